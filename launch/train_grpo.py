"""Stage 2, GRPO.  python launch/train_grpo.py --config=configs/demo.py --workdir=DIR
    --config.init_checkpoint=<SFT export> --config.rl.group_size=8"""

import common  # noqa: F401

common.cpu_devices()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "training config")
_WORKDIR = flags.DEFINE_string("workdir", "runs/grpo", "checkpoints, metrics, traces")
_EXPORT = flags.DEFINE_string("export", "", "also write the final model as a VILA/HF folder")


def main(_):
    common.init_distributed()
    from lvr_jax.train import trainer
    run = trainer.train_grpo(_CONFIG.value, _WORKDIR.value)
    if _EXPORT.value:
        trainer.export(run, _EXPORT.value)


if __name__ == "__main__":
    app.run(main)
