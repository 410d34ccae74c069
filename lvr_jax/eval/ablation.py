"""launch/ablate.py's two studies of the paper's learning claims, at CPU size, on the demo's
synthetic `majority` task (which colour fills the screen longest over 8 equal parts of a video):

* frames: CoT-SFT on every training chain, trained and evaluated at several frames per clip. The
  answer needs a look at each of the k = 8 parts, so accuracy should rise up to 8 frames and then
  flatten (the paper: LongVILA-R1's accuracy rises from 16 to 512 frames).
* stages: with the demo's scarce chains (CoT-SFT sees the reasoning of `sft_items` videos, GRPO
  the answers of all), CoT-SFT only, GRPO only (from the random model) and CoT-SFT then GRPO, all
  with the same total number of steps (the paper: CoT-SFT + RL beats either alone).

Each arm is a normal run of `train_sft` / `train_grpo` (the public launchers' functions) through
the demo's `train_stage`, in its own folder, resumable: a finished stage is not run again, a killed
one resumes from its last checkpoint. Every arm shares one synthetic set and, per seed, one random
initial model (weights from the seed; the seed also drives the data order and sampling).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from lvr_jax.eval import demo
from lvr_jax.weights.io import atomic_write

PARTS = 8                    # the majority task's parts: frames needed to see each one once
TOKENS_PER_FRAME = 16        # the tiny vision tower: 7 x 7 patches, 2 x 2 merge (padded) -> 4 x 4
STUDIES = ("frames", "stages")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training run: `stages` ((name, steps), ...) from the seed's random model, the model
    seeing `frames` frames per clip; SFT on the chains of `sft_file` (under the data folder)."""
    study: str
    name: str
    seed: int
    frames: int
    stages: tuple[tuple[str, int], ...]
    sft_file: str = "sft.jsonl"

    @property
    def folder(self) -> str:
        return f"{self.study}/seed{self.seed}/{self.name}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What launch/ablate.py was asked for."""
    studies: tuple[str, ...]
    seeds: tuple[int, ...]
    frames: tuple[int, ...]          # frames study: frames per clip
    frames_sft_steps: int            # frames study: CoT-SFT steps on every chain
    stage_frames: int                # stages study: frames per clip (the demo's 8)
    sft_steps: int                   # stages study: S CoT-SFT steps ...
    grpo_steps: int                  # ... then G GRPO steps; the single-stage arms get S + G


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """"4,8,16" -> (4, 8, 16): distinct integers, kept in order; ValueError naming `what`."""
    try:
        vals = tuple(dict.fromkeys(int(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise ValueError(f"{what} is empty")
    return vals


def check_plan(plan: Plan, video_frames: int) -> Plan:
    """ValueError naming the first bad setting."""
    bad = [s for s in plan.studies if s not in STUDIES]
    if bad or not plan.studies:
        raise ValueError(f"unknown studies {bad or plan.studies}; known: {list(STUDIES)}")
    if any(s < 0 for s in plan.seeds):
        raise ValueError(f"seeds must be >= 0, got {plan.seeds}")
    for f in plan.frames + (plan.stage_frames,):
        if not 1 <= f <= video_frames:
            raise ValueError(f"frames per clip must be in [1, {video_frames}] (the videos' "
                             f"length, --video_frames), got {f}")
    for name in ("frames_sft_steps", "sft_steps", "grpo_steps"):
        if getattr(plan, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(plan, name)}")
    return plan


def arms(plan: Plan) -> list[Arm]:
    """Every run of the plan, seed-major (one seed's whole study finishes before the next)."""
    out = []
    total = plan.sft_steps + plan.grpo_steps
    for seed in plan.seeds:
        if "frames" in plan.studies:
            out += [Arm("frames", f"frames{f}", seed, f, (("sft", plan.frames_sft_steps),),
                        sft_file="train.jsonl") for f in plan.frames]
        if "stages" in plan.studies:
            f = plan.stage_frames
            out += [Arm("stages", "sft", seed, f, (("sft", total),)),
                    Arm("stages", "grpo", seed, f, (("grpo", total),)),
                    Arm("stages", "sft_grpo", seed, f,
                        (("sft", plan.sft_steps), ("grpo", plan.grpo_steps)))]
    return out


def max_length(frames: int) -> int:
    """Prompt + reply tokens: the demo's 320 at 8 frames, 16 more per extra frame."""
    return max(320, 320 + TOKENS_PER_FRAME * (frames - 8))


def stage_config(base, arm: Arm, stage: str, steps: int, start: str, data_dir: Path, sft_lr: float):
    """The config of one stage of `arm`: the demo's GRPO config (`base`), or its CoT-SFT settings
    (the demo's --sft_lr, projector trained), with the arm's seed, frames and steps."""
    cfg = base.copy_and_resolve_references()
    cfg.init_checkpoint = str(start)
    cfg.data.dir = str(data_dir)
    cfg.train.steps = steps
    cfg.train.seed = arm.seed
    cfg.data.pipeline.seed = arm.seed
    cfg.data.pipeline.num_frames = arm.frames
    cfg.data.pipeline.max_length = max(int(cfg.data.pipeline.max_length), max_length(arm.frames))
    cfg.profile.num_steps = 0
    if stage == "sft":
        cfg.data.train_files = str(data_dir / arm.sft_file)
        cfg.optim.lr = sft_lr
        cfg.train.freeze_projector = False
    return cfg


def run_arm(arm: Arm, base, work: Path, *, sft_lr: float) -> dict:
    """Train (or resume) every stage of `arm` and evaluate each on the validation split; returns
    and writes `<arm folder>/result.json`: the accuracy after each stage and the seconds each
    stage took (training and evaluation; for a stage resumed after a kill, the run that finished
    it)."""
    from lvr_jax.train.grpo import train_grpo
    from lvr_jax.train.sft import train_sft

    folder = work / arm.folder
    done = folder / "result.json"
    if done.exists():
        result = json.loads(done.read_text())
        asked = json.loads(json.dumps(dict(dataclasses.asdict(arm), sft_lr=sft_lr)))
        differs = {k: (result[k], v) for k, v in asked.items()
                   if k in result and result[k] != v}
        if differs:   # (stored, asked): a rerun must train on what its flags ask for
            raise ValueError(f"{done} was trained with other settings {differs} (stored, "
                             f"asked); use a new --workdir")
        return result
    start = str(work / f"init_seed{arm.seed}")
    times_file = folder / "stage_seconds.json"       # a stage's time, kept across reruns
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    stages = []
    for i, (stage, steps) in enumerate(arm.stages):
        cfg = stage_config(base, arm, stage, steps, start, work / "data", sft_lr)
        name = f"{i}_{stage}"
        t0 = time.perf_counter()
        start, result = demo.train_stage(train_sft if stage == "sft" else train_grpo, cfg,
                                         str(folder), name)
        if name not in times:
            times[name] = round(time.perf_counter() - t0, 1)
            atomic_write(times_file, json.dumps(times).encode())
        stages.append(dict(stage=stage, steps=steps, accuracy=result["accuracy"], n=result["n"],
                           format_rate=result.get("format_rate"), seconds=times[name]))
    out = dict(dataclasses.asdict(arm), sft_lr=sft_lr, accuracy=stages[-1]["accuracy"],
               n=stages[-1]["n"],
               stage_results=stages, seconds=round(sum(s["seconds"] for s in stages), 1))
    atomic_write(done, json.dumps(out, indent=2).encode())
    return out
