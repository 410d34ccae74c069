"""Stage 2, GRPO.
    python launch/train_grpo.py --config=configs/demo.py --workdir=DIR
        --config.init_checkpoint=<SFT export> --config.rl.group_size=8 [--export=DIR]"""

from lvr_jax import cli

if __name__ == "__main__":
    cli.train_main("grpo")
