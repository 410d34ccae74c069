"""Reward functions behind one interface, chosen by `rl.reward_fn`, and the guard that keeps a
failing one from taking the run down.

Interface: `fn(replies: list[str], records: list[dict]) -> list[float] | dict[str, list[float]]`,
one value per reply. A list (or 1-D array) is the reward. A dict holds "reward" and optionally
"accuracy" and "format" (other keys are ignored); "accuracy" defaults to the reward, "format" to
the `rl.reward_style` format rule on the reply (`rewards.format_reward`). Values are real numbers
(bool, int, float, numpy scalars); the trainer does not clip them.

The records (`batch_records`): row r of the trainer's rows (this process's prompts, each repeated
G times, prompt-major: row r is sample r % G of prompt r // G) is a new dict holding exactly
  problem_id  str   the record's id (`Record.problem_id`)
  answer      str   the answer as stored (`Record.answer`: "<answer>B</answer>", "B", "3", free text)
  letter      str   the option letter, "" for an open-ended answer (`Record.letter`, read from answer)
  category    str   `Record.category` ("" when the batch has none)
  index       int   the record's position in the training set (-1 when the batch has none)
  question    str   the question text: the batch's "question" field when it has one, else read back
                    from the prompt tokens (the chat's user turn, video token dropped, the
                    `data.pipeline.prompt_template` wording cut off when it matches), else ""
  sample      int   r % G, which of the prompt's G samples the reply is
The function may mutate them; each call gets fresh dicts.

`rl.reward_fn` is "" (the built-in style, `style`) or "package.module:function" (a dotted
attribute path after the colon is allowed). `load_reward_fn` imports and checks it at start-up: a
missing module or attribute, something not callable, or a callable that cannot take
(replies, records) is a ValueError naming the string. A `RewardFactory` (`@reward_factory`) is
built once with the run's `RewardSettings` (style, weights, the config and mesh) and the
function it returns is used; the built-ins are factories, so they follow the config's style and
weights (called directly they use the defaults).

`SafeReward` runs the function: when it raises or returns something of the wrong shape, every
reply of the batch scores 0; a reply with a NaN, an infinity, a number past float32's range
(the scores' dtype) or a non-number in any of its values scores 0 (reward, accuracy and format);
0-d NumPy / JAX numbers of any real dtype (bfloat16 included) count as numbers. Those replies
are flagged in "error"; each failing record's problem_id is logged once per `SafeReward` (one
per run), with the reason.

Built-ins: `style` (the `rl.reward_style` rule, exactly `rewards.batch_rewards`) and `free_text`
(letter and number answers keep the style's rule, free-text answers get ROUGE-L, `rouge_l`).
`lvr_jax.train.judge:judge` asks a judge model instead of ROUGE-L.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lvr_jax.data import prompts
from lvr_jax.rl import rewards
from lvr_jax.weights.tokens import VIDEO_TOKEN

log = logging.getLogger(__name__)

DEFAULT_REWARD_FN = "lvr_jax.rl.reward_fns:style"
RECORD_FIELDS = ("problem_id", "answer", "letter", "category", "index", "question", "sample")
SCORE_KEYS = ("reward", "accuracy", "format")


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    """What a `RewardFactory` is built from: the style and weights of `rl`, and for factories
    that need more (the judge) the whole config and the run's mesh."""
    style: str = "longrl"
    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    config: Any = dataclasses.field(default=None, compare=False, repr=False)
    mesh: Any = dataclasses.field(default=None, compare=False, repr=False)


class RewardFactory:
    """A reward function that needs the run's settings: `build(RewardSettings) -> fn`. Calling the
    factory itself scores with the default `RewardSettings()`."""

    def __init__(self, build: Callable[[RewardSettings], Callable]):
        self._build = build
        functools.update_wrapper(self, build)

    def build(self, settings: RewardSettings) -> Callable:
        return self._build(settings)

    def __call__(self, replies, records):
        return self._build(RewardSettings())(replies, records)


def reward_factory(build: Callable[[RewardSettings], Callable]) -> RewardFactory:
    """Decorator: `build(settings) -> fn` becomes a factory `rl.reward_fn` can name."""
    return RewardFactory(build)


