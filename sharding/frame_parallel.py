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


def encode_frames(model, frames: jax.Array, *, mesh, axis: str = "seq",
                  per_frame: bool = False) -> jax.Array:
    """Equal to `model.encode_video(frames)` ([T * tokens_per_frame, D]); each device of `axis`
    runs the vision tower and projector on T / n of the frames (padding frames are encoded and
    dropped). With `per_frame`, returns [T, tokens_per_frame, D] instead.

    Only `axis` is manual inside the shard_map; parameters keep their fsdp / tensor sharding.
    """
    n = mesh.shape[axis]
    t = frames.shape[0]
    padded = pad_frames(frames, n)
    graphdef, state = nnx.split(model)

    def local(state, frames):
        return nnx.merge(graphdef, state).encode_frames(frames)

    encode = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis)), out_specs=P(axis),
                           axis_names={axis}, check_vma=False)
    padded = jax.lax.with_sharding_constraint(padded, NamedSharding(mesh, P(axis)))
    emb = encode(state, padded)[:t]
    return emb if per_frame else emb.reshape(-1, emb.shape[-1])
