"""Plot metrics.jsonl files (reward, accuracy, loss curves) into one PNG.
    python launch/plot_metrics.py runs/demo/grpo/metrics.jsonl [more.jsonl] --out=curves.png"""

from __future__ import annotations

import argparse
import json
import os

CURVES = ("loss", "reward_mean", "accuracy", "format_rate", "kl", "response_length")


def plot(paths, out: str) -> str:
    """One panel per metric present in any file; one line per file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for p in paths:
        if os.path.exists(p):
            with open(p) as f:
                runs[os.path.basename(os.path.dirname(p)) or p] = [json.loads(x) for x in f if x.strip()]
    names = [c for c in CURVES if any(c in r for rows in runs.values() for r in rows)]
    if not names:
        raise SystemExit(f"no known metrics ({', '.join(CURVES)}) in {paths}")
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        for run, rows in runs.items():
            pts = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
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
    args = ap.parse_args()
    print(plot(args.metrics, args.out))


if __name__ == "__main__":
    main()
