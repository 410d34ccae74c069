"""Convert checkpoints between the VILA/HF layout and orbax.

    # VILA/HF folder -> params-only orbax checkpoint (<dst>/0/params + meta)
    python launch/convert_checkpoint.py --to=orbax --src=/ckpt/LongVILA-R1-7B --dst=/ckpt/r1_orbax
    # a training run's orbax checkpoint (or a params-only one) -> VILA/HF folder
    python launch/convert_checkpoint.py --to=hf --src=runs/grpo/checkpoints [--step=200] \\
        --like=runs/sft_model --dst=runs/grpo_step200_model

What each direction writes and reads, and the flags: `lvr_jax/train/convert.py`. Single process;
no mesh is needed.
"""

import sys

from lvr_jax import cli

cli.cpu_devices(1)

from absl import app  # noqa: E402

from lvr_jax.train import convert  # noqa: E402
from lvr_jax.weights.io import CheckpointError  # noqa: E402

_FLAGS = convert.define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    try:
        convert.run_flags(_FLAGS)
    except (convert.ConvertError, CheckpointError) as e:
        sys.exit(f"[convert] error: {e}")


if __name__ == "__main__":
    app.run(main)
