"""launch/ablate.py: the arms each study trains, their configs, the tables' statistics, and a toy
run of the frames study end to end (outputs' structure; a rerun trains nothing)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import demo as demo_config
from lvr_jax.eval import ablation, ablation_report
from tests.conftest import launch_env

ROOT = Path(__file__).resolve().parents[1]


def plan(**kw):
    base = dict(studies=("frames", "stages"), seeds=(0, 3), frames=(2, 8), frames_sft_steps=5,
                stage_frames=8, sft_steps=7, grpo_steps=4)
    return ablation.Plan(**{**base, **kw})


def test_arms_give_every_stage_arm_the_same_total_steps():
    arms = ablation.arms(plan())
    assert [a.folder for a in arms] == [
        "frames/seed0/frames2", "frames/seed0/frames8", "stages/seed0/sft", "stages/seed0/grpo",
        "stages/seed0/sft_grpo", "frames/seed3/frames2", "frames/seed3/frames8",
        "stages/seed3/sft", "stages/seed3/grpo", "stages/seed3/sft_grpo"]
    stages = {a.name: a.stages for a in arms if a.study == "stages"}
    assert stages == {"sft": (("sft", 11),), "grpo": (("grpo", 11),),
                      "sft_grpo": (("sft", 7), ("grpo", 4))}
    assert {a.sft_file for a in arms if a.study == "frames"} == {"train.jsonl"}   # every chain
    assert {a.sft_file for a in arms if a.study == "stages"} == {"sft.jsonl"}     # scarce chains
    assert [a.frames for a in arms[:5]] == [2, 8, 8, 8, 8]


@pytest.mark.parametrize("bad, says", [
    (dict(studies=("frames", "speed")), "unknown studies ['speed']"),
    (dict(frames=(2, 64)), "frames per clip must be in [1, 32]"),
    (dict(seeds=(-1,)), "seeds must be >= 0"),
    (dict(grpo_steps=0), "grpo_steps must be >= 1"),
])
def test_check_plan_names_the_bad_setting(bad, says):
    with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("]", r"\]")):
        ablation.check_plan(plan(**bad), video_frames=32)
    with pytest.raises(ValueError, match="comma-separated integers"):
        ablation.parse_ints("2,four", "--frames")


def test_stage_configs_carry_the_arms_seed_frames_and_stage_settings(tmp_path):
    base = demo_config.get_config("grpo")
    arm = ablation.Arm("frames", "frames16", 3, 16, (("sft", 5),), sft_file="train.jsonl")
    sft = ablation.stage_config(base, arm, "sft", 5, tmp_path / "init", tmp_path, sft_lr=2e-3)
    assert (sft.train.seed, sft.data.pipeline.seed, sft.data.pipeline.num_frames) == (3, 3, 16)
    assert sft.train.steps == 5 and sft.optim.lr == 2e-3 and not sft.train.freeze_projector
    assert sft.data.train_files == str(tmp_path / "train.jsonl")
    assert sft.init_checkpoint == str(tmp_path / "init")
    assert sft.data.pipeline.max_length == 320 + 16 * 8      # 16 tokens per extra frame
    arm = ablation.Arm("stages", "grpo", 1, 8, (("grpo", 9),))
    grpo = ablation.stage_config(base, arm, "grpo", 9, "init", tmp_path, sft_lr=2e-3)
    assert grpo.optim.lr == base.optim.lr and grpo.train.freeze_projector      # the GRPO recipe
    assert grpo.data.train_files == base.data.train_files        # all of train.jsonl's answers
    assert grpo.data.pipeline.max_length == 320 and grpo.train.steps == 9
    assert base.train.seed == 0 and base.data.pipeline.num_frames == 8         # base untouched


def test_a_finished_arm_asked_with_other_settings_is_refused(tmp_path):
    """result.json is reused only for the arm it was trained for (a rerun with other step counts
    or SFT rate had reported the old arm's accuracy under the new flags)."""
    arm = ablation.Arm("stages", "sft", 0, 8, (("sft", 400),))
    done = tmp_path / arm.folder / "result.json"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps(dict(dataclasses.asdict(arm), sft_lr=1e-3, accuracy=0.9)))
    base = demo_config.get_config("grpo")
    assert ablation.run_arm(arm, base, tmp_path, sft_lr=1e-3)["accuracy"] == 0.9
    for other, lr in ((dataclasses.replace(arm, stages=(("sft", 100),)), 1e-3), (arm, 2e-3)):
        with pytest.raises(ValueError, match="trained with other settings .*use a new --workdir"):
            ablation.run_arm(other, base, tmp_path, sft_lr=lr)


