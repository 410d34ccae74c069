"""MR-SP benchmark helpers (launch/bench_mrsp.py): per-device memory and FLOPs of the compiled VLM
prefill against the size of the ring.

Each case compiles (never runs; abstract params) the prefill of one clip + `PROMPT_TOKENS` text
tokens: vision encoding (frame-parallel over the layout's `frames` axis), then the model's own
`Qwen2.prefill` under a `Layout`, returning only the last position's logits (the prefix K/V is
dead). Attention is chosen through the model config's `AttentionOptions`:
  ring    a layout whose `length` runs over `seq` = n > 1: the zigzag ring; at n = 1 the same ring
          code on a ring of one device (`single_device_ring`, passed as the `prompt` option)
  dense   a layout without a ring axis: dense attention
  none    the `prompt` option `no_attention` (zero FLOPs): everything but attention
FLOPs per device, by formula (`eval.flops`; `cost_analysis()` counts the scanned layer body
once): the tower + projector on the device's share of the frames (padded to the ring) and the
LLM layers on its share of the padded tokens, the head at the last position, plus the attention
sub-blocks each device computes (`computed_blocks`: 2n+1 of 4n in the zigzag ring; for a
contiguous split, the sub-blocks not fully masked).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from lvr_jax.eval.flops import (head_flops, layer_flops, projector_flops, siglip_flops,
                                up_to)
from lvr_jax.models.qwen2 import to_left_padded
from lvr_jax.models.vlm import VLM
from sharding.frame_parallel import encode_frames
from sharding.mesh import Layout, make_mesh
from sharding.ring_attention import ring_attention_local, ring_attention_local_stats
from sharding.sequence_parallel import padded_length, zigzag_indices

PROMPT_TOKENS = 64  # text around the video
MIB = 2 ** 20


def no_attention(q, k, v, *_):
    """Prompt-attention stand-in with zero FLOPs, to measure everything but attention."""
    return q


def single_device_ring(mesh, axis: str = "seq"):
    """The ring's code over a `mesh` axis of size 1, as a prompt attention (the seq = 1 baseline;
    a layout only rings over axes of size > 1)."""
    spec = P(None, axis)
    return jax.shard_map(functools.partial(ring_attention_local, axis_name=axis), mesh=mesh,
                         in_specs=(spec,) * 7, out_specs=spec)


def last_logits(model, frames, ids, *, layout: Layout, multiple: int = 1):
    """Logits [1, V] at the last position of the prompt `ids` [L] with the clip spliced in;
    the prompt left padded to a multiple of `multiple` (the ring needs an even length)."""
    axis = layout.axis("frames")
    video = (model.encode_video(frames) if axis is None else
             encode_frames(model, frames, mesh=layout.mesh, axis=axis))
    embeds = model.embed_prompt(ids, video)[None]
    mask = jnp.ones(embeds.shape[:2], bool)
    if multiple > 1:
        embeds, mask = to_left_padded(embeds, mask, multiple)
    return model.llm.prefill(embeds, mask, layout=layout).logits


def compile_prefill(cfg, state, frames: int, seq: int, attention: str):
    """Compiled `last_logits` of `frames` frames on a mesh with `seq` ring devices (the rest on
    `data`); `state`: the (abstract) params of a VLM of `cfg`; `attention`: ring, dense (seq 1),
    none."""
    mesh = make_mesh({"seq": seq, "data": -1})
    layout = Layout.of(mesh)
    prompt = {"none": no_attention, "ring": single_device_ring(mesh) if seq == 1 else None}
    llm = dataclasses.replace(cfg.llm, attention=dataclasses.replace(
        cfg.llm.attention, prompt=prompt.get(attention)))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: VLM(dataclasses.replace(cfg, llm=llm),
                                                       rngs=nnx.Rngs(0))))
    multiple = 2 if layout.seq_axis is None and attention != "dense" else 1

    def fn(state, clip, ids):
        return last_logits(nnx.merge(graphdef, state), clip, ids, layout=layout, multiple=multiple)

    px = cfg.vision.image_size
    clip = jax.ShapeDtypeStruct((frames, px, px, 3), jnp.float32)
    ids = np.full((PROMPT_TOKENS,), 10, np.int32)
    ids[PROMPT_TOKENS // 4] = cfg.video_token_id
    return jax.jit(fn).lower(state, clip, jnp.asarray(ids)).compile()


def computed_blocks(length: int, n: int, zigzag: bool) -> np.ndarray:
    """Sub-blocks (half-chunk x half-chunk, lp / 2n tokens each) each of the n devices computes
    in a causal ring over `length` tokens. zigzag: what the ring computes, its conditional-free
    schedule (`ring_attention_local_stats`: 2n+1 of 4n on every device). Contiguous split: what a
    ring that skipped every fully masked sub-block would compute (the ring cannot run this split;
    the count shows the imbalance the zigzag order avoids)."""
    lp = padded_length(length, n)
    if not zigzag:
        h = lp // (2 * n)
        starts = np.arange(2 * n) * h
        last = np.minimum(starts + h, length) - 1          # last real position of each chunk
        need = (starts[None, :] <= last[:, None]) & (starts[:, None] < length)  # [q chunk, k chunk]
        return need.reshape(n, 2, 2 * n).sum(axis=(1, 2))
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


def other_flops(cfg, frames: int, length: int, n: int) -> float:
    """Per-device FLOPs of the prefill without attention on a ring of n (formula)."""
    shown = up_to(frames, n)
    return ((siglip_flops(cfg.vision, shown) + projector_flops(cfg, shown)
             + layer_flops(cfg.llm, padded_length(length, n))) / n + head_flops(cfg.llm, 1))


def attention_flops(blocks: np.ndarray, length: int, n: int, cfg) -> np.ndarray:
    """2 matmuls (QK^T, PV) x 2 FLOPs per MAC per computed sub-block, all layers."""
    chunk = padded_length(length, n) // (2 * n)
    llm = cfg.llm
    return blocks * 4.0 * chunk * chunk * llm.num_heads * llm.head_dim * llm.num_layers


def sweep(cfg, frame_list, seq_list, log=print) -> list[dict]:
    """One row per (frames, seq): temp bytes, FLOPs, load balance (zigzag and contiguous)."""
    state = nnx.state(nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0))))
    rows, t0 = [], time.time()
    for frames in frame_list:
        length = PROMPT_TOKENS - 1 + frames * cfg.tokens_per_frame
        base = None
        dense = compile_prefill(cfg, state, frames, 1, "dense").memory_analysis().temp_size_in_bytes
        for n in seq_list:
            temp = compile_prefill(cfg, state, frames, n, "ring").memory_analysis().temp_size_in_bytes
            other = other_flops(cfg, frames, length, n)
            zz = other + attention_flops(computed_blocks(length, n, True), length, n, cfg)
            flat = other + attention_flops(computed_blocks(length, n, False), length, n, cfg)
            base = temp if n == 1 else base
            r = dict(frames=frames, tokens=length, seq=n, temp=temp,
                     ratio=temp / base if base else float("nan"), dense=dense, flops=zz.max(),
                     balance=zz.max() / zz.min(), flat=flat.max() / flat.min())
            rows.append(r)
            log(f"[bench_mrsp] frames={frames} seq={n}: temp {temp / MIB:.1f} MiB/device "
                f"({r['ratio']:.3f} of seq=1), balance {r['balance']:.3f} "
                f"(contiguous {r['flat']:.3f})  [{time.time() - t0:.0f}s]")
    return rows


def markdown(rows, cfg) -> str:
    lines = [f"Tiny VLM ({cfg.tokens_per_frame} embeddings per frame, {PROMPT_TOKENS} text tokens), "
             f"per device, compiled on {jax.device_count()} virtual CPU devices.", "",
             "| frames | tokens | seq | temp MiB / device | vs seq=1 | dense seq=1 MiB | "
             "GFLOPs / device (max) | max/min zigzag | max/min contiguous |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['frames']} | {r['tokens']} | {r['seq']} | {r['temp'] / MIB:.1f} | "
                     f"{r['ratio']:.3f} | {r['dense'] / MIB:.1f} | {r['flops'] / 1e9:.2f} | "
                     f"{r['balance']:.3f} | {r['flat']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path) -> None:
    """Temp memory and load balance against the seq size, one line per frame count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for frames in sorted({r["frames"] for r in rows}):
        sel = [r for r in rows if r["frames"] == frames]
        seqs = [r["seq"] for r in sel]
        a.plot(seqs, [r["temp"] / MIB for r in sel], "o-", label=f"{frames} frames")
        b.plot(seqs, [r["balance"] for r in sel], "o-", label=f"{frames} frames zigzag")
        b.plot(seqs, [r["flat"] for r in sel], "x--", label=f"{frames} frames contiguous")
    a.set(xscale="log", yscale="log", xlabel="seq devices", ylabel="temp MiB / device",
          title="prefill activation memory")
    b.set(xscale="log", xlabel="seq devices", ylabel="max / min FLOPs", title="load balance")
    a.legend(fontsize=7)
    b.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_outputs(rows, out, cfg, log=print) -> None:
    """<out>/bench_mrsp.md (the table) and bench_mrsp.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, cfg)
    (out / "bench_mrsp.md").write_text(table)
    log(table)
    plot(rows, out / "bench_mrsp.png")
    log(f"[bench_mrsp] wrote {out}/bench_mrsp.md and bench_mrsp.png")
