"""Pad, zigzag-reorder and undo a sequence for causal load-balanced sequence parallelism.

A sequence (axis 1 of ``[batch, length, ...]``) sharded over a mesh axis of size ``n`` is first
padded to a multiple of ``2 * n`` and cut into ``2 * n`` equal chunks. Device ``i`` then holds
chunks ``i`` and ``2n - 1 - i`` (in that order), so under a causal mask every device has the same
amount of attention work: an early chunk (little to attend to) paired with a late one (a lot).

After :func:`zigzag` the permuted array's contiguous block ``i`` of length ``length / n`` is what
device ``i`` holds when the axis is sharded normally (``PartitionSpec(..., 'seq')``).
:func:`zigzag_positions` gives the global position of each permuted token, which is what the ring
attention and RoPE need; :func:`unzigzag` restores the global order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding


def padded_length(length: int, num_shards: int) -> int:
    """Smallest multiple of ``2 * num_shards`` that is >= ``length`` (and > 0)."""
    m = 2 * num_shards
    return max(m, -(-length // m) * m)


def pad_sequence(x, target_length: int, *, axis: int = 1, value=0):
    """Pad ``x`` at the end of ``axis`` up to ``target_length`` with ``value``."""
    extra = target_length - x.shape[axis]
    if extra < 0:
        raise ValueError(f"cannot pad length {x.shape[axis]} down to {target_length}")
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def pad_to_multiple(x, num_shards: int, *, axis: int = 1, value=0):
    """Pad axis ``axis`` of ``x`` to a multiple of ``2 * num_shards``; returns ``(padded, length)``."""
    length = x.shape[axis]
    return pad_sequence(x, padded_length(length, num_shards), axis=axis, value=value), length


def _check(length: int, num_shards: int) -> int:
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if length % (2 * num_shards):
        raise ValueError(
            f"length {length} is not a multiple of 2 * num_shards = {2 * num_shards}; pad it first"
        )
    return length // (2 * num_shards)


def zigzag_chunk_order(num_shards: int) -> np.ndarray:
    """Chunk ids in permuted order: ``[0, 2n-1, 1, 2n-2, ..., n-1, n]``."""
    n = num_shards
    return np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], axis=1).reshape(-1)


def zigzag_indices(length: int, num_shards: int) -> np.ndarray:
    """Permutation ``perm`` with ``permuted[j] = x[perm[j]]``; ``perm[j]`` is token j's position."""
    chunk = _check(length, num_shards)
    order = zigzag_chunk_order(num_shards)
    return (order[:, None] * chunk + np.arange(chunk)[None, :]).reshape(-1)


def unzigzag_indices(length: int, num_shards: int) -> np.ndarray:
    """Inverse of :func:`zigzag_indices`: ``x[i] = permuted[inv[i]]``."""
    return np.argsort(zigzag_indices(length, num_shards))


def zigzag(x, num_shards: int, *, axis: int = 1):
    """Reorder ``axis`` of ``x`` (length a multiple of ``2 * num_shards``) into zigzag order
    (``x`` taken at :func:`zigzag_indices`). Written with reshapes, a reverse and a stack, not a
    gather, so that neither it nor its transpose needs the whole axis on one device when the axis
    is sharded."""
    if num_shards == 1:
        return x  # chunks 0 and 1 in order: the identity
    n, chunk = num_shards, _check(x.shape[axis], num_shards)
    halves = x.reshape(x.shape[:axis] + (2, n, chunk) + x.shape[axis + 1:])
    early = jax.lax.index_in_dim(halves, 0, axis, keepdims=False)           # chunks 0 .. n-1
    late = jnp.flip(jax.lax.index_in_dim(halves, 1, axis, keepdims=False), axis)  # 2n-1 .. n
    return jnp.stack([early, late], axis=axis + 1).reshape(x.shape)


def unzigzag(x, num_shards: int, *, axis: int = 1):
    """Undo :func:`zigzag`: back to global order along ``axis`` (reshapes, like `zigzag`)."""
    if num_shards == 1:
        return x
    n, chunk = num_shards, _check(x.shape[axis], num_shards)
    pairs = x.reshape(x.shape[:axis] + (n, 2, chunk) + x.shape[axis + 1:])
    early = jax.lax.index_in_dim(pairs, 0, axis + 1, keepdims=False)
    late = jnp.flip(jax.lax.index_in_dim(pairs, 1, axis + 1, keepdims=False), axis)
    return jnp.concatenate([early, late], axis=axis).reshape(x.shape)


def zigzag_positions(length: int, num_shards: int, batch: int | None = None):
    """Global positions of the zigzag-permuted tokens, int32 ``[length]`` or ``[batch, length]``."""
    pos = jnp.asarray(zigzag_indices(length, num_shards), jnp.int32)
    return pos if batch is None else jnp.broadcast_to(pos, (batch, length))


def shard_sequence(layout, input_embeds, positions, segment_ids=None):
    """Pad to a multiple of 2n (padding: segment -1), zigzag-reorder and constrain the sequence
    to its sharding: tokens over the layout's ring axis (`length`), rows over `batch` where the
    mesh axes divide them (a `sharding.mesh.Layout` with a ring axis).

    Returns `(x, pos, seg, where)`: the permuted arrays and `where[i]`, the permuted index of
    original token i (so `x[:, where]` is the original order).
    """
    axis = layout.seq_axis
    n = layout.mesh.shape[axis]
    b, length = input_embeds.shape[:2]
    lp = padded_length(length, n)
    seg = jnp.zeros((b, length), jnp.int32) if segment_ids is None else segment_ids
    x = zigzag(pad_sequence(input_embeds, lp), n)
    pos = zigzag(pad_sequence(positions, lp), n)
    seg = zigzag(pad_sequence(seg.astype(jnp.int32), lp, value=-1), n)
    names = ("batch", "length") + (None,) * (x.ndim - 2)
    spec = layout.spec(names, x.shape)
    if spec[1] != axis:
        raise ValueError(f"the sharding rules put mesh axis {axis!r} on an earlier dimension than "
                         f"'length' ({spec}); keep it out of 'batch'")
    x = jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, spec))
    return x, pos, seg, unzigzag_indices(lp, n)[:length]
