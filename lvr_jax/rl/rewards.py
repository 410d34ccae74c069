"""Rule-based rewards for reasoning replies in two styles, "longrl" (the default) and "lenient".

Each style scores a reply 0/1 on format and 0/1 on accuracy; the reward is `accuracy_weight *
accuracy + format_weight * format` (0.9 / 0.1 by default, as Long-RL's r1v with format_weight 0.1).
Every public function accepts any reply and ground truth (str, None, bytes, numbers, other objects)
and never raises: what cannot be parsed or graded scores 0. Only an unknown style name raises
(ValueError, `check_reward_style`): a misspelt config fails at start-up, it never scores 0 silently.
Bytes are decoded as UTF-8 with replacement; a number given as ground truth is used as its `str`.

Style "longrl" is exactly Long-RL's rule (NVlabs/Long-RL examples/reward_function/r1v.py, on the
ground truth its verl/utils/dataset.py builds):
- Format: 1.0 iff the whole reply as is (surrounding whitespace fails) fully matches
  `<think>.*?</think>\\s*<answer>.*?</answer>` with DOTALL: it starts with `<think>`, ends with
  `</answer>`, and a `</think>` is followed, after only whitespace, by an `<answer>` that ends before
  that final `</answer>`; the two `.*?` may hold any text, tags included.
- Ground truth: the stored answer; if it contains "<answer>", the content of the FIRST
  `<answer>(.*?)</answer>` match in it (no DOTALL: no newline inside). A stored answer with
  "<answer>" but no such match makes Long-RL's dataset raise; here it scores 0.
- Accuracy: remove every "\\n" and " " from the reply and take the content of the FIRST
  `<answer>(.*?)</answer>` match, stripped, or else the WHOLE original reply, stripped; 1.0 iff
  `mathruler.grader.grade_answer(given, truth.strip())` (mathruler 0.1.0 itself); an exception
  scores 0. grade_answer is case-insensitive and MATH-normalising ("12.0" = "12", "0.75" = "3/4",
  "\\boxed{B}" = "B", "(B)" = "B", "12 cm" = "12"), else asks sympy whether the difference is 0; it
  rejects "B.", "Option B", "**B**", "three" for 3, "12 km" for 12 and unreduced fractions.
- The regexes run as equivalent linear scans (Python's backtracking on them is quadratic at worst);
  the tests check the scans against `re`. sympy can run forever on short inputs ("9**9**9",
  "999999999!" hang Long-RL's reward), so grade_answer runs with a time limit in a helper process
  (`lvr_jax.rl.grading`): a call past `grading.GRADE_TIMEOUT_S` scores 0.

Style "lenient" (forgiving; every parse linear in the text length, so huge replies are cheap):
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
  Otherwise the two strings are compared after dropping the same decoration (the prefix only when
  a colon or "is" ends it: "Option trading" stays as it is), lower-casing, collapsing whitespace
  and dropping a trailing period. An empty ground truth matches nothing.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from lvr_jax.rl.grading import mathruler_grade

REWARD_STYLES = ("longrl", "lenient")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
NUMERIC_RTOL = 1e-4
NUMERIC_ATOL = 1e-8


def check_reward_style(style: Any) -> str:
    """`style` if it is one of `REWARD_STYLES`, else ValueError naming the valid styles."""
    if isinstance(style, str) and style in REWARD_STYLES:
        return style
    raise ValueError(f"unknown reward style {style!r}; valid styles: {', '.join(REWARD_STYLES)}")


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


# ---- style "longrl" ---------------------------------------------------------------------------

def _first_answer_span(s: str) -> str | None:
    """Group 1 of `re.search(r"<answer>(.*?)</answer>", s)` (no DOTALL), linearly: the first "<answer>"
    whose next "</answer>" comes before any newline (none can start before that newline)."""
    start = s.find(ANSWER_OPEN)
    while start >= 0:
        begin = start + len(ANSWER_OPEN)
        end = s.find(ANSWER_CLOSE, begin)
        if end < 0:
            return None
        newline = s.find("\n", begin, end)
        if newline < 0:
            return s[begin:end]
        start = s.find(ANSWER_OPEN, newline + 1)
    return None


@_never_raise(0.0)
def _format_longrl(text: Any) -> float:
    """`re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", text, re.DOTALL)`, linearly:
    `<think>` at 0, `</answer>` at the end, and an `<answer>` at j (ending by the start of that
    `</answer>`) after a whitespace run [w, j) right after a `</think>` that follows the `<think>`."""
    s = _as_text(text)
    if s is None or not (s.startswith(THINK_OPEN) and s.endswith(ANSWER_CLOSE)):
        return 0.0
    last_open = len(s) - len(ANSWER_CLOSE) - len(ANSWER_OPEN)    # latest start of the <answer>
    min_close = len(THINK_OPEN)                                  # earliest start of the </think>
    j = s.find(ANSWER_OPEN, 0, last_open + len(ANSWER_OPEN))
    while 0 <= j <= last_open:
        w = j
        while w > 0 and s[w - 1].isspace():
            w -= 1
        if w - len(THINK_CLOSE) >= min_close and s.startswith(THINK_CLOSE, w - len(THINK_CLOSE)):
            return 1.0
        j = s.find(ANSWER_OPEN, j + 1, last_open + len(ANSWER_OPEN))
    return 0.0


@_never_raise(None)
def _extract_longrl(text: Any) -> str | None:
    """What Long-RL grades: the first answer span of the reply with "\\n" and " " removed, stripped,
    or else the whole reply stripped; None when the reply is not text."""
    s = _as_text(text)
    if s is None:
        return None
    span = _first_answer_span(s.replace("\n", "").replace(" ", ""))
    return span.strip() if span is not None else s.strip()


def _real_number(x: Any) -> bool:
    """An int or float, Python's or NumPy's (np.int64(7) -> "7"), not a bool."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _truth_longrl(answer: Any) -> str | None:
    """Long-RL's ground truth from the stored answer (first `<answer>` span when tagged), stripped."""
    s = _as_text(answer)
    if s is None:
        return str(answer) if _real_number(answer) else None
    s = _first_answer_span(s) if ANSWER_OPEN in s else s
    return None if s is None else s.strip()


