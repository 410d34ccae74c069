"""Rule-based rewards for reasoning answers: format, accuracy (option letter or number), combined.

Every public function here accepts any input (any string, `None`, bytes, other objects) and never
raises: a reply that cannot be parsed simply scores 0. All parsing is linear in the text length
(`str.find` / anchored regexes without nested quantifiers), so huge replies are cheap.

Rules
- Format: the stripped reply is exactly `<think>R</think>` then `<answer>A</answer>`, with only
  whitespace before, between and after; each of the four tags occurs exactly once (so no nested,
  repeated or stray tags); R and A may be any other text, including empty. Tags are case-sensitive.
- Answer extraction: the content of the LAST complete `<answer>...</answer>` pair, stripped. When it
  looks like a multiple-choice option it is reduced to the upper-case letter: "B", "b", "B.", "(B)",
  "[B]", "B) text", "B. text", "B: text", "**B**", "Answer: B", "The answer is (B)", "Option B".
  A reply without a complete pair has no answer (accuracy 0, even if the text names a letter).
- Accuracy: the ground truth may be "<answer>B</answer>" or a bare "B" / "42". If it is a letter,
  the prediction must reduce to the same letter (case-insensitive). Otherwise, if both sides parse as
  numbers they are compared with relative tolerance 1e-4 (absolute 1e-8 near zero); number parsing
  accepts a sign, thousands commas ("1,234"), decimals, exponents, simple fractions ("3/4"), a
  leading currency sign, a trailing "%" or unit words ("12 km", "3.5 seconds"; the unit is ignored,
  a second number is not allowed) and English number words zero..twenty and the tens ("three",
  "forty"); markdown emphasis, a `\\boxed{}` wrapper and an "Answer:" prefix are dropped first.
  Otherwise the two strings are compared after lower-casing, collapsing whitespace and
  dropping a trailing period.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
NUMERIC_RTOL = 1e-4
NUMERIC_ATOL = 1e-8

_PREFIX = re.compile(
    r"(?:the\s+)?(?:final\s+|correct\s+|best\s+)?(?:answer|option|choice)\b(?:\s+is)?\s*[:：]?\s*",
    re.IGNORECASE,
)
# The whole content is one letter, optionally bracketed / followed by a punctuation mark.
_LONE_LETTER = re.compile(r"[(\[]?([A-Za-z])[)\]]?\s*[.:)]?")
# "B) text", "B. text", "(B) text", "B: text": an upper-case letter closed by punctuation, then text.
_LETTER_WITH_TEXT = re.compile(r"(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.:)])\s")
_NUMBER = re.compile(
    r"[-+]?(?:\d+(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?"
)
_NUMBER_WORDS = {
    w: float(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORDS.update({w: float(10 * i) for i, w in enumerate(
    "thirty forty fifty sixty seventy eighty ninety".split(), start=3)})
_UNIT_TAIL = re.compile(r"[^\W\d_]+(?:[\s/.\-^²³][^\W\d_]*)*\.?", re.UNICODE)


def _never_raise(default):
    """Decorator: return `default` instead of propagating any exception (last line of defence)."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception:  # noqa: BLE001 - rewards must never crash a training step
                return default
        return inner
    return wrap


def _as_text(x: Any) -> str | None:
    """`str` as is, bytes decoded leniently, anything else None."""
    if isinstance(x, str):
        return x
    if isinstance(x, (bytes, bytearray)):
        return bytes(x).decode("utf-8", errors="replace")
    return None


@_never_raise(0.0)
def format_reward(text: Any) -> float:
    """1.0 iff `text` is `<think>...</think>` then `<answer>...</answer>` with only whitespace around."""
    s = _as_text(text)
    if s is None:
        return 0.0
    s = s.strip()
    if not (s.startswith(THINK_OPEN) and s.endswith(ANSWER_CLOSE)):
        return 0.0
    for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE):
        if s.count(tag) != 1:
            return 0.0
    think_end = s.find(THINK_CLOSE)
    answer_start = s.find(ANSWER_OPEN)
    if answer_start < think_end:
        return 0.0
    between = s[think_end + len(THINK_CLOSE):answer_start]
    return 1.0 if between.strip() == "" else 0.0


def _last_answer_span(s: str) -> str | None:
    """Content of the last complete `<answer>...</answer>` pair (unstripped), or None."""
    end = s.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = s.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return s[start + len(ANSWER_OPEN):end]


def _strip_decoration(s: str) -> str:
    """Drop markdown emphasis / quotes, a `\\boxed{...}` wrapper and an "Answer:"-style prefix."""
    s = s.strip().strip("*_`'\"").strip()
    if s.startswith("\\boxed{") and s.endswith("}"):
        s = s[len("\\boxed{"):-1].strip()
    m = _PREFIX.match(s)
    if m and m.end() < len(s):
        s = s[m.end():].strip().strip("*_`'\"").strip()
    return s


