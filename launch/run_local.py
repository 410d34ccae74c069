"""Start N JAX processes of one command on this host (multi-controller JAX on one machine).

    python launch/run_local.py --num_processes=2 --cpu_devices_per_process=4 -- \
        python launch/train_grpo.py --config=configs/demo.py --workdir=runs/grpo2

Each process gets JAX_COORDINATOR (localhost and a free port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID, which launch/common.py `init_distributed` passes to `jax.distributed.initialize`.
`--cpu_devices_per_process` runs on virtual CPU devices with gloo collectives;
`--gpus_per_process` gives each process its own slice of CUDA_VISIBLE_DEVICES.
Output lines are prefixed with `[pN]`. Waits are bounded: when a process fails, the others get
SIGTERM (they save a checkpoint) and then SIGKILL after `--grace_s`; after process 0 ends well, the
others get `--grace_s` to end too; `--timeout_s` bounds the whole run. SIGINT / SIGTERM are passed
on to every process. The exit code is the first failing process's, else 0.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(base: dict, *, index: int, count: int, port: int, cpu_devices: int | None,
                gpus: int | None) -> dict:
    """The environment of process `index` of `count`."""
    env = dict(base, JAX_COORDINATOR=f"localhost:{port}", JAX_NUM_PROCESSES=str(count),
               JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
    if cpu_devices:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
        env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index * gpus + i) for i in range(gpus))
    return env


def _pump(proc: subprocess.Popen, prefix: str) -> None:
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
    """Run `cmd` as `num_processes` JAX processes; returns the exit code (see module doc)."""
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
                code = next((c for c in (p.returncode for p in procs) if c and c > 0), 0)
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


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(description="run N JAX processes on this host")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--cpu_devices_per_process", type=int, default=None,
                        help="virtual CPU devices per process (gloo collectives)")
    parser.add_argument("--gpus_per_process", type=int, default=None,
                        help="GPUs per process (sets CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--timeout_s", type=float, default=0, help="0: no limit")
    parser.add_argument("--grace_s", type=float, default=60)
    args = parser.parse_args(argv[:split])
    return run(argv[split + 1:], num_processes=args.num_processes,
               cpu_devices=args.cpu_devices_per_process, gpus=args.gpus_per_process,
               timeout_s=args.timeout_s, grace_s=args.grace_s)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
