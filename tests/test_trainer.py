"""Training loop: exact resume after SIGKILL, a SIGTERM stop that saves at a step boundary,
non-finite updates skipped and counted."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lvr_jax.train import state as train_state
from lvr_jax.train.loop import StopRequest
from tests.conftest import launch_env, synthetic_run_inputs

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A small synthetic set and a random tiny VILA checkpoint with its tokenizer."""
    return synthetic_run_inputs(tmp_path_factory.mktemp("train"), num_train=12)


def sft_cmd(root: Path, workdir: Path):
    return [sys.executable, str(ROOT / "launch" / "train_sft.py"),
            f"--config={ROOT / 'configs' / 'demo.py'}", f"--workdir={workdir}",
            f"--config.init_checkpoint={root / 'init'}", f"--config.data.dir={root / 'data'}",
            f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=4",
            "--config.train.log_every=100", "--config.data.pipeline.batch_size=2",
            "--config.data.pipeline.num_frames=4"]


def losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows}          # last row of a step wins


def test_sigkill_then_resume_matches_uninterrupted(tiny_setup, tmp_path):
    # the three runs compile the same programs, then spend their time in 40 + 40 - 8 steps
    env = launch_env(tmp_path / "jit_cache", optimized=True)
    full = tmp_path / "full"
    subprocess.run(sft_cmd(tiny_setup, full), check=True, env=env, timeout=600,
                   capture_output=True)
    want = losses(full)
    assert sorted(want) == list(range(1, STEPS + 1))

    cut = tmp_path / "cut"
    proc = subprocess.Popen(sft_cmd(tiny_setup, cut), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    marker = cut / "checkpoints" / "8" / "commit_success.txt"
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert marker.exists(), "the run ended before its step-8 checkpoint"
    done_before = max(losses(cut))
    assert done_before < STEPS, "the run finished before it was killed"
    out = subprocess.run(sft_cmd(tiny_setup, cut), check=True, env=env, timeout=600,
                         capture_output=True, text=True)
    resumed = int(out.stdout.split("resumed from checkpoint step ")[1].split()[0])
    assert 8 <= resumed < STEPS
    got = losses(cut)
    # the rows logged after the step-`resumed` checkpoint by the killed run were dropped on resume
    assert [json.loads(x)["step"] for x in open(cut / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert (f"dropped {done_before - resumed} rows after step {resumed}" in out.stdout
            if done_before > resumed else "dropped" not in out.stdout)
    for step in range(resumed + 1, STEPS + 1):
        assert got[step] == want[step], step


def test_nonfinite_updates_are_skipped_counted_and_stop_the_run():
    optim = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=1, final_lr_fraction=0.1,
                                           b1=0.9, b2=0.98, weight_decay=0.0, grad_clip=1.0,
                                           grad_accum_steps=1))
    tx = train_state.make_optimizer(optim, 10)
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=3), jnp.float32)}
    state = tx.init(params)
    good = {"w": jnp.ones(3)}
    bad = {"w": jnp.asarray([1.0, jnp.nan, 0.0])}
    upd, state = tx.update(good, state, params)
    params = optax.apply_updates(params, upd)
    before = np.asarray(params["w"])
    for i in range(2):
        upd, state = tx.update(bad, state, params)
        params = optax.apply_updates(params, upd)
        np.testing.assert_array_equal(params["w"], before)   # update skipped
        assert train_state.nonfinite_counts(state) == (i + 1, i + 1)

    metrics = {}
    with pytest.raises(train_state.NonFiniteError, match="2 consecutive steps"):
        train_state.check_finite_counts(7, state, 2, metrics)
    assert metrics["nonfinite_skipped"] == 2
    upd, state = tx.update(good, state, params)
    assert train_state.nonfinite_counts(state) == (0, 2)
    assert jax.tree.leaves(upd)[0].shape == (3,)


def test_schedule_counts_optimizer_updates_under_gradient_accumulation():
    """40 steps with grad_accum_steps=4 are 10 updates: warmup of 2 updates, then the cosine
    decay reaches its end at the last update (not at a quarter of the way)."""
    optim = ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=2, final_lr_fraction=0.0,
                                           b1=0.9, b2=0.98, weight_decay=0.0, grad_clip=1e9,
                                           grad_accum_steps=4))
    tx = train_state.make_optimizer(optim, 40)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    sizes = []
    for step in range(1, 41):
        upd, state = tx.update({"w": jnp.ones(())}, state, params)
        if step % 4 == 0:
            sizes.append(abs(float(upd["w"])))
        else:
            assert float(upd["w"]) == 0.0                      # accumulating, no update yet
    assert sizes[0] == 0.0 and abs(sizes[2] - 1.0) < 1e-5       # warmup 0 -> peak at update 2
    assert all(a > b for a, b in zip(sizes[2:], sizes[3:]))      # decays every update after
    assert sizes[-1] < 0.05