def choice_letter(content: Any) -> str | None:
    """The option letter (upper case) if `content` looks like a multiple-choice pick, else None."""
    s = _as_text(content)
    if s is None:
        return None
    s = _strip_decoration(s)
    m = _LONE_LETTER.fullmatch(s)
    if m:
        return m.group(1).upper()
    m = _LETTER_WITH_TEXT.match(s)
    if m:
        return next(g for g in m.groups() if g)
    return None


@_never_raise(None)
def extract_answer(text: Any) -> str | None:
    """Content of the last `<answer>` tag, stripped; reduced to the option letter when it is one.

    Returns None when there is no complete `<answer>...</answer>` pair.
    """
    s = _as_text(text)
    if s is None:
        return None
    content = _last_answer_span(s)
    if content is None:
        return None
    return choice_letter(content) or content.strip()


def _reference_answer(answer: Any) -> str | None:
    """Ground truth as a letter or stripped string; accepts tagged or bare answers."""
    s = _as_text(answer)
    if s is None:
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            return repr(answer)
        return None
    if ANSWER_CLOSE in s:
        return extract_answer(s)
    s = s.strip()
    return (choice_letter(s) or s) if s else None


def parse_number(text: Any) -> float | None:
    """A float from a numeric answer ("1,234", "-3.5e2", "3/4", "$12", "50%", "12 km", "three")."""
    s = _as_text(text)
    if s is None:
        return None
    s = _strip_decoration(s).rstrip(".").strip().lower()
    if not s or len(s) > 200:
        return None
    if s in _NUMBER_WORDS:
        return _NUMBER_WORDS[s]
    s = s.lstrip("$€£¥").strip()
    if s.count("/") == 1:
        num, den = (parse_number(p) for p in s.split("/"))
        if num is not None and den is not None and den != 0:
            return num / den
    m = _NUMBER.match(s)
    if not m or not any(ch.isdigit() for ch in m.group(0)):
        return None
    rest = s[m.end():].strip()
    if rest and rest not in ("%", "°") and not _UNIT_TAIL.fullmatch(rest):
        return None
    try:
        value = float(m.group(0).replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _normalize_text(s: str) -> str:
    """Lower-case, collapse whitespace, drop a trailing period."""
    return " ".join(s.lower().split()).rstrip(".").strip()


@_never_raise(0.0)
def accuracy_reward(text: Any, answer: Any) -> float:
    """1.0 iff the reply's extracted answer matches `answer` (letter, number or normalised text)."""
    truth = _reference_answer(answer)
    pred = extract_answer(text)
    if not truth or pred is None:
        return 0.0
    if len(truth) == 1 and truth.isalpha():
        return 1.0 if pred.upper() == truth.upper() else 0.0
    t_num, p_num = parse_number(truth), parse_number(pred)
    if t_num is not None and p_num is not None:
        return 1.0 if math.isclose(p_num, t_num, rel_tol=NUMERIC_RTOL, abs_tol=NUMERIC_ATOL) else 0.0
    t_text, p_text = _normalize_text(_strip_decoration(truth)), _normalize_text(_strip_decoration(pred))
    return 1.0 if t_text and p_text == t_text else 0.0


@_never_raise(0.0)
def combined_reward(text: Any, answer: Any, accuracy_weight: float = 0.9,
                    format_weight: float = 0.1) -> float:
    """`accuracy_weight * accuracy_reward + format_weight * format_reward`."""
    return float(accuracy_weight * accuracy_reward(text, answer) + format_weight * format_reward(text))


def batch_rewards(texts: Sequence[Any], answers: Sequence[Any] | Any, accuracy_weight: float = 0.9,
                  format_weight: float = 0.1) -> dict[str, np.ndarray]:
    """Score a batch; returns float32 arrays `reward`, `accuracy`, `format`, each `[len(texts)]`.

    `answers` is one answer per text, one per group of consecutive texts (len(texts) a multiple of
    len(answers): each answer repeated G = len(texts) // len(answers) times, the GRPO layout), or a
    single string for all. Only a length mismatch raises (ValueError); the strings never do.
    """
    texts = list(texts)
    if isinstance(answers, (str, bytes)) or answers is None:
        answers = [answers] * len(texts)
    answers = list(answers)
    if len(answers) != len(texts):
        if not answers or len(texts) % len(answers):
            raise ValueError(f"batch_rewards: {len(texts)} texts but {len(answers)} answers; need one "
                             "answer per text or per group of consecutive texts")
        group = len(texts) // len(answers)
        answers = [a for a in answers for _ in range(group)]
    acc = np.array([accuracy_reward(t, a) for t, a in zip(texts, answers)], np.float32)
    fmt = np.array([format_reward(t) for t in texts], np.float32)
    reward = (accuracy_weight * acc + format_weight * fmt).astype(np.float32)
    return {"reward": reward, "accuracy": acc, "format": fmt}
