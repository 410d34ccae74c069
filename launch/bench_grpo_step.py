"""One whole GRPO step with MR-SP against the naive path: naive, mrsp, mrsp_shared (the modes
are described in `lvr_jax.eval.bench_step`), same model, batch and seeds.

Setting "run": the demo's tiny VLM (configs/demo.py: fsdp=2 x seq=4 for the mrsp modes, fsdp=8
for naive) on 8 virtual CPU devices, several frame counts; per mode and frame count the median
seconds per phase and per step over --steps steps after a warm-up step, FLOPs per phase (all
devices, by formula: `lvr_jax.eval.flops`) and the peak bytes per device (`memory_analysis()`).
Setting "compile": the 7B config compiled only (abstract weights) at --compile_frames; FLOPs
and peak bytes per device per mode. Writes <out>/bench_grpo_step.json (rows), .md and .png.

    python launch/bench_grpo_step.py --out=runs/bench_grpo_step [--frames=16,32,64,128]
        [--compile_frames=512,1024] [--setting=run,compile] [--quick]
--quick: setting "run" only, at one frame count (--quick_frames), in a few minutes on 2 cores.
"""

import os

from lvr_jax import cli

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU aborts in all-reduce-promotion on the 7B update's bf16 all-reduces (launch/plan_memory.py)
if "all-reduce-promotion" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_disable_hlo_passes=all-reduce-promotion").strip()
cli.cpu_devices(8)

import importlib  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("out", "runs/bench_grpo_step", "folder for bench_grpo_step.json/.md/.png")
flags.DEFINE_string("setting", "run,compile", "comma-separated: run, compile")
flags.DEFINE_string("modes", "naive,mrsp,mrsp_shared", "comma-separated modes")
flags.DEFINE_string("frames", "16,32,64,128", "frame counts of the run setting")
flags.DEFINE_string("compile_frames", "512,1024", "frame counts of the compile setting")
flags.DEFINE_string("run_config", "configs.demo", "config module of the run setting")
flags.DEFINE_string("compile_config", "configs.longvila_r1_7b", "config of the compile setting")
flags.DEFINE_integer("steps", 3, "timed steps per mode and frame count (after one warm-up)")
flags.DEFINE_integer("prompts", 2, "run setting: prompts per step")
flags.DEFINE_integer("group", 8, "run setting: G samples per prompt")
flags.DEFINE_integer("new_tokens", 32, "run setting: tokens per sample")
flags.DEFINE_integer("text", 64, "run setting: text tokens per prompt (one video placeholder)")
flags.DEFINE_bool("quick", False, "run setting only, at --quick_frames")
flags.DEFINE_integer("quick_frames", 128, "the frame count of --quick")
flags.DEFINE_string("cache", "", "jax compilation cache folder ('' = a temporary one; the "
                    "warm-up step compiles each phase for memory_analysis, then reuses it)")
FLAGS = flags.FLAGS


def ints(text):
    return [int(x) for x in text.split(",") if x]


def main(argv):
    del argv
    from lvr_jax.eval import bench_step, bench_step_report

    cache = FLAGS.cache or tempfile.mkdtemp(prefix="bench_grpo_step_cache_")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    log = lambda m: print(m, flush=True)  # noqa: E731
    settings = ["run"] if FLAGS.quick else FLAGS.setting.split(",")
    modes = tuple(FLAGS.modes.split(","))
    rows = []
    if "run" in settings:
        config = importlib.import_module(FLAGS.run_config).get_config("grpo")
        rows += bench_step.run_setting(
            config, [FLAGS.quick_frames] if FLAGS.quick else ints(FLAGS.frames), modes=modes,
            steps=FLAGS.steps, log=log, prompts=FLAGS.prompts, group=FLAGS.group,
            new_tokens=FLAGS.new_tokens, text=FLAGS.text)
    if "compile" in settings:
        config = importlib.import_module(FLAGS.compile_config).get_config("grpo")
        rows += bench_step.compile_setting(config, ints(FLAGS.compile_frames), modes=modes,
                                           log=log)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    header = (f"bench_grpo_step (commit {commit or 'unknown'}, {jax.device_count()} "
              f"{jax.devices()[0].platform} devices): run = {FLAGS.run_config}, "
              f"{FLAGS.prompts} prompts x G={FLAGS.group}, {FLAGS.new_tokens} new tokens, "
              f"{FLAGS.text} text tokens, median of {FLAGS.steps} steps; compile = "
              f"{FLAGS.compile_config}. FLOPs: all devices, by formula.")
    bench_step_report.write_outputs(rows, FLAGS.out, header, log=log)


if __name__ == "__main__":
    app.run(main)
