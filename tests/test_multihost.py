"""Multi-controller JAX: 2 processes x 4 CPU devices (gloo) run GRPO like 1 process x 8 devices,
including a resume from a checkpoint that both processes wrote. A random model scored by a
reward its replies vary under (`varied_reward`): what is compared is the distributed run, not
learning (no SFT stage first)."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import demo
from lvr_jax.data.prompts import template_corpus
from tests.conftest import launch_env

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def varied_reward(replies, records):
    """A reward that a random model's replies already vary under (their length mod 4), so GRPO's
    advantages and loss are not all 0 without an SFT stage first."""
    return [(len(r) % 4) / 3 for r in replies]


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    """A tiny random VLM and a synthetic set; GRPO is scored by `varied_reward`."""
    from lvr_jax.data.synthetic import generate_dataset
    from lvr_jax.weights.tiny import make_random_checkpoint

    root = tmp_path_factory.mktemp("multihost")
    generate_dataset(root / "data", num_train=16, num_val=0, num_test=0, num_frames=16, size=28)
    rows = [json.loads(x) for x in open(root / "data" / "train.jsonl")]
    corpus = [r["problem"] for r in rows] + template_corpus()
    make_random_checkpoint(demo.get_config().model, root / "init", corpus=corpus)
    return root


def data_flags(root: Path, init: Path) -> list[str]:
    return [f"--config.init_checkpoint={init}", f"--config.data.dir={root / 'data'}",
            "--config.data.pipeline.num_frames=4", "--config.train.log_every=100"]


def grpo_cmd(root: Path, workdir: Path, steps: int) -> list[str]:
    return [sys.executable, str(LAUNCH / "train_grpo.py"), f"--config={ROOT / 'configs/demo.py'}",
            f"--workdir={workdir}", *data_flags(root, root / "init"),
            "--config.rl.reward_fn=tests.test_multihost:varied_reward",
            f"--config.train.steps={steps}", "--config.train.checkpoint_every=2",
            "--config.rl.group_size=4", "--config.rl.max_new_tokens=24",
            "--config.data.pipeline.batch_size=2"]


def env(cache=None):
    """`launch_env(cache)` without a coordinator, with this repo on the path (for the reward).
    A cache shared by the processes of one run is safe: jax writes entries from process 0 only."""
    out = {k: v for k, v in launch_env(cache).items() if not k.startswith("JAX_COORDINATOR")}
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT), out.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return out


def run(cmd, timeout=900, cache=None):
    out = subprocess.run(cmd, env=env(cache), timeout=timeout, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def two_processes(cmd) -> list[str]:
    return [sys.executable, str(LAUNCH / "run_local.py"), "--num_processes=2",
            "--cpu_devices_per_process=4", "--timeout_s=800", "--grace_s=30", "--", *cmd]


def metrics(workdir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, open(workdir / "metrics.jsonl"))}


STEPS = 4
PHASES = ("encode", "prefill", "decode", "reward", "logprob", "update")


@pytest.fixture(scope="module")
def one_process(run_inputs, tmp_path_factory):
    """1 process x 8 devices, STEPS GRPO steps, step 1 profiled."""
    workdir = tmp_path_factory.mktemp("one")
    out = run(grpo_cmd(run_inputs, workdir, STEPS) + ["--config.profile.start_step=1",
                                                      "--config.profile.num_steps=1"])
    assert f"XLA trace (xplane + perfetto) of steps 1..1 in {workdir / 'trace'}" in out
    return workdir


def test_profiled_step_has_named_phases_in_order(one_process):
    runs = list((one_process / "trace" / "plugins" / "profile").iterdir())
    assert len(runs) == 1
    assert list(runs[0].glob("*.xplane.pb")), "no xplane file"
    events = json.load(gzip.open(runs[0] / "perfetto_trace.json.gz"))
    events = events["traceEvents"] if isinstance(events, dict) else events
    spans = {e["name"]: (e["ts"], e["ts"] + e.get("dur", 0)) for e in events
             if e.get("name") in PHASES + ("grpo",) and "ts" in e}
    assert set(spans) == set(PHASES) | {"grpo"}, sorted(spans)
    step_start, step_end = spans["grpo"]
    starts = [spans[p][0] for p in PHASES]
    assert starts == sorted(starts), dict(zip(PHASES, starts))
    assert all(step_start <= spans[p][0] and spans[p][1] <= step_end for p in PHASES)


def test_two_processes_match_one_process_and_resume_after_sigterm(one_process, run_inputs,
                                                                   tmp_path):
    steps = STEPS
    want = metrics(one_process)
    assert sorted(want) == list(range(1, steps + 1))
    # all replies run to max_new_tokens (a random model), so at ratio 1 the policy loss is 0 up to
    # rounding; the gradient is not, unless every advantage is 0
    norms = [want[s]["grad_norm"] for s in want]
    assert min(norms) > 1e-3, f"degenerate GRPO run (all advantages 0): {norms}"

    # 2 x 4 devices; SIGTERM once the step-2 checkpoint exists: both processes agree to stop at
    # the next step boundary, save together and exit 0; the rerun resumes there.
    two, cache = tmp_path / "two", tmp_path / "jit_cache"      # the rerun loads the programs
    proc = subprocess.Popen(two_processes(grpo_cmd(run_inputs, two, steps)), env=env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = two / "checkpoints" / "2" / "commit_success.txt"
    deadline = time.time() + 800
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "[p0] [launch] process 0/2, 4 local of 8 devices" in out
    assert "[p1] [launch] process 1/2, 4 local of 8 devices" in out
    stopped = int(out.split("stopped by a signal at step ")[1].split(";")[0])
    assert 2 <= stopped < steps, out[-3000:]

    out = run(two_processes(grpo_cmd(run_inputs, two, steps)), cache=cache)
    assert f"resumed from checkpoint step {stopped}" in out
    got = metrics(two)
    assert sorted(got) == list(range(1, steps + 1))
    for step in want:
        for key in ("loss", "policy_loss", "kl", "entropy", "grad_norm"):
            # the policy loss is 0 up to rounding here (see above): 4e-8 apart in a passing run
            atol = 5e-7 if key in ("loss", "policy_loss") else 1e-7
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-4, atol=atol,
                                       err_msg=f"step {step} {key}")
        for key in ("reward_mean", "accuracy", "format_rate", "response_length"):
            assert got[step][key] == want[step][key], (step, key)


# ---------------------------------------------------------------------------------------------
# launch plumbing (no JAX processes)


def launch_common():
    from lvr_jax import cli
    return cli


class FakeFlags:
    def __init__(self, coordinator_address=None, num_processes=None, process_id=None):
        self.coordinator_address = coordinator_address
        self.num_processes = num_processes
        self.process_id = process_id


def test_distributed_settings_flags_then_env_then_slurm():
    cli = launch_common()
    settings = cli.distributed_settings
    # what run_local.py gives process 1 of 2 is what init_distributed reads back
    launched = cli.process_env({}, index=1, count=2, port=5, cpu_devices=4, gpus=None)
    assert settings(None, launched) == {"coordinator_address": "localhost:5", "num_processes": 2,
                                        "process_id": 1}
    env = {"JAX_COORDINATOR": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
           "SLURM_NTASKS": "8"}
    assert settings(FakeFlags("f:2", 2, 1), env) == {"coordinator_address": "f:2",
                                                     "num_processes": 2, "process_id": 1}
    assert settings(FakeFlags(), env) == {"coordinator_address": "h:1", "num_processes": 4,
                                          "process_id": 3}
    assert settings(None, {"SLURM_NTASKS": "8"}) == {}          # jax reads SLURM itself
    assert settings(None, {"SLURM_NTASKS": "1"}) is None
    assert settings(FakeFlags(), {}) is None
    assert settings(FakeFlags("f:2", 1, 0), {}) is None         # one process: nothing to do
    with pytest.raises(ValueError, match="process_id 2 is not in"):
        settings(FakeFlags("f:2", 2, 2), {})
    with pytest.raises(ValueError, match="num_processes"):
        settings(FakeFlags("f:2", None, 0), {})
    # each value from its flag, else its variable: flags next to run_local's variables win one
    # by one (the variables had replaced them all); a count without an address is an error
    assert settings(FakeFlags(None, 4, 3), launched) == {"coordinator_address": "localhost:5",
                                                         "num_processes": 4, "process_id": 3}
    with pytest.raises(ValueError, match="without --coordinator_address"):
        settings(FakeFlags(None, 2, 1), {})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        settings(None, {"JAX_COORDINATOR": "h:1", "JAX_PROCESS_ID": "0"})
    # GPUs: each process a slice of what CUDA_VISIBLE_DEVICES lets the launcher see
    slices = [cli.process_env({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, index=i, count=2, port=5,
                              cpu_devices=None, gpus=2)["CUDA_VISIBLE_DEVICES"] for i in (0, 1)]
    assert slices == ["4,5", "6,7"]
    assert cli.process_env({}, index=1, count=2, port=5, cpu_devices=None,
                           gpus=2)["CUDA_VISIBLE_DEVICES"] == "2,3"
    with pytest.raises(ValueError, match="need 4 GPUs"):
        cli.process_env({"CUDA_VISIBLE_DEVICES": "4,5"}, index=0, count=2, port=5,
                        cpu_devices=None, gpus=2)


def test_run_local_fails_when_a_process_dies_by_a_signal_after_process_0():
    """A process killed by a signal (negative return code) after process 0 ended well is a
    failure; only processes run_local itself kills for hanging count as done."""
    code = ("import os, signal, time\n"
            "if os.environ['JAX_PROCESS_ID'] == '1':\n"
            "    time.sleep(1); os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, str(LAUNCH / "run_local.py"), "--num_processes=2",
                          "--grace_s=20", "--", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out.stdout + out.stderr


def test_run_local_stops_the_others_when_one_fails():
    code = ("import os, sys, time\n"
            "print('up', os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'], flush=True)\n"
            "sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(120)")
    t0 = time.time()
    out = subprocess.run([sys.executable, str(LAUNCH / "run_local.py"), "--num_processes=3",
                          "--grace_s=5", "--", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stdout + out.stderr
    assert time.time() - t0 < 40
    assert "[p1] up 1 3" in out.stdout and "[p0] up 0 3" in out.stdout
    assert "process 1 exited with 3; stopping the others" in out.stdout