# ---- records ----------------------------------------------------------------------------------

def answer_letter(answer: Any) -> str:
    """The option letter of a stored answer, "" for an open-ended one (as `Record.letter`)."""
    try:
        return prompts.answer_letter(str(answer))
    except ValueError:
        return ""


def question_from_prompt(text: str, template: Any = None) -> str:
    """The question in a decoded chat prompt: the last user turn (Qwen's `<|im_start|>user`
    ... `<|im_end|>`, else the whole text), the video token dropped, and the prompt template's
    wording before and after `{question}` cut off where it matches; stripped."""
    start = text.rfind("<|im_start|>user\n")
    turn = text[start + len("<|im_start|>user\n"):] if start >= 0 else text
    end = turn.find("<|im_end|>")
    turn = (turn[:end] if end >= 0 else turn).replace(VIDEO_TOKEN, "").strip()
    try:
        wording = prompts.resolve_template(template).text
    except ValueError:
        return turn
    unescape = lambda s: s.replace("{{", "{").replace("}}", "}").strip()  # noqa: E731
    before, _, after = wording.partition("{question}")
    before, after = unescape(before), unescape(after)
    if before and turn.startswith(before):
        turn = turn[len(before):]
    if after and turn.endswith(after):
        turn = turn[:-len(after)]
    return turn.strip()


def batch_records(batch: Mapping, group: int, *, tokenizer=None, template: Any = None) -> list[dict]:
    """The record dicts of a batch's P prompts x `group` samples (prompt-major; module doc).
    `tokenizer` / `template` read the question back from `input_ids` when the batch has no
    "question" field."""
    n = len(batch["answer"])
    column = lambda key, default: list(batch[key]) if key in batch else [default] * n  # noqa: E731
    if "question" in batch:
        questions = [str(q) for q in batch["question"]]
    elif tokenizer is not None and "input_ids" in batch:
        ids = np.asarray(batch["input_ids"])
        lengths = (np.asarray(batch["length"]) if "length" in batch
                   else np.asarray(batch["attention_mask"]).sum(-1) if "attention_mask" in batch
                   else np.full(n, ids.shape[1]))
        texts = tokenizer.batch_decode([row[:k] for row, k in zip(ids, lengths)],
                                       skip_special_tokens=False)
        questions = [question_from_prompt(t, template) for t in texts]
    else:
        questions = [""] * n
    per_prompt = [dict(problem_id=str(pid), answer=str(ans), letter=answer_letter(ans), category=str(cat),
                       index=int(idx), question=q)
                  for pid, ans, cat, idx, q in zip(column("problem_id", ""), batch["answer"],
                                                   column("category", ""), column("index", -1), questions)]
    for i, rec in enumerate(per_prompt):
        rec["problem_id"] = rec["problem_id"] or f"row {i}"
    return [{**rec, "sample": g} for rec in per_prompt for g in range(group)]


# ---- loading and the guard ----------------------------------------------------------------------

