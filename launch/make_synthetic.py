"""Write the synthetic long-video reasoning set (mp4 + JSONL per split).

    python launch/make_synthetic.py --out=/tmp/synth --num_train=2000 --num_val=200 \
        --num_test=200 --frames=64 --size=32 --seed=0
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

from lvr_jax.data import synthetic

_OUT = flags.DEFINE_string("out", None, "output folder", required=True)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 64, "train items")
_NUM_VAL = flags.DEFINE_integer("num_val", 16, "validation items")
_NUM_TEST = flags.DEFINE_integer("num_test", 16, "test items")
_FRAMES = flags.DEFINE_integer("frames", 64, f"frames per video ({synthetic.MIN_FRAMES}.."
                               f"{synthetic.MAX_FRAMES})")
_SIZE = flags.DEFINE_integer("size", 32, "frame side in pixels (even, >= 16)")
_FPS = flags.DEFINE_integer("fps", 8, "frame rate written in the mp4")
_SEED = flags.DEFINE_integer("seed", 0, "random seed")
_QTYPES = flags.DEFINE_string("qtypes", ",".join(synthetic.DEFAULT_QTYPES),
                              f"comma-separated question types, of {list(synthetic.GENERATORS)}")
_WORKERS = flags.DEFINE_integer("workers", 0, "processes writing videos (0: this one)")


def usage_error(message: str) -> app.UsageError:
    return app.UsageError(message, exitcode=2)     # 2, like the argparse errors it replaces


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise usage_error(f"unexpected arguments: {argv[1:]}")
    if not synthetic.MIN_FRAMES <= _FRAMES.value <= synthetic.MAX_FRAMES:
        raise usage_error(f"--frames must be in [{synthetic.MIN_FRAMES}, {synthetic.MAX_FRAMES}]")
    if _SIZE.value < 16 or _SIZE.value % 2:
        raise usage_error("--size must be even and >= 16")
    try:
        qtypes = synthetic.check_qtypes(_QTYPES.value)
    except ValueError as e:
        raise usage_error(f"--qtypes: {e}") from None
    if min(_NUM_TRAIN.value, _NUM_VAL.value, _NUM_TEST.value) < 0:
        raise usage_error("split sizes must be >= 0")
    start = time.perf_counter()
    paths = synthetic.generate_dataset(_OUT.value, num_train=_NUM_TRAIN.value, num_val=_NUM_VAL.value,
                                       num_test=_NUM_TEST.value, num_frames=_FRAMES.value,
                                       size=_SIZE.value, seed=_SEED.value, fps=_FPS.value,
                                       workers=_WORKERS.value, qtypes=qtypes)
    took = time.perf_counter() - start
    total = _NUM_TRAIN.value + _NUM_VAL.value + _NUM_TEST.value
    print(json.dumps({"out": str(Path(_OUT.value).resolve()), "splits": {k: str(v) for k, v in paths.items()},
                      "items": total, "seconds": round(took, 2)}))


if __name__ == "__main__":
    app.run(main)
