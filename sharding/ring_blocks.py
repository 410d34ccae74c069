"""The sub-blocks of the ring (`sharding.ring_attention`): one (query chunk, key chunk) pair folded
into the online softmax (forward) or into the gradients (backward), in float32, tile by tile over
the keys so that only [B, KVH, G, Cq, key_tile] scores are alive at a time.

Masking semantics (shared by `lvr_jax.models.attention.dense_attention`): query ``i`` attends key
``j`` iff ``seg_k[j] >= 0`` and ``seg_q[i] == seg_k[j]`` and (if causal) ``pos_k[j] <= pos_q[i]``.
GQA: q is viewed as ``[B, L, KVH, H // KVH, D]``; K/V are never repeated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def mask_of(q_pos, q_seg, kv_pos, kv_seg, causal: bool):
    """Boolean mask ``[B, 1, 1, Lq, Lk]`` (broadcasts over kv heads and groups)."""
    m = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] >= 0)
    if causal:
        m = m & (kv_pos[:, None, :] <= q_pos[:, :, None])
    return m[:, None, None]


def group_heads(q, kv_heads: int):
    """``[B, L, H, D] -> [B, L, KVH, H // KVH, D]``."""
    b, l, h, d = q.shape
    if h % kv_heads:
        raise ValueError(f"{h} query heads is not a multiple of {kv_heads} kv heads")
    return q.reshape(b, l, kv_heads, h // kv_heads, d)


def varying_axes(x) -> frozenset:
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(t, "vma", ()))


def match_vma(tree, *refs):
    """pcast every leaf of ``tree`` to vary over the union of the axes the ``refs`` vary over.

    Needed for loop carries built from constants inside a ``shard_map`` with check_vma.
    """
    axes = frozenset().union(*(varying_axes(r) for r in refs))

    def one(x):
        missing = tuple(sorted(axes - varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(one, tree)


def chunks(x, n: int, axis: int = 1):
    return list(jnp.split(x, n, axis=axis)) if n > 1 else [x]


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
    return start, take, mask_of(q_pos, q_seg, take(kv_pos), take(kv_seg), causal) & fresh


def fwd_block(state, q, k, v, q_pos, q_seg, kv_pos, kv_seg, causal, scale, key_tile):
    """Fold one (query chunk, key chunk) sub-block into the online-softmax state ``(m, l, acc)``
    (m, l [B, KVH, G, Cq], acc [B, KVH, G, Cq, D], float32), tile by tile."""
    tile, n = _key_tiles(k.shape[1], key_tile)
    if n == 1:
        return _fwd_tile(state, q, k, v, mask_of(q_pos, q_seg, kv_pos, kv_seg, causal), scale)

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


def bwd_block(acc, q, k, v, do, lse, delta, q_pos, q_seg, kv_pos, kv_seg, causal, scale,
               key_tile):
    """Gradient contributions of one sub-block, tile by tile; ``acc = (dq_a, dk_c, dv_c)``."""
    tile, n = _key_tiles(k.shape[1], key_tile)
    if n == 1:
        return bwd_tile(acc, q, k, v, do, lse, delta,
                         mask_of(q_pos, q_seg, kv_pos, kv_seg, causal), scale)

    def one(i, carry):
        dq, dk, dv = carry
        start, take, mask = _key_tile(i, tile, k.shape[1], q_pos, q_seg, kv_pos, kv_seg, causal)
        dq, dk_t, dv_t = bwd_tile((dq, take(dk), take(dv)), q, take(k), take(v), do, lse, delta,
                                   mask, scale)
        put = lambda x, t: jax.lax.dynamic_update_slice_in_dim(x, t, start, axis=1)  # noqa: E731
        return dq, put(dk, dk_t), put(dv, dv_t)

    return jax.lax.fori_loop(0, n, one, acc)


def bwd_tile(acc, q, k, v, do, lse, delta, mask, scale):
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
