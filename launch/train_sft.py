"""Stage 1, long CoT-SFT.
    python launch/train_sft.py --config=configs/demo.py --workdir=DIR --config.init_checkpoint=CKPT
        [--export=DIR]"""

import common

if __name__ == "__main__":
    common.train_main("sft")