@_never_raise(0.0)
def _accuracy_longrl(text: Any, answer: Any) -> float:
    given, truth = _extract_longrl.__wrapped__(text), _truth_longrl(answer)
    return 0.0 if given is None or truth is None else float(mathruler_grade(given, truth))


# ---- style "lenient" --------------------------------------------------------------------------

_PREFIX = re.compile(
    r"(?:the\s+)?(?:final\s+|correct\s+|best\s+)?(?:answer|option|choice)\b(?:\s+is)?\s*[:：]?\s*",
    re.IGNORECASE,
)
# For free text: the prefix only when a colon or "is" ends it ("Option trading" is an answer)
_TEXT_PREFIX = re.compile(
    r"(?:the\s+)?(?:final\s+|correct\s+|best\s+)?(?:answer|option|choice)(?:\s+is\b|\s*[:：])\s*",
    re.IGNORECASE,
)
# The whole content is one letter, optionally bracketed / followed by a punctuation mark.
_LONE_LETTER = re.compile(r"[(\[]?([A-Za-z])[)\]]?\s*[.:)]?")
# "B) text", "B. text", "(B) text", "B: text": an upper-case letter closed by punctuation, then text.
_LETTER_WITH_TEXT = re.compile(r"(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.:)])\s")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")
_NUMBER_WORDS = {w: float(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({w: float(10 * i) for i, w in enumerate(
    "thirty forty fifty sixty seventy eighty ninety".split(), start=3)})
_UNIT_TAIL = re.compile(r"[^\W\d_]+(?:[\s/.\-^²³][^\W\d_]*)*\.?", re.UNICODE)


@_never_raise(0.0)
def _format_lenient(text: Any) -> float:
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


def _strip_decoration(s: str, prefix: re.Pattern = _PREFIX) -> str:
    """Drop markdown emphasis / quotes, a `\\boxed{...}` wrapper and an "Answer:"-style prefix."""
    s = s.strip().strip("*_`'\"").strip()
    if s.startswith("\\boxed{") and s.endswith("}"):
        s = s[len("\\boxed{"):-1].strip()
    m = prefix.match(s)
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
def _extract_lenient(text: Any) -> str | None:
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
        return str(answer) if _real_number(answer) else None
    if ANSWER_CLOSE in s:
        return _extract_lenient(s)
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
def _accuracy_lenient(text: Any, answer: Any) -> float:
    """1.0 iff the reply's extracted answer matches `answer` (letter, number or normalised text)."""
    truth = _reference_answer(answer)
    pred = _extract_lenient(text)
    if not truth or pred is None:
        return 0.0
    if len(truth) == 1 and truth.isalpha():
        return 1.0 if pred.upper() == truth.upper() else 0.0
    t_num, p_num = parse_number(truth), parse_number(pred)
    if t_num is not None and p_num is not None:
        return 1.0 if math.isclose(p_num, t_num, rel_tol=NUMERIC_RTOL, abs_tol=NUMERIC_ATOL) else 0.0
    t_text, p_text = (_normalize_text(_strip_decoration(x, _TEXT_PREFIX)) for x in (truth, pred))
    return 1.0 if t_text and p_text == t_text else 0.0


_FORMAT = {"longrl": _format_longrl, "lenient": _format_lenient}
_ACCURACY = {"longrl": _accuracy_longrl, "lenient": _accuracy_lenient}
_EXTRACT = {"longrl": _extract_longrl, "lenient": _extract_lenient}


# ---- public API -------------------------------------------------------------------------------

def format_reward(text: Any, style: str = "longrl") -> float:
    """1.0 iff `text` has the reasoning format of `style` (see the module docstring), else 0.0."""
    return _FORMAT[check_reward_style(style)](text)


def accuracy_reward(text: Any, answer: Any, style: str = "longrl") -> float:
    """1.0 iff the reply's answer matches `answer` (the record's answer as stored: "<answer>B</answer>",
    "B", free text or a number) under `style`, else 0.0."""
    return _ACCURACY[check_reward_style(style)](text, answer)


def extract_answer(text: Any, style: str = "lenient") -> str | None:
    """The answer `style` grades in the reply.

    "lenient" (the default, a readable prediction): the content of the last `<answer>` pair,
    stripped, reduced to the option letter when it is one; None without a complete pair.
    "longrl": the first `<answer>` span of the reply with "\\n" and " " removed, stripped, or the whole
    reply stripped when there is no span; None only for a reply that is not text.
    """
    return _EXTRACT[check_reward_style(style)](text)


def combined_reward(text: Any, answer: Any, accuracy_weight: float = 0.9, format_weight: float = 0.1,
                    *, style: str = "longrl") -> float:
    """`accuracy_weight * accuracy_reward + format_weight * format_reward` under `style`."""
    style = check_reward_style(style)
    try:
        return float(accuracy_weight * _ACCURACY[style](text, answer)
                     + format_weight * _FORMAT[style](text))
    except Exception:  # noqa: BLE001 - e.g. weights that are not numbers
        return 0.0


def batch_rewards(texts: Sequence[Any], answers: Sequence[Any] | Any, *, style: str = "longrl",
                  accuracy_weight: float = 0.9, format_weight: float = 0.1) -> dict[str, np.ndarray]:
    """Score a batch under `style`; returns float32 arrays `reward`, `accuracy`, `format`, each
    `[len(texts)]`.

    `answers` is one answer per text, one per group of consecutive texts (len(texts) a multiple of
    len(answers): each answer repeated G = len(texts) // len(answers) times, the GRPO layout), or a
    single string for all. Only a length mismatch or an unknown style raises (ValueError); the
    strings never do.
    """
    style = check_reward_style(style)
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
    acc = np.array([_ACCURACY[style](t, a) for t, a in zip(texts, answers)], np.float32)
    fmt = np.array([_FORMAT[style](t) for t in texts], np.float32)
    reward = (accuracy_weight * acc + format_weight * fmt).astype(np.float32)
    return {"reward": reward, "accuracy": acc, "format": fmt}
