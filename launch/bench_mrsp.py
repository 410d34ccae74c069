"""MR-SP benchmark: per-device memory and FLOPs of the compiled VLM prefill vs the seq axis.

For each frame count and seq size, compiles (never runs) the prefill of the configured model on
virtual CPU devices: frame-parallel vision encoding + zigzag ring-attention prefill, returning the
last position's logits. Reported per device:
  * temp bytes from `compiled.memory_analysis()` (activations; weights are arguments),
  * FLOPs = non-attention FLOPs from `cost_analysis()` of the same prefill with attention removed
    (identical on every device) + attention FLOPs of the sub-blocks each device really computes
    (counted by running the ring's block-skip logic on the real positions / padding),
  * load balance = max / min FLOPs across the seq devices, zigzag vs a contiguous split.
The seq = 1 baseline is the same ring code on one device; dense attention is shown for reference.
Writes a Markdown table and a PNG. Usage:
    python launch/bench_mrsp.py --out=runs/bench_mrsp [--frames=16,64,256,1024] [--seq=1,2,4,8]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from lvr_jax.models.vlm import init_vlm, vlm_config_from  # noqa: E402
from sharding.frame_parallel import encode_frames  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from sharding.ring_attention import ring_attention_fn, ring_attention_local_stats  # noqa: E402
from sharding.sequence_parallel import padded_length, shard_sequence  # noqa: E402

PROMPT_TOKENS = 64  # text around the video


def no_attention(q, k, v, *args):
    """Stand-in with zero FLOPs, to measure everything but attention."""
    return q


def prefill(model, frames, ids, *, mesh, attention):
    """Last-position logits of the prompt `ids` with the clip spliced in."""
    n = mesh.shape["seq"]
    video = encode_frames(model, frames, mesh=mesh) if n > 1 else model.encode_video(frames)
    embeds = model.embed_prompt(ids, video)[None]
    pos = jnp.arange(embeds.shape[1])[None]
    if attention == "dense":
        hidden = model.llm(embeds, pos, return_hidden=True)
        return model.llm.head(hidden[:, -1:])
    x, p, seg, where = shard_sequence(mesh, "seq", embeds, pos)
    fn = ring_attention_fn(mesh) if attention == "ring" else no_attention
    hidden = model.llm(x, p, segment_ids=seg, attention_fn=fn, return_hidden=True)
    last = int(where[-1])
    return model.llm.head(hidden[:, last:last + 1])


def compile_prefill(model, mesh, frames, attention):
    cfg = model.cfg
    clip = jax.ShapeDtypeStruct((frames, cfg.vision.image_size, cfg.vision.image_size, 3),
                                jnp.float32)
    ids = np.full((PROMPT_TOKENS,), 10, np.int32)
    ids[PROMPT_TOKENS // 4] = cfg.video_token_id
    fn = jax.jit(functools.partial(prefill, mesh=mesh, attention=attention))
    return fn.lower(model, clip, jnp.asarray(ids)).compile()


def computed_blocks(length: int, n: int, zigzag: bool) -> np.ndarray:
    """Sub-blocks each of the n devices computes in a causal ring over `length` tokens."""
    lp = padded_length(length, n)
    pos = np.arange(lp)
    if zigzag:
        from sharding.sequence_parallel import zigzag_indices
        pos = zigzag_indices(lp, n)
    seg = np.where(pos < length, 0, -1)
    mesh = make_mesh({"seq": n}, devices=jax.devices()[:n])
    ones = jnp.ones((1, lp, 1, 1), jnp.float32)
    spec = P(None, "seq")

    def local(q, p, s):
        _, _, count = ring_attention_local_stats(q, q, q, p, p, s, s, axis_name="seq")
        return count[None]

    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=P("seq"),
                       check_vma=False)
    return np.asarray(fn(ones, jnp.asarray(pos[None], jnp.int32), jnp.asarray(seg[None], jnp.int32)))


def attention_flops(blocks: np.ndarray, length: int, n: int, cfg) -> np.ndarray:
    """2 matmuls (QK^T, PV) x 2 FLOPs per MAC per computed sub-block, all layers."""
    chunk = padded_length(length, n) // (2 * n)
    llm = cfg.llm
    return blocks * 4.0 * chunk * chunk * llm.num_heads * llm.head_dim * llm.num_layers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_mrsp")
    ap.add_argument("--config", default="configs.tiny")
    ap.add_argument("--frames", default="16,64,256,1024")
    ap.add_argument("--seq", default="1,2,4,8")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cfg = vlm_config_from(importlib.import_module(args.config).get_config().model)
    cfg = type(cfg)(cfg.llm, cfg.vision, cfg.projector_type, video_token_id=1,
                    newline_token_id=2)
    model = init_vlm(cfg, 0)
    frame_list = [int(f) for f in args.frames.split(",")]
    seq_list = [int(s) for s in args.seq.split(",")]
    rows, t0 = [], time.time()
    for frames in frame_list:
        length = PROMPT_TOKENS - 1 + frames * cfg.tokens_per_frame
        base = None
        dense = compile_prefill(model, make_mesh({"seq": 1, "data": -1}), frames, "dense")
        dense_temp = dense.memory_analysis().temp_size_in_bytes
        for n in seq_list:
            mesh = make_mesh({"seq": n, "data": -1})
            ring = compile_prefill(model, mesh, frames, "ring")
            temp = ring.memory_analysis().temp_size_in_bytes
            other = compile_prefill(model, mesh, frames, "none").cost_analysis()["flops"]
            zz = other + attention_flops(computed_blocks(length, n, True), length, n, cfg)
            flat = other + attention_flops(computed_blocks(length, n, False), length, n, cfg)
            base = temp if n == 1 else base
            rows.append(dict(frames=frames, tokens=length, seq=n, temp=temp,
                             ratio=temp / base if base else float("nan"), dense=dense_temp,
                             flops=zz.max(), balance=zz.max() / zz.min(),
                             flat=flat.max() / flat.min()))
            r = rows[-1]
            print(f"[bench_mrsp] frames={frames} seq={n}: temp {temp / 2**20:.1f} MiB/device "
                  f"({r['ratio']:.3f} of seq=1), balance {r['balance']:.3f} "
                  f"(contiguous {r['flat']:.3f})  [{time.time() - t0:.0f}s]", flush=True)
    write_outputs(rows, args.out, cfg)


def write_outputs(rows, out, cfg):
    lines = [f"Tiny VLM ({cfg.tokens_per_frame} embeddings per frame, {PROMPT_TOKENS} text tokens), "
             "per device, compiled on 8 virtual CPU devices.", "",
             "| frames | tokens | seq | temp MiB / device | vs seq=1 | dense seq=1 MiB | "
             "GFLOPs / device (max) | max/min zigzag | max/min contiguous |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['frames']} | {r['tokens']} | {r['seq']} | {r['temp'] / 2**20:.1f} | "
                     f"{r['ratio']:.3f} | {r['dense'] / 2**20:.1f} | {r['flops'] / 1e9:.2f} | "
                     f"{r['balance']:.3f} | {r['flat']:.3f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "bench_mrsp.md"), "w") as f:
        f.write(table)
    print(table)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for frames in sorted({r["frames"] for r in rows}):
        sel = [r for r in rows if r["frames"] == frames]
        a.plot([r["seq"] for r in sel], [r["temp"] / 2**20 for r in sel], "o-",
               label=f"{frames} frames")
        b.plot([r["seq"] for r in sel], [r["balance"] for r in sel], "o-",
               label=f"{frames} frames zigzag")
        b.plot([r["seq"] for r in sel], [r["flat"] for r in sel], "x--",
               label=f"{frames} frames contiguous")
    a.set(xscale="log", yscale="log", xlabel="seq devices", ylabel="temp MiB / device",
          title="prefill activation memory")
    b.set(xscale="log", xlabel="seq devices", ylabel="max / min FLOPs", title="load balance")
    a.legend(fontsize=7)
    b.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bench_mrsp.png"), dpi=100)
    print(f"[bench_mrsp] wrote {out}/bench_mrsp.md and bench_mrsp.png")


if __name__ == "__main__":
    main()
