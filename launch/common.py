"""Shared launch-script plumbing: XLA flags for CPU runs, multi-host init, config loading."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cpu_devices(n: int = 8) -> None:
    """On a machine without accelerators, expose `n` virtual CPU devices (before jax import)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def init_distributed() -> None:
    """`jax.distributed.initialize` from JAX_COORDINATOR / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    (set by launch/run_local.py) or a SLURM allocation; a no-op for one process."""
    import jax

    n = int(os.environ.get("JAX_NUM_PROCESSES", os.environ.get("SLURM_NTASKS", "1")))
    if n <= 1:
        return
    if "JAX_COORDINATOR" in os.environ:
        jax.distributed.initialize(os.environ["JAX_COORDINATOR"], n,
                                   int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()   # SLURM auto-detection
    print(f"[launch] process {jax.process_index()}/{jax.process_count()}, "
          f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)


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

    app.run(main)
