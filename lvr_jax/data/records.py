"""Video QA records (JSONL or parquet): reading, validation, and the video path checks.

Two record forms are read (one JSON object per line, or one parquet row, same fields) and
normalised into `Record`:

* LongVideo-Reason: `{"problem_id", "videos": "rel/path.mp4", "problem": "question with options",
  "problem_type": category, "reasoning": "...", "answer": "<answer>B</answer>"}`; `problem` is
  kept exactly as stored (Long-RL feeds it to its template unstripped);
* benchmark: `{"question", "options": [...], "answer": "B" or an index, "category", "videos" or
  "video", optional "problem_id" / "id", optional "reasoning"}`; without `options` the question
  is open-ended.

Answers: `Record.answer` is the answer as the reward grades it: as stored for the
LongVideo-Reason form ("<answer>B</answer>", "<answer>3</answer>", "a red ball"), the option letter
for the benchmark form when it gives a letter, an index or an option's line ("B. red"), the text
as given otherwise. A NaN answer (JSON `NaN`, a missing value) is a missing answer.
`Record.letter` is the option letter, or "" for an open-ended answer (a number, free text: anything
`prompts.answer_letter` cannot read as a letter). A letter must be one of the listed options
when the question lists them (option lines "A. ...", or `options`); a benchmark question without
options (in `options` or as lines of the question) takes open-ended answers only.

Errors name the record as `file:line (problem_id ...)` (parquet: `file:row`, rows counted from 1
like lines). A line that is not UTF-8 is a bad record like any other; the rest of the file still
loads. Duplicate problem_ids are kept as distinct records: each later one is renamed
`<id>@<file>:<line>` (with `#2`, `#3`, ... if even that is taken) and a warning names both places.
`videos` is a path relative to the dataset root; absolute paths, `..` components and symlinks
that leave the root are rejected. `on_error="skip"` counts and logs bad records in a `SkipLog`
instead of raising.

Kept free of grain and jax imports: records load anywhere (launch tools, data workers).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
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
    question: str       # `problem` as stored, or the benchmark question + its lettered options
    answer: str         # the answer as the reward grades it (see the module doc)
    letter: str         # the option letter; "" for an open-ended answer
    category: str
    reasoning: str      # CoT text ("" when absent)
    source: str         # "file.jsonl:line" ("file.parquet:row")
    index: int = -1     # position in the record list the pipeline was built from

    @property
    def open_ended(self) -> bool:
        return not self.letter

    @property
    def reply_answer(self) -> str:
        """What the SFT reply's `<answer>` holds: the letter, or the answer's text."""
        return self.letter or prompts.answer_text(self.answer)


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


# an option's letter with its text, as `format_options` writes options: "B. red", "(B) red", "B: red"
_LETTER_AND_TEXT = re.compile(r"\s*(?:\(([A-Z])\)|([A-Z])[.):])\s+\S")


def _answer(raw: Any, letters: list[str], source: str, pid: str | None, *,
            benchmark: bool) -> tuple[str, str]:
    """(answer as the reward grades it, option letter or "") of a record's raw `answer`."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise RecordError(source, pid, "missing field 'answer'")
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise RecordError(source, pid, f"field 'answer' must be a string or a number, got "
                                       f"{type(raw).__name__}")
    if isinstance(raw, float) and not math.isfinite(raw):   # JSON's NaN: a missing value
        raise RecordError(source, pid, f"missing field 'answer' (it is {raw})")
    if benchmark and isinstance(raw, int) and letters:      # an option index
        if not 0 <= raw < len(letters):
            raise RecordError(source, pid, f"answer index {raw} out of range")
        return letters[raw], letters[raw]
    stored = raw if isinstance(raw, str) else str(raw)
    try:
        letter = prompts.answer_letter(stored)
    except ValueError:
        letter = ""
        chosen = _LETTER_AND_TEXT.match(stored) if benchmark and letters else None
        if chosen and (chosen.group(1) or chosen.group(2)) in letters:   # an option's line
            letter = chosen.group(1) or chosen.group(2)
    if not letter:                                    # open-ended: a number, free text
        if not prompts.answer_text(stored):
            raise RecordError(source, pid, f"answer {stored!r} is empty")
        return stored, ""
    if letters and letter not in letters:
        raise RecordError(source, pid, f"answer {letter!r} is not one of the options {letters}")
    if benchmark:
        if not letters:
            raise RecordError(source, pid, f"answer {stored!r} is an option letter but the "
                                           f"question lists no options")
        return letter, letter
    return stored, letter


