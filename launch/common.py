"""Shared launch-script plumbing: XLA flags for CPU runs, multi-host init, config loading."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cpu_devices(n: int = 8) -> None:
    """On a machine without accelerators, expose `n` virtual CPU devices (before jax import;
    a device count already in XLA_FLAGS wins). Also defines the multi-host flags."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _distributed_flags()


def _distributed_flags():
    from absl import flags
    f = flags.FLAGS
    if "coordinator_address" not in f:
        flags.DEFINE_string("coordinator_address", None,
                            "host:port of process 0 for jax.distributed (multi-host runs)")
        flags.DEFINE_integer("num_processes", None, "number of JAX processes (multi-host runs)")
        flags.DEFINE_integer("process_id", None, "this process's index (multi-host runs)")


def distributed_settings(flag_values=None, environ=None) -> dict | None:
    """Where `jax.distributed.initialize` gets its arguments, in this order:
    --coordinator_address/--num_processes/--process_id flags; JAX_COORDINATOR / JAX_NUM_PROCESSES
    / JAX_PROCESS_ID (set by launch/run_local.py); a SLURM job step with more than one task
    ({} = let JAX read SLURM itself). None: a single process, nothing to initialise."""
    env = os.environ if environ is None else environ
    given = {}
    if flag_values is not None:
        given = {"coordinator_address": flag_values.coordinator_address,
                 "num_processes": flag_values.num_processes, "process_id": flag_values.process_id}
    if given.get("coordinator_address") is None and "JAX_COORDINATOR" in env:
        given = {"coordinator_address": env["JAX_COORDINATOR"],
                 "num_processes": int(env.get("JAX_NUM_PROCESSES", "1")),
                 "process_id": int(env.get("JAX_PROCESS_ID", "0"))}
    if given.get("coordinator_address") is not None:
        missing = [k for k in ("num_processes", "process_id") if given.get(k) is None]
        if missing:
            raise ValueError(f"--coordinator_address is set but {missing} are not")
        n, i = int(given["num_processes"]), int(given["process_id"])
        if not 0 <= i < n:
            raise ValueError(f"process_id {i} is not in [0, num_processes={n})")
        return None if n == 1 else {"coordinator_address": given["coordinator_address"],
                                    "num_processes": n, "process_id": i}
    if int(env.get("SLURM_NTASKS", env.get("SLURM_STEP_NUM_TASKS", "1"))) > 1:
        return {}
    return None


def init_distributed() -> None:
    """Call `jax.distributed.initialize` when this is one process of several (see
    `distributed_settings`); a no-op for a single process."""
    from absl import flags
    settings = distributed_settings(flags.FLAGS if flags.FLAGS.is_parsed() else None)
    if settings is None:
        return
    import jax

    jax.distributed.initialize(**settings)
    print(f"[launch] process {jax.process_index()}/{jax.process_count()}, "
          f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)


def is_main_process() -> bool:
    import jax
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait for every process (no-op for one process)."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def finish() -> None:
    """End a launch script. With several processes: wait for all, then leave without the
    interpreter's teardown, which can hang in the distributed runtime."""
    import jax
    if jax.process_count() > 1:
        barrier("finish")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def train_main(stage: str) -> None:
    """The body of launch/train_{stage}.py: config + workdir (+ export) flags, then train."""
    cpu_devices()
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/demo.py"),
                                             "training config")
    workdir = flags.DEFINE_string("workdir", f"runs/{stage}", "checkpoints, metrics, traces")
    export = flags.DEFINE_string("export", "", "also write the final model as a VILA/HF folder")

    def main(_):
        init_distributed()
        from lvr_jax.train import trainer
        run = getattr(trainer, f"train_{stage}")(config.value, workdir.value)
        if export.value:
            trainer.export(run, export.value)
        finish()

    app.run(main)
