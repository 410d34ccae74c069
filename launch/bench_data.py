"""Throughput of the video data pipeline (decode + SigLIP preprocessing + tokenize + batch).

Runs the grain pipeline over a synthetic set with 1 and 2 decoding worker processes and prints a
Markdown table of frames/s (also written to OUT/bench_data.md, .json and .png).
Startup (spawning the workers, first batch) is reported apart from the steady-state rate.

    python launch/bench_data.py --out=/tmp/bench --workers=1,2 --image_size=28
"""

from __future__ import annotations

import json
import tempfile
import time
import types
from pathlib import Path

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "folder for bench_data.md / .json / .png", required=True)
_DATA = flags.DEFINE_string("data", None, "a synthetic dataset folder (default: made under --out)")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 48, "items to generate when --data is not given")
_VIDEO_FRAMES = flags.DEFINE_integer("video_frames", 256, "frames per generated video")
_VIDEO_SIZE = flags.DEFINE_integer("video_size", 64, "side of the generated videos")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 32, "frames sampled per video")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 28, "SigLIP input side (448 for the 7B)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "videos per batch")
_WORKERS = flags.DEFINE_string("workers", "1,2", "comma-separated worker process counts")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "passes over the data per measurement")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer folder (default: the tiny one)")
_ALL = (_OUT, _DATA, _NUM_ITEMS, _VIDEO_FRAMES, _VIDEO_SIZE, _NUM_FRAMES, _IMAGE_SIZE, _BATCH_SIZE,
        _WORKERS, _EPOCHS, _TOKENIZER)


def _tokenizer(folder):
    from lvr_jax.weights.hf import load_tokenizer
    from lvr_jax.weights.tiny import make_tokenizer
    if folder is None:
        folder = tempfile.mkdtemp(prefix="bench_tok_")
        make_tokenizer(folder)
    return load_tokenizer(folder)


def measure(records, cfg, tokenizer, pre) -> dict:
    """Iterate the whole pipeline once; startup = until the first batch, the rate over the rest
    until the last batch; drain = from it to the end of the data (grain's workers noticing it)."""
    from lvr_jax.data.dataset import make_iter_dataset

    start = time.perf_counter()
    it = iter(make_iter_dataset(records, cfg, tokenizer, pre, shard_index=0, shard_count=1))
    try:
        first = next(it)
        t_first = time.perf_counter()
        frames = videos = batches = 0
        t_last = t_first
        for batch in it:
            frames += int(batch["num_frames"].sum())
            videos += len(batch["num_frames"])
            batches += 1
            t_last = time.perf_counter()
        t_end = time.perf_counter()
    finally:
        it.close()
    steady = t_last - t_first
    return dict(workers=cfg.num_workers, startup_s=t_first - start, steady_s=steady,
                drain_s=t_end - t_last, batches=batches,
                videos=videos, frames=frames, frames_per_s=frames / steady if steady > 0 else 0.0,
                videos_per_s=videos / steady if steady > 0 else 0.0,
                first_batch_frames=int(first["num_frames"].sum()))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=2)
    args = types.SimpleNamespace(**{h.name: h.value for h in _ALL})
    try:
        counts = [int(w) for w in args.workers.split(",")]
    except ValueError:
        raise app.UsageError(f"--workers must be comma-separated integers, got {args.workers!r}") from None
    from lvr_jax.data import synthetic
    from lvr_jax.data.dataset import DataConfig
    from lvr_jax.data.records import load_records
    from lvr_jax.data.video import Preprocessor
    from lvr_jax.eval import bench_data_report

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
    for workers in counts:
        cfg = DataConfig(root=str(data), num_frames=args.num_frames, batch_size=args.batch_size,
                         num_workers=workers, num_epochs=args.epochs, seed=0)
        rows.append(measure(records, cfg, tokenizer, pre))
        if not rows[-1]["batches"]:
            raise app.UsageError("one batch only, no steady state to time: raise --num_items or "
                                 "--epochs, or lower --batch_size")
        print(json.dumps(rows[-1]))
    print(bench_data_report.write(out, rows, vars(args)))


if __name__ == "__main__":
    app.run(main)
