"""The README demo, one command from a fresh clone: on 8 virtual CPU devices, writes the synthetic
long-video reasoning set, a random tiny VLM, trains it by CoT-SFT then GRPO, and prints the
validation accuracy after each stage (reports, metrics, curves under --workdir).

    python launch/demo.py --workdir=runs/demo [--config.train.steps=...] [--sft_steps=...]
"""

import common  # noqa: F401

common.cpu_devices()

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(common.ROOT, "configs/demo.py"),
                                          "demo config (GRPO stage; SFT uses --sft_*)")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "where everything goes")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 600, "CoT-SFT steps")
_SFT_LR = flags.DEFINE_float("sft_lr", 3e-3, "CoT-SFT learning rate")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 400, "synthetic training items")
_NUM_VAL = flags.DEFINE_integer("num_val", 128, "synthetic validation items")
_FRAMES = flags.DEFINE_integer("video_frames", 32, "frames per synthetic video")


def stage(msg):
    print(f"\n=== {msg} ===", flush=True)


def main(_):
    common.init_distributed()
    from lvr_jax.data.synthetic import generate_dataset
    from lvr_jax.train import trainer
    from lvr_jax.weights.tiny import make_random_checkpoint

    t0 = time.time()
    work = _WORKDIR.value
    config = _CONFIG.value
    data_dir = config.data.dir = os.path.join(work, "data")
    stage(f"synthetic data -> {data_dir}")
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        generate_dataset(data_dir, num_train=_NUM_TRAIN.value, num_val=_NUM_VAL.value,
                         num_test=0, num_frames=_FRAMES.value, size=28, seed=0)
    corpus = []
    with open(os.path.join(data_dir, "train.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            corpus += [rec["problem"], rec["reasoning"]]
    init = os.path.join(work, "init")
    if not os.path.exists(os.path.join(init, "config.json")):
        make_random_checkpoint(config.model, init, corpus=corpus)
    print(f"random tiny VLM + tokenizer -> {init}", flush=True)

    sft_cfg = config.copy_and_resolve_references()
    sft_cfg.init_checkpoint = init
    sft_cfg.train.steps = _SFT_STEPS.value
    sft_cfg.optim.lr = _SFT_LR.value
    sft_cfg.profile.num_steps = 0
    stage(f"CoT-SFT, {sft_cfg.train.steps} steps")
    run = trainer.train_sft(sft_cfg, os.path.join(work, "sft"))
    sft_ckpt = trainer.export(run, os.path.join(work, "sft_model"))
    before = trainer.evaluate_checkpoint(sft_cfg, sft_ckpt, os.path.join(work, "reports"),
                                         name="val_after_sft")

    grpo_cfg = config.copy_and_resolve_references()
    grpo_cfg.init_checkpoint = str(sft_ckpt)
    stage(f"GRPO, {grpo_cfg.train.steps} steps, G={grpo_cfg.rl.group_size}")
    run = trainer.train_grpo(grpo_cfg, os.path.join(work, "grpo"))
    grpo_ckpt = trainer.export(run, os.path.join(work, "grpo_model"))
    after = trainer.evaluate_checkpoint(grpo_cfg, grpo_ckpt, os.path.join(work, "reports"),
                                        name="val_after_grpo")

    from plot_metrics import plot
    png = plot([os.path.join(work, "sft", "metrics.jsonl"),
                os.path.join(work, "grpo", "metrics.jsonl")], os.path.join(work, "curves.png"))
    stage("result")
    print(f"validation accuracy after SFT : {before['accuracy']:.3f} (n={before['n']})")
    print(f"validation accuracy after GRPO: {after['accuracy']:.3f} (n={after['n']})")
    for cat in after["per_category"]:
        b, a = before["per_category"].get(cat, {}).get("accuracy"), after["per_category"][cat]["accuracy"]
        print(f"  {cat:10s} {b:.3f} -> {a:.3f}")
    print(f"curves: {png}; reports: {os.path.join(work, 'reports')}; "
          f"total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    app.run(main)
