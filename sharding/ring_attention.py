"""Ring attention over a mesh axis (MR-SP stage 2), load balanced for causal masks by zigzag.

Layout: every device holds a slice of the sequence (in zigzag order, see
:mod:`sharding.sequence_parallel`): its queries and its keys/values, each cut into two chunks.
The K/V blocks, with their global positions and segment ids, travel around the ring with
``jax.lax.ppermute`` (sent before the step's compute, so the transfer overlaps it) while each
device folds them into an online softmax (running max / sum, float32; the sub-block math is in
:mod:`sharding.ring_blocks`). Masks come from global positions and segment ids.

Schedule, without conditionals (no `lax.cond`: no predicate copied to the host, a program CUDA
graphs can capture). Causal attention on a zigzag layout: device ``i`` holds chunks ``i`` and
``2n-1-i``; at ring step ``s`` it holds the K/V chunks of device ``j = i - s mod n``. Step 0
computes 3 sub-blocks (both diagonals and the late-query / early-key one); every later step
exactly 2: when ``j < i`` both query chunks against key chunk ``j``, else query chunk ``2n-1-i``
against both key chunks; the chunks are chosen by index with selects. Every other sub-block is
fully masked under zigzag. So each device computes ``2n + 1`` of ``4n`` sub-blocks whatever its
index. This needs positions that grow with the global token index (zigzag_positions, or a
prompt's positions with its padding segment-masked, as `shard_sequence` makes them); anything
else, and non-causal attention, takes every sub-block (``4n``).

Masking semantics (shared by :func:`lvr_jax.models.attention.dense_attention`): query ``i`` attends
key ``j`` iff ``seg_k[j] >= 0`` and ``seg_q[i] == seg_k[j]`` and (if causal) ``pos_k[j] <= pos_q[i]``.
A negative segment id marks padding. A query with no key to attend outputs exactly 0.

Sub-block kernels (`kernel`): "tiled" folds each sub-block into the online softmax in float32
key tiles (:mod:`sharding.ring_blocks`; the CPU default); "cudnn" runs it as one cuDNN
flash-attention call and "xla" as the same contract on XLA (:mod:`sharding.fused_blocks`: each
call returns its output and float32 log-sum-exp, merged into the same online state; the backward
hands the kernel the merged output and log-sum-exp). The fused kernels mask the diagonal
sub-blocks causally by index and every other computed one not at all, so a causal ring off the
zigzag schedule (odd local lengths, keys longer than queries) runs tiled.

GQA: ``q`` has ``H`` heads and ``k``/``v`` have ``KVH`` heads with ``H % KVH == 0``; query head
``h`` uses kv head ``h // (H // KVH)`` (the HF ``repeat_kv`` convention). K/V are never repeated
in memory: q is viewed as ``[B, L, KVH, H // KVH, D]``.

Gradients: a ``jax.custom_vjp``. The forward saves only q, k, v, the output and the per-row
log-sum-exp; the backward recomputes the probabilities sub-block by sub-block in a second ring
pass over the same schedule, where the dK/dV accumulators travel with their K/V block and arrive
home after ``n`` hops. Memory is O(local length) per device, not O(local length x global length)
as plain autodiff of the loop would be.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sharding import fused_blocks
from sharding.mesh import Layout
from sharding.ring_blocks import (
    F32,
    KEY_TILE,
    bwd_block,
    chunks,
    fwd_block,
    group_heads,
    match_vma,
)
from sharding.sequence_parallel import (
    pad_sequence,
    padded_length,
    unzigzag,
    zigzag,
    zigzag_positions,
)


# ----------------------------------------------------------------------------- schedule


def _ring_perm(n: int):
    return [(j, (j + 1) % n) for j in range(n)]


def _zigzag_ok(causal: bool, local_length: int) -> bool:
    """Whether the 2n+1 zigzag schedule applies (else every sub-block is computed)."""
    return causal and local_length % 2 == 0


def _pairs(zigzag_schedule: bool, first: bool, early):
    """The (query chunk, key chunk) sub-blocks of a ring step; an index is a Python int or a
    traced 0/1 scalar (chosen by `early` = the K/V came from a device before this one)."""
    if not zigzag_schedule:
        return [(0, 0), (0, 1), (1, 0), (1, 1)]
    if first:
        return [(0, 0), (1, 0), (1, 1)]
    late = jnp.where(early, 0, 1).astype(jnp.int32)
    return [(late, 0), (1, late)]


def num_blocks(n: int, causal: bool, local_length: int) -> int:
    """Sub-blocks one device computes in a ring of `n` (2n + 1 causal zigzag, else 4n; n for an
    odd local length, one chunk)."""
    if local_length % 2:
        return n
    return 2 * n + 1 if _zigzag_ok(causal, local_length) else 4 * n


def _pick(items, idx):
    """items[idx] for a Python int, or a select between the two for a traced 0/1 index."""
    if isinstance(idx, int):
        return items[idx]
    return jax.tree.map(lambda a, b: jnp.where(idx == 0, a, b), items[0], items[1])


def _put(items, idx, new):
    """items with items[idx] = new, without a conditional (see `_pick`)."""
    items = list(items)
    if isinstance(idx, int):
        items[idx] = new
        return items
    return [jax.tree.map(lambda x, y, i=i: jnp.where(idx == i, x, y), new, items[i])
            for i in range(len(items))]


def _fused(kernel: str, causal: bool, zigzag_schedule: bool) -> bool:
    """Whether the sub-blocks go through a fused kernel (`sharding.fused_blocks`): its masks are
    causal-by-index on the diagonal sub-blocks and segments, so a causal ring needs the zigzag
    schedule (else positions decide, which only the tiled blocks express)."""
    return kernel != "tiled" and (zigzag_schedule or not causal)


def _early(axis_name):
    """`early(s)`: at ring step s this device holds the K/V of a device before it (i - s >= 0)."""
    i = jax.lax.axis_index(axis_name)
    return lambda s: s <= i


# ----------------------------------------------------------------------------- forward


def _ring_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, causal, scale, key_tile,
                  tie_positions, kernel="tiled"):
    """Returns ``(out [B, Lq, H, D] q.dtype, lse [B, KVH, G, Lq] f32)``.

    ``tie_positions``: tie the positions / segment ids to q with an optimization_barrier. Under a
    differentiated layer scan they are loop invariant, and JAX's scan partial evaluation hoists
    everything that depends only on them (the sub-block masks, broadcast to [B, KVH, G, Cq, Ck],
    and the -inf / 0 fills) out of the layer loop, stacked over the ring steps (the 7B GRPO update
    at 512 frames on seq = 8 needed 676 GiB of temp per device without the tie, 44 with it;
    README, plan_memory). XLA:CPU's runtime deadlocked on the tied program mid-demo (a device
    reached a later all-reduce while its peers still waited in a collective-permute of the layer
    loop), so the model turns it on for accelerators only (`AttentionOptions.tie_positions`).
    """
    if tie_positions:
        q, q_pos, kv_pos, q_seg, kv_seg = jax.lax.optimization_barrier(
            (q, q_pos, kv_pos, q_seg, kv_seg))
    b, lq, h, d = q.shape
    kvh = k.shape[2]
    n = jax.lax.axis_size(axis_name)
    nc = 2 if lq % 2 == 0 else 1
    zz = _zigzag_ok(causal, lq) and k.shape[1] == lq
    qg = group_heads(q, kvh)
    g = qg.shape[3]
    q_c, qp_c, qs_c = chunks(qg, nc), chunks(q_pos, nc), chunks(q_seg, nc)
    cq = lq // nc
    state = [(jnp.full((b, kvh, g, cq), -jnp.inf, F32), jnp.zeros((b, kvh, g, cq), F32),
              jnp.zeros((b, kvh, g, cq, d), F32)) for _ in range(nc)]
    state = match_vma(state, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    early_at = _early(axis_name)
    fused = _fused(kernel, causal, zz)

    def step(state, kvb, pairs, first=False):
        kb, vb, kpb, ksb = (chunks(x, nc) for x in kvb)
        for a, c in pairs:
            if fused:
                fold = functools.partial(
                    fused_blocks.fwd_block, q=_pick(q_c, a), k=_pick(kb, c), v=_pick(vb, c),
                    q_seg=_pick(qs_c, a), kv_seg=_pick(ksb, c), kernel=kernel, scale=scale,
                    diag=causal and first and a == c)
            else:
                fold = functools.partial(
                    fwd_block, q=_pick(q_c, a), k=_pick(kb, c), v=_pick(vb, c),
                    q_pos=_pick(qp_c, a), q_seg=_pick(qs_c, a), kv_pos=_pick(kpb, c),
                    kv_seg=_pick(ksb, c), causal=causal, scale=scale, key_tile=key_tile)
            state = _put(state, a, fold(_pick(state, a)))
        return state

    def pairs_at(s):
        if nc == 1:
            return [(0, 0)]
        return _pairs(zz, False, early_at(s))

    kvb = (k, v, kv_pos, kv_seg)
    if n > 1:
        nxt = jax.lax.ppermute(kvb, axis_name, _ring_perm(n))   # in flight during step 0
    state = step(state, kvb, [(0, 0)] if nc == 1 else _pairs(zz, True, None), first=True)
    if n > 1:
        def body(s, carry):
            state, kvb = carry
            nxt = jax.lax.ppermute(kvb, axis_name, _ring_perm(n))
            return step(state, kvb, pairs_at(s)), nxt

        state, kvb = jax.lax.fori_loop(1, n - 1, body, (state, nxt))
        state = step(state, kvb, pairs_at(n - 1))

    outs, lses = [], []
    for (m, l, acc), seg in zip(state, qs_c):
        ok = l > 0
        o = acc / jnp.where(ok, l, 1.0)[..., None]  # rows with no key: acc == 0 -> 0
        if fused:   # every key scored (masked ones at -2^15 * scale): zero the padding rows
            o = jnp.where((seg >= 0)[:, None, None, :, None], o, 0.0)
        outs.append(o.transpose(0, 3, 1, 2, 4))  # [B, Cq, KVH, G, D]
        lses.append(jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), 0.0))
    out = jnp.concatenate(outs, axis=1).reshape(b, lq, h, d)
    if fused:
        out = jnp.where(fused_blocks.segments_ok(q_seg, kv_seg), out, jnp.nan)
    return out.astype(q.dtype), jnp.concatenate(lses, axis=-1)


# ----------------------------------------------------------------------------- backward


def _ring_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, axis_name, causal,
                   scale, key_tile, kernel="tiled"):
    b, lq, _, d = q.shape
    lk, kvh = k.shape[1], k.shape[2]
    n = jax.lax.axis_size(axis_name)
    nc = 2 if lq % 2 == 0 else 1
    zz = _zigzag_ok(causal, lq) and lk == lq
    qg, dog = group_heads(q, kvh), group_heads(dout.astype(q.dtype), kvh)
    fused = _fused(kernel, causal, zz)
    if fused:   # padding rows were zeroed after the kernel: no gradient flows through them
        dog = jnp.where((q_seg >= 0)[:, :, None, None, None], dog, 0)
        o_c = chunks(group_heads(out, kvh), nc)     # the kernel takes rowsum(dO o) from these
    else:
        delta = jnp.einsum("bqhgd,bqhgd->bhgq", dog.astype(F32),
                           group_heads(out, kvh).astype(F32))
        delta_c = chunks(delta, nc, axis=3)
    q_c, do_c = chunks(qg, nc), chunks(dog, nc)
    qp_c, qs_c = chunks(q_pos, nc), chunks(q_seg, nc)
    lse_c = chunks(lse, nc, axis=3)
    refs = (q, k, v, q_pos, kv_pos, q_seg, kv_seg, dout)
    dq = match_vma([jnp.zeros(x.shape, F32) for x in q_c], *refs)
    zeros = [jnp.zeros((b, lk // nc, kvh, d), F32) for _ in range(nc)]
    dkv = match_vma((zeros, list(zeros)), *refs)
    early_at = _early(axis_name)

    def step(dq, dkv, kvb, pairs, first=False):
        kb, vb, kpb, ksb = (chunks(x, nc) for x in kvb)
        dk, dv = dkv
        for a, c in pairs:
            acc = (_pick(dq, a), _pick(dk, c), _pick(dv, c))
            if fused:
                new = fused_blocks.bwd_block(
                    acc, q=_pick(q_c, a), k=_pick(kb, c), v=_pick(vb, c), o=_pick(o_c, a),
                    lse=_pick(lse_c, a), do=_pick(do_c, a), q_seg=_pick(qs_c, a),
                    kv_seg=_pick(ksb, c), kernel=kernel, scale=scale,
                    diag=causal and first and a == c)
            else:
                new = bwd_block(acc, q=_pick(q_c, a), k=_pick(kb, c), v=_pick(vb, c),
                                do=_pick(do_c, a), lse=_pick(lse_c, a), delta=_pick(delta_c, a),
                                q_pos=_pick(qp_c, a), q_seg=_pick(qs_c, a),
                                kv_pos=_pick(kpb, c), kv_seg=_pick(ksb, c), causal=causal,
                                scale=scale, key_tile=key_tile)
            dq, dk, dv = _put(dq, a, new[0]), _put(dk, c, new[1]), _put(dv, c, new[2])
        return dq, (dk, dv)

    def pairs_at(s):
        if nc == 1:
            return [(0, 0)]
        return _pairs(zz, False, early_at(s))

    kvb = (k, v, kv_pos, kv_seg)
    if n > 1:
        nxt = jax.lax.ppermute(kvb, axis_name, _ring_perm(n))   # K/V in flight during step 0
    dq, dkv = step(dq, dkv, kvb, [(0, 0)] if nc == 1 else _pairs(zz, True, None), first=True)
    if n > 1:
        hop = functools.partial(jax.lax.ppermute, axis_name=axis_name, perm=_ring_perm(n))
        dkv = hop(dkv)                                 # dK/dV travel with their K/V

        def body(s, carry):
            dq, kvb, dkv = carry
            nxt = hop(kvb)
            dq, dkv = step(dq, dkv, kvb, pairs_at(s))
            return dq, nxt, hop(dkv)

        dq, kvb, dkv = jax.lax.fori_loop(1, n - 1, body, (dq, nxt, dkv))
        dq, dkv = step(dq, dkv, kvb, pairs_at(n - 1))
        dkv = hop(dkv)                                 # one more hop: each dK/dV block home
    dq = jnp.concatenate(dq, axis=1).reshape(q.shape).astype(q.dtype)
    dk = jnp.concatenate(dkv[0], axis=1).astype(k.dtype)
    dv = jnp.concatenate(dkv[1], axis=1).astype(v.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11, 12))
def _ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, causal, scale, key_tile, tie, kernel):
    return _ring_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, causal, scale, key_tile,
                         tie, kernel)[0]


def _ring_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, causal, scale, key_tile, tie,
              kernel):
    out, lse = _ring_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, causal, scale,
                             key_tile, tie, kernel)
    return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _ring_bwd(axis_name, causal, scale, key_tile, tie, kernel, res, dout):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    dq, dk, dv = _ring_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout,
                                axis_name, causal, scale, key_tile, kernel)
    return dq, dk, dv, None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _check_local(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B,L,H,D], k = v [B,L,KVH,D]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} differ in batch or head_dim")
    if q_pos.shape != q.shape[:2] or q_seg.shape != q.shape[:2]:
        raise ValueError(f"q_pos/q_seg must be {q.shape[:2]}, got {q_pos.shape}, {q_seg.shape}")
    if kv_pos.shape != k.shape[:2] or kv_seg.shape != k.shape[:2]:
        raise ValueError(f"kv_pos/kv_seg must be {k.shape[:2]}, got {kv_pos.shape}, {kv_seg.shape}")


def _ints(*xs):
    return tuple(jnp.asarray(x).astype(jnp.int32) for x in xs)


def ring_attention_local(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, axis_name, causal=True,
                         scale=None, key_tile: int = KEY_TILE, tie_positions: bool = False,
                         kernel: str = "auto"):
    """Ring attention on this device's shard; call inside a ``shard_map`` over ``axis_name``.

    Args:
      q: local queries ``[B, Lq, H, D]``.
      k, v: local keys / values ``[B, Lk, KVH, D]``, ``H % KVH == 0`` (GQA, not repeated).
      q_pos, kv_pos: int ``[B, Lq]`` / ``[B, Lk]`` GLOBAL positions of the local tokens.
      q_seg, kv_seg: int ``[B, Lq]`` / ``[B, Lk]`` segment ids; < 0 marks padding.
      axis_name: the mesh axis the sequence is sharded over (the ring).
      causal: also require ``kv_pos <= q_pos``.
      scale: softmax scale, default ``1 / sqrt(D)``.
      key_tile: keys per score tile inside a sub-block (memory, not the result).
      tie_positions: tie positions / segments to q (see `_ring_forward`; memory under a
        differentiated layer scan, not the result).
      kernel: the sub-blocks' kernel (`fused_blocks.kernel_for`): "tiled" einsum blocks, "cudnn"
        fused flash attention, "xla" (the fused contract on XLA, for tests), "auto" = cuDNN on a
        GPU for bf16 / fp16, else tiled. A causal ring off the zigzag schedule runs tiled.

    Returns ``[B, Lq, H, D]`` in q's dtype; rows with no key to attend are 0. Differentiable in
    q, k, v (custom VJP with a second ring pass). Each local block is split into 2 chunks (when its
    length is even) and every (query chunk, key chunk) pair that is fully masked is skipped.
    """
    _check_local(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q_pos, kv_pos, q_seg, kv_seg = _ints(q_pos, kv_pos, q_seg, kv_seg)
    return _ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, bool(causal), scale,
                 int(key_tile), bool(tie_positions), fused_blocks.kernel_for(kernel, q.dtype))


def ring_attention_local_stats(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, axis_name, causal=True,
                               scale=None, key_tile: int = KEY_TILE, kernel: str = "auto"):
    """Forward only, for tests / benchmarks: ``(out, lse [B, KVH, G, Lq], computed_blocks)``.

    ``computed_blocks`` (int32 scalar, per device): the (query chunk, key chunk) sub-blocks the
    schedule computed, out of ``n_devices * 2 * 2`` (for even local lengths; `num_blocks`).
    """
    _check_local(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q_pos, kv_pos, q_seg, kv_seg = _ints(q_pos, kv_pos, q_seg, kv_seg)
    out, lse = _ring_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, bool(causal),
                             scale, int(key_tile), False, fused_blocks.kernel_for(kernel, q.dtype))
    count = num_blocks(jax.lax.axis_size(axis_name), bool(causal), q.shape[1])
    return out, lse, match_vma(jnp.asarray(count, jnp.int32), q)


# ----------------------------------------------------------------------------- public


def _sharded_ring(mesh: Mesh, axis: str, xspec: P, **kw):
    """The local ring under a shard_map: q/k/v sharded as `xspec` ([B, L, heads, D]) with the
    length over the ring axis (even of size 1), positions and segments as its first two
    entries."""
    local = functools.partial(ring_attention_local, axis_name=axis, **kw)
    xspec = P(xspec[0], axis, *xspec[2:])
    tspec = P(*xspec[:2])
    return jax.shard_map(local, mesh=mesh, in_specs=(xspec,) * 3 + (tspec,) * 4, out_specs=xspec)


NAMES = ("batch", "length", "kv_heads", None)   # q/k/v; query heads follow the kv heads


def ring_attention_fn(layout, *, causal: bool = True, key_tile: int = KEY_TILE,
                      tie_positions: bool = False, kernel: str = "auto"):
    """`attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg)` running the ring over the ring axis of
    `layout` (a `sharding.mesh.Layout`: logical 'length') on global arrays whose length is
    already padded and zigzag-ordered (`sequence_parallel.shard_sequence`).

    Rows are sharded as the layout's 'batch', heads as its 'kv_heads', both only where the mesh
    axes divide them; the rest of the model stays under the compiler's sharding.
    """
    axis = layout.seq_axis
    if axis is None:
        raise ValueError("the layout has no ring axis: its 'length' rule maps to no mesh axis "
                         "of size > 1")

    def attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        if q_seg is None:
            q_seg = kv_seg = jnp.zeros(q.shape[:2], jnp.int32)
        ring = _sharded_ring(layout.mesh, axis, layout.spec(NAMES, k.shape), causal=causal,
                             key_tile=key_tile, tie_positions=tie_positions, kernel=kernel)
        return ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg)

    return attend


def ring_attention(q, k, v, *, mesh: Mesh, axis: str = "seq", causal: bool = True,
                   segment_ids=None, key_tile: int = KEY_TILE, kernel: str = "auto"):
    """Self-attention with the sequence sharded over ``mesh`` axis ``axis`` (a ring).

    Args:
      q: ``[batch, length, heads, head_dim]`` in global (unpermuted) order.
      k, v: ``[batch, length, kv_heads, head_dim]``, ``heads % kv_heads == 0``.
      mesh: the device mesh; ``axis`` is the ring axis. The batch is also sharded over 'data'
        (and 'fsdp') when it divides, and heads over 'tensor' when both head counts divide.
      causal: causal mask from global positions.
      segment_ids: optional int ``[batch, length]`` (or ``[length]``); attention stays within
        equal ids; negative ids are padding (attend to nothing, are attended by nothing).
      key_tile: keys per score tile inside a sub-block (memory, not the result).
      kernel: the sub-blocks' kernel (see `ring_attention_local`).

    Any length works: the sequence is padded to a multiple of ``2 * mesh.shape[axis]`` (padding
    gets segment -1), zigzag-reordered, attended, and restored. Equals dense attention
    (`lvr_jax.models.attention.dense_attention`).
    """
    b, length, h, _ = q.shape
    if k.shape[:2] != (b, length) or v.shape != k.shape:
        raise ValueError(f"self-attention needs matching q {q.shape}, k {k.shape}, v {v.shape}")
    n = mesh.shape[axis]
    lp = padded_length(length, n)
    if segment_ids is None:
        seg = jnp.zeros((b, length), jnp.int32)
    else:
        seg = jnp.broadcast_to(jnp.asarray(segment_ids).astype(jnp.int32), (b, length))
    q, k, v = (pad_sequence(x, lp) for x in (q, k, v))
    seg = pad_sequence(seg, lp, value=-1)
    q, k, v, seg = (zigzag(x, n) for x in (q, k, v, seg))
    pos = zigzag_positions(lp, n, b)
    layout = Layout.of(mesh, {"length": axis,
                              "batch": tuple(a for a in ("data", "fsdp") if a != axis)})
    ring = _sharded_ring(mesh, axis, layout.spec(NAMES, k.shape), causal=causal,
                         key_tile=key_tile, kernel=kernel)
    return unzigzag(ring(q, k, v, pos, pos, seg, seg), n)[:, :length]
