"""The training loop shared by the stages: steps until `train.steps`, checkpoints, metrics,
progress lines, profiling, and one stop mechanism for 1..N processes.

Stopping: SIGTERM / SIGINT set a flag; at each step boundary the processes agree whether any of
them was asked to stop (a collective, so every process decides the same), then all save one
checkpoint together and exit 0. A step is never cut in half, so the checkpoint always holds a
whole step (on a cluster, send the signal a step's time before the hard kill, e.g. SLURM
`--signal=TERM@300`).

Validation (`eval.every` > 0): `train.validation.Validator` answers the validation split greedily
at every `eval.every`-th step and at the last one, before the step's metrics row is written, so the
`val_*` keys join that row (one row per step); it keeps the best params in `<workdir>/best/` and
names them in `<workdir>/best.json` (see `lvr_jax.train.validation`).
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from lvr_jax.train.metrics import say
from lvr_jax.train.state import Run, save
from lvr_jax.train.validation import Validator

log = logging.getLogger(__name__)


def eta(done: int, total: int, elapsed: float, *, start: int = 0, unit: str = "step") -> str:
    """'40/200 (20%, 1.20 s/step, eta 3m12s)' for a progress line; `elapsed` seconds were spent
    on the items after `start` (a resumed run)."""
    rate = elapsed / max(done - start, 1)
    left = int(rate * (total - done))
    return (f"{done}/{total} ({100 * done // max(total, 1)}%, {rate:.2f} s/{unit}, "
            f"eta {left // 60}m{left % 60:02d}s)")


class StopRequest:
    """SIGTERM / SIGINT -> a flag; `agreed()` is True on every process once any process got one
    (a save is collective, so it cannot run inside one process's signal handler). Use as a
    context manager: the old handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.asked = False
        self._old = {}

    def __enter__(self) -> StopRequest:
        self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handler(self, signum, _frame):
        if self.asked:     # asked twice: stop now; the last periodic checkpoint stays
            raise KeyboardInterrupt(f"signal {signum} received twice: stopping without a save")
        log.warning("received signal %d: saving a checkpoint at the end of this step", signum)
        self.asked = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.asked
        return bool(np.any(multihost_utils.process_allgather(np.asarray([self.asked]))))


def trace_dir(run: Run) -> Path:
    """Where the XLA trace goes (one subfolder per process in multi-process runs)."""
    base = run.workdir / "trace"
    return base / f"process_{jax.process_index()}" if jax.process_count() > 1 else base


def _stop_trace(run: Run, start: int) -> bool:
    """End the XLA trace (written then); returns False (not tracing any more)."""
    jax.profiler.stop_trace()
    say(f"[train] XLA trace (xplane + perfetto) of steps {start}..{run.step - 1} in "
        f"{trace_dir(run)}")
    return False


def loop(run: Run, step_fn, *, what: str) -> list[dict]:
    """Run `step_fn(run, batch) -> metrics` until train.steps; validate, checkpoint, log,
    profile."""
    cfg = run.config
    total = int(cfg.train.steps)
    prof = cfg.profile
    rows = []
    validator = Validator.of(run, what) if run.step < total else None
    first, t_start = run.step, time.perf_counter()
    say(f"[{what}] steps {run.step}..{total}: checkpoints every {cfg.train.checkpoint_every} in "
        f"{run.ckpt.directory}, metrics in {run.writer.path}")
    tracing = False
    with StopRequest() as stop:
        try:
            while run.step < total:
                if prof.num_steps and run.step == prof.start_step:
                    jax.profiler.start_trace(str(trace_dir(run)), create_perfetto_trace=True)
                    tracing = True
                batch = next(run.data_iter)
                t0 = time.perf_counter()
                with jax.profiler.StepTraceAnnotation(what, step_num=run.step):
                    # block: the update is dispatched asynchronously, and the step time should
                    # count its compute, not just the dispatch
                    metrics = jax.block_until_ready(step_fn(run, batch))
                run.step += 1
                run.check_finite(metrics)
                metrics["step_time_s"] = time.perf_counter() - t0
                metrics["data_skipped"] = getattr(run.data_iter, "skipped", 0)
                if validator is not None and validator.due(run.step, total):
                    metrics.update(validator(run))
                rows.append(run.writer.write(run.step, metrics))
                if tracing and run.step == prof.start_step + prof.num_steps:
                    tracing = _stop_trace(run, prof.start_step)
                if run.step % cfg.train.log_every == 0 or run.step == total:
                    shown = {k: v for k, v in rows[-1].items() if isinstance(v, float)}
                    progress = eta(run.step, total, time.perf_counter() - t_start, start=first)
                    say(f"[{what}] step {progress} "
                        + " ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:8]))
                if run.step % cfg.train.checkpoint_every == 0 or run.step == total:
                    save(run)
                if run.step < total and stop.agreed():
                    save(run, force=True)
                    run.ckpt.wait_until_finished()
                    say(f"[{what}] stopped by a signal at step {run.step}; checkpoint saved in "
                        f"{run.ckpt.directory}")
                    raise SystemExit(0)
        finally:
            if tracing:   # the window ran past the last step, or a signal / error ended it
                _stop_trace(run, prof.start_step)
            run.ckpt.wait_until_finished()
            if validator is not None:
                validator.close()
    say(f"[{what}] done: checkpoints in {run.ckpt.directory}, metrics in {run.writer.path}")
    return rows
