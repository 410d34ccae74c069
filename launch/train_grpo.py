"""Stage 2, GRPO.
    python launch/train_grpo.py --config=configs/demo.py --workdir=DIR
        --config.init_checkpoint=<SFT export> --config.rl.group_size=8 [--export=DIR]"""

import common

if __name__ == "__main__":
    common.train_main("grpo")
