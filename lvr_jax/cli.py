"""Launch plumbing for the scripts in launch/: XLA flags for CPU runs, multi-host init, and
starting N JAX processes of one command on this host (`run`, behind launch/run_local.py).

Imports only the standard library and absl at module level; jax is imported inside the functions
that need it, so `cpu_devices` can still set XLA_FLAGS before the first jax import.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

# The environment `run` gives each process and `distributed_settings` reads back.
COORDINATOR_ENV = "JAX_COORDINATOR"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


# ---------------------------------------------------------------------------------------------
# in a launch script


# XLA flags for NVIDIA GPUs, each with why (applied by `cpu_devices` when a CUDA plugin is there).
GPU_XLA_FLAGS = {
    # overlap the ring's K/V ppermutes and the fsdp all-gathers / reduce-scatters with compute
    "--xla_gpu_enable_latency_hiding_scheduler": "true",
    # fold many small all-reduces of a layer's gradients into one collective
    "--xla_gpu_all_reduce_combine_threshold_bytes": str(256 << 20),
    "--xla_gpu_all_gather_combine_threshold_bytes": str(256 << 20),
    "--xla_gpu_reduce_scatter_combine_threshold_bytes": str(256 << 20),
}
# XLA client memory settings: let the allocator take 95% of the device (default 75%) for long
# prompts; the rest stays for cuDNN / NCCL workspaces.
GPU_ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}


def has_cuda_plugin() -> bool:
    """Whether jax's CUDA plugin is installed (checked without importing jax) and not switched
    off by JAX_PLATFORMS."""
    if os.environ.get("JAX_PLATFORMS", "") in ("cpu",):
        return False
    return any(_module_exists(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                 "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"))


def _module_exists(name: str) -> bool:
    """Whether `name` can be imported, without importing it (a missing parent package is False)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def gpu_settings(environ=None) -> dict:
    """Apply `GPU_XLA_FLAGS` (flags already in XLA_FLAGS win) and `GPU_ENV` to `environ` (default
    os.environ) before jax starts; returns what was set."""
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    added = {k: v for k, v in GPU_XLA_FLAGS.items() if k not in flags}
    if added:
        env["XLA_FLAGS"] = " ".join([flags] + [f"{k}={v}" for k, v in added.items()]).strip()
    set_env = {k: v for k, v in GPU_ENV.items() if k not in env}
    env.update(set_env)
    return {**added, **set_env}


def cpu_devices(n: int = 8) -> None:
    """Device setup of a launch script, before jax is imported: on a machine with jax's CUDA
    plugin the GPU settings (`gpu_settings`), else `n` virtual CPU devices (a device count
    already in XLA_FLAGS wins). Also defines the multi-host flags."""
    if has_cuda_plugin():
        gpu_settings()
    else:
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
    """Where `jax.distributed.initialize` gets its arguments: each of coordinator address,
    process count and process id from its flag (--coordinator_address / --num_processes /
    --process_id), else its environment variable (JAX_COORDINATOR / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, set by launch/run_local.py); with none of them, a SLURM job step with more
    than one task ({} = let JAX read SLURM itself). A count or id without an address, or an
    address without both, is a ValueError. None: a single process, nothing to initialise."""
    env = os.environ if environ is None else environ
    names = (("coordinator_address", COORDINATOR_ENV), ("num_processes", NUM_PROCESSES_ENV),
             ("process_id", PROCESS_ID_ENV))
    given = {}
    for key, var in names:
        value = getattr(flag_values, key, None) if flag_values is not None else None
        if value is None and env.get(var, "") != "":
            value = env[var] if key == "coordinator_address" else int(env[var])
        given[key] = value
    set_ = [f"--{k} / {v}" for k, v in names if given[k] is not None]
    if given["coordinator_address"] is None and set_:
        raise ValueError(f"{set_} set without --coordinator_address / {COORDINATOR_ENV}")
    if given["coordinator_address"] is not None:
        missing = [f"--{k} / {v}" for k, v in names[1:] if given[k] is None]
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


def config_file(name: str) -> str:
    """Path of a file of the installed `configs` package (the default --config of a script)."""
    import importlib.util
    import pathlib

    return str(pathlib.Path(importlib.util.find_spec("configs").origin).with_name(name))


