"""Pad, zigzag-reorder and undo a sequence for causal load-balanced sequence parallelism.

A sequence (axis 1 of ``[batch, length, ...]``) sharded over a mesh axis of size ``n`` is first
padded to a multiple of ``2 * n`` and cut into ``2 * n`` equal chunks. Device ``i`` then holds
chunks ``i`` and ``2n - 1 - i`` (in that order), so under a causal mask every device has the same
amount of attention work: an early chunk (little to attend to) paired with a late one (a lot).

After :func:`zigzag` the permuted array's contiguous block ``i`` of length ``length / n`` is what
device ``i`` holds when the axis is sharded normally (``PartitionSpec(..., 'seq')``).
:func:`zigzag_positions` gives the global position of each permuted token, which is what the ring
attention and RoPE need; :func:`unzigzag` restores the global order.

Chunked (``chunks = S > 1``, for a prefill run chunk by chunk): the sequence is first cut into ``S``
contiguous chunks and each is zigzagged on its own; device ``i`` holds, for every chunk ``s`` in
order, that chunk's pieces ``i`` and ``2n - 1 - i``. So chunk ``s`` of every device's block,
taken together, is chunk ``s`` of the sequence in the plain zigzag layout. ``S = 1`` is the plain
zigzag.
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


def _check(length: int, num_shards: int, chunks: int = 1) -> int:
    """Tokens per piece (a chunk's 1 / 2n)."""
    if num_shards < 1 or chunks < 1:
        raise ValueError(f"num_shards and chunks must be >= 1, got {num_shards}, {chunks}")
    m = 2 * num_shards * chunks
    if length % m:
        raise ValueError(f"length {length} is not a multiple of 2 * num_shards * chunks = {m}; "
                         f"pad it first")
    return length // m


def zigzag_chunk_order(num_shards: int) -> np.ndarray:
    """Chunk ids in permuted order: ``[0, 2n-1, 1, 2n-2, ..., n-1, n]``."""
    n = num_shards
    return np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], axis=1).reshape(-1)


def zigzag_indices(length: int, num_shards: int, chunks: int = 1) -> np.ndarray:
    """Permutation ``perm`` with ``permuted[j] = x[perm[j]]``; ``perm[j]`` is token j's position."""
    n, piece = num_shards, _check(length, num_shards, chunks)
    order = zigzag_chunk_order(n).reshape(n, 1, 2, 1)            # [device, chunk, half, token]
    start = np.arange(chunks).reshape(1, chunks, 1, 1) * 2 * n * piece
    return (start + order * piece + np.arange(piece).reshape(1, 1, 1, piece)).reshape(-1)


def unzigzag_indices(length: int, num_shards: int, chunks: int = 1) -> np.ndarray:
    """Inverse of :func:`zigzag_indices`: ``x[i] = permuted[inv[i]]``."""
    return np.argsort(zigzag_indices(length, num_shards, chunks))


def zigzag(x, num_shards: int, *, axis: int = 1, chunks: int = 1):
    """Reorder ``axis`` of ``x`` (length a multiple of ``2 * num_shards * chunks``) into zigzag
    order (``x`` taken at :func:`zigzag_indices`). Written with reshapes, a reverse, a stack and
    (for chunks) a transpose, not a gather, so that neither it nor its transpose needs the whole
    axis on one device when the axis is sharded."""
    if num_shards == 1:
        return x  # pieces 0 and 1 of each chunk in order: the identity
    n, piece = num_shards, _check(x.shape[axis], num_shards, chunks)
    halves = x.reshape(x.shape[:axis] + (chunks, 2, n, piece) + x.shape[axis + 1:])
    early = jax.lax.index_in_dim(halves, 0, axis + 1, keepdims=False)       # pieces 0 .. n-1
    late = jnp.flip(jax.lax.index_in_dim(halves, 1, axis + 1, keepdims=False), axis + 1)
    pairs = jnp.stack([early, late], axis=axis + 2)                         # [S, n, 2, piece]
    return jnp.moveaxis(pairs, axis, axis + 1).reshape(x.shape)             # device-major


def unzigzag(x, num_shards: int, *, axis: int = 1, chunks: int = 1):
    """Undo :func:`zigzag`: back to global order along ``axis`` (reshapes, like `zigzag`)."""
    if num_shards == 1:
        return x
    n, piece = num_shards, _check(x.shape[axis], num_shards, chunks)
    pairs = x.reshape(x.shape[:axis] + (n, chunks, 2, piece) + x.shape[axis + 1:])
    pairs = jnp.moveaxis(pairs, axis + 1, axis)                             # [S, n, 2, piece]
    early = jax.lax.index_in_dim(pairs, 0, axis + 2, keepdims=False)
    late = jnp.flip(jax.lax.index_in_dim(pairs, 1, axis + 2, keepdims=False), axis + 1)
    return jnp.concatenate([early, late], axis=axis + 1).reshape(x.shape)


def zigzag_positions(length: int, num_shards: int, batch: int | None = None):
    """Global positions of the zigzag-permuted tokens, int32 ``[length]`` or ``[batch, length]``."""
    pos = jnp.asarray(zigzag_indices(length, num_shards), jnp.int32)
    return pos if batch is None else jnp.broadcast_to(pos, (batch, length))


def shard_sequence(layout, input_embeds, positions, segment_ids=None, chunks: int = 1):
    """Pad to a multiple of 2n * chunks (padding: segment -1), zigzag-reorder (in `chunks`
    chunks) and constrain the sequence to its sharding: tokens over the layout's ring axis
    (`length`; n = 1 without one), rows over `batch` where the mesh axes divide them (a
    `sharding.mesh.Layout`).

    Returns `(x, pos, seg, where)`: the permuted arrays and `where[i]`, the permuted index of
    original token i (so `x[:, where]` is the original order).
    """
    axis = layout.seq_axis
    n = layout.size("length")
    b, length = input_embeds.shape[:2]
    lp = padded_length(length, n * chunks)
    seg = jnp.zeros((b, length), jnp.int32) if segment_ids is None else segment_ids
    order = lambda a: zigzag(a, n, chunks=chunks)  # noqa: E731
    x = order(pad_sequence(input_embeds, lp))
    pos = order(pad_sequence(positions, lp))
    seg = order(pad_sequence(seg.astype(jnp.int32), lp, value=-1))
    names = ("batch", "length") + (None,) * (x.ndim - 2)
    spec = layout.spec(names, x.shape)
    if axis is not None and spec[1] != axis:
        raise ValueError(f"the sharding rules put mesh axis {axis!r} on an earlier dimension than "
                         f"'length' ({spec}); keep it out of 'batch'")
    if layout.mesh is not None:
        x = jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, spec))
    return x, pos, seg, unzigzag_indices(lp, n, chunks)[:length]
