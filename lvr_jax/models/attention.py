"""Attention of the decoder: how it is chosen (`AttentionOptions`), dense attention (the reference
masking semantics), the ring for sequence-parallel prompts, and the shared-prefix merge.

Masking semantics, shared by every path: query i attends key j iff seg_k[j] >= 0 and
seg_q[i] == seg_k[j] and (if causal) pos_k[j] <= pos_q[i]. A query with no key to attend gives 0.
GQA by grouping: q [B, L, H, D] against k, v [B, L, KVH, D]; query head h uses kv head
h // (H // KVH); K/V are never repeated in memory.

Shared prefix (MR-SP stage 3): G branches per prompt attend to one prompt cache, sharded over the
layout's `cache_length` axis, plus their own tokens. Attention of a branch query = log-sum-exp
merge of (a) the query against the prefix K/V: each device scores its local prefix shard and the
max, the sum and the weighted values are combined with pmax / psum (the cache never moves), and
(b) the query against the branch's cached tokens (< `step`) and its new tokens (causal). This
equals attention over the full sequence prompt + response.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding import fused_blocks
from sharding.ring_attention import KEY_TILE, ring_attention_fn

TIE_CHOICES = ("auto", "on", "off")
QUERY_BLOCK = 64   # query rows per block of the one-device prompt attention off GPU
IMPLEMENTATIONS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """How the decoder attends: knobs that change the compiled program (memory, speed), not the
    result. Part of `Qwen2Config` (config section `model.attention`).

    key_tile       keys per score tile inside a ring sub-block
    query_chunk    branch queries per rematerialised chunk in the training forward (their scores
                   against a prefix shard are [B, G, chunk, H, S_local] float32; decode never chunks)
    tie_positions  the ring's position tie (`sharding.ring_attention._ring_forward`): "on",
                   "off", or "auto" = on except on the CPU backend (where XLA:CPU deadlocked on it)
    implementation fused attention: "cudnn" (flash attention, bf16 / fp16 on NVIDIA GPUs), "xla"
                   (the same contract on XLA, writing the scores out), or "auto" (cuDNN on a GPU
                   backend for bf16 / fp16). For the vision tower it is
                   `jax.nn.dot_product_attention`'s (`fused_implementation`: "auto" off GPU is
                   XLA's); for the ring's sub-blocks and the branches' prefix attention it is the
                   kernel of `sharding.fused_blocks` ("auto" off GPU: the einsum blocks, key-tiled
                   in the ring, which never write a sub-block's scores out)
    prompt         what-if stand-in for the prompt attention, `f(q, k, v, q_pos, kv_pos, q_seg,
                   kv_seg)`, or None (the memory planner measures everything else with it)
    prefix         what-if stand-in for `prefix_stats`, or None
    """
    key_tile: int = KEY_TILE
    query_chunk: int = 256
    tie_positions: str = "auto"
    implementation: str = "auto"
    prompt: Callable | None = None
    prefix: Callable | None = None

    def __post_init__(self):
        if self.tie_positions not in TIE_CHOICES:
            raise ValueError(f"attention.tie_positions must be one of {TIE_CHOICES}, got "
                             f"{self.tie_positions!r}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attention.implementation must be one of {IMPLEMENTATIONS}, got "
                             f"{self.implementation!r}")
        if self.key_tile < 1 or self.query_chunk < 1:
            raise ValueError(f"attention.key_tile and query_chunk must be >= 1, got "
                             f"{self.key_tile}, {self.query_chunk}")

    def heads_first(self) -> bool:
        """Whether a prefill keeps the prefix K/V heads-first ([.., KVH, S, D], `Prefix`): always,
        but under the `prefix` stand-in (which reads [.., S, KVH, D]). Decode reads the prefix
        through the einsum partials (`prefix_kernel`), whose batched matmuls need their batch
        dims (prompt, KV head) leading and would otherwise copy the prefix every step and layer;
        the fused kernels, used for longer extends, take it by token (one copy per call)."""
        return self.prefix is None

    def prefix_kernel(self, dtype, queries: int) -> str:
        """The kernel of the branches' prefix attention for `queries` response tokens per branch:
        the einsum partials ("tiled") for a decode step (1), else `fused_blocks.kernel_for`. A
        flash kernel over a decode step's few query rows runs one block per (prompt, head) down
        the whole prefix, and its segment slots would pad a copy of the prefix every step and
        layer; the einsum partials read the heads-first prefix where it is."""
        return "tiled" if queries == 1 else fused_blocks.kernel_for(self.implementation, dtype)

    def tie(self) -> bool:
        """Whether the ring ties positions on this backend."""
        if self.tie_positions == "auto":
            return jax.default_backend() != "cpu"
        return self.tie_positions == "on"


def fused_implementation(choice: str, dtype) -> str:
    """The `jax.nn.dot_product_attention` implementation for `choice` and a compute dtype: "auto"
    is cuDNN's fused flash attention on a GPU backend for bf16 / fp16 (what cuDNN takes), else
    XLA's (which writes the scores out; the CPU path, same contract)."""
    if choice != "auto":
        return choice
    fused = jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if fused else "xla"


def attention_mask(q_pos, kv_pos, q_seg=None, kv_seg=None, causal: bool = True) -> jax.Array:
    """Boolean mask [B, Lq, Lk]: same segment (segments < 0 are padding), and kv_pos <= q_pos."""
    mask = jnp.ones((q_pos.shape[0], q_pos.shape[1], kv_pos.shape[1]), bool)
    if causal:
        mask &= kv_pos[:, None, :] <= q_pos[:, :, None]
    if q_seg is not None:
        mask &= (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] >= 0)
    return mask


