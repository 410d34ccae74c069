"""The one-GPU check: device and cuDNN version, one attention sub-block (the ring's einsum vs the
fused kernel, forward and forward+backward), a 1.5B-size prefill at 32k tokens (MFU), decode
ms/step for G = 8 branches on a 16k prefix, and the phases of one 1.5B-size GRPO step at 64
frames. Writes <out>/gpu_check.json and its report gpu_check.md (the goals judged on a GPU)
after each section; what each section does: `lvr_jax/eval/gpu_check.py`.

    python launch/gpu_check.py --out=runs/gpu_check            # on a GPU machine
    python launch/gpu_check.py --cpu-smoke --out=/tmp/smoke    # the same code, toy sizes, CPU
"""

import sys
from pathlib import Path

from lvr_jax import cli

SMOKE = "--cpu-smoke" in sys.argv or "--cpu_smoke" in sys.argv
if SMOKE:
    import os
    os.environ["JAX_PLATFORMS"] = "cpu"
cli.cpu_devices(1)

from absl import app, flags  # noqa: E402

flags.DEFINE_bool("cpu_smoke", False, "toy sizes on CPU (also spelt --cpu-smoke)")
flags.DEFINE_string("out", "runs/gpu_check", "folder for gpu_check.json / .md")
flags.DEFINE_list("sections", ["sub_block", "prefill", "decode", "grpo"], "sections to run")


def main(argv):
    from lvr_jax.eval import gpu_check

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    unknown = [s for s in flags.FLAGS.sections if s not in gpu_check.SECTIONS]
    if unknown:
        raise app.UsageError(f"--sections: unknown {unknown}; known {list(gpu_check.SECTIONS)}")
    sizes = gpu_check.CPU_SMOKE if SMOKE else gpu_check.Sizes()
    result = gpu_check.run_checks(sizes, flags.FLAGS.out, flags.FLAGS.sections,
                                  log=lambda m: print(m, flush=True))
    failed = [s for s in flags.FLAGS.sections if "error" in result[s]]
    print((Path(flags.FLAGS.out) / "gpu_check.md").read_text(), flush=True)
    print(f"[gpu_check] wrote {flags.FLAGS.out}/gpu_check.json and .md"
          + (f"; FAILED: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.argv = [a.replace("--cpu-smoke", "--cpu_smoke") for a in sys.argv]
    app.run(main)