def parse_record(obj: Any, source: str, *, need_reasoning: bool = False) -> Record:
    """Validate one JSON object / parquet row (either form) into a `Record`; RecordError names
    it."""
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
        category = obj.get("problem_type") or obj.get("category") or "unknown"
        letters = _option_letters(question)
        benchmark = False
    elif "question" in obj:                    # benchmark form (options: multiple choice)
        question = obj.get("question")
        options = obj.get("options")
        if not isinstance(question, str) or not question.strip():
            raise RecordError(source, pid, "field 'question' must be a non-empty string")
        if options is None or (isinstance(options, list) and not options):
            options = []
        elif not isinstance(options, list) or len(options) < 2:
            raise RecordError(source, pid, "field 'options' must be a list of at least 2 options")
        try:
            question = prompts.format_question(question, [str(o) for o in options])
        except ValueError as e:
            raise RecordError(source, pid, str(e)) from e
        pid = pid if pid is not None else source
        category = obj.get("category") or obj.get("problem_type") or "unknown"
        letters = list(prompts.LETTERS[:len(options)]) if options else _option_letters(question)
        benchmark = True
    else:
        raise RecordError(source, pid, "missing field 'problem' (or 'question' + 'options')")
    video = _video_field(obj, source, pid)
    answer, letter = _answer(obj.get("answer"), letters, source, pid, benchmark=benchmark)
    reasoning = obj.get("reasoning") or ""
    if not isinstance(reasoning, str):
        raise RecordError(source, pid, "field 'reasoning' must be a string")
    if need_reasoning and not reasoning.strip():
        raise RecordError(source, pid, "missing field 'reasoning' (needed for SFT)")
    rec = Record(problem_id=pid, video=video, question=question, answer=answer, letter=letter,
                 category=str(category), reasoning=reasoning, source=source)
    if need_reasoning and reasoning.strip():   # RL and evaluation never read it: no reason to drop
        try:
            prompts.reasoning_response(reasoning, rec.reply_answer, open_ended=rec.open_ended)
        except ValueError as e:
            raise RecordError(source, pid, f"field 'reasoning': {e}") from e
    return rec


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


PARQUET_SUFFIXES = (".parquet", ".pq")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(source, JSON value or RecordError) per non-blank line. Bytes are decoded line by line, so a
    line that is not UTF-8 (or not JSON) is one bad record and the rest of the file still reads.
    Lines end at \n, \r\n or \r (as text mode reads them); a UTF-8 BOM is allowed."""
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        source = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            bad = e.object[e.start]
            yield source, RecordError(source, None, f"not valid UTF-8 (byte 0x{bad:02x} at byte "
                                                    f"{e.start + 1} of the line)")
            continue
        if not line.strip():
            continue
        try:
            yield source, json.loads(line)
        except json.JSONDecodeError as e:
            yield source, RecordError(source, None, f"invalid JSON ({e.msg})")


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(source "file:row", row dict without its null fields) per row (rows counted from 1). A file
    that cannot be read at all raises RecordError naming it, whatever on_error says."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise RecordError(str(path), None, f"cannot read the parquet file ({e})") from e
    for i, row in enumerate(rows, 1):
        yield f"{path}:{i}", {k: v for k, v in row.items() if v is not None}


def load_records(paths: str | os.PathLike | Iterable[str | os.PathLike], *, on_error: str = "raise",
                 need_reasoning: bool = False, skips: SkipLog | None = None) -> list[Record]:
    """Read and validate JSONL files (blank lines ignored) and parquet files (`.parquet`, `.pq`:
    the same fields as columns). Bad records (undecodable or invalid lines included) raise
    `RecordError` (`on_error="raise"`) or are counted in `skips` and logged (`on_error="skip"`).
    A duplicate problem_id is logged with both places and the later record kept as
    `<id>@<file>:<line>`. Records get `index` = position in the returned list."""
    check_on_error(on_error)
    skips = skips if skips is not None else SkipLog()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Record] = []
    seen: dict[str, str] = {}
    renamed = 0
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {path}")
        rows = _parquet_rows(path) if path.suffix.lower() in PARQUET_SUFFIXES else _jsonl_rows(path)
        for source, obj in rows:
            try:
                if isinstance(obj, RecordError):
                    raise obj
                rec = parse_record(obj, source, need_reasoning=need_reasoning)
            except RecordError as e:
                if on_error == "raise":
                    raise
                skips.add(str(e))
                continue
            if rec.problem_id in seen:
                pid, k = f"{rec.problem_id}@{source}", 2
                while pid in seen:
                    pid, k = f"{rec.problem_id}@{source}#{k}", k + 1
                log.warning("duplicate problem_id %r at %s (first at %s): kept as a distinct record "
                            "with problem_id %r", rec.problem_id, source, seen[rec.problem_id], pid)
                rec = dataclasses.replace(rec, problem_id=pid)
                renamed += 1
            seen[rec.problem_id] = source
            out.append(dataclasses.replace(rec, index=len(out)))
    if renamed:
        log.warning("%d duplicate problem_ids renamed <id>@<file>:<line>", renamed)
    if skips.count:
        log.warning("loaded %d records, skipped %d", len(out), skips.count)
    return out