def dense_attention(q, k, v, q_pos=None, kv_pos=None, q_seg=None, kv_seg=None, *,
                    causal: bool = True, scale: float | None = None, segment_ids=None):
    """Softmax attention with the masking semantics above, float32 softmax, output in q's dtype.

    q [B, Lq, H, D]; k, v [B, Lk, KVH, D]. Positions default to `arange`; `segment_ids` is a
    shorthand for self-attention segments (one [B, L] array for both sides).
    """
    b, lq, h, d = q.shape
    lk, kvh = k.shape[1], k.shape[2]
    q_pos = jnp.broadcast_to(jnp.arange(lq) if q_pos is None else q_pos, (b, lq))
    kv_pos = jnp.broadcast_to(jnp.arange(lk) if kv_pos is None else kv_pos, (b, lk))
    if segment_ids is not None:
        q_seg = kv_seg = jnp.broadcast_to(jnp.asarray(segment_ids), (b, lq))
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, lq, kvh, h // kvh, d)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_pos, kv_pos, q_seg, kv_seg, causal)[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1)                       # normalised after the values: one pass less
    out = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / jnp.where(denom == 0, 1.0, denom)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d).astype(q.dtype)


def prompt_attention(layout, options: AttentionOptions):
    """`attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg)` for a prompt laid out by `layout`: the
    zigzag ring over its `length` axis (inputs from `shard_sequence`), else one fused attention
    call where the options' kernel is fused (a GPU), else dense attention; the options' stand-in
    when one is set."""
    if options.prompt is not None:
        return options.prompt
    if layout.seq_axis is None:
        return functools.partial(whole_prompt_attention, implementation=options.implementation)
    return ring_attention_fn(layout, key_tile=options.key_tile, tie_positions=options.tie(),
                             kernel=options.implementation)


