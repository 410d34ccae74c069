"""The README demo, shrunk: killed during GRPO, rerun, it resumes from its last checkpoint; a rerun
asking for other data is refused."""

import dataclasses
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lvr_jax.eval.demo import DemoData, DemoInputError, check_existing_inputs
from tests.conftest import launch_env

ROOT = Path(__file__).resolve().parents[1]
GRPO_STEPS = 6


def demo_cmd(workdir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "demo.py"), f"--workdir={workdir}",
            "--num_train=12", "--num_val=4", "--video_frames=16", "--sft_steps=4", "--sft_items=4",
            f"--config.train.steps={GRPO_STEPS}", "--config.train.checkpoint_every=2",
            "--config.train.log_every=1", "--config.rl.group_size=2",
            "--config.rl.max_new_tokens=8", "--config.eval.max_new_tokens=8",
            "--config.eval.batch_size=4", "--config.data.pipeline.num_frames=4",
            "--config.data.pipeline.batch_size=2"]


def test_killed_demo_resumes_from_its_last_checkpoint(tmp_path):
    env = launch_env(tmp_path / "jit_cache")      # the rerun loads the killed run's programs
    work = tmp_path / "demo"
    first_log = tmp_path / "first.log"
    with first_log.open("w") as log:
        proc = subprocess.Popen(demo_cmd(work), env=env, stdout=log, stderr=subprocess.DEVNULL)
    marker = work / "grpo" / "checkpoints" / "2" / "commit_success.txt"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert marker.exists(), "the demo ended before its GRPO step-2 checkpoint"
    assert not (work / "reports" / "val_after_grpo.json").exists(), "the demo finished"

    out = subprocess.run(demo_cmd(work), env=env, timeout=600, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "sft already done (4 steps)" in out.stdout
    assert f"[data] 12 training items from {work / 'data' / 'train.jsonl'}" in out.stdout  # GRPO
    sft_set = (work / "data" / "sft.jsonl").read_text().splitlines()    # CoT-SFT: 4 of 12 items
    assert sft_set == (work / "data" / "train.jsonl").read_text().splitlines()[:4]
    assert f"[data] 4 training items from {work / 'data' / 'sft.jsonl'}" in first_log.read_text()
    resumed = int(re.search(r"resumed from checkpoint step (\d+)", out.stdout).group(1))
    assert 2 <= resumed < GRPO_STEPS
    assert f"[grpo] step {GRPO_STEPS}/{GRPO_STEPS}" in out.stdout
    assert f"[grpo] step {resumed}/" not in out.stdout      # steps before the resume not redone
    after = re.search(r"validation accuracy after GRPO: ([0-9.]+) \(n=4\)", out.stdout)
    assert after is not None, out.stdout[-2000:]
    assert re.search(r"GRPO reward \(sampled\) mean: [0-9.]+ over the first 20 steps, [0-9.]+ over "
                     r"the last 20", out.stdout), out.stdout[-2000:]
    assert (work / "reports" / "val_after_grpo.md").exists()
    assert (work / "curves.png").stat().st_size > 0

    # a rerun asking for other data stops before training, naming what differs: the launch
    # script once, then the check it runs on each kind of difference
    bad = subprocess.run(demo_cmd(work) + ["--qtypes=corner"], env=env, timeout=300,
                         capture_output=True, text=True)
    says = "qtypes: ['majority'] there, ['corner'] asked"
    assert bad.returncode != 0 and says in bad.stderr + bad.stdout, bad.stderr[-2000:]
    assert "[data]" not in bad.stdout
    asked = DemoData(num_train=12, num_val=4, frames=16, qtypes=("majority",), sft_items=4)
    check_existing_inputs(work / "data", asked)                       # what the demo ran
    for change, says in ((dict(sft_items=5), "another CoT-SFT subset than --sft_items=5"),
                         (dict(num_val=5), "num_val: 4 there, 5 asked"),
                         (dict(frames=8), "frames: 16 there, 8 asked")):
        with pytest.raises(DemoInputError, match=re.escape(says)):
            check_existing_inputs(work / "data", dataclasses.replace(asked, **change))
    with pytest.raises(ValueError, match=re.escape("--sft_items must be >= 0 (0: all), got -1")):
        dataclasses.replace(asked, sft_items=-1)