def train_main(stage: str) -> None:
    """The body of launch/train_{stage}.py: --config, --workdir, --export, then train (stage
    'sft' or 'grpo' of `lvr_jax.train`) and export."""
    cpu_devices()
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", config_file("demo.py"), "training config")
    workdir = flags.DEFINE_string("workdir", f"runs/{stage}", "checkpoints, metrics, traces")
    export = flags.DEFINE_string("export", "", "also write the final model as a VILA/HF folder")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        init_distributed()
        import importlib

        from lvr_jax.train.state import export as export_model

        run = getattr(importlib.import_module(f"lvr_jax.train.{stage}"), f"train_{stage}")(
            config.value, workdir.value)
        if export.value:
            export_model(run, export.value)
        finish()

    app.run(main)


# ---------------------------------------------------------------------------------------------
# N processes of one command on this host (launch/run_local.py)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(base: dict, *, index: int, count: int, port: int, cpu_devices: int | None,
                gpus: int | None) -> dict:
    """The environment of process `index` of `count`."""
    env = dict(base, **{COORDINATOR_ENV: f"localhost:{port}", NUM_PROCESSES_ENV: str(count),
                        PROCESS_ID_ENV: str(index)}, PYTHONUNBUFFERED="1")
    if cpu_devices:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
        env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    if gpus:   # this process's slice of the GPUs the environment lets us see (all: 0, 1, ..)
        visible = [g for g in base.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        ids = visible or [str(i) for i in range(count * gpus)]
        if len(ids) < count * gpus:
            raise ValueError(f"{count} processes x {gpus} GPUs need {count * gpus} GPUs; "
                             f"CUDA_VISIBLE_DEVICES={base['CUDA_VISIBLE_DEVICES']!r} has {len(ids)}")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[index * gpus:(index + 1) * gpus])
    return env


def _pump(proc: subprocess.Popen, prefix: str) -> None:
    """Copy the process's output lines to ours, each prefixed."""
    for line in proc.stdout:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def _stop(procs, grace_s: float) -> None:
    """SIGTERM every live process, SIGKILL what is still alive after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(cmd: list[str], *, num_processes: int, cpu_devices: int | None = None,
        gpus: int | None = None, timeout_s: float = 0, grace_s: float = 60) -> int:
    """Run `cmd` as `num_processes` JAX processes on this host; returns the exit code.

    Each process gets JAX_COORDINATOR (localhost and a free port), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID, which `init_distributed` passes to `jax.distributed.initialize`.
    `cpu_devices`: virtual CPU devices per process with gloo collectives; `gpus`: each process
    gets its own slice of CUDA_VISIBLE_DEVICES. Output lines are prefixed with `[pN]`. Waits are
    bounded: when a process fails, the others get SIGTERM (they save a checkpoint) and then
    SIGKILL after `grace_s`; after process 0 ends well, the others get `grace_s` to end too;
    `timeout_s` (0: no limit) bounds the whole run (exit code 124). SIGINT / SIGTERM are passed
    on to every process. The exit code is the first failing process's, else 0."""
    if num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if not cmd:
        raise ValueError("no command given; put it after --")
    port = free_port()
    procs = [subprocess.Popen(cmd, env=process_env(os.environ, index=i, count=num_processes,
                                                   port=port, cpu_devices=cpu_devices, gpus=gpus),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    pumps = [threading.Thread(target=_pump, args=(p, f"[p{i}]"), daemon=True)
             for i, p in enumerate(procs)]
    for t in pumps:
        t.start()

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    start = time.time()
    code = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                print(f"[run_local] process {i} exited with {code}; stopping the others",
                      flush=True)
                _stop(procs, grace_s)
                break
            if all(c == 0 for c in codes):
                break
            if codes[0] == 0:
                print(f"[run_local] process 0 finished; waiting up to {grace_s:.0f}s for the "
                      "others", flush=True)
                deadline = time.time() + grace_s
                while time.time() < deadline and any(p.poll() is None for p in procs):
                    time.sleep(0.2)
                hung = [i for i, p in enumerate(procs) if p.poll() is None]
                if hung:
                    print(f"[run_local] processes {hung} did not exit; killing them", flush=True)
                    _stop(procs, 0)
                # a process we killed for hanging at exit counts as done; any other failure
                # (a signal included) is the run's
                code = next((p.returncode for i, p in enumerate(procs)
                             if i not in hung and p.returncode not in (None, 0)), 0)
                break
            if timeout_s and time.time() - start > timeout_s:
                print(f"[run_local] timeout after {timeout_s:.0f}s; stopping", flush=True)
                _stop(procs, grace_s)
                code = 124
                break
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for t in pumps:
            t.join(timeout=5)
    return code