def whole_prompt_attention(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None, *,
                           implementation: str = "auto"):
    """Causal attention over a whole prompt on one device. With a fused kernel
    (`fused_blocks.kernel_for`; cuDNN on a GPU) it is one flash-attention call, causal by index:
    the ring's contract, positions that grow with the index among a segment's tokens (what
    `ring_prompt` builds); otherwise, and for keys longer than the queries, dense attention."""
    kernel = fused_blocks.kernel_for(implementation, q.dtype)
    if k.shape[1] != q.shape[1]:
        return dense_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    if kernel == "tiled":
        return causal_blocks_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    if q_seg is None:
        q_seg = kv_seg = jnp.zeros(q.shape[:2], jnp.int32)
    o, _ = fused_blocks.attention(q, k, v, q_seg, kv_seg, kernel=kernel,
                                  scale=q.shape[-1] ** -0.5, diag=True)
    o = jnp.where((q_seg >= 0)[:, :, None, None], o, 0.0)      # padding rows attend nothing
    return jnp.where(fused_blocks.segments_ok(q_seg, kv_seg), o, jnp.nan).astype(q.dtype)


def causal_blocks_attention(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None, *,
                            block: int = QUERY_BLOCK):
    """Dense attention in query blocks of `block` rows, each against the keys up to its end (the
    later ones are causally hidden under the ring's contract: positions grow with the index), so
    about half the [L, L] scores are never computed or held; one block: `dense_attention`."""
    length = q.shape[1]
    if length <= block:
        return dense_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    index = jnp.broadcast_to(jnp.arange(length), q.shape[:2])   # dense_attention's default, cut
    q_pos, kv_pos = (index if p is None else p for p in (q_pos, kv_pos))   # with the blocks
    cut = lambda x, a, b: None if x is None else x[:, a:b]  # noqa: E731
    outs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        outs.append(dense_attention(q[:, start:end], k[:, :end], v[:, :end],
                                    cut(q_pos, start, end), cut(kv_pos, 0, end),
                                    cut(q_seg, start, end), cut(kv_seg, 0, end)))
    return jnp.concatenate(outs, axis=1)


# ----------------------------------------------------------------------------- shared prefix


def local_rows(x, axis: str):
    """This device's block of dim 1 (the G branches) of x, split over mesh `axis` (in shard_map)."""
    n = x.shape[1] // jax.lax.axis_size(axis)
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis) * n, n, axis=1)


def prefix_stats(q, k, v, valid, *, scale, axis=None, scatter: bool = False,
                 kernel: str = "tiled", heads_first: bool = False):
    """Softmax partials of q [B, G, T, KVH, Hg, D] against the prefix (shard) k, v [B, S, KVH, D]
    ([B, KVH, S, D] when `heads_first`: the tiled kernel only), valid [B, S]; summed over `axis`
    when given. Returns float32 (max, sum, weighted values), each [B, G, T, KVH, Hg(, D)].
    `scatter`: return only this device's block of the G branches, the sums reduce-scattered
    (half the bytes of summing all G everywhere). `kernel` (`fused_blocks.kernel_for`): "tiled"
    writes the float32 scores out; "cudnn" / "xla" run one fused attention per shard and turn its
    (output, log-sum-exp) into the same partials."""
    if kernel == "tiled":
        m, l_sum, o = _einsum_partials(q, k, v, valid, scale, axis, heads_first)
    else:
        if heads_first:
            raise ValueError(f"the {kernel!r} kernel takes the prefix by token ([B, S, KVH, D]; "
                             "branch_attention swaps a heads-first one once per call)")
        b, g, t, kvh, hg, d = q.shape
        rows = jnp.zeros((b, g * t), jnp.int32)
        o, lse = fused_blocks.attention(q.reshape(b, g * t, kvh * hg, d), k, v, rows,
                                        jnp.where(valid, 0, -1).astype(jnp.int32),
                                        kernel=kernel, scale=scale)
        lse = lse.reshape(b, kvh, hg, g, t).transpose(0, 3, 4, 1, 2)
        m = jax.lax.stop_gradient(lse)
        if axis is not None:
            m = jax.lax.pmax(m, axis)
        l_sum = jnp.exp(lse - m)
        o = o.reshape(q.shape) * l_sum[..., None]
    if axis is not None and scatter:
        l_sum, o = (jax.lax.psum_scatter(a, axis, scatter_dimension=1, tiled=True)
                    for a in (l_sum, o))
        m = local_rows(m, axis)
    elif axis is not None:
        l_sum, o = jax.lax.psum((l_sum, o), axis)
    return m, l_sum, o


