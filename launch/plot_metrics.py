"""Plot metrics.jsonl files (reward, accuracy, loss curves) into one PNG, and print each curve's
mean over its first and last `--window` steps.
    python launch/plot_metrics.py runs/demo/grpo/metrics.jsonl [more.jsonl] --out=curves.png"""

from __future__ import annotations

import argparse
import json
import os

CURVES = ("loss", "reward_mean", "accuracy", "format_rate", "kl", "response_length")


def read_runs(paths) -> dict[str, list[dict]]:
    """{run name (the file's folder): rows} for the files that exist."""
    runs = {}
    for p in paths:
        if os.path.exists(p):
            with open(p) as f:
                runs[os.path.basename(os.path.dirname(p)) or p] = [json.loads(x) for x in f if x.strip()]
    return runs


def curve(rows: list[dict], name: str) -> list[tuple[int, float]]:
    """(step, value) of the rows that log `name` as a number."""
    return [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]


def first_last(rows: list[dict], window: int = 20) -> dict[str, tuple[float, float]]:
    """{metric: (mean of its first `window` values, mean of its last `window`)} for CURVES."""
    out = {}
    for name in CURVES:
        vals = [v for _, v in curve(rows, name)]
        if vals:
            out[name] = (sum(vals[:window]) / len(vals[:window]),
                         sum(vals[-window:]) / len(vals[-window:]))
    return out


def plot(paths, out: str) -> str:
    """One panel per metric present in any file; one line per file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_runs(paths)
    names = [c for c in CURVES if any(c in r for rows in runs.values() for r in rows)]
    if not names:
        raise SystemExit(f"no known metrics ({', '.join(CURVES)}) in {paths}")
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        for run, rows in runs.items():
            pts = curve(rows, name)
            if pts:
                ax.plot(*zip(*pts), label=run)
        ax.set(title=name, xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", nargs="+")
    ap.add_argument("--out", default="curves.png")
    ap.add_argument("--window", type=int, default=20, help="steps averaged at each end")
    args = ap.parse_args()
    if args.window < 1:
        ap.error("--window must be >= 1")
    print(plot(args.metrics, args.out))
    for run, rows in read_runs(args.metrics).items():
        for name, (a, b) in first_last(rows, args.window).items():
            print(f"{run:8s} {name:16s} first {args.window}: {a:.4g}  last {args.window}: {b:.4g}")


if __name__ == "__main__":
    main()
