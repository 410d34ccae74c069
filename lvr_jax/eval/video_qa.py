"""Video QA evaluation of a checkpoint folder: answers (greedy unless eval.temperature > 0),
overall and per-category accuracy under every reward style (`lvr_jax.rl.rewards.REWARD_STYLES`),
one of them (the config's `rl.reward_style`) the headline; the report (`.json` + `.md`).

The model-side code (`evaluate`, `score_item`, `summarize`, `score_replies`) lives in
`lvr_jax.eval.accuracy`, which imports nothing from `lvr_jax.train`, so the training loop's
validation (`lvr_jax.train.validation`) runs the very same code; this module imports `train` (config
plumbing, `validation_batches`) and re-exports those names.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from lvr_jax.eval.accuracy import evaluate, score_item, score_replies, summarize
from lvr_jax.train import settings
from lvr_jax.train.loop import eta
from lvr_jax.train.metrics import say
from lvr_jax.train.validation import validation_batches

__all__ = ["evaluate", "evaluate_checkpoint", "report_markdown", "score_item", "score_replies",
           "summarize", "write_report"]


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
    if result.get("sampling"):
        how = result["sampling"]
        lines.append("Replies: greedy.\n" if not how["temperature"] else
                     f"Replies: one sample per prompt, temperature {how['temperature']}, top_p "
                     f"{how['top_p']}, seed {how['seed']}.\n")
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
    if result.get("skipped"):
        lines.append(f"\n{result['skipped']} item(s) not scored: the data pipeline skipped them "
                     f"(a line that is no valid record, a video that failed to load, a prompt "
                     f"past max_length; "
                     f"data.pipeline.on_error='skip'; the log names them)")
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
    """Multiple-choice accuracy (replies as `eval.temperature` / `eval.top_p` give them) of a
    VILA-layout checkpoint on a split of the config's
    data, on the config's mesh, scored under every reward style with `config.rl.reward_style` as the
    headline; writes `<out_dir>/<name>.json` and `.md`."""
    from lvr_jax.data.records import SkipLog, load_records
    from lvr_jax.eval.generate import InputError, check_checkpoint

    reward_style = settings.reward_style(config)            # checked: a bad style fails here
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1 (or left out: every item), got {limit}")
    check_checkpoint(checkpoint)                            # the inputs, before loading weights
    split = split or config.eval.split
    files = settings.data_files(config, split)
    try:
        records = load_records(files, on_error=settings.data_config(config).on_error,
                               skips=(bad_lines := SkipLog()))
    except FileNotFoundError as e:
        raise InputError(f"split {split!r}: {e}") from None
    if not records:
        raise InputError(f"split {split!r}: no records in {files}")
    mesh, layout = settings.mesh_and_layout(config)
    model, tok, _ = settings.load_model(config, checkpoint, mesh)
    num_examples = int(config.eval.get("num_examples", 0))
    records, data = validation_batches(config, tok, Path(checkpoint) / "vision_tower", split=split,
                                       num_examples=num_examples, records=records)
    batches = iter(data)
    total = len(records) if limit is None else min(limit, len(records))
    t0 = time.perf_counter()

    def progress(done: int, correct: int) -> None:
        say(f"[eval] {name}: {eta(done, total, time.perf_counter() - t0, unit='item')} "
            f"{reward_style} accuracy so far {correct / max(done, 1):.3f}")

    result = evaluate(model, tok, batches, layout=layout,
                      max_new_tokens=int(config.eval.max_new_tokens), limit=limit,
                      on_batch=progress, reward_style=reward_style, **settings.eval_sampling(config))
    # items the data pipeline skipped, and (the whole split asked for) lines that were no record
    whole = limit is None and not num_examples
    result["skipped"] = total - result["n"] + (bad_lines.count if whole else 0)
    md_path = Path(out_dir) / f"{name}.md"
    if jax.process_index() == 0:
        _, md_path = write_report(result, out_dir, name)
    by_style = ", ".join(f"{s} {v:.3f}" for s, v in result["accuracy_by_style"].items())
    skipped = f", {result['skipped']} skipped by the data pipeline" if result["skipped"] else ""
    say(f"[eval] {checkpoint} on {split}: accuracy {result['accuracy']:.3f} ({reward_style}; {by_style}) "
        f"over {result['n']}{skipped} (format {result['format_rate']:.3f}); report {md_path}")
    return result
