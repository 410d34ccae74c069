"""Greedy video-QA answers and their accuracy: every reply scored under every reward style
(`lvr_jax.rl.rewards.REWARD_STYLES`), one of them (the config's `rl.reward_style`) the headline.

Layering: this module imports nothing from `lvr_jax.train`, so the training loop can call
`evaluate` on the model it trains (`lvr_jax.train.validation`, every `eval.every` steps) without
an import cycle; `lvr_jax.eval.video_qa.evaluate_checkpoint` (which imports `train` for the
config plumbing) runs the same `evaluate` on a checkpoint folder. A checkpoint on disk and the
model in training are therefore scored by the same code.
"""

from __future__ import annotations

import collections

import jax.numpy as jnp
import numpy as np

from lvr_jax.models.vlm import encode_batch, make_prompts
from lvr_jax.rl.rewards import (
    REWARD_STYLES,
    accuracy_reward,
    check_reward_style,
    extract_answer,
    format_reward,
)
from lvr_jax.rollout.sampler import Sampler, SamplingParams
from sharding.mesh import UNSHARDED, Layout
from sharding.multihost import put_batch

# logical names of the leading dims of the batch fields the model reads
_BATCH_AXES = {"frames": ("batch", "frames"), "input_ids": ("batch",), "attention_mask": ("batch",),
               "num_frames": ("batch",)}


def score_item(text, answer, category="unknown", problem_id="", *, reward_style: str = "longrl") -> dict:
    """One reply scored under every reward style; "correct" / "format" / "predicted" follow the
    headline `reward_style` ("predicted" is the string that style grades, `extract_answer`)."""
    headline = check_reward_style(reward_style)
    correct = {s: bool(accuracy_reward(text, answer, style=s)) for s in REWARD_STYLES}
    fmt = {s: bool(format_reward(text, style=s)) for s in REWARD_STYLES}
    return {"problem_id": str(problem_id), "category": str(category), "answer": str(answer),
            "predicted": extract_answer(text, style=headline), "correct": correct[headline],
            "correct_by_style": correct, "format": fmt[headline], "format_by_style": fmt,
            "response": text}


def summarize(items: list[dict], *, reward_style: str = "longrl") -> dict:
    """The result dict of scored items (`score_item`): accuracy overall and per category under every
    style, the headline style's numbers under the keys that have no style in their name."""
    headline = check_reward_style(reward_style)
    n = len(items)

    def rate(rows, key, style):
        return float(np.mean([r[key][style] for r in rows])) if rows else 0.0

    per_cat = collections.defaultdict(list)
    for item in items:
        per_cat[item["category"]].append(item)
    by_style = {s: rate(items, "correct_by_style", s) for s in REWARD_STYLES}
    fmt_by_style = {s: rate(items, "format_by_style", s) for s in REWARD_STYLES}
    categories = {}
    for cat, rows in sorted(per_cat.items()):
        acc = {s: rate(rows, "correct_by_style", s) for s in REWARD_STYLES}
        fmt = {s: rate(rows, "format_by_style", s) for s in REWARD_STYLES}
        categories[cat] = {"accuracy": acc[headline], "accuracy_by_style": acc,
                           "format_rate": fmt[headline], "format_rate_by_style": fmt,
                           "n": len(rows)}
    return {"accuracy": by_style[headline], "reward_style": headline, "accuracy_by_style": by_style,
            "format_rate": fmt_by_style[headline], "format_rate_by_style": fmt_by_style, "n": n,
            "per_category": categories, "items": items}


def score_replies(texts, answers, categories, problem_ids=None, *, reward_style: str = "longrl") -> dict:
    """`summarize` of the replies `texts` against the stored `answers` (no model involved)."""
    problem_ids = range(len(texts)) if problem_ids is None else problem_ids
    return summarize([score_item(t, a, c, p, reward_style=reward_style)
                      for t, a, c, p in zip(texts, answers, categories, problem_ids, strict=True)],
                     reward_style=reward_style)


def on_mesh(batch: dict, layout: Layout) -> dict:
    """The model's fields of a batch that every process holds whole -> arrays on the layout's mesh
    (global arrays, rows over the batch axes where they divide, so this works when the mesh spans
    several processes); plain device arrays without a mesh."""
    if layout.mesh is None:
        return {k: jnp.asarray(batch[k]) for k in _BATCH_AXES if k in batch}
    return {k: put_batch(batch[k], layout.mesh, len(batch[k]), layout.table, names=names)
            for k, names in _BATCH_AXES.items() if k in batch}


def evaluate(model, tokenizer, batches, *, layout: Layout = UNSHARDED, max_new_tokens: int = 96,
             limit: int | None = None, on_batch=None, reward_style: str = "longrl",
             sampler: Sampler | None = None, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0) -> dict:
    """Decode every batch of an RL-mode data iterator (greedy at `temperature` 0, else one sample
    per prompt, batch i drawn with seed `seed` + i: the same replies every run) and score the
    answers under every reward style, `reward_style` being the headline. Every process passes the
    same whole batches (a data shard of (0, 1)) and gets the same result.

    `on_batch(items_done, items_correct)` (headline style) is called after each batch; `limit`
    scores at most that many items (the first ones; no batch runs past it); `sampler` (default:
    a new one for `model`) lets a caller that evaluates repeatedly (the training loop) reuse the
    compiled decode. Returns
    `summarize`'s dict: {"accuracy", "reward_style", "accuracy_by_style", "format_rate",
    "format_rate_by_style", "n", "per_category": {cat: {"accuracy", "accuracy_by_style", "format_rate",
    "format_rate_by_style", "n"}},
    "items": [...]}; the keys without a style in their name are the headline style's.
    """
    reward_style = check_reward_style(reward_style)
    if sampler is None:
        sampler = Sampler.for_tokenizer(model, layout.mesh, tokenizer, rules=layout.table)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=float(temperature),
                            top_p=float(top_p))
    items = []
    for i, batch in enumerate(batches):
        if limit is not None and len(items) >= limit:
            break
        b = on_mesh(batch, layout)
        feats = encode_batch(model, b["frames"], layout=layout)
        prompt = make_prompts(model, feats, b["input_ids"], b["attention_mask"], layout,
                              b.get("num_frames"))   # None: every clip all T frames
        tokens, _, lengths = sampler.generate_padded(prompt, None, params, seed=seed + i)
        texts = tokenizer.batch_decode([t[:n] for t, n in zip(tokens, lengths)],
                                       skip_special_tokens=True)
        for text, answer, cat, pid in zip(texts, batch["answer"], batch["category"],
                                          batch["problem_id"]):
            items.append(score_item(text, answer, cat, pid, reward_style=reward_style))
        items = items if limit is None else items[:limit]
        if on_batch is not None:
            on_batch(len(items), sum(i["correct"] for i in items))
    return {**summarize(items, reward_style=reward_style),
            "sampling": {"temperature": params.temperature, "top_p": params.top_p, "seed": seed}}
