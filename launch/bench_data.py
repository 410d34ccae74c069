"""Throughput of the video data pipeline (decode + SigLIP preprocessing + tokenize + batch).

Runs the grain pipeline over a synthetic set with 1 and 2 decoding worker processes and prints a
Markdown table of frames/s (also written to OUT/bench_data.md and OUT/bench_data.json).
Startup (spawning the workers, first batch) is reported apart from the steady-state rate.

    python launch/bench_data.py --out=/tmp/bench --workers=1,2 --image_size=28
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for bench_data.md / .json")
    p.add_argument("--data", default=None, help="a synthetic dataset folder (default: made under --out)")
    p.add_argument("--num_items", type=int, default=48, help="items to generate when --data is not given")
    p.add_argument("--video_frames", type=int, default=256, help="frames per generated video")
    p.add_argument("--video_size", type=int, default=64, help="side of the generated videos")
    p.add_argument("--num_frames", type=int, default=32, help="frames sampled per video")
    p.add_argument("--image_size", type=int, default=28, help="SigLIP input side (448 for the 7B)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--workers", default="1,2", help="comma-separated worker process counts")
    p.add_argument("--epochs", type=int, default=2, help="passes over the data per measurement")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the tiny one)")
    return p.parse_args(argv)


def _tokenizer(folder):
    from lvr_jax.weights.hf import load_tokenizer
    from lvr_jax.weights.tiny import make_tokenizer
    if folder is None:
        folder = tempfile.mkdtemp(prefix="bench_tok_")
        make_tokenizer(folder)
    return load_tokenizer(folder)


def measure(records, cfg, tokenizer, pre) -> dict:
    """Iterate the whole pipeline once; startup = until the first batch, rate over the rest."""
    from lvr_jax.data.dataset import make_iter_dataset

    start = time.perf_counter()
    it = iter(make_iter_dataset(records, cfg, tokenizer, pre, shard_index=0, shard_count=1))
    try:
        first = next(it)
        t_first = time.perf_counter()
        frames = videos = batches = 0
        for batch in it:
            frames += int(batch["num_frames"].sum())
            videos += len(batch["num_frames"])
            batches += 1
        t_end = time.perf_counter()
    finally:
        it.close()
    steady = t_end - t_first
    return dict(workers=cfg.num_workers, startup_s=t_first - start, steady_s=steady, batches=batches,
                videos=videos, frames=frames, frames_per_s=frames / steady if steady > 0 else 0.0,
                videos_per_s=videos / steady if steady > 0 else 0.0,
                first_batch_frames=int(first["num_frames"].sum()))


def table(rows, args) -> str:
    head = (f"Data pipeline throughput: {args.num_frames} frames sampled per video "
            f"({args.video_frames}-frame {args.video_size}px H.264 videos), SigLIP preprocessing to "
            f"{args.image_size}px, batch {args.batch_size}; {os.cpu_count()} CPU cores "
            f"({platform.processor() or platform.machine()}).\n\n")
    lines = ["| workers | videos | frames | steady s | frames/s | videos/s | startup s |",
             "|--------:|-------:|-------:|---------:|---------:|---------:|----------:|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['videos']} | {r['frames']} | {r['steady_s']:.2f} | "
                     f"{r['frames_per_s']:.0f} | {r['videos_per_s']:.1f} | {r['startup_s']:.2f} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    from lvr_jax.data import synthetic
    from lvr_jax.data.dataset import DataConfig, load_records
    from lvr_jax.data.video import Preprocessor

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "synthetic"
    if not (data / "train.jsonl").is_file():
        t = time.perf_counter()
        synthetic.generate_dataset(data, num_train=args.num_items, num_val=0, num_test=0,
                                   num_frames=args.video_frames, size=args.video_size, seed=0)
        print(f"generated {args.num_items} videos in {time.perf_counter() - t:.1f}s under {data}")
    records = load_records(data / "train.jsonl")
    tokenizer = _tokenizer(args.tokenizer)
    pre = Preprocessor.for_image_size(args.image_size)
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        cfg = DataConfig(root=str(data), num_frames=args.num_frames, batch_size=args.batch_size,
                         num_workers=workers, num_epochs=args.epochs, seed=0)
        rows.append(measure(records, cfg, tokenizer, pre))
        print(json.dumps(rows[-1]))
    md = table(rows, args)
    print(md)
    (out / "bench_data.md").write_text(md)
    (out / "bench_data.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
