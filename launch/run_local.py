"""Start N JAX processes of one command on this host (multi-controller JAX on one machine).

    python launch/run_local.py --num_processes=2 --cpu_devices_per_process=4 -- \
        python launch/train_grpo.py --config=configs/demo.py --workdir=runs/grpo2

Each process gets JAX_COORDINATOR (localhost and a free port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID, which `lvr_jax.cli.init_distributed` passes to `jax.distributed.initialize`.
`--cpu_devices_per_process` runs on virtual CPU devices with gloo collectives;
`--gpus_per_process` gives each process its own slice of CUDA_VISIBLE_DEVICES.
Output lines are prefixed with `[pN]`. Waits are bounded: when a process fails, the others get
SIGTERM (they save a checkpoint) and then SIGKILL after `--grace_s`; after process 0 ends well, the
others get `--grace_s` to end too; `--timeout_s` bounds the whole run. SIGINT / SIGTERM are passed
on to every process. The exit code is the first failing process's, else 0.
"""

from __future__ import annotations

import sys

from absl import app, flags

from lvr_jax import cli

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "JAX processes to start")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices_per_process", None,
                                    "virtual CPU devices per process (gloo collectives)")
_GPUS = flags.DEFINE_integer("gpus_per_process", None, "GPUs per process (sets CUDA_VISIBLE_DEVICES)")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 0, "0: no limit")
_GRACE_S = flags.DEFINE_float("grace_s", 60, "seconds the others get to end (see above)")


def main(argv: list[str]) -> int:
    # absl parses the flags before the first `--` and leaves the command after it in argv.
    return cli.run(argv[1:], num_processes=_NUM_PROCESSES.value, cpu_devices=_CPU_DEVICES.value,
                   gpus=_GPUS.value, timeout_s=_TIMEOUT_S.value, grace_s=_GRACE_S.value)


if __name__ == "__main__":
    if "--" not in sys.argv[1:]:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    app.run(main)
