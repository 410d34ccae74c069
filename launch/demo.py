"""The README demo, one command from a fresh clone: on 8 virtual CPU devices, writes the synthetic
long-video reasoning set, a random tiny VLM, trains it by CoT-SFT then GRPO, and prints the
validation accuracy after each stage (reports, metrics, curves under --workdir).

The default task is the synthetic `majority` question (which colour fills the screen longest over
the whole video). As in LongVILA-R1, chain-of-thought annotations are scarce and answers are not:
CoT-SFT sees the reasoning of only the first `--sft_items` training videos (8), GRPO learns from
all of them (400) with the answer as its only label.

    python launch/demo.py --workdir=runs/demo [--config.train.steps=...] [--sft_steps=...]
"""

import common  # noqa: F401

common.cpu_devices()

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(common.ROOT, "configs/demo.py"),
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
    if common.is_main_process():
        print(f"\n=== {msg} ===", flush=True)


def train_stage(trainer, train_fn, cfg, work: str, name: str):
    """Train (or resume) one stage, export it and evaluate it on the validation split; a stage
    whose last checkpoint, export and report all exist is not run again."""
    workdir, export = os.path.join(work, name), os.path.join(work, f"{name}_model")
    report = os.path.join(work, "reports", f"val_after_{name}.json")
    last = os.path.join(workdir, "checkpoints", str(cfg.train.steps), "commit_success.txt")
    if all(os.path.exists(p) for p in (last, os.path.join(export, "config.json"), report)):
        print(f"{name} already done ({cfg.train.steps} steps): {export}, {report}", flush=True)
        with open(report) as f:
            return export, json.load(f)
    run = train_fn(cfg, workdir)
    ckpt = trainer.export(run, export)
    result = trainer.evaluate_checkpoint(cfg, ckpt, os.path.join(work, "reports"),
                                         name=f"val_after_{name}")
    return ckpt, result


def check_flags() -> tuple[str, ...]:
    """Usage errors for flag values the demo cannot use; returns the question types."""
    if _SFT_ITEMS.value < 0:
        raise app.UsageError(f"--sft_items must be >= 0 (0: all), got {_SFT_ITEMS.value}")
    from lvr_jax.data.synthetic import check_qtypes
    try:
        return check_qtypes(_QTYPES.value)
    except ValueError as e:
        raise app.UsageError(f"--qtypes: {e}") from None


def check_existing_inputs(data_dir: Path, qtypes: tuple[str, ...]) -> None:
    """A rerun must train on what its flags ask for: a synthetic set already in `data_dir` must
    have been written with the same flags, and its sft.jsonl must be the same subset."""
    if not (data_dir / "meta.json").exists():
        return
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    asked = dict(num_train=_NUM_TRAIN.value, num_val=_NUM_VAL.value, frames=_FRAMES.value,
                 qtypes=list(qtypes))
    there = dict(meta, qtypes=list(meta.get("qtypes", ())))
    diff = [f"{k}: {there.get(k)} there, {v} asked" for k, v in asked.items() if there.get(k) != v]
    if diff:
        raise app.UsageError(f"{data_dir} holds a synthetic set written with other settings "
                             f"({'; '.join(diff)}); use a new --workdir")
    sft = data_dir / "sft.jsonl"
    if sft.exists() and sft.read_text(encoding="utf-8") != sft_subset(train_lines(data_dir)):
        raise app.UsageError(f"{sft} holds another CoT-SFT subset than --sft_items="
                             f"{_SFT_ITEMS.value} asks for; use a new --workdir")


def train_lines(data_dir: Path) -> list[str]:
    return (data_dir / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)


def sft_subset(lines: list[str]) -> str:
    """The CoT-SFT set: the first --sft_items lines of train.jsonl (all of them for 0)."""
    return "".join(lines[:_SFT_ITEMS.value or len(lines)])


def main(_):
    qtypes = check_flags()
    if not flags.FLAGS["verbosity"].present:    # progress lines only; --verbosity=0 for library logs
        logging.set_verbosity(logging.WARNING)
    common.init_distributed()
    from lvr_jax.data.synthetic import generate_dataset
    from lvr_jax.train import trainer
    from lvr_jax.weights.tiny import make_random_checkpoint

    t0 = time.time()
    work = _WORKDIR.value
    config = _CONFIG.value
    data_dir = Path(work, "data")
    config.data.dir = str(data_dir)
    stage(f"synthetic data -> {data_dir}")
    init = os.path.join(work, "init")
    check_existing_inputs(data_dir, qtypes)    # every process, before anything is written
    common.barrier("demo_check")
    if common.is_main_process():         # one writer; the other processes wait at the barrier
        if not (data_dir / "meta.json").exists():
            generate_dataset(data_dir, num_train=_NUM_TRAIN.value, num_val=_NUM_VAL.value,
                             num_test=0, num_frames=_FRAMES.value, size=28, seed=0,
                             qtypes=qtypes)
        lines = train_lines(data_dir)
        (data_dir / "sft.jsonl").write_text(sft_subset(lines), encoding="utf-8")
        corpus = []
        for line in lines:
            rec = json.loads(line)
            corpus += [rec["problem"], rec["reasoning"]]
        if not os.path.exists(os.path.join(init, "config.json")):
            make_random_checkpoint(config.model, init, corpus=corpus)
        print(f"random tiny VLM + tokenizer -> {init}", flush=True)
    common.barrier("demo_inputs")

    sft_cfg = config.copy_and_resolve_references()
    sft_cfg.init_checkpoint = init
    sft_cfg.data.train_files = str(data_dir / "sft.jsonl")
    sft_cfg.train.steps = _SFT_STEPS.value
    sft_cfg.optim.lr = _SFT_LR.value
    sft_cfg.profile.num_steps = 0
    stage(f"CoT-SFT, {sft_cfg.train.steps} steps")
    sft_ckpt, before = train_stage(trainer, trainer.train_sft, sft_cfg, work, "sft")

    grpo_cfg = config.copy_and_resolve_references()
    grpo_cfg.init_checkpoint = str(sft_ckpt)
    stage(f"GRPO, {grpo_cfg.train.steps} steps, G={grpo_cfg.rl.group_size}")
    _, after = train_stage(trainer, trainer.train_grpo, grpo_cfg, work, "grpo")

    stage("result")
    if common.is_main_process():
        from plot_metrics import first_last, plot, read_runs
        grpo_metrics = os.path.join(work, "grpo", "metrics.jsonl")
        png = plot([os.path.join(work, "sft", "metrics.jsonl"), grpo_metrics],
                   os.path.join(work, "curves.png"))
        reward = first_last(read_runs([grpo_metrics]).get("grpo", []), 20).get("reward_mean")
        if reward:
            print(f"GRPO reward (sampled) mean: {reward[0]:.3f} over the first 20 steps, "
                  f"{reward[1]:.3f} over the last 20")
        print(f"validation accuracy after SFT : {before['accuracy']:.3f} (n={before['n']})")
        print(f"validation accuracy after GRPO: {after['accuracy']:.3f} (n={after['n']})")
        for cat in after["per_category"]:
            b = before["per_category"].get(cat, {}).get("accuracy")
            print(f"  {cat:10s} {b:.3f} -> {after['per_category'][cat]['accuracy']:.3f}")
        print(f"curves: {png}; reports: {os.path.join(work, 'reports')}; "
              f"total {time.time() - t0:.0f}s", flush=True)
    common.finish()


if __name__ == "__main__":
    app.run(main)
