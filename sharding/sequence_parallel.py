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
from jax.sharding import NamedSharding, PartitionSpec


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
    """Reorder ``axis`` of ``x`` (length a multiple of ``2 * num_shards``) into zigzag order."""
    if num_shards == 1:
        return x  # chunks 0 and 1 in order: the identity
    return jnp.take(x, zigzag_indices(x.shape[axis], num_shards), axis=axis)


def unzigzag(x, num_shards: int, *, axis: int = 1):
    """Undo :func:`zigzag`: back to global order along ``axis``."""
    if num_shards == 1:
        return x
    return jnp.take(x, unzigzag_indices(x.shape[axis], num_shards), axis=axis)


def zigzag_positions(length: int, num_shards: int, batch: int | None = None):
    """Global positions of the zigzag-permuted tokens, int32 ``[length]`` or ``[batch, length]``."""
    pos = jnp.asarray(zigzag_indices(length, num_shards), jnp.int32)
    return pos if batch is None else jnp.broadcast_to(pos, (batch, length))


def shard_sequence(mesh, axis: str, input_embeds, positions, segment_ids=None):
    """Pad to a multiple of 2n (padding: segment -1), zigzag-reorder and constrain the sequence
    to be sharded over `axis` (batch over data/fsdp when it divides).

    Returns `(x, pos, seg, where)`: the permuted arrays and `where[i]`, the permuted index of
    original token i (so `x[:, where]` is the original order).
    """
    from sharding.ring_attention import _batch_axes  # ring_attention imports this module

    n = mesh.shape[axis]
    b, length = input_embeds.shape[:2]
    lp = padded_length(length, n)
    seg = jnp.zeros((b, length), jnp.int32) if segment_ids is None else segment_ids
    x = zigzag(pad_sequence(input_embeds, lp), n)
    pos = zigzag(pad_sequence(positions, lp), n)
    seg = zigzag(pad_sequence(seg.astype(jnp.int32), lp, value=-1), n)
    spec = PartitionSpec(_batch_axes(mesh, b, axis), axis)
    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return x, pos, seg, unzigzag_indices(lp, n)[:length]


def sequence_parallel_call(model, input_embeds, positions, segment_ids, mesh, axis: str = "seq",
                           **kwargs):
    """Run `model(input_embeds, positions, ...)` (a Qwen2) with the sequence sharded over `axis`.

    The prompt goes through `shard_sequence`; every layer's attention is the ring
    (`ring_attention_fn`), all other ops stay per token. Outputs (logits or hidden states, and
    per-layer K/V when asked) come back in global order, padding dropped.
    """
    from sharding.ring_attention import ring_attention_fn

    x, pos, seg, where = shard_sequence(mesh, axis, input_embeds, positions, segment_ids)
    out = model(x, pos, segment_ids=seg, attention_fn=ring_attention_fn(mesh, axis), **kwargs)
    if kwargs.get("return_kv"):
        out, kv = out
        return out[:, where], jax.tree.map(lambda a: a[:, :, where], kv)
    return out[:, where]
