"""MR-SP benchmark: per-device memory and FLOPs of the compiled VLM prefill vs the seq axis.

For each frame count and seq size, compiles (never runs) the prefill of the configured model on
8 virtual CPU devices: frame-parallel vision encoding + zigzag ring-attention prefill, returning
the last position's logits. Reported per device:
  * temp bytes from `compiled.memory_analysis()` (activations; weights are arguments),
  * FLOPs by formula (`lvr_jax.eval.flops`; cost_analysis() counts a scanned layer body once):
    the device's share of the tower, projector and layer matmuls + attention FLOPs of the
    sub-blocks each device computes (zigzag ring: 2n+1 of 4n, no conditionals),
  * load balance = max / min FLOPs across the seq devices, zigzag vs a contiguous split (which
    the ring cannot run: counted as a ring skipping every fully masked sub-block would).
The seq = 1 baseline is the same ring code on one device; dense attention is shown for reference
(see `lvr_jax.eval.bench_prefill`). Writes a Markdown table and a PNG. Usage:
    python launch/bench_mrsp.py --out=runs/bench_mrsp [--frames=16,64,256,1024] [--seq=1,2,4,8]
"""

from __future__ import annotations

import dataclasses
import importlib
import os

from absl import app, flags

from lvr_jax import cli

flags.DEFINE_string("out", "runs/bench_mrsp", "folder for bench_mrsp.md and bench_mrsp.png")
flags.DEFINE_string("config", "configs.tiny", "config module (its model section is benchmarked)")
flags.DEFINE_string("frames", "16,64,256,1024", "comma-separated frame counts")
flags.DEFINE_string("seq", "1,2,4,8", "comma-separated seq (ring) sizes")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from lvr_jax.eval import bench_prefill      # imports jax: after cpu_devices
    from lvr_jax.models.vlm import vlm_config_from

    cfg = vlm_config_from(importlib.import_module(FLAGS.config).get_config().model)
    cfg = dataclasses.replace(cfg, video_token_id=1, newline_token_id=2)
    log = lambda m: print(m, flush=True)  # noqa: E731
    rows = bench_prefill.sweep(cfg, [int(f) for f in FLAGS.frames.split(",")],
                               [int(s) for s in FLAGS.seq.split(",")], log=log)
    bench_prefill.write_outputs(rows, FLAGS.out, cfg, log=log)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    cli.cpu_devices(8)
    app.run(main)
