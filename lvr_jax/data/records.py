"""JSONL video QA records: reading, validation, and the video path checks.

Two record forms are read (one JSON object per line) and normalised into `Record`:

* LongVideo-Reason: `{"problem_id", "videos": "rel/path.mp4", "problem": "question with options",
  "problem_type": category, "reasoning": "...", "answer": "<answer>B</answer>"}`;
* multiple-choice benchmark: `{"question", "options": [...], "answer": "B", "category", "videos"
  or "video", optional "problem_id" / "id", optional "reasoning"}`.

Errors name the record as `file:line (problem_id ...)`. `videos` is a path relative to the
dataset root; absolute paths, `..` components and symlinks that leave the root are rejected.
`on_error="skip"` counts and logs bad records in a `SkipLog` instead of raising.

Kept free of grain and jax imports: records load anywhere (launch tools, data workers).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from lvr_jax.data import prompts

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")


class RecordError(ValueError):
    """A record that cannot be used; the message names it (file:line and problem_id)."""

    def __init__(self, source: str, problem_id: str | None, reason: str):
        self.source, self.problem_id, self.reason = source, problem_id, reason
        pid = f" (problem_id {problem_id!r})" if problem_id is not None else ""
        super().__init__(f"{source}{pid}: {reason}")

    def __reduce__(self):  # keep the fields across worker processes
        return type(self), (self.source, self.problem_id, self.reason)


@dataclasses.dataclass(frozen=True)
class Record:
    """One normalised example."""
    problem_id: str
    video: str          # path relative to the dataset root
    question: str       # question text including its lettered options
    answer: str         # option letter
    category: str
    reasoning: str      # CoT text ("" when absent)
    source: str         # "file.jsonl:line"
    index: int = -1     # position in the record list the pipeline was built from


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s", re.M)


def _option_letters(question: str) -> list[str]:
    """Letters of the option lines ("A. ...", "(B) ...") when they run A, B, C, ...; else []."""
    found = list(dict.fromkeys(_OPTION_LINE.findall(question)))
    return found if found and found == list(prompts.LETTERS[:len(found)]) else []


def _field(obj: dict, names: Sequence[str]):
    for n in names:
        if n in obj and obj[n] is not None and obj[n] != "":
            return obj[n]
    return None


def _video_field(obj: dict, source: str, pid: str | None) -> str:
    v = _field(obj, ("videos", "video", "video_path"))
    if v is None:
        raise RecordError(source, pid, "missing field 'videos'")
    if isinstance(v, list):
        if len(v) != 1 or not isinstance(v[0], str):
            raise RecordError(source, pid, f"'videos' must be one path, got {v!r}")
        v = v[0]
    if not isinstance(v, str):
        raise RecordError(source, pid, f"'videos' must be a string path, got {type(v).__name__}")
    check_relative_path(v, source, pid)
    return v


def check_relative_path(rel: str, source: str = "?", problem_id: str | None = None) -> None:
    """Reject paths that could leave the dataset root: absolute, drive-letter, `..`, empty."""
    if not rel.strip() or "\x00" in rel:
        raise RecordError(source, problem_id, f"invalid video path {rel!r}")
    if (PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute()
            or PureWindowsPath(rel).drive or rel.startswith("~")):
        raise RecordError(source, problem_id,
                          f"video path {rel!r} is absolute; it must be relative to the dataset root")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise RecordError(source, problem_id, f"video path {rel!r} escapes the dataset root ('..')")


def resolve_video(root, rel: str, source: str = "?", problem_id: str | None = None) -> Path:
    """`root / rel`, after checking that it stays under `root` once symlinks are resolved."""
    check_relative_path(rel, source, problem_id)
    root = Path(root).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise RecordError(source, problem_id,
                          f"video path {rel!r} resolves to {path}, outside the dataset root {root}")
    return path


def parse_record(obj: Any, source: str, *, need_reasoning: bool = False) -> Record:
    """Validate one JSON object (either form) into a `Record`; RecordError names it."""
    if not isinstance(obj, dict):
        raise RecordError(source, None, f"a record must be a JSON object, got {type(obj).__name__}")
    pid = _field(obj, ("problem_id", "question_id", "id", "uid"))
    pid = None if pid is None else str(pid)
    if "problem" in obj:                       # LongVideo-Reason form
        if pid is None:
            raise RecordError(source, None, "missing field 'problem_id'")
        question = obj.get("problem")
        if not isinstance(question, str) or not question.strip():
            raise RecordError(source, pid, "field 'problem' must be a non-empty string")
        question = question.strip()
        category = obj.get("problem_type") or obj.get("category") or "unknown"
        letters = _option_letters(question)
    elif "question" in obj:                    # multiple-choice benchmark form
        question = obj.get("question")
        options = obj.get("options")
        if not isinstance(question, str) or not question.strip():
            raise RecordError(source, pid, "field 'question' must be a non-empty string")
        if not isinstance(options, list) or len(options) < 2:
            raise RecordError(source, pid, "field 'options' must be a list of at least 2 options")
        try:
            question = prompts.format_question(question, [str(o) for o in options])
        except ValueError as e:
            raise RecordError(source, pid, str(e)) from e
        pid = pid if pid is not None else source
        category = obj.get("category") or obj.get("problem_type") or "unknown"
        letters = list(prompts.LETTERS[:len(options)])
    else:
        raise RecordError(source, pid, "missing field 'problem' (or 'question' + 'options')")
    video = _video_field(obj, source, pid)
    raw_answer = obj.get("answer")
    if raw_answer is None or raw_answer == "":
        raise RecordError(source, pid, "missing field 'answer'")
    if isinstance(raw_answer, int) and not isinstance(raw_answer, bool) and letters:
        if not 0 <= raw_answer < len(letters):
            raise RecordError(source, pid, f"answer index {raw_answer} out of range")
        letter = letters[raw_answer]
    else:
        try:
            letter = prompts.answer_letter(str(raw_answer))
        except ValueError as e:
            raise RecordError(source, pid, str(e)) from e
    if letters and letter not in letters:
        raise RecordError(source, pid, f"answer {letter!r} is not one of the options {letters}")
    reasoning = obj.get("reasoning") or ""
    if not isinstance(reasoning, str):
        raise RecordError(source, pid, "field 'reasoning' must be a string")
    if need_reasoning and not reasoning.strip():
        raise RecordError(source, pid, "missing field 'reasoning' (needed for SFT)")
    if reasoning.strip():
        try:
            prompts.reasoning_response(reasoning, letter)
        except ValueError as e:
            raise RecordError(source, pid, str(e)) from e
    return Record(problem_id=pid, video=video, question=question, answer=letter,
                  category=str(category), reasoning=reasoning, source=source)


class SkipLog:
    """Counts and logs skipped records (`on_error="skip"`); keeps the last few reasons."""

    def __init__(self, keep: int = 50):
        self.count = 0
        self.recent: collections.deque[str] = collections.deque(maxlen=keep)

    def add(self, message: str) -> None:
        self.count += 1
        self.recent.append(message)
        log.warning("skipping record (%d skipped so far): %s", self.count, message)


def check_on_error(on_error: str) -> None:
    """ValueError unless `on_error` is one of ON_ERROR."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def load_records(paths: str | os.PathLike | Iterable[str | os.PathLike], *, on_error: str = "raise",
                 need_reasoning: bool = False, skips: SkipLog | None = None) -> list[Record]:
    """Read and validate JSONL files (blank lines ignored). Bad lines raise `RecordError`
    (`on_error="raise"`) or are counted in `skips` and logged (`on_error="skip"`). Duplicate
    problem_ids are an error. Records get `index` = position in the returned list."""
    check_on_error(on_error)
    skips = skips if skips is not None else SkipLog()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Record] = []
    seen: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {path}")
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                source = f"{path}:{lineno}"
                try:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise RecordError(source, None, f"invalid JSON ({e.msg})") from e
                    rec = parse_record(obj, source, need_reasoning=need_reasoning)
                    if rec.problem_id in seen:
                        raise RecordError(source, rec.problem_id,
                                          f"duplicate problem_id (first at {seen[rec.problem_id]})")
                except RecordError as e:
                    if on_error == "raise":
                        raise
                    skips.add(str(e))
                    continue
                seen[rec.problem_id] = source
                out.append(dataclasses.replace(rec, index=len(out)))
    if skips.count:
        log.warning("loaded %d records, skipped %d", len(out), skips.count)
    return out
