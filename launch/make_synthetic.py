"""Write the synthetic long-video reasoning set (mp4 + JSONL per split).

    python launch/make_synthetic.py --out=/tmp/synth --num_train=2000 --num_val=200 \
        --num_test=200 --frames=64 --size=32 --seed=0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lvr_jax.data import synthetic  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num_train", type=int, default=64)
    p.add_argument("--num_val", type=int, default=16)
    p.add_argument("--num_test", type=int, default=16)
    p.add_argument("--frames", type=int, default=64,
                   help=f"frames per video ({synthetic.MIN_FRAMES}..{synthetic.MAX_FRAMES})")
    p.add_argument("--size", type=int, default=32, help="frame side in pixels (even, >= 16)")
    p.add_argument("--fps", type=int, default=8, help="frame rate written in the mp4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qtypes", default=",".join(synthetic.DEFAULT_QTYPES),
                   help=f"comma-separated question types, of {list(synthetic.GENERATORS)}")
    p.add_argument("--workers", type=int, default=0, help="processes writing videos (0: this one)")
    args = p.parse_args(argv)
    if not synthetic.MIN_FRAMES <= args.frames <= synthetic.MAX_FRAMES:
        p.error(f"--frames must be in [{synthetic.MIN_FRAMES}, {synthetic.MAX_FRAMES}]")
    if args.size < 16 or args.size % 2:
        p.error("--size must be even and >= 16")
    try:
        args.qtypes = synthetic.check_qtypes(args.qtypes)
    except ValueError as e:
        p.error(f"--qtypes: {e}")
    if min(args.num_train, args.num_val, args.num_test) < 0:
        p.error("split sizes must be >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    paths = synthetic.generate_dataset(args.out, num_train=args.num_train, num_val=args.num_val,
                                       num_test=args.num_test, num_frames=args.frames,
                                       size=args.size, seed=args.seed, fps=args.fps,
                                       workers=args.workers, qtypes=args.qtypes)
    took = time.perf_counter() - start
    total = args.num_train + args.num_val + args.num_test
    print(json.dumps({"out": str(Path(args.out).resolve()), "splits": {k: str(v) for k, v in paths.items()},
                      "items": total, "seconds": round(took, 2)}))


if __name__ == "__main__":
    main()
