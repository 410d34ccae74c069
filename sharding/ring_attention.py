"""Ring attention over a mesh axis (MR-SP stage 2), load balanced for causal masks by zigzag.

Layout: every device holds a slice of the sequence (in zigzag order, see
:mod:`sharding.sequence_parallel`): its queries and its keys/values. The K/V blocks, with their
global positions and segment ids, travel around the ring with ``jax.lax.ppermute`` while each
device folds them into an online softmax (running max / sum, float32). Masks come only from global
positions and segment ids, so any token permutation works; blocks that are fully masked are skipped
with ``jax.lax.cond`` per (query chunk, key chunk) sub-block, which under zigzag gives every device
the same ``2n + 1`` of ``4n`` sub-blocks for a causal mask.

Masking semantics (shared by :func:`dense_attention`): query ``i`` attends key ``j`` iff
``seg_k[j] >= 0`` and ``seg_q[i] == seg_k[j]`` and (if causal) ``pos_k[j] <= pos_q[i]``. A
negative segment id marks padding. A query with no key to attend outputs exactly 0.

GQA: ``q`` has ``H`` heads and ``k``/``v`` have ``KVH`` heads with ``H % KVH == 0``; query head
``h`` uses kv head ``h // (H // KVH)`` (the HF ``repeat_kv`` convention). K/V are never repeated
in memory: q is viewed as ``[B, L, KVH, H // KVH, D]``.

Gradients: a ``jax.custom_vjp``. The forward saves only q, k, v, the output and the per-row
log-sum-exp; the backward recomputes the probabilities block by block in a second ring pass, where
the dK/dV accumulators travel with their K/V block and arrive home after ``n`` hops. Memory is
O(local length) per device, not O(local length x global length) as plain autodiff of the loop
would be.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sharding.mesh import Layout
from sharding.sequence_parallel import (
    pad_sequence,
    padded_length,
    unzigzag,
    zigzag,
    zigzag_positions,
)

F32 = jnp.float32


# ----------------------------------------------------------------------------- masks


def _mask(q_pos, q_seg, kv_pos, kv_seg, causal: bool):
    """Boolean mask ``[B, 1, 1, Lq, Lk]`` (broadcasts over kv heads and groups)."""
    m = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] >= 0)
    if causal:
        m = m & (kv_pos[:, None, :] <= q_pos[:, :, None])
    return m[:, None, None]


def _block_live(q_pos, q_seg, kv_pos, kv_seg, causal: bool):
    """Scalar bool: may any (query, key) pair of this block be unmasked? (conservative)."""
    hi_p = jnp.iinfo(q_pos.dtype).max
    hi_s = jnp.iinfo(q_seg.dtype).max
    qv, kv = q_seg >= 0, kv_seg >= 0
    live = qv.any(1) & kv.any(1)
    q_smin = jnp.where(qv, q_seg, hi_s).min(1)
    q_smax = jnp.where(qv, q_seg, -1).max(1)
    k_smin = jnp.where(kv, kv_seg, hi_s).min(1)
    k_smax = jnp.where(kv, kv_seg, -1).max(1)
    live = live & (q_smin <= k_smax) & (k_smin <= q_smax)
    if causal:
        k_pmin = jnp.where(kv, kv_pos, hi_p).min(1)
        q_pmax = jnp.where(qv, q_pos, -hi_p).max(1)
        live = live & (k_pmin <= q_pmax)
    return live.any()


# ----------------------------------------------------------------------------- helpers


def _group(q, kv_heads: int):
    """``[B, L, H, D] -> [B, L, KVH, H // KVH, D]``."""
    b, l, h, d = q.shape
    if h % kv_heads:
        raise ValueError(f"{h} query heads is not a multiple of {kv_heads} kv heads")
    return q.reshape(b, l, kv_heads, h // kv_heads, d)


def _chunks(x, n: int, axis: int = 1):
    return list(jnp.split(x, n, axis=axis)) if n > 1 else [x]


def _varying_axes(x) -> frozenset:
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(t, "vma", ()))


def _match_vma(tree, *refs):
    """pcast every leaf of ``tree`` to vary over the union of the axes the ``refs`` vary over.

    Needed for loop / cond carries built from constants inside a ``shard_map`` with check_vma.
    """
    axes = frozenset().union(*(_varying_axes(r) for r in refs))

    def one(x):
        missing = tuple(sorted(axes - _varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(one, tree)


def _ring_perm(n: int):
    return [(j, (j + 1) % n) for j in range(n)]


# ----------------------------------------------------------------------------- forward


# Keys per tile inside a (query chunk, key chunk) sub-block (the default of `key_tile`): the scores
# alive at a time are [B, KVH, G, Cq, key_tile] instead of [B, KVH, G, Cq, Ck] (Ck = local length
# / 2; 16.5k tokens for the 7B at 1024 frames on seq = 8, 29 GiB of float32 scores untiled).
KEY_TILE = 512


def _key_tiles(length: int, key_tile: int) -> tuple[int, int]:
    """(tile size, number of tiles) for a key chunk of `length` keys."""
    tile = min(key_tile, length)
    return tile, -(-length // tile)


def _key_tile(i, tile: int, length: int, q_pos, q_seg, kv_pos, kv_seg, causal: bool):
    """Start of key tile `i` and its mask. The last tile is shifted back to end at `length`;
    keys it shares with the tile before are masked out (each key is folded in once)."""
    start = jnp.minimum(i * tile, length - tile)
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, tile, axis=1)  # noqa: E731
    fresh = start + jnp.arange(tile) >= i * tile
    return start, take, _mask(q_pos, q_seg, take(kv_pos), take(kv_seg), causal) & fresh


def _fwd_block(state, q, k, v, q_pos, q_seg, kv_pos, kv_seg, causal, scale, key_tile):
    """Fold one (query chunk, key chunk) sub-block into the online-softmax state, tile by tile."""
    tile, n = _key_tiles(k.shape[1], key_tile)
    if n == 1:
        return _fwd_tile(state, q, k, v, _mask(q_pos, q_seg, kv_pos, kv_seg, causal), scale)

    def one(i, st):
        _, take, mask = _key_tile(i, tile, k.shape[1], q_pos, q_seg, kv_pos, kv_seg, causal)
        return _fwd_tile(st, q, take(k), take(v), mask, scale)

    return jax.lax.fori_loop(0, n, one, state)


def _fwd_tile(state, q, k, v, mask, scale):
    """Fold one block of keys into the online-softmax state."""
    m, l, acc = state  # m, l: [B, KVH, G, Cq]; acc: [B, KVH, G, Cq, D]; float32
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=F32) * scale
    s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
    alpha = jnp.exp(m - m_safe)  # m == -inf -> 0
    l = alpha * l + p.sum(-1)
    pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), v, preferred_element_type=F32)
    acc = acc * alpha[..., None] + pv
    return m_new, l, acc


