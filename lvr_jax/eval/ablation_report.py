"""The ablation studies' outputs (lvr_jax.eval.ablation): per study a Markdown table (`<study>.md`)
and one PNG (`<study>.png`) of validation accuracy over seeds, mean, sample standard deviation and
range, and `results.json` holding every arm's result."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np

from lvr_jax.eval.ablation import PARTS
from lvr_jax.weights.io import atomic_write

CHANCE = 0.25                # four options

STAGE_ROWS = (               # (key, label): key "<arm>" or "<arm>@<stage index>"
    ("sft", "CoT-SFT only"),
    ("grpo", "GRPO only (from the random model)"),
    ("sft_grpo@0", "CoT-SFT (first stage of the next row)"),
    ("sft_grpo", "CoT-SFT then GRPO"),
)


def _values(results: list[dict], study: str, name: str, stage: int | None = None) -> dict:
    """{seed: (accuracy, format rate, steps, seconds)} of one arm (after stage `stage`, default
    its last) over the seeds that finished it."""
    out = {}
    for r in results:
        if r["study"] == study and r["name"] == name:
            picked = r["stage_results"] if stage is None else [r["stage_results"][stage]]
            out[r["seed"]] = (picked[-1]["accuracy"], picked[-1].get("format_rate"),
                              "+".join(str(x["steps"]) for x in picked),
                              sum(x["seconds"] for x in picked))
    return out


def _stats(accs: list[float]) -> tuple[float, float, float, float]:
    a = np.asarray(accs, float)
    sd = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return float(a.mean()), sd, float(a.min()), float(a.max())


def rows(results: list[dict], study: str) -> list[dict]:
    """One dict per table row: label, steps, per-seed accuracy, mean / sd / min / max, mean format
    rate and mean minutes per seed."""
    if study == "frames":
        names = sorted({r["frames"] for r in results if r["study"] == "frames"})
        keys = [(f"frames{f}", None, f"{f} frames") for f in names]
    else:
        keys = [(k.split("@")[0], int(k.split("@")[1]) if "@" in k else None, label)
                for k, label in STAGE_ROWS]
    out = []
    for name, stage, label in keys:
        vals = _values(results, study, name, stage)
        if not vals:
            continue
        accs = [v[0] for v in vals.values()]
        fmt = [v[1] for v in vals.values() if v[1] is not None]
        mean, sd, lo, hi = _stats(accs)
        out.append(dict(label=label, steps=next(iter(vals.values()))[2],
                        by_seed={s: v[0] for s, v in sorted(vals.items())}, mean=mean, sd=sd,
                        min=lo, max=hi, format_rate=float(np.mean(fmt)) if fmt else None,
                        minutes=float(np.mean([v[3] for v in vals.values()])) / 60,
                        frames=int(name[6:]) if study == "frames" else None,
                        part_of=stage is not None))
    return out


def markdown(table: list[dict], study: str, seeds: list[int]) -> str:
    """The study's table: accuracy per seed, mean +- sample sd, range, format rate, minutes."""
    first = "frames per clip" if study == "frames" else "arm"
    head = [first, "steps"] + [f"seed {s}" for s in seeds] + \
        ["mean ± sd", "min–max", "format rate", "min / seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["label"], r["steps"]] + \
            [f"{r['by_seed'][s]:.3f}" if s in r["by_seed"] else "–" for s in seeds] + \
            [f"{r['mean']:.3f} ± {r['sd']:.3f}", f"{r['min']:.3f}–{r['max']:.3f}",
             "–" if r["format_rate"] is None else f"{r['format_rate']:.3f}",
             f"{r['minutes']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], study: str, out: Path) -> Path:
    """frames: mean accuracy against frames per clip (log2 axis) with +- sd bars and each seed's
    point; stages: one bar per row with each seed's point. Chance (1/4) dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2) if study == "frames" else (7.6, 4.6))
    if study == "frames":
        x = [r["frames"] for r in table]
        ax.errorbar(x, [r["mean"] for r in table], yerr=[r["sd"] for r in table], marker="o",
                    capsize=4, label="mean ± sd over seeds")
        for r in table:
            ax.scatter([r["frames"]] * len(r["by_seed"]), list(r["by_seed"].values()), s=14,
                       color="grey", alpha=0.7, zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.axvline(PARTS, color="C2", linestyle=":", label=f"{PARTS} frames: one per part")
        ax.set_xlabel("frames per clip (trained and evaluated)")
        ax.set_title("Accuracy against frames (majority of 8 parts; CoT-SFT)", fontsize=10)
    else:
        x = np.arange(len(table))
        ax.bar(x, [r["mean"] for r in table], yerr=[r["sd"] for r in table], capsize=4,
               color=["C1" if r["part_of"] else "C0" for r in table], alpha=0.8)
        for i, r in enumerate(table):
            ax.scatter([i] * len(r["by_seed"]), list(r["by_seed"].values()), s=14, color="black",
                       zorder=3)
        ax.set_xticks(x, [textwrap.fill(r["label"], 18) + f"\n({r['steps']} steps)" for r in table],
                      fontsize=8)
        ax.set_title("Stage ablation (majority; scarce CoT): mean ± sd, dots = seeds",
                     fontsize=10)
    ax.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label="chance (1/4)")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("validation accuracy (greedy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=90)
    finally:
        plt.close(fig)
    return out


def write(results: list[dict], work: Path, settings: dict) -> list[Path]:
    """`results.json` (the settings and every finished arm: this run's, and those an earlier run
    in `work` recorded for other studies or seeds) and, per study with results, its table and PNG
    under `work`; returns the paths written."""
    written = [work / "results.json"]
    key = lambda r: (r["study"], r["name"], r["seed"])  # noqa: E731
    if written[0].exists():
        ours = {key(r) for r in results}
        earlier = json.loads(written[0].read_text()).get("arms", [])
        results = [r for r in earlier if key(r) not in ours] + list(results)
    atomic_write(written[0], json.dumps(dict(settings=settings, arms=results), indent=2).encode())
    seeds = sorted({r["seed"] for r in results})
    for study in sorted({r["study"] for r in results}):
        table = rows(results, study)
        md = work / f"{study}.md"
        atomic_write(md, markdown(table, study, seeds).encode())
        written += [md, plot(table, study, work / f"{study}.png")]
    return written
