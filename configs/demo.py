"""The README demo: a tiny VLM, CoT-SFT then GRPO on the synthetic long-video set, 8 virtual CPU
devices (fsdp=2 x seq=4: frames and prompts sharded 4 ways). Every field can be overridden on the
command line, e.g. `--config.rl.group_size=8 --config.train.steps=20`."""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = common.model_config(common.tiny_llm(), common.tiny_vision())
    c.model.llm.vocab_size = 1024
    c.init_checkpoint = ""           # VILA-layout folder; the demo makes a random one
    c.mesh = dict(data=1, fsdp=2, seq=4, tensor=1)

    c.data = ml_collections.ConfigDict()
    c.data.dir = "runs/demo/data"    # synthetic set (launch/make_synthetic.py)
    c.data.train_files = ""          # default: <dir>/train.jsonl
    c.data.val_files = ""            # default: <dir>/val.jsonl
    c.data.pipeline = dict(root="", num_frames=8, fps=0.0, batch_size=4, seed=0, shuffle=True,
                           on_error="skip", num_workers=0, max_length=320,
                           system_prompt=None)

    c.optim = ml_collections.ConfigDict(dict(lr=3e-4, warmup_steps=5, final_lr_fraction=0.1,
                                             b1=0.9, b2=0.98, weight_decay=0.0, grad_clip=1.0,
                                             grad_accum_steps=1))
    c.train = ml_collections.ConfigDict(dict(steps=200, seed=0, log_every=10, checkpoint_every=100,
                                             keep_checkpoints=2, max_nonfinite=5,
                                             freeze_vision=True))
    c.rl = ml_collections.ConfigDict(dict(
        group_size=8, max_new_tokens=96, temperature=1.0, top_p=1.0, top_k=0, clip_low=0.2,
        clip_high=0.28, beta=0.01, loss_agg="token-mean", filter_groups=False,
        recompute_old_logprobs=False, accuracy_weight=0.9, format_weight=0.1))
    c.eval = ml_collections.ConfigDict(dict(max_new_tokens=96, batch_size=8, split="val"))
    c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=0))
    return c
