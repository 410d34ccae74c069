"""What `launch/bench_data.py` writes: the Markdown table, the JSON and the PNG of the data
pipeline's steady-state frames/s and startup seconds per worker count (and the drain: from the
last batch to the end of the data, grain's workers noticing it)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def table(rows, args: dict) -> str:
    head = (f"Data pipeline throughput: {args['num_frames']} frames sampled per video "
            f"({args['video_frames']}-frame {args['video_size']}px H.264 videos), SigLIP "
            f"preprocessing to {args['image_size']}px, batch {args['batch_size']}; "
            f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}).\n\n")
    lines = ["| workers | videos | frames | steady s | frames/s | videos/s | startup s | drain s |",
             "|--------:|-------:|-------:|---------:|---------:|---------:|----------:|--------:|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['videos']} | {r['frames']} | {r['steady_s']:.2f} | "
                     f"{r['frames_per_s']:.0f} | {r['videos_per_s']:.1f} | {r['startup_s']:.2f} | "
                     f"{r['drain_s']:.2f} |")
    return head + "\n".join(lines) + "\n"


def plot(rows, path) -> None:
    """Steady-state frames/s and startup seconds against the number of worker processes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    at = range(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(at, [r["frames_per_s"] for r in rows])
    a.set_ylabel("frames/s (steady state)")
    b.bar(at, [r["startup_s"] for r in rows], color="tab:orange")
    b.set_ylabel("startup s (to the first batch)")
    for ax in (a, b):
        ax.set_xticks(at, [str(r["workers"]) for r in rows])
        ax.set_xlabel("decoding worker processes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out, rows, args: dict) -> str:
    """bench_data.md / .json / .png under `out`; returns the table."""
    out = Path(out)
    md = table(rows, args)
    (out / "bench_data.md").write_text(md)
    (out / "bench_data.json").write_text(json.dumps({"args": args, "rows": rows}, indent=2))
    plot(rows, out / "bench_data.png")
    return md