def _num_chunks(length: int) -> int:
    return 2 if length % 2 == 0 and length >= 2 else 1


def _ring_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, causal, scale, key_tile,
                  tie_positions):
    """Returns ``(out [B, Lq, H, D] q.dtype, lse [B, KVH, G, Lq] f32, computed sub-blocks)``.

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
    nq, nk = _num_chunks(lq), _num_chunks(k.shape[1])
    qg = _group(q, kvh)
    g = qg.shape[3]
    q_c, qp_c, qs_c = _chunks(qg, nq), _chunks(q_pos, nq), _chunks(q_seg, nq)
    cq = lq // nq

    state0 = [
        (
            jnp.full((b, kvh, g, cq), -jnp.inf, F32),
            jnp.zeros((b, kvh, g, cq), F32),
            jnp.zeros((b, kvh, g, cq, d), F32),
        )
        for _ in range(nq)
    ]
    count0 = jnp.zeros((), jnp.int32)
    state0, count0 = _match_vma((state0, count0), q, k, v, q_pos, kv_pos, q_seg, kv_seg)

    def step(state, count, kvb):
        kb, vb, kpb, ksb = kvb
        k_c, v_c = _chunks(kb, nk), _chunks(vb, nk)
        kp_c, ks_c = _chunks(kpb, nk), _chunks(ksb, nk)
        new_state = []
        for a in range(nq):
            st = state[a]
            for c in range(nk):
                live = _block_live(qp_c[a], qs_c[a], kp_c[c], ks_c[c], causal)
                st = jax.lax.cond(
                    live,
                    functools.partial(_fwd_block, q=q_c[a], k=k_c[c], v=v_c[c], q_pos=qp_c[a],
                                      q_seg=qs_c[a], kv_pos=kp_c[c], kv_seg=ks_c[c],
                                      causal=causal, scale=scale, key_tile=key_tile),
                    lambda s: s,
                    st,
                )
                count = count + live.astype(jnp.int32)
            new_state.append(st)
        return new_state, count

    def body(_, carry):
        state, count, kvb = carry
        nxt = jax.lax.ppermute(kvb, axis_name, _ring_perm(n))
        state, count = step(state, count, kvb)
        return state, count, nxt

    kvb = (k, v, kv_pos, kv_seg)
    state, count, kvb = jax.lax.fori_loop(0, n - 1, body, (state0, count0, kvb))
    state, count = step(state, count, kvb)

    outs, lses = [], []
    for m, l, acc in state:
        ok = l > 0
        o = acc / jnp.where(ok, l, 1.0)[..., None]  # rows with no key: acc == 0 -> 0
        outs.append(o.transpose(0, 3, 1, 2, 4))  # [B, Cq, KVH, G, D]
        lses.append(jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), 0.0))
    out = jnp.concatenate(outs, axis=1).reshape(b, lq, h, d).astype(q.dtype)
    lse = jnp.concatenate(lses, axis=-1)
    return out, lse, count


# ----------------------------------------------------------------------------- backward


def _bwd_block(acc, q, k, v, do, lse, delta, q_pos, q_seg, kv_pos, kv_seg, causal, scale,
               key_tile):
    """Gradient contributions of one sub-block, tile by tile; ``acc = (dq_a, dk_c, dv_c)``."""
    tile, n = _key_tiles(k.shape[1], key_tile)
    if n == 1:
        return _bwd_tile(acc, q, k, v, do, lse, delta,
                         _mask(q_pos, q_seg, kv_pos, kv_seg, causal), scale)

    def one(i, carry):
        dq, dk, dv = carry
        start, take, mask = _key_tile(i, tile, k.shape[1], q_pos, q_seg, kv_pos, kv_seg, causal)
        dq, dk_t, dv_t = _bwd_tile((dq, take(dk), take(dv)), q, take(k), take(v), do, lse, delta,
                                   mask, scale)
        put = lambda x, t: jax.lax.dynamic_update_slice_in_dim(x, t, start, axis=1)  # noqa: E731
        return dq, put(dk, dk_t), put(dv, dv_t)

    return jax.lax.fori_loop(0, n, one, acc)


def _bwd_tile(acc, q, k, v, do, lse, delta, mask, scale):
    """Gradient contributions of one block of keys; ``acc = (dq_a, dk, dv)`` in float32."""
    dq, dk, dv = acc
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=F32) * scale
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
    dv = dv + jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(do.dtype), do, preferred_element_type=F32)
    dp = jnp.einsum("bqhgd,bkhd->bhgqk", do, v, preferred_element_type=F32)
    ds = p * (dp - delta[..., None]) * scale
    dq = dq + jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(k.dtype), k, preferred_element_type=F32)
    dk = dk + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(q.dtype), q, preferred_element_type=F32)
    return dq, dk, dv


def _ring_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, axis_name, causal,
                   scale, key_tile):
    b, lq, _, d = q.shape
    lk, kvh = k.shape[1], k.shape[2]
    n = jax.lax.axis_size(axis_name)
    nq, nk = _num_chunks(lq), _num_chunks(lk)
    qg, dog = _group(q, kvh), _group(dout.astype(q.dtype), kvh)
    delta = jnp.einsum("bqhgd,bqhgd->bhgq", dog.astype(F32), _group(out, kvh).astype(F32))
    q_c, do_c = _chunks(qg, nq), _chunks(dog, nq)
    qp_c, qs_c = _chunks(q_pos, nq), _chunks(q_seg, nq)
    lse_c, delta_c = _chunks(lse, nq, axis=3), _chunks(delta, nq, axis=3)

    refs = (q, k, v, q_pos, kv_pos, q_seg, kv_seg, dout)
    dq0 = _match_vma([jnp.zeros(x.shape, F32) for x in q_c], *refs)
    dkv0 = _match_vma(
        ([jnp.zeros((b, lk // nk, kvh, d), F32) for _ in range(nk)],
         [jnp.zeros((b, lk // nk, kvh, d), F32) for _ in range(nk)]),
        *refs,
    )

    def step(dq, dkv, kvb):
        kb, vb, kpb, ksb = kvb
        k_c, v_c = _chunks(kb, nk), _chunks(vb, nk)
        kp_c, ks_c = _chunks(kpb, nk), _chunks(ksb, nk)
        dq, (dk, dv) = list(dq), (list(dkv[0]), list(dkv[1]))
        for a in range(nq):
            for c in range(nk):
                live = _block_live(qp_c[a], qs_c[a], kp_c[c], ks_c[c], causal)
                dq[a], dk[c], dv[c] = jax.lax.cond(
                    live,
                    functools.partial(_bwd_block, q=q_c[a], k=k_c[c], v=v_c[c], do=do_c[a],
                                      lse=lse_c[a], delta=delta_c[a], q_pos=qp_c[a],
                                      q_seg=qs_c[a], kv_pos=kp_c[c], kv_seg=ks_c[c],
                                      causal=causal, scale=scale, key_tile=key_tile),
                    lambda s: s,
                    (dq[a], dk[c], dv[c]),
                )
        return dq, (dk, dv)

    def body(_, carry):
        dq, kvb, dkv = carry
        dq, dkv = step(dq, dkv, kvb)
        kvb, dkv = jax.lax.ppermute((kvb, dkv), axis_name, _ring_perm(n))
        return dq, kvb, dkv

    kvb = (k, v, kv_pos, kv_seg)
    dq, kvb, dkv = jax.lax.fori_loop(0, n - 1, body, (dq0, kvb, dkv0))
    dq, dkv = step(dq, dkv, kvb)
    if n > 1:  # one more hop brings each dK/dV block back to the device that owns it
        dkv = jax.lax.ppermute(dkv, axis_name, _ring_perm(n))
    dq = jnp.concatenate(dq, axis=1).reshape(q.shape).astype(q.dtype)
    dk = jnp.concatenate(dkv[0], axis=1).astype(k.dtype)
    dv = jnp.concatenate(dkv[1], axis=1).astype(v.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, causal, scale, key_tile, tie):
    return _ring_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, causal, scale, key_tile,
                         tie)[0]


def _ring_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, causal, scale, key_tile, tie):
    out, lse, _ = _ring_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, causal, scale,
                                key_tile, tie)
    return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _ring_bwd(axis_name, causal, scale, key_tile, tie, res, dout):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    dq, dk, dv = _ring_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout,
                                axis_name, causal, scale, key_tile)
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
                         scale=None, key_tile: int = KEY_TILE, tie_positions: bool = False):
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

    Returns ``[B, Lq, H, D]`` in q's dtype; rows with no key to attend are 0. Differentiable in
    q, k, v (custom VJP with a second ring pass). Each local block is split into 2 chunks (when its
    length is even) and every (query chunk, key chunk) pair that is fully masked is skipped.
    """
    _check_local(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q_pos, kv_pos, q_seg, kv_seg = _ints(q_pos, kv_pos, q_seg, kv_seg)
    return _ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, bool(causal), scale,
                 int(key_tile), bool(tie_positions))


def ring_attention_local_stats(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, axis_name, causal=True,
                               scale=None, key_tile: int = KEY_TILE):
    """Forward only, for tests / benchmarks: ``(out, lse [B, KVH, G, Lq], computed_blocks)``.

    ``computed_blocks`` (int32 scalar, per device) counts the (query chunk, key chunk) sub-blocks
    that were not skipped, out of ``n_devices * 2 * 2`` (for even local lengths).
    """
    _check_local(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q_pos, kv_pos, q_seg, kv_seg = _ints(q_pos, kv_pos, q_seg, kv_seg)
    return _ring_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, bool(causal), scale,
                         int(key_tile), False)


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
                      tie_positions: bool = False):
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
                             key_tile=key_tile, tie_positions=tie_positions)
        return ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg)

    return attend


def ring_attention(q, k, v, *, mesh: Mesh, axis: str = "seq", causal: bool = True,
                   segment_ids=None, key_tile: int = KEY_TILE):
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
                         key_tile=key_tile)
    return unzigzag(ring(q, k, v, pos, pos, seg, seg), n)[:, :length]