def resolve(spec: str) -> Any:
    """The object `"package.module:attr.path"` names; ValueError naming `spec` when it cannot be
    imported, has no such attribute, is not callable or cannot take (replies, records)."""
    where = f"rl.reward_fn={spec!r}"
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"{where}: expected 'package.module:function'")
    module_name, attr = (s.strip() for s in spec.split(":"))
    if not module_name or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise ValueError(f"{where}: expected 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is a config error naming the string
        raise ValueError(f"{where}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, RewardFactory):
        return obj
    if not callable(obj):
        raise ValueError(f"{where}: {attr!r} is a {type(obj).__name__}, not a function")
    try:
        inspect.signature(obj).bind(["reply"], [{}])
    except TypeError as e:
        raise ValueError(f"{where}: {attr!r} cannot be called as fn(replies, records) ({e})") from e
    except ValueError:
        pass                                   # no signature to read (some builtins): trust it
    return obj


def load_reward_fn(spec: str, settings: RewardSettings | None = None) -> SafeReward:
    """The guarded reward function `spec` names ("" = `style`), factories built once."""
    settings = settings or RewardSettings()
    rewards.check_reward_style(settings.style)
    name = spec or DEFAULT_REWARD_FN
    obj = resolve(name)
    fn = obj.build(settings) if isinstance(obj, RewardFactory) else obj
    return SafeReward(fn, name=name, style=settings.style)


class _BadOutput(Exception):
    """The function's return value as a whole is unusable."""


_F32_MAX = float(np.finfo(np.float32).max)


def _real_scalar(v: Any) -> bool:
    """A 0-d array (NumPy, JAX) of a bool, integer or real floating dtype (bfloat16 included)."""
    dtype = getattr(v, "dtype", None)
    if getattr(v, "shape", None) != () or dtype is None:
        return False
    try:
        return any(jnp.issubdtype(dtype, t) for t in (jnp.bool_, jnp.integer, jnp.floating))
    except TypeError:
        return False


def _number(v: Any) -> float | None:
    """`v` as a finite float that float32 holds (the scores' dtype), None when it is not a real
    number, not finite or too large (a float32 infinity would turn its group's advantages NaN)."""
    if not (isinstance(v, numbers.Real) or _real_scalar(v)):
        return None
    try:
        f = float(v)
    except (OverflowError, TypeError, ValueError):    # 10**400, Fraction(10**400, 3)
        return None
    return f if math.isfinite(f) and abs(f) <= _F32_MAX else None


def _column(values: Any, n: int, key: str) -> list:
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
        raise _BadOutput(f"{key!r} is a {type(values).__name__}, not a list of {n} numbers")
    values = list(values)
    if len(values) != n:
        raise _BadOutput(f"{key!r} has {len(values)} values for {n} replies")
    return values


class SafeReward:
    """Runs a reward function so that it never takes the run down (module doc). Returns float32
    arrays "reward", "accuracy", "format" and "error" (1.0 where the reply scored 0 because the
    function failed for it), each [len(replies)]."""

    def __init__(self, fn: Callable, *, name: str = "", style: str = "longrl"):
        self.fn, self.name, self.style = fn, name or getattr(fn, "__name__", repr(fn)), style
        self.logged: set[str] = set()          # problem_ids logged so far
        self._traceback_logged = False

    def _log(self, records: Sequence[Mapping], rows, reason: str) -> None:
        for i in rows:
            pid = str(records[i].get("problem_id", f"row {i}"))
            if pid not in self.logged:
                self.logged.add(pid)
                log.warning("reward %s failed for record %r: %s; its replies score 0 (each record is "
                            "logged once)", self.name, pid, reason)

    def __call__(self, replies: Sequence[str], records: Sequence[Mapping]) -> dict[str, np.ndarray]:
        replies = list(replies)
        n = len(replies)
        if len(records) != n:
            raise ValueError(f"{n} replies but {len(records)} records")
        out = {k: np.zeros(n, np.float32) for k in (*SCORE_KEYS, "error")}
        try:
            got = self.fn(list(replies), [dict(r) for r in records])
            cols = {k: _column(got[k], n, k) for k in SCORE_KEYS if k in got} if isinstance(got, Mapping) \
                else {"reward": _column(got, n, "the result")}
            if "reward" not in cols:
                raise _BadOutput(f"a dict without 'reward' (keys {sorted(got)})")
        except Exception as e:  # noqa: BLE001 - a reward function must never crash a training step
            why = str(e) if isinstance(e, _BadOutput) else f"{type(e).__name__}: {e}"
            if not isinstance(e, _BadOutput) and not self._traceback_logged:
                self._traceback_logged = True
                log.warning("reward %s raised (traceback shown once)", self.name, exc_info=True)
            out["error"][:] = 1.0
            self._log(records, range(n), why)
            return out
        cols.setdefault("accuracy", cols["reward"])
        if "format" not in cols:
            cols["format"] = [rewards.format_reward(t, self.style) for t in replies]
        bad = {}
        for i in range(n):
            vals = {k: _number(cols[k][i]) for k in SCORE_KEYS}
            wrong = [f"{k}={cols[k][i]!r}" for k, v in vals.items() if v is None]
            if wrong:
                bad.setdefault(", ".join(wrong), []).append(i)
                out["error"][i] = 1.0
                continue
            for k, v in vals.items():
                out[k][i] = v
        for why, rows in bad.items():
            self._log(records, rows, f"returned {why}")
        return out


# ---- built-in scorers -----------------------------------------------------------------------------

@reward_factory
def style(settings: RewardSettings):
    """The `rl.reward_style` rule (`rewards.batch_rewards`) with the `rl` weights."""
    def score(replies, records):
        return rewards.batch_rewards(replies, [r["answer"] for r in records], style=settings.style,
                                     accuracy_weight=settings.accuracy_weight,
                                     format_weight=settings.format_weight)
    return score


def is_free_text(record: Mapping) -> bool:
    """A free-text answer: no option letter (the record's "letter", else read from "answer") and
    its text (`prompts.answer_text`) is not a number (`rewards.parse_number`) nor empty."""
    letter = record.get("letter")
    if letter is None:
        letter = answer_letter(record.get("answer", ""))
    text = prompts.answer_text(str(record.get("answer", "")))
    return not letter and bool(text) and rewards.parse_number(text) is None


def answer_span(reply: Any) -> str | None:
    """The reply's first `<answer>` up to the next `</answer>` (newlines allowed), stripped; None
    without such a pair."""
    if not isinstance(reply, str):
        return None
    start = reply.find(rewards.ANSWER_OPEN)
    end = reply.find(rewards.ANSWER_CLOSE, start + len(rewards.ANSWER_OPEN)) if start >= 0 else -1
    return reply[start + len(rewards.ANSWER_OPEN):end].strip() if end >= 0 else None


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (`rouge_score`, Google's package): both texts lower-cased, every run of
    characters other than a-z / 0-9 a separator (so accents and non-Latin scripts are dropped),
    words of more than 3 letters Porter-stemmed; LCS over the words, P = LCS / len(candidate),
    R = LCS / len(reference), F = 2PR / (P + R); 0 when either side has no words."""
    return float(_rouge_scorer().score(reference, candidate)["rougeL"].fmeasure)


def open_ended_scorer(settings: RewardSettings, score_open: Callable) -> Callable:
    """A reward function: letter and number answers keep the style's accuracy rule; for free-text
    answers (`is_free_text`) accuracy is 0 without an answer span (`answer_span`), else
    `score_open(records, candidates)[j]` for the j-th such reply (a number in [0, 1]; NaN when it
    cannot tell, which the guard turns into 0 + an error). `score_open` is called on every call,
    with empty lists when there is nothing to score (the judge gathers over processes); when it
    raises (its traceback logged once) or returns the wrong count, those replies are NaN and the
    others keep their scores. Format: the style's rule; reward = accuracy_weight * accuracy +
    format_weight * format."""
    failed = []

    def score(replies, records):
        fmt = [rewards.format_reward(t, settings.style) for t in replies]
        acc = [0.0 if is_free_text(r) else rewards.accuracy_reward(t, r["answer"], settings.style)
               for t, r in zip(replies, records)]
        rows = [i for i, r in enumerate(records) if is_free_text(r) and answer_span(replies[i]) is not None]
        try:
            got = list(score_open([records[i] for i in rows], [answer_span(replies[i]) for i in rows]))
            if len(got) != len(rows):
                raise ValueError(f"{len(got)} open-ended scores for {len(rows)} replies")
        except Exception:  # noqa: BLE001 - only the open-ended replies fail
            if not failed:
                failed.append(True)
                log.warning("open-ended scorer failed (traceback shown once)", exc_info=True)
            got = [math.nan] * len(rows)
        for i, s in zip(rows, got):
            v = _number(s)
            acc[i] = math.nan if v is None else v
        weigh = lambda a, f: settings.accuracy_weight * a + settings.format_weight * f  # noqa: E731
        return {"reward": [weigh(a, f) for a, f in zip(acc, fmt)], "accuracy": acc, "format": fmt}
    return score


@reward_factory
def free_text(settings: RewardSettings):
    """`open_ended_scorer` with `rouge_l(reply's answer span, prompts.answer_text(answer))`."""
    def score_open(records, candidates):
        return [rouge_l(c, prompts.answer_text(r["answer"])) for r, c in zip(records, candidates)]
    return open_ended_scorer(settings, score_open)
