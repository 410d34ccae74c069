"""A GRPO run's reward function (`rl.reward_fn`, `lvr_jax.rl.reward_fns`) and the judge reward.

Wiring: `check_reward_fn(config)` resolves `rl.reward_fn` at start-up (a ValueError naming the
string when it is wrong, before any work); `run_reward_fn(run)` builds it once per run (the judge
loads its checkpoint then) and returns the same guarded `SafeReward` on every later call.

The judge (`rl.reward_fn = "lvr_jax.train.judge:judge"`): letter and number answers keep the
`rl.reward_style` rule; for a free-text answer (`reward_fns.is_free_text`) a reply without an
`<answer>` span scores accuracy 0, otherwise a second model, the VILA-layout folder
`rl.judge_checkpoint` (its LLM only, no video), grades (question, reference answer, the reply's
answer span) from `JUDGE_PROMPT`, rendered with the judge tokenizer's chat template (a user turn
plus the generation prompt) when it has one. It is loaded once, on the run's mesh, and decodes
greedily through this project's `Sampler`, up to `rl.judge_max_new_tokens` tokens. The verdict
(`parse_verdict`) is the first whole word "yes" or "no" of its reply, any case: accuracy 1.0 or
0.0; a reply with neither is NaN, which the guard scores 0 and counts in "error". Each field of the
prompt is cut to `MAX_FIELD_CHARS` characters. With several processes, the (question, reference,
answer) triples of all of them are gathered and judged together (the same prompts on every
process, as the sampler's SPMD program needs), each process keeping its own verdicts. Prompts
are batched to a power of two rows and a multiple of `LENGTH_BUCKET` tokens, so few programs
compile.
"""

from __future__ import annotations

import math
import re
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lvr_jax.data import prompts
from lvr_jax.rl.reward_fns import (DEFAULT_REWARD_FN, RewardSettings, SafeReward, load_reward_fn,
                                   open_ended_scorer, resolve, reward_factory)
from lvr_jax.rl.rewards import check_reward_style
from lvr_jax.rollout.sampler import Sampler, SamplingParams
from lvr_jax.train import settings as train_settings
from sharding.multihost import gather_json

JUDGE_FN = "lvr_jax.train.judge:judge"
JUDGE_PROMPT = (
    "You are grading an answer to a question about a video. You cannot see the video: judge only "
    "whether the candidate answer means the same as the reference answer.\n\n"
    "Question: {question}\n"
    "Reference answer: {reference}\n"
    "Candidate answer: {candidate}\n\n"
    "Does the candidate answer mean the same as the reference answer? Reply with one word: yes or no.")
MAX_FIELD_CHARS = 2000
LENGTH_BUCKET = 64
_VERDICT = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def judge_prompt(question: str, reference: str, candidate: str) -> str:
    """`JUDGE_PROMPT` filled; each field stripped and cut to `MAX_FIELD_CHARS` characters."""
    clip = lambda s: str(s).strip()[:MAX_FIELD_CHARS]  # noqa: E731
    return JUDGE_PROMPT.format(question=clip(question), reference=clip(reference),
                               candidate=clip(candidate))


def parse_verdict(text: str) -> float:
    """1.0 / 0.0 for the first whole word "yes" / "no" (any case) in `text`, NaN without one."""
    m = _VERDICT.search(text if isinstance(text, str) else "")
    return math.nan if m is None else 1.0 if m.group(1).lower() == "yes" else 0.0


def _batch_devices(layout) -> int:
    """Devices the logical "batch" axis spans on the layout's mesh (1 without a mesh)."""
    if layout.mesh is None:
        return 1
    target = layout.table.get("batch")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(layout.mesh.shape[a] for a in axes)