def key_scores(rows, k, mask, scale):
    """Scores [..., R, J] float32 of query rows [..., R, D] against heads-first keys
    [..., J, D], -inf where `mask` (broadcast to [..., R, J]) is False. With the batch dims
    leading in K/V as stored, this and `key_partials`' product are plain batched matmuls that
    read K/V in place (XLA:CPU copied a [B, S, KVH, D] prefix into this layout every decode
    step and layer; scores as [..., J, R] made its weighted-value product a slow generic dot)."""
    s = jnp.einsum("...rd,...jd->...rj", rows.astype(k.dtype), k,
                   preferred_element_type=jnp.float32) * scale
    return jnp.where(mask, s, -jnp.inf)


def key_partials(s, m, v):
    """(sum [..., R], weighted values [..., R, D]) of scores s [..., R, J] shifted by m [..., R]
    against heads-first values v [..., J, D], float32 (the weights in v's dtype, as
    `dense_attention`)."""
    p = jnp.exp(s - m[..., None])
    o = jnp.einsum("...rj,...jd->...rd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return jnp.sum(p, axis=-1), o


def row_max(s, axis=None):
    """The shift of scores [..., R, J]: their max over J, and over mesh `axis` when given (any
    shift is exact; stopped, which keeps the pmax out of AD), 0 for a row with no key."""
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1))
    if axis is not None:
        m = jax.lax.pmax(m, axis)
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _einsum_partials(q, k, v, valid, scale, axis, heads_first):
    """The tiled kernel's partials, from scores [B, KVH, rows, S] (`key_scores`); a prefix not
    stored heads-first is transposed here (a copy per call)."""
    b, g, t, kvh, hg, d = q.shape
    if not heads_first:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    rows = q.transpose(0, 3, 1, 2, 4, 5).reshape(b, kvh, g * t * hg, d)
    s = key_scores(rows, k, valid[:, None, None, :], scale)
    m = row_max(s, axis)
    l_sum, o = key_partials(s, m, v)
    back = lambda x: jnp.moveaxis(x.reshape(b, kvh, g, t, hg, *x.shape[3:]), 1, 3)  # noqa: E731
    return back(m), back(l_sum), back(o)


