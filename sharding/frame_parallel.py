"""MR-SP stage 1: frame-parallel vision encoding. A clip's frames are padded to a multiple of the
`frame` axis (the mesh's `seq` axis reused), each device encodes its slice with the vision tower +
projector, and the embeddings come back in frame order with the padding dropped."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def pad_frames(frames: jax.Array, multiple: int) -> jax.Array:
    """Pad [T, ...] with copies of the last frame up to a multiple of `multiple` frames."""
    extra = (-frames.shape[0]) % multiple
    if not extra:
        return frames
    return jnp.concatenate([frames, jnp.repeat(frames[-1:], extra, axis=0)], axis=0)


def map_frames(fn, module, frames: jax.Array, *, mesh, axis: str = "seq") -> jax.Array:
    """`fn(module, frames) -> [T, ...]` with the T frames split over mesh axis `axis`: padded to
    a multiple of its size, each device maps its slice, results gathered in frame order and the
    padding dropped. Only `axis` is manual; parameters keep their fsdp / tensor sharding."""
    t = frames.shape[0]
    padded = pad_frames(frames, mesh.shape[axis])
    graphdef, state = nnx.split(module)

    def local(state, frames):
        return fn(nnx.merge(graphdef, state), frames)

    run = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis)), out_specs=P(axis),
                        axis_names={axis}, check_vma=False)
    padded = jax.lax.with_sharding_constraint(padded, NamedSharding(mesh, P(axis)))
    return run(state, padded)[:t]


def encode_frames(model, frames: jax.Array, *, mesh, axis: str = "seq",
                  per_frame: bool = False) -> jax.Array:
    """Equal to `model.encode_video(frames)` ([T * tokens_per_frame, D]); each device of `axis`
    runs the vision tower and projector on T / n of the frames. With `per_frame`, returns
    [T, tokens_per_frame, D] instead."""
    emb = map_frames(lambda m, f: m.encode_frames(f), model, frames, mesh=mesh, axis=axis)
    return emb if per_frame else emb.reshape(-1, emb.shape[-1])


def vision_features(vision, frames: jax.Array, *, mesh=None, axis: str = "seq") -> jax.Array:
    """SigLIP features [T, N, C] of frames, frame-parallel when the mesh has `axis` > 1. These
    are what GRPO caches per prompt (the tower is frozen by default)."""
    if mesh is None or mesh.shape.get(axis, 1) == 1:
        return vision(frames)
    return map_frames(lambda m, f: m(f), vision, frames, mesh=mesh, axis=axis)
