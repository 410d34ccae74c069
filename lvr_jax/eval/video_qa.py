"""Multiple-choice video QA evaluation: greedy answers, overall and per-category accuracy."""

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
from lvr_jax.rl.rewards import accuracy_reward, extract_answer, format_reward
from lvr_jax.rollout.sampler import Sampler, SamplingParams
from lvr_jax.train import settings
from lvr_jax.train.loop import eta
from lvr_jax.train.metrics import say
from sharding.mesh import UNSHARDED, Layout


def evaluate(model, tokenizer, batches, *, layout: Layout = UNSHARDED, max_new_tokens: int = 96,
             limit: int | None = None, on_batch=None) -> dict:
    """Greedy-decode every batch of an RL-mode data iterator and score the answers.

    `on_batch(items_done, items_correct)` is called after each batch. Returns {"accuracy",
    "format_rate", "n", "per_category": {...}, "items": [...]}.
    """
    sampler = Sampler.for_tokenizer(model, layout.mesh, tokenizer, rules=layout.table)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    per_cat = collections.defaultdict(list)
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
            ok = accuracy_reward(text, answer)
            per_cat[str(cat)].append(ok)
            items.append({"problem_id": str(pid), "category": str(cat), "answer": str(answer),
                          "predicted": extract_answer(text), "correct": bool(ok),
                          "format": bool(format_reward(text)), "response": text})
        if on_batch is not None:
            on_batch(len(items), sum(i["correct"] for i in items))
        if limit is not None and len(items) >= limit:
            break
    n = len(items)
    return {"accuracy": float(np.mean([i["correct"] for i in items])) if n else 0.0,
            "format_rate": float(np.mean([i["format"] for i in items])) if n else 0.0, "n": n,
            "per_category": {c: {"accuracy": float(np.mean(v)), "n": len(v)}
                             for c, v in sorted(per_cat.items())},
            "items": items}


def write_report(result: dict, out_dir, name: str = "eval") -> tuple[Path, Path]:
    """`<name>.json` (everything) and `<name>.md` (the accuracy table) under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    lines = ["| category | n | accuracy |", "|---|---:|---:|"]
    for cat, r in result["per_category"].items():
        lines.append(f"| {cat} | {r['n']} | {r['accuracy']:.3f} |")
    lines.append(f"| **all** | {result['n']} | {result['accuracy']:.3f} |")
    lines.append(f"\nformat rate: {result['format_rate']:.3f}\n")
    (out / f"{name}.md").write_text("\n".join(lines))
    return out / f"{name}.json", out / f"{name}.md"


def evaluate_checkpoint(config, checkpoint, out_dir, *, split: str | None = None,
                        limit: int | None = None, name: str = "eval") -> dict:
    """Greedy multiple-choice accuracy of a VILA-layout checkpoint on a split of the config's
    data, on the config's mesh; writes `<out_dir>/<name>.json` and `.md`."""
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
            f"accuracy so far {correct / max(done, 1):.3f}")

    result = evaluate(model, tok, batches, layout=layout,
                      max_new_tokens=int(config.eval.max_new_tokens), limit=limit,
                      on_batch=progress)
    md_path = Path(out_dir) / f"{name}.md"
    if jax.process_index() == 0:
        _, md_path = write_report(result, out_dir, name)
    say(f"[eval] {checkpoint} on {split}: accuracy {result['accuracy']:.3f} over {result['n']} "
        f"(format {result['format_rate']:.3f}); report {md_path}")
    return result