class Judge:
    """Grades (question, reference, candidate) triples with a language model served by `sampler`
    (greedy, `max_new_tokens`); see the module doc."""

    def __init__(self, sampler: Sampler, tokenizer, *, max_new_tokens: int = 16):
        self.sampler, self.tokenizer = sampler, tokenizer
        self.params = SamplingParams(max_new_tokens=int(max_new_tokens), temperature=0.0)
        self.last_replies: list[str] = []      # the judge's decoded replies of the last call

    def render(self, question: str, reference: str, candidate: str) -> str:
        """The judge's input text: `judge_prompt` in the tokenizer's chat template, if any."""
        text = judge_prompt(question, reference, candidate)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      tokenize=False, add_generation_prompt=True)
        return text

    def generate(self, texts: list[str]) -> list[str]:
        """The judge's greedy replies to `texts` (the same list on every process)."""
        ids = [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) or [self.sampler.pad_id]
               for t in texts]
        n = len(ids)
        rows = max(1 << (n - 1).bit_length(), _batch_devices(self.sampler.layout))
        ids += [ids[0]] * (rows - n)
        multiple = math.lcm(self.sampler.layout.pad_multiple, LENGTH_BUCKET)
        width = -(-max(len(i) for i in ids) // multiple) * multiple
        tok = np.full((rows, width), self.sampler.pad_id, np.int32)
        valid = np.zeros((rows, width), bool)
        for r, row in enumerate(ids):                   # left padded, as `prefill` takes them
            tok[r, width - len(row):] = row
            valid[r, width - len(row):] = True
        x = self.sampler.llm.embed_tokens(jnp.asarray(tok))
        out, _, lengths = self.sampler.generate_padded(x, jnp.asarray(valid), self.params)
        return self.tokenizer.batch_decode([t[:k] for t, k in zip(out[:n], lengths[:n])],
                                           skip_special_tokens=True)

    def __call__(self, items: list[tuple[str, str, str]]) -> list[float]:
        """Verdicts (`parse_verdict`) of this process's (question, reference, candidate) items;
        every process must call it (the items of all are judged together)."""
        mine = [[str(q), str(r), str(c)] for q, r, c in items]
        parts = gather_json(mine)
        everything = [it for part in parts for it in part]
        if not everything:
            self.last_replies = []
            return []
        replies = self.generate([self.render(*it) for it in everything])
        start = sum(len(p) for p in parts[:jax.process_index()]) if len(parts) > 1 else 0
        self.last_replies = replies[start:start + len(mine)]
        return [parse_verdict(t) for t in self.last_replies]

    def score_open(self, records: list[dict], candidates: list[str]) -> list[float]:
        """`open_ended_scorer`'s hook: the record's question, its answer text, the candidate."""
        return self([(r.get("question", ""), prompts.answer_text(str(r["answer"])), c)
                     for r, c in zip(records, candidates)])


def load_judge(config, mesh) -> Judge:
    """The judge of `rl.judge_checkpoint` on `mesh` (ValueError when it is not set or no folder)."""
    path = config.rl.get("judge_checkpoint", "")
    if not path or not Path(path).is_dir():
        raise ValueError(f"rl.reward_fn={JUDGE_FN!r} needs rl.judge_checkpoint, a VILA-layout folder; "
                         f"got {path!r}")
    model, tokenizer, _ = train_settings.load_model(config, path, mesh)
    sampler = Sampler.for_tokenizer(model, mesh, tokenizer,
                                    rules=train_settings.sharding_rules(config))
    return Judge(sampler, tokenizer, max_new_tokens=int(config.rl.get("judge_max_new_tokens", 16)))


@reward_factory
def judge(settings: RewardSettings):
    """The judge reward (module doc), built from the run's config and mesh."""
    if settings.config is None:
        raise ValueError(f"{JUDGE_FN} reads rl.judge_checkpoint: name it in rl.reward_fn")
    mesh = settings.mesh if settings.mesh is not None else train_settings.mesh_and_layout(settings.config)[0]
    the_judge = load_judge(settings.config, mesh)
    score = open_ended_scorer(settings, the_judge.score_open)
    score.judge = the_judge
    return score


# ---- the run's reward function --------------------------------------------------------------------

def reward_settings(config, mesh=None) -> RewardSettings:
    """`RewardSettings` of a config's `rl` section (style checked), with the config and mesh."""
    rl = config.rl
    return RewardSettings(style=check_reward_style(rl.get("reward_style", "longrl")),
                          accuracy_weight=float(rl.get("accuracy_weight", 0.9)),
                          format_weight=float(rl.get("format_weight", 0.1)), config=config, mesh=mesh)


def check_reward_fn(config) -> str:
    """`rl.reward_fn` ("" = the built-in style) resolved and checked, nothing built or loaded;
    ValueError naming the string (or rl.judge_checkpoint for the judge) when it is wrong."""
    reward_settings(config)
    spec = config.rl.get("reward_fn", "") or DEFAULT_REWARD_FN
    if resolve(spec) is judge:
        path = config.rl.get("judge_checkpoint", "")
        if not path or not Path(path).is_dir():
            raise ValueError(f"rl.reward_fn={spec!r} needs rl.judge_checkpoint, a VILA-layout folder; "
                             f"got {path!r}")
    return spec


_BUILT: dict[int, tuple[weakref.ref, SafeReward]] = {}


def run_reward_fn(run) -> SafeReward:
    """The run's guarded reward function, built on the first call for `run` (the judge loads on
    its mesh then), the same object afterwards; its failure log is once per record per run."""
    key = id(run)
    hit = _BUILT.get(key)
    if hit is None or hit[0]() is not run:
        fn = load_reward_fn(run.config.rl.get("reward_fn", ""), reward_settings(run.config, run.mesh))
        _BUILT[key] = (weakref.ref(run, lambda _, k=key: _BUILT.pop(k, None)), fn)
        hit = _BUILT[key]
    return hit[1]