def branch_attention(q, k_new, v_new, prefix_k, prefix_v, prefix_valid, cache_k, cache_v, step,
                     *, layout, options: AttentionOptions, prefix_heads_first: bool = False):
    """q [B, G, T, H, D]; k_new, v_new [B, G, T, KVH, D]; prefix [B, S, KVH, D] ([B, KVH, S, D]
    when `prefix_heads_first`; sharded over the layout's `cache_length` axis); the response cache
    heads-first [B, G, KVH, C, D], of which entries < `step` are valid (the sampler writes each
    step's K/V into it in place afterwards). -> [B, G, T, H, D]. When the G branches are split
    over that same axis (`Layout.branch_axis`), each device brings only its branches' queries
    and gets only their partials back. Queries run in rematerialised chunks of
    `options.query_chunk` when T is longer (same result, less memory)."""
    b, g, t, h, d = q.shape
    kvh = k_new.shape[-2]
    hg = h // kvh
    qg = q.reshape(b, g, t, kvh, hg, d)
    scale = d ** -0.5
    axis = layout.axis("cache_length")
    if options.prefix is not None:
        if prefix_heads_first:
            raise ValueError("the prefix stand-in takes a [B, S, KVH, D] prefix, not heads-first")
        stats_fn = options.prefix
    else:
        kernel = options.prefix_kernel(q.dtype, t)
        if kernel != "tiled" and prefix_heads_first:   # fused kernels read by token: swap once
            prefix_k, prefix_v = jnp.swapaxes(prefix_k, 1, 2), jnp.swapaxes(prefix_v, 1, 2)
            prefix_heads_first = False                  # here, not in every query chunk
        stats_fn = functools.partial(prefix_stats, kernel=kernel, heads_first=prefix_heads_first)
    if axis is not None:
        scatter = layout.branch_axis(b, g) == axis

        def sharded(qc, k, v, valid):
            if scatter:   # this device's branches -> all of them, to meet its prefix shard
                qc = jax.lax.all_gather(qc, axis, axis=1, tiled=True)
            return stats_fn(qc, k, v, valid, scale=scale, axis=axis, scatter=scatter)

        rows = P(None, axis) if scatter else P()
        kv_spec = P(None, None, axis) if prefix_heads_first else P(None, axis)
        stats = jax.shard_map(sharded, mesh=layout.mesh,
                              in_specs=(rows, kv_spec, kv_spec, P(None, axis)),
                              out_specs=rows, axis_names={axis})
    else:
        stats = functools.partial(stats_fn, scale=scale)
    c = cache_k.shape[3]
    new_k, new_v = jnp.swapaxes(k_new, 2, 3), jnp.swapaxes(v_new, 2, 3)   # heads-first

    def local_stats(qc, k, v, mask):
        """Softmax partials (max, sum, weighted values) of qc against heads-first k, v
        [B, G, KVH, J, D] under mask [Tc, J]: what `prefix_stats` gives for the prefix."""
        tc = qc.shape[2]
        rows = qc.transpose(0, 1, 3, 2, 4, 5).reshape(b, g, kvh, tc * hg, d)
        mask = jnp.repeat(jnp.broadcast_to(mask, (tc, k.shape[3])), hg, axis=0)   # [rows, J]
        s2 = key_scores(rows, k, mask, scale)
        m = row_max(s2)
        l_sum, o = key_partials(s2, m, v)
        back = lambda x: jnp.moveaxis(  # noqa: E731
            x.reshape(b, g, kvh, tc, hg, *x.shape[4:]), 2, 3)
        return back(m), back(l_sum), back(o)

    def attend(qc, first):
        """Queries qc [B, G, Tc, KVH, Hg, D] at response positions first, first + 1, ...: the
        prefix, the branch's cache (entries < step) and its new tokens (causal), merged by
        log-sum-exp; the cache is read where it is (no copy per step)."""
        i = first + jnp.arange(qc.shape[2])[:, None]
        parts = [stats(qc, prefix_k, prefix_v, prefix_valid)]
        if c:
            parts.append(local_stats(qc, cache_k, cache_v, jnp.arange(c)[None, :] < step))
        parts.append(local_stats(qc, new_k, new_v, jnp.arange(t)[None, :] <= i))
        m = jax.lax.stop_gradient(functools.reduce(jnp.maximum, [p[0] for p in parts]))
        w = [jnp.exp(p[0] - m) for p in parts]
        denom = sum(p[1] * wi for p, wi in zip(parts, w))
        num = sum(p[2] * wi[..., None] for p, wi in zip(parts, w))
        return (num / denom[..., None]).astype(q.dtype)

    chunk = options.query_chunk
    if t <= chunk:
        out = attend(qg, 0)
    else:
        n = -(-t // chunk)
        padded = jnp.pad(qg, [(0, 0), (0, 0), (0, n * chunk - t)] + [(0, 0)] * 3)
        chunks = jnp.moveaxis(padded.reshape(b, g, n, chunk, *qg.shape[3:]), 2, 0)
        out = jax.lax.map(jax.checkpoint(lambda a: attend(*a)), (chunks, jnp.arange(n) * chunk))
        out = jnp.moveaxis(out, 0, 2).reshape(b, g, n * chunk, *qg.shape[3:])[:, :, :t]
    return out.reshape(b, g, t, h, d)
