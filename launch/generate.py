"""Answer a multiple-choice question about one video with a VILA-layout checkpoint.

    python launch/generate.py --checkpoint=runs/demo/grpo_model --video=clip.mp4 \\
        --question="What happened first?" --options="a red ball,a blue cube,a green star,nothing"
    python launch/generate.py --checkpoint=DIR --video=clip.mp4 \\
        --question=$'Which came first?\\nA. x\\nB. y' --num_samples=4 --temperature=1.0 \\
        --seed=3 --json_out=answers.json

Frames sampled and preprocessed as in training, the reasoning prompt, frame-parallel encoding
and the shared-prefix sampler on the config's mesh; greedy by default. The flags and what they
do: `lvr_jax/eval/generate.py`.
"""

import sys

from lvr_jax import cli

cli.cpu_devices()

from absl import app  # noqa: E402

from lvr_jax.eval import generate  # noqa: E402

_FLAGS = generate.define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    cli.init_distributed()
    try:
        generate.run_flags(_FLAGS)
    except generate.InputError as e:
        sys.exit(f"[generate] error: {e}")
    cli.finish()


if __name__ == "__main__":
    app.run(main)
