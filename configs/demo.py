"""The README demo: a tiny VLM, CoT-SFT then GRPO on the synthetic long-video set, 8 virtual CPU
devices (fsdp=2 x seq=4: frames and prompts sharded 4 ways). Every field can be overridden on the
command line, e.g. `--config.rl.group_size=8 --config.train.steps=20`.

    --config=configs/demo.py:sft    the CoT-SFT stage (200 steps, lr 3e-3)
    --config=configs/demo.py:grpo   the GRPO stage (the default; 200 steps, G = 8)
"""

import ml_collections

from configs import common


def get_config(stage: str = "grpo") -> ml_collections.ConfigDict:
    stage = common.check_stage(stage)
    model = common.model_config(common.tiny_llm(), common.tiny_vision())
    model.llm.vocab_size = 1024
    c = common.base_config(model, dict(data=1, fsdp=2, seq=4, tensor=1), stage)
    c.data.dir = "runs/demo/data"    # synthetic set (launch/make_synthetic.py)
    c.data.pipeline.update(num_frames=8, batch_size=4, max_length=320)
    c.optim.update(lr=3e-4, warmup_steps=5)
    c.train.update(steps=200, checkpoint_every=100)
    c.rl.update(max_new_tokens=96)
    c.eval.update(max_new_tokens=96)
    if stage == "sft":
        c.train.steps, c.optim.lr = 200, 3e-3
    return c
