"""Stage 1, long CoT-SFT.  python launch/train_sft.py --config=configs/demo.py --workdir=DIR"""

import common  # noqa: F401  (path, CPU devices)

common.cpu_devices()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "training config")
_WORKDIR = flags.DEFINE_string("workdir", "runs/sft", "checkpoints, metrics, traces")
_EXPORT = flags.DEFINE_string("export", "", "also write the final model as a VILA/HF folder")


def main(_):
    common.init_distributed()
    from lvr_jax.train import trainer
    run = trainer.train_sft(_CONFIG.value, _WORKDIR.value)
    if _EXPORT.value:
        trainer.export(run, _EXPORT.value)


if __name__ == "__main__":
    app.run(main)
