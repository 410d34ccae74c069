"""Stage 1, long CoT-SFT.
    python launch/train_sft.py --config=configs/demo.py --workdir=DIR --config.init_checkpoint=CKPT
        [--export=DIR]"""

from lvr_jax import cli

if __name__ == "__main__":
    cli.train_main("sft")