def result(study, name, seed, accs, frames=8, steps=None, fmt=0.5):
    steps = steps or [3] * len(accs)
    stages = [dict(stage="sft", steps=s, accuracy=a, n=4, format_rate=fmt, seconds=60.0)
              for s, a in zip(steps, accs)]
    return dict(study=study, name=name, seed=seed, frames=frames, accuracy=accs[-1],
                stage_results=stages, seconds=60.0 * len(accs))


def test_tables_report_mean_sd_and_range_over_seeds(tmp_path):
    rng = np.random.default_rng(0)
    acc = {(f, s): float(rng.uniform()) for f in (2, 4) for s in (0, 1, 2)}
    results = [result("frames", f"frames{f}", s, [acc[f, s]], frames=f) for (f, s) in acc]
    results += [result("stages", "sft_grpo", s, [0.2 + s / 10, 0.5 + s / 10], steps=[7, 4])
                for s in (0, 1)] + [result("stages", "sft", 0, [0.3], steps=[11])]
    rows = ablation_report.rows(results, "frames")
    assert [r["frames"] for r in rows] == [2, 4]
    for r in rows:
        vals = np.array([acc[r["frames"], s] for s in (0, 1, 2)])
        assert r["by_seed"] == {s: acc[r["frames"], s] for s in (0, 1, 2)}
        np.testing.assert_allclose([r["mean"], r["sd"], r["min"], r["max"]],
                                   [vals.mean(), vals.std(ddof=1), vals.min(), vals.max()])
    stages = ablation_report.rows(results, "stages")
    assert [(r["label"], r["steps"]) for r in stages] == [
        ("CoT-SFT only", "11"), ("CoT-SFT (first stage of the next row)", "7"),
        ("CoT-SFT then GRPO", "7+4")]
    np.testing.assert_allclose([stages[1]["mean"], stages[2]["mean"]], [0.25, 0.55])
    md = ablation_report.markdown(stages, "stages", [0, 1])
    assert "| CoT-SFT only | 11 | 0.300 | – | 0.300 ± 0.000 |" in md
    written = ablation_report.write(results, tmp_path, dict(seeds=[0, 1, 2]))
    assert [p.name for p in written] == ["results.json", "frames.md", "frames.png", "stages.md",
                                         "stages.png"]
    assert all(p.stat().st_size > 0 for p in written)
    # a later run of one study in the same workdir keeps the other study's arms in results.json
    # (it had kept only its own) and replaces its own arms
    again = [result("stages", "sft", 0, [0.4], steps=[11])]
    ablation_report.write(again, tmp_path, dict(seeds=[0]))
    arms = json.loads((tmp_path / "results.json").read_text())["arms"]
    assert len(arms) == len(results) and again[0] in arms and results[-1] not in arms


def test_ablate_frames_study_at_toy_size(tmp_path):
    work = tmp_path / "ablate"
    cmd = [sys.executable, str(ROOT / "launch" / "ablate.py"), f"--workdir={work}",
           "--study=frames", "--seeds=0", "--frames=2,4", "--frames_sft_steps=2",
           "--num_train=8", "--num_val=4", "--video_frames=16", "--sft_items=4",
           "--config.eval.max_new_tokens=8", "--config.eval.batch_size=4",
           "--config.data.pipeline.batch_size=2"]
    env = launch_env()
    out = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = json.loads((work / "results.json").read_text())
    assert got["settings"]["frames"] == [2, 4] and got["settings"]["seeds"] == [0]
    assert [(a["name"], a["frames"], a["seed"]) for a in got["arms"]] == [("frames2", 2, 0),
                                                                         ("frames4", 4, 0)]
    for arm in got["arms"]:
        (stage,) = arm["stage_results"]
        assert stage["stage"] == "sft" and stage["steps"] == 2 and stage["n"] == 4
        assert 0 <= stage["accuracy"] <= 1 and stage["seconds"] > 0
        report = work / "frames" / "seed0" / arm["name"] / "reports" / "val_after_0_sft.json"
        assert json.loads(report.read_text())["accuracy"] == arm["accuracy"]
    table = (work / "frames.md").read_text().splitlines()
    assert table[0].startswith("| frames per clip | steps | seed 0 | mean ± sd |")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| 2 frames", "| 4 frames"]
    assert (work / "frames.png").stat().st_size > 0 and not (work / "stages.md").exists()

    again = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[sft] step" not in again.stdout                      # nothing trained twice
    assert json.loads((work / "results.json").read_text())["arms"] == got["arms"]