@pytest.mark.parametrize("updates", [1, 10])
def test_cosine_without_warmup_starts_at_the_full_rate(updates):
    """warmup_steps = 0: update 0 at lr, then the cosine to final_lr_fraction (the first update
    had been at rate 0; with one update the run changed nothing)."""
    optim = ml_collections.ConfigDict(dict(lr=0.5, warmup_steps=0, final_lr_fraction=0.1))
    sched = train_state.learning_rate(optim, updates)
    i = np.arange(updates)
    want = 0.5 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * i / updates)))
    np.testing.assert_allclose([float(sched(k)) for k in i], want, rtol=1e-6)


@pytest.mark.parametrize("key,bad", [("train.keep_checkpoints", 0), ("train.checkpoint_every", 0),
                                     ("train.log_every", -1), ("optim.grad_accum_steps", 0),
                                     ("train.steps", -1), ("optim.warmup_steps", -1)])
def test_bad_counts_are_refused_naming_the_key(key, bad):
    """keep_checkpoints = 0 had made orbax keep none (every checkpoint deleted, exit 0);
    checkpoint_every / log_every = 0 divided by zero after the first step."""
    from configs import demo
    from lvr_jax.train import settings

    config = demo.get_config("sft")
    settings.check_counts(config)
    section, name = key.split(".")
    config[section][name] = bad
    with pytest.raises(ValueError, match=rf"{re.escape(key)} must be an integer >= \d, got {bad}"):
        settings.check_counts(config)


def test_stop_request_is_one_flag_for_any_process_count():
    """SIGTERM / SIGINT only set the flag the loop checks at a step boundary (one process: no
    collective); a second signal stops at once; the old handlers come back afterwards."""
    before = {s: signal.getsignal(s) for s in StopRequest.SIGNALS}
    with StopRequest() as stop:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stop.asked and stop.agreed()
        with pytest.raises(KeyboardInterrupt, match="received twice"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert {s: signal.getsignal(s) for s in StopRequest.SIGNALS} == before


def _toy_run(workdir, config):
    """A Run of the real loop, checkpointer and metrics around a 2x2 linear model (no data
    pipeline): what the loop's bookkeeping needs and no more."""
    from flax import nnx

    from lvr_jax.train.checkpoint import Checkpointer
    from lvr_jax.train.metrics import MetricsWriter

    class Batches:
        def __next__(self):
            return {}

        def get_state(self):
            return {}

        def set_state(self, state):
            pass

    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, train_state.make_optimizer(config.optim, config.train.steps),
                        wrt=nnx.Param)
    run = train_state.Run(config, Path(workdir), None, model, None, opt,
                          Checkpointer(Path(workdir) / "checkpoints", max_to_keep=2),
                          MetricsWriter(str(workdir)), None, Batches(), 0, jax.random.key(0))
    train_state.restore(run)
    return run


def test_a_profile_window_past_the_last_step_is_written_and_stopped(tmp_path):
    """The trace is stopped when the loop ends inside the window (it was never written, and the
    profiler kept running, so the next stage's loop in the same process failed)."""
    from configs import demo
    from lvr_jax.train.loop import loop

    config = demo.get_config("sft")
    config.train.update(steps=3, checkpoint_every=2, log_every=1)
    config.profile.update(start_step=1, num_steps=5)

    @jax.jit
    def update(params, x):
        return jax.tree.map(lambda p: p - 0.1 * x, params)

    def step_fn(run, batch):
        from flax import nnx
        nnx.update(run.model, update(nnx.state(run.model, nnx.Param), 1.0))
        return {"loss": jnp.zeros(())}

    for stage in ("a", "b"):                          # two stages, as demo.py runs SFT then GRPO
        run = _toy_run(tmp_path / stage, config)
        loop(run, step_fn, what=stage)
        run.ckpt.close()
        assert list((tmp_path / stage / "trace").rglob("*.xplane.pb")), stage
