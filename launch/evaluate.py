"""Multiple-choice video QA accuracy of a checkpoint, overall and per category (JSON + Markdown).
    python launch/evaluate.py --config=configs/demo.py --checkpoint=DIR --out=DIR [--split=val]"""

import sys

from lvr_jax import cli

cli.cpu_devices()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", cli.config_file("demo.py"),
                                          "config (data, mesh, eval)")
_CKPT = flags.DEFINE_string("checkpoint", None, "VILA-layout checkpoint folder", required=True)
_OUT = flags.DEFINE_string("out", "runs/eval", "report folder")
_SPLIT = flags.DEFINE_string("split", None, "data split (default config.eval.split)")
_LIMIT = flags.DEFINE_integer("limit", None, "evaluate at most this many items")


def main(_):
    cli.init_distributed()
    from lvr_jax.eval.generate import InputError
    from lvr_jax.eval.video_qa import evaluate_checkpoint
    try:
        evaluate_checkpoint(_CONFIG.value, _CKPT.value, _OUT.value, split=_SPLIT.value,
                            limit=_LIMIT.value)
    except InputError as e:
        sys.exit(f"[evaluate] error: {e}")
    cli.finish()


if __name__ == "__main__":
    app.run(main)
