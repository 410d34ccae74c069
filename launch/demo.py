"""The README demo, one command from a fresh clone: on 8 virtual CPU devices, writes the synthetic
long-video reasoning set, a random tiny VLM, trains it by CoT-SFT then GRPO, and prints the
validation accuracy after each stage (reports, metrics, curves under --workdir).

The default task is the synthetic `majority` question (which colour fills the screen longest over
the whole video). As in LongVILA-R1, chain-of-thought annotations are scarce and answers are not:
CoT-SFT sees the reasoning of only the first `--sft_items` training videos (8), GRPO learns from
all of them (400) with the answer as its only label.

    python launch/demo.py --workdir=runs/demo [--config.train.steps=...] [--sft_steps=...]
"""

from lvr_jax import cli

cli.cpu_devices()

import time  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", cli.config_file("demo.py"),
                                          "demo config (GRPO stage; SFT uses --sft_*)")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "where everything goes")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 200, "CoT-SFT steps")
_SFT_LR = flags.DEFINE_float("sft_lr", 3e-3, "CoT-SFT learning rate")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 400, "synthetic training items")
_SFT_ITEMS = flags.DEFINE_integer("sft_items", 8, "CoT-SFT on the first N training items only "
                                  "(0: all); GRPO always uses all of them")
_NUM_VAL = flags.DEFINE_integer("num_val", 128, "synthetic validation items")
_FRAMES = flags.DEFINE_integer("video_frames", 32, "frames per synthetic video")
_QTYPES = flags.DEFINE_string("qtypes", "majority", "synthetic question types (comma-separated; "
                              "lvr_jax/data/synthetic.py lists them)")


def stage(msg):
    if cli.is_main_process():
        print(f"\n=== {msg} ===", flush=True)


def demo_data():
    """The data flags, checked (usage errors before any work)."""
    from lvr_jax.data.synthetic import check_qtypes
    from lvr_jax.eval.demo import DemoData

    try:
        qtypes = check_qtypes(_QTYPES.value)
    except ValueError as e:
        raise app.UsageError(f"--qtypes: {e}") from None
    try:
        return DemoData(_NUM_TRAIN.value, _NUM_VAL.value, _FRAMES.value, qtypes, _SFT_ITEMS.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def main(_):
    want = demo_data()
    if not flags.FLAGS["verbosity"].present:    # progress lines only; --verbosity=0 for library logs
        logging.set_verbosity(logging.WARNING)
    cli.init_distributed()
    from lvr_jax.eval import demo
    from lvr_jax.train.grpo import train_grpo
    from lvr_jax.train.sft import train_sft

    t0 = time.time()
    work, config = _WORKDIR.value, _CONFIG.value
    data_dir, init = Path(work, "data"), Path(work, "init")
    config.data.dir = str(data_dir)
    stage(f"synthetic data -> {data_dir}")
    try:
        demo.check_existing_inputs(data_dir, want)    # every process, before anything is written
    except demo.DemoInputError as e:
        raise app.UsageError(str(e)) from None
    cli.barrier("demo_check")
    if cli.is_main_process():           # one writer; the other processes wait at the barrier
        demo.write_inputs(data_dir, init, want, config.model)
    cli.barrier("demo_inputs")

    sft_cfg = config.copy_and_resolve_references()
    sft_cfg.init_checkpoint = str(init)
    sft_cfg.data.train_files = str(data_dir / "sft.jsonl")
    sft_cfg.train.steps = _SFT_STEPS.value
    sft_cfg.optim.lr = _SFT_LR.value
    sft_cfg.profile.num_steps = 0
    sft_cfg.train.freeze_projector = False     # the GRPO config freezes it (Long-RL's RL recipe)
    stage(f"CoT-SFT, {sft_cfg.train.steps} steps")
    sft_ckpt, before = demo.train_stage(train_sft, sft_cfg, work, "sft")

    grpo_cfg = config.copy_and_resolve_references()
    grpo_cfg.init_checkpoint = str(sft_ckpt)
    stage(f"GRPO, {grpo_cfg.train.steps} steps, G={grpo_cfg.rl.group_size}")
    _, after = demo.train_stage(train_grpo, grpo_cfg, work, "grpo")

    stage("result")
    if cli.is_main_process():
        lines = demo.summary(work, before, after)
        lines[-1] += f"; total {time.time() - t0:.0f}s"
        print("\n".join(lines), flush=True)
    cli.finish()


if __name__ == "__main__":
    app.run(main)
