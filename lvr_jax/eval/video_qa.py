"""Video QA evaluation: greedy answers, overall and per-category accuracy under every reward style
(`lvr_jax.rl.rewards.REWARD_STYLES`), one of them (the config's `rl.reward_style`) the headline."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lvr_jax.data.dataset import make_iter_dataset
from lvr_jax.data.records import load_records
from lvr_jax.data.video import Preprocessor
from lvr_jax.models.vlm import encode_batch, make_prompts
from lvr_jax.rl.rewards import (
    REWARD_STYLES,
    accuracy_reward,
    check_reward_style,
    extract_answer,
    format_reward,
)
from lvr_jax.rollout.sampler import Sampler, SamplingParams
from lvr_jax.train import settings
from lvr_jax.train.loop import eta
from lvr_jax.train.metrics import say
from sharding.mesh import UNSHARDED, Layout


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
        categories[cat] = {"accuracy": acc[headline], "accuracy_by_style": acc, "n": len(rows)}
    return {"accuracy": by_style[headline], "reward_style": headline, "accuracy_by_style": by_style,
            "format_rate": fmt_by_style[headline], "format_rate_by_style": fmt_by_style, "n": n,
            "per_category": categories, "items": items}


def score_replies(texts, answers, categories, problem_ids=None, *, reward_style: str = "longrl") -> dict:
    """`summarize` of the replies `texts` against the stored `answers` (no model involved)."""
    problem_ids = range(len(texts)) if problem_ids is None else problem_ids
    return summarize([score_item(t, a, c, p, reward_style=reward_style)
                      for t, a, c, p in zip(texts, answers, categories, problem_ids, strict=True)],
                     reward_style=reward_style)


def evaluate(model, tokenizer, batches, *, layout: Layout = UNSHARDED, max_new_tokens: int = 96,
             limit: int | None = None, on_batch=None, reward_style: str = "longrl") -> dict:
    """Greedy-decode every batch of an RL-mode data iterator and score the answers under every
    reward style, `reward_style` being the headline.

    `on_batch(items_done, items_correct)` (headline style) is called after each batch. Returns
    `summarize`'s dict: {"accuracy", "reward_style", "accuracy_by_style", "format_rate",
    "format_rate_by_style", "n", "per_category": {cat: {"accuracy", "accuracy_by_style", "n"}},
    "items": [...]}; the keys without a style in their name are the headline style's.
    """
    reward_style = check_reward_style(reward_style)
    sampler = Sampler.for_tokenizer(model, layout.mesh, tokenizer, rules=layout.table)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    items = []
    for batch in batches:
        feats = encode_batch(model, jnp.asarray(batch["frames"]), layout=layout)
        x, mask = make_prompts(model, feats, jnp.asarray(batch["input_ids"]),
                               jnp.asarray(batch["attention_mask"]), layout.pad_multiple)
        tokens, _, lengths = sampler.generate_padded(x, mask, params)
        texts = tokenizer.batch_decode([t[:n] for t, n in zip(tokens, lengths)],
                                       skip_special_tokens=True)
        for text, answer, cat, pid in zip(texts, batch["answer"], batch["category"],
                                          batch["problem_id"]):
            items.append(score_item(text, answer, cat, pid, reward_style=reward_style))
        if on_batch is not None:
            on_batch(len(items), sum(i["correct"] for i in items))
        if limit is not None and len(items) >= limit:
            break
    return summarize(items, reward_style=reward_style)


def report_markdown(result: dict) -> str:
    """The accuracy table of a result: a column per reward style, the headline style named."""
    headline = result.get("reward_style")
    by_style = result.get("accuracy_by_style") or {headline or "accuracy": result["accuracy"]}
    styles = sorted(by_style, key=lambda s: s != headline)          # the headline column first

    def label(s):
        return f"{s} (headline)" if s == headline else s

    lines = []
    if headline:
        lines.append(f"Headline reward style: **{headline}** (its accuracy is the result's `accuracy`); "
                     f"every column scores the same replies.\n")
    lines += ["| category | n | " + " | ".join(f"accuracy: {label(s)}" for s in styles) + " |",
              "|---|---:|" + "---:|" * len(styles)]

    def row(name, r, acc):
        accs = r.get("accuracy_by_style") or {headline or "accuracy": acc}
        return (f"| {name} | {r['n']} | "
                + " | ".join(f"{accs[s]:.3f}" if s in accs else "-" for s in styles) + " |")

    for cat, r in result["per_category"].items():
        lines.append(row(cat, r, r["accuracy"]))
    lines.append(row("**all**", result, result["accuracy"]))
    fmt = f"format rate ({headline}): " if headline else "format rate: "
    lines.append(f"\n{fmt}{result['format_rate']:.3f}")
    others = {s: v for s, v in result.get("format_rate_by_style", {}).items() if s != headline}
    if others:
        lines.append("; ".join(f"format rate ({s}): {v:.3f}" for s, v in others.items()))
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir, name: str = "eval") -> tuple[Path, Path]:
    """`<name>.json` (everything) and `<name>.md` (`report_markdown`) under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(report_markdown(result))
    return out / f"{name}.json", out / f"{name}.md"


def evaluate_checkpoint(config, checkpoint, out_dir, *, split: str | None = None,
                        limit: int | None = None, name: str = "eval") -> dict:
    """Greedy multiple-choice accuracy of a VILA-layout checkpoint on a split of the config's
    data, on the config's mesh, scored under every reward style with `config.rl.reward_style` as the
    headline; writes `<out_dir>/<name>.json` and `.md`."""
    reward_style = settings.reward_style(config)            # checked: a bad style fails here
    mesh, layout = settings.mesh_and_layout(config)
    model, tok, _ = settings.load_model(config, checkpoint, mesh)
    split = split or config.eval.split
    dcfg = settings.data_config(config, mode="rl", num_epochs=1, shuffle=False,
                                drop_remainder=False, batch_size=int(config.eval.batch_size))
    records = load_records(settings.data_files(config, split), on_error=dcfg.on_error)
    pre = Preprocessor.from_pretrained(Path(checkpoint) / "vision_tower")
    batches = iter(make_iter_dataset(records, dcfg, tok, pre, shard_index=0, shard_count=1))
    total = len(records) if limit is None else min(limit, len(records))
    t0 = time.perf_counter()

    def progress(done: int, correct: int) -> None:
        say(f"[eval] {name}: {eta(done, total, time.perf_counter() - t0, unit='item')} "
            f"{reward_style} accuracy so far {correct / max(done, 1):.3f}")

    result = evaluate(model, tok, batches, layout=layout,
                      max_new_tokens=int(config.eval.max_new_tokens), limit=limit,
                      on_batch=progress, reward_style=reward_style)
    md_path = Path(out_dir) / f"{name}.md"
    if jax.process_index() == 0:
        _, md_path = write_report(result, out_dir, name)
    by_style = ", ".join(f"{s} {v:.3f}" for s, v in result["accuracy_by_style"].items())
    say(f"[eval] {checkpoint} on {split}: accuracy {result['accuracy']:.3f} ({reward_style}; {by_style}) "
        f"over {result['n']} (format {result['format_rate']:.3f}); report {md_path}")
    return result
