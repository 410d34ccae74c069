"""Memory plan of one GRPO step: does a config fit on N devices of a given size, per frame count?

Compiles (never runs) every phase of one GRPO step on --devices x --hosts virtual CPU devices
and reports per-device memory; see `lvr_jax.train.memory_plan` for what is compiled and how it is
counted. With --hosts=N the config's seq axis is N times longer: the ring spans the nodes.

    python launch/plan_memory.py --out=runs/plan_memory [--config=configs/longvila_r1_7b.py:grpo]
        [--frames=512,1024,4096] [--hosts=2] [--batch=1] [--phases=prefill,update] [--budget_gib=80]
        [--stand_in=ring,prefix] [--config.mesh.fsdp=2 --config.mesh.seq=4]
        [--config.sharding_rules.embed=fsdp] [--config.rl.max_new_tokens=512]
Writes <out>/plan_memory.md (table + verdict) and plan_memory.json (bytes, per phase).
"""

from __future__ import annotations

import os
import sys

from lvr_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def int_from_argv(argv, name: str, default: int) -> int:
    """--name=N (N >= 1) from the command line, read before absl parses it (jax must not start
    first)."""
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}=") or (a == f"--{name}" and i + 1 < len(argv)):
            return positive(a.split("=", 1)[1] if "=" in a else argv[i + 1], name)
    return default


def positive(text: str, name: str) -> int:
    """int(text) >= 1, else SystemExit naming the flag."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SystemExit(f"--{name} takes integers >= 1, got {text!r}")
    return value


def split(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def main(argv):
    del argv
    phases = tuple(split(FLAGS.phases))
    unknown = [p for p in phases if p not in memory_plan.PHASES]
    if unknown or not phases:
        raise SystemExit(f"unknown phases {unknown or FLAGS.phases!r}; known: {memory_plan.PHASES}")
    frames = [positive(f, "frames") for f in split(FLAGS.frames) or [""]]
    if FLAGS.batch < 0 or FLAGS.budget_gib <= 0:
        raise SystemExit(f"--batch must be >= 0 and --budget_gib > 0, got {FLAGS.batch}, "
                         f"{FLAGS.budget_gib}")
    config = CONFIG.value
    if FLAGS.hosts > 1:      # the ring spans the nodes: seq = hosts x the config's seq
        config.mesh = {**dict(config.mesh), "seq": dict(config.mesh).get("seq", 1) * FLAGS.hosts}
    memory_plan.run_plan(
        config, FLAGS.out, name=FLAGS.name or "plan_memory",
        frames=frames, batch=FLAGS.batch or None,
        phases=phases, budget_gib=FLAGS.budget_gib,
        stand_ins=tuple(split(FLAGS.stand_in)),
        source=dict(config=config_flags.get_config_filename(FLAGS["config"]),
                    overrides=config_flags.get_override_values(FLAGS["config"]),
                    hosts=FLAGS.hosts),
        log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    cli.cpu_devices(int_from_argv(sys.argv, "devices", 8) * int_from_argv(sys.argv, "hosts", 1))
    from absl import app, flags
    from ml_collections import config_flags

    from lvr_jax.train import memory_plan

    PHASES, STAND_INS = memory_plan.PHASES, tuple(memory_plan.STAND_INS)

    FLAGS = flags.FLAGS
    CONFIG = config_flags.DEFINE_config_file(
        "config", os.path.join(ROOT, "configs/longvila_r1_7b.py:grpo"), "training config")
    flags.DEFINE_string("out", "runs/plan_memory", "folder for the Markdown and JSON reports")
    flags.DEFINE_string("name", "", "report file name (default plan_memory)")
    flags.DEFINE_string("frames", "512,1024,4096", "comma-separated frame counts")
    flags.DEFINE_integer("batch", 0, "prompts per step, global (0: data.pipeline.batch_size)")
    flags.DEFINE_string("phases", ",".join(PHASES), f"phases to report, of {PHASES}")
    flags.DEFINE_float("budget_gib", 80.0, "device memory budget, GiB")
    flags.DEFINE_integer("devices", 8, "virtual CPU devices per host (read before jax starts)")
    flags.DEFINE_integer("hosts", 1, "nodes of --devices each; the mesh's seq axis spans them")
    flags.DEFINE_string("stand_in", "", f"what-if: O(length) stand-ins for {STAND_INS} "
                        "(lower bounds for tiled versions; see lvr_jax.train.memory_plan)")
    app.run(main)
