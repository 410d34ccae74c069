"""The README demo's pieces (launch/demo.py): the synthetic set and a random tiny VLM, one
resumable training stage at a time (train, export, evaluate), and the closing summary.

As in LongVILA-R1, chain-of-thought annotations are scarce and answers are not: CoT-SFT sees the
reasoning of only the first `sft_items` training videos (`sft.jsonl`), GRPO all of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from lvr_jax.data.prompts import template_corpus
from lvr_jax.eval.video_qa import evaluate_checkpoint
from lvr_jax.train.metrics import first_last, plot, read_runs
from lvr_jax.train.state import export


class DemoInputError(ValueError):
    """A rerun whose flags ask for other data than the workdir holds."""


@dataclasses.dataclass(frozen=True)
class DemoData:
    """What the demo's synthetic set is made of (the flags of launch/demo.py)."""
    num_train: int
    num_val: int
    frames: int
    qtypes: tuple[str, ...]
    sft_items: int       # CoT-SFT on the first N training items (0: all)

    def __post_init__(self):
        if self.sft_items < 0:
            raise ValueError(f"--sft_items must be >= 0 (0: all), got {self.sft_items}")

    def sft_subset(self, lines: list[str]) -> str:
        """The CoT-SFT set: the first `sft_items` lines of train.jsonl (all of them for 0)."""
        return "".join(lines[:self.sft_items or len(lines)])


def train_lines(data_dir: Path) -> list[str]:
    return (data_dir / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)


def check_existing_inputs(data_dir: Path, want: DemoData) -> None:
    """A rerun must train on what its flags ask for: a synthetic set already in `data_dir` must
    have been written with the same settings, and its sft.jsonl must be the same subset."""
    if not (data_dir / "meta.json").exists():
        return
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    asked = dict(num_train=want.num_train, num_val=want.num_val, frames=want.frames,
                 qtypes=list(want.qtypes))
    there = dict(meta, qtypes=list(meta.get("qtypes", ())))
    diff = [f"{k}: {there.get(k)} there, {v} asked" for k, v in asked.items() if there.get(k) != v]
    if diff:
        raise DemoInputError(f"{data_dir} holds a synthetic set written with other settings "
                             f"({'; '.join(diff)}); use a new --workdir")
    sft = data_dir / "sft.jsonl"
    if sft.exists() and sft.read_text(encoding="utf-8") != want.sft_subset(train_lines(data_dir)):
        raise DemoInputError(f"{sft} holds another CoT-SFT subset than --sft_items="
                             f"{want.sft_items} asks for; use a new --workdir")


def write_inputs(data_dir: Path, init: Path, want: DemoData, model_section, *,
                 seed: int = 0) -> None:
    """The synthetic set (once), its CoT-SFT subset, and a random tiny VLM (`write_init`, once).
    One process writes; the others wait."""
    from lvr_jax.data.synthetic import generate_dataset

    if not (data_dir / "meta.json").exists():
        generate_dataset(data_dir, num_train=want.num_train, num_val=want.num_val, num_test=0,
                         num_frames=want.frames, size=28, seed=0, qtypes=want.qtypes)
    (data_dir / "sft.jsonl").write_text(want.sft_subset(train_lines(data_dir)), encoding="utf-8")
    write_init(init, model_section, data_dir, seed=seed)


def write_init(init: Path, model_section, data_dir: Path, *, seed: int = 0) -> None:
    """A random tiny VLM (weights from `seed`) with a BPE tokenizer trained on the set's text, so
    the prompt wording takes a few tokens each, not one per byte; once per folder."""
    from lvr_jax.weights.tiny import make_random_checkpoint

    corpus = template_corpus()
    for line in train_lines(data_dir):
        rec = json.loads(line)
        corpus += [rec["problem"], rec["reasoning"]]
    if not (init / "config.json").exists():
        make_random_checkpoint(model_section, init, seed=seed, corpus=corpus)
    print(f"random tiny VLM (seed {seed}) + tokenizer -> {init}", flush=True)


def train_stage(train_fn, cfg, work, name: str):
    """Train (or resume) one stage, export it and evaluate it on the validation split; a stage
    whose last checkpoint, export and report all exist is not run again. Returns (export
    folder, evaluation result)."""
    workdir, exported = os.path.join(work, name), os.path.join(work, f"{name}_model")
    report = os.path.join(work, "reports", f"val_after_{name}.json")
    last = os.path.join(workdir, "checkpoints", str(cfg.train.steps), "commit_success.txt")
    if all(os.path.exists(p) for p in (last, os.path.join(exported, "config.json"), report)):
        print(f"{name} already done ({cfg.train.steps} steps): {exported}, {report}", flush=True)
        with open(report) as f:
            return exported, json.load(f)
    ckpt = export(train_fn(cfg, workdir), exported)
    result = evaluate_checkpoint(cfg, ckpt, os.path.join(work, "reports"),
                                 name=f"val_after_{name}")
    return ckpt, result


def summary(work, before: dict, after: dict) -> list[str]:
    """The closing lines: the curves' PNG, the GRPO reward's first / last 20-step means, the
    validation accuracy after each stage, overall and per category."""
    grpo_metrics = os.path.join(work, "grpo", "metrics.jsonl")
    png = plot([os.path.join(work, "sft", "metrics.jsonl"), grpo_metrics],
               os.path.join(work, "curves.png"))
    lines = []
    reward = first_last(read_runs([grpo_metrics]).get("grpo", []), 20).get("reward_mean")
    if reward:
        lines.append(f"GRPO reward (sampled) mean: {reward[0]:.3f} over the first 20 steps, "
                     f"{reward[1]:.3f} over the last 20")
    lines.append(f"validation accuracy after SFT : {before['accuracy']:.3f} (n={before['n']})")
    lines.append(f"validation accuracy after GRPO: {after['accuracy']:.3f} (n={after['n']})")
    for cat in after["per_category"]:
        b = before["per_category"].get(cat, {}).get("accuracy")
        lines.append(f"  {cat:10s} {b:.3f} -> {after['per_category'][cat]['accuracy']:.3f}")
    return lines + [f"curves: {png}; reports: {os.path.join(work, 'reports')}"]
