"""Multiple-choice video QA evaluation: greedy answers, overall and per-category accuracy."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from lvr_jax.rl.rewards import accuracy_reward, extract_answer, format_reward
from lvr_jax.rollout.sampler import Sampler, SamplingParams


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: eos, <|im_end|>, <|endoftext|> when present."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
           tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    return sorted(i for i in ids if isinstance(i, int) and 0 <= i != tokenizer.unk_token_id)


def make_sampler(model, mesh, tokenizer) -> Sampler:
    """A sampler that stops at the tokenizer's `stop_ids` and pads finished rows with its pad id
    (else the first stop id)."""
    eos = stop_ids(tokenizer)
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    return Sampler(model, mesh, eos_ids=eos, pad_id=int(pad))


def evaluate(model, tokenizer, batches, *, mesh=None, max_new_tokens: int = 96,
             prompt_fn=None, features_fn=None, limit: int | None = None, on_batch=None) -> dict:
    """Greedy-decode every batch of an RL-mode data iterator and score the answers.

    `features_fn(model, frames)` and `prompt_fn(model, feats, ids, attn, multiple)` are the
    trainer's compiled helpers; `on_batch(items_done, items_correct)` is called after each
    batch. Returns {"accuracy", "format_rate", "n", "per_category": {...}, "items": [...]}.
    """
    sampler = make_sampler(model, mesh, tokenizer)
    params = SamplingParams(max_new_tokens, 0.0, 1.0, 0, 1)
    per_cat = collections.defaultdict(list)
    items = []
    for batch in batches:
        feats = features_fn(model, jnp.asarray(batch["frames"]))
        x, mask = prompt_fn(model, feats, jnp.asarray(batch["input_ids"]),
                            jnp.asarray(batch["attention_mask"]), sampler.pad_multiple)
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
