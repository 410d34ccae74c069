"""`model.vision_chunk`: SigLIP in frame micro-batches (`layers.map_chunks`) gives the features and
gradients of one call over all frames, on one device and frame-parallel over `seq`."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import common
from lvr_jax.models.layers import map_chunks
from lvr_jax.models.vlm import encode_batch, init_vlm, vlm_config_from
from sharding.mesh import Layout, make_mesh
from tests.torch_reference import rel_err


def tiny_cfg(chunk: int):
    model = common.model_config(common.tiny_llm(), common.tiny_vision(), vision_chunk=chunk)
    return vlm_config_from(model)


def test_map_chunks_equals_one_call():
    x = jax.random.normal(jax.random.key(0), (7, 3))
    fn = lambda a: jnp.tanh(a) * 2.0  # noqa: E731
    for chunk in (0, 1, 2, 3, 7, 9):
        rel = rel_err(map_chunks(fn, x, chunk), fn(x))
        assert rel < 1e-6, (chunk, rel)


@pytest.mark.parametrize("frames,chunk", [(7, 3), (8, 4)])
def test_chunked_tower_features_and_grads(frames, chunk):
    plain = init_vlm(tiny_cfg(0), 0)
    chunked = init_vlm(tiny_cfg(chunk), 0)      # same seed: same weights
    assert chunked.vision.cfg.frame_chunk == chunk
    px = plain.cfg.vision.image_size
    images = jax.random.uniform(jax.random.key(1), (frames, px, px, 3), minval=-1, maxval=1)
    want, got = plain.vision(images), chunked.vision(images)
    rel = rel_err(got, want)
    assert rel < 1e-6, rel

    def loss(vision, x):
        return jnp.sum(jnp.sin(vision(x)))

    g_want = nnx.grad(loss, argnums=(0, 1))(plain.vision, images)
    g_got = nnx.grad(loss, argnums=(0, 1))(chunked.vision, images)
    # relative to each leaf's norm, except where the true gradient is ~0 (the key bias: softmax
    # ignores a constant per query), which is held to the whole gradient's scale
    scale = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(g_want))))
    for a, b in zip(jax.tree.leaves(g_want), jax.tree.leaves(g_got), strict=True):
        err = float(jnp.linalg.norm(b - a) / max(float(jnp.linalg.norm(a)), 1e-3 * scale))
        assert err < 1e-5, err


def test_chunked_frame_parallel_encode_equals_unchunked():
    """encode_batch on fsdp 2 x seq 4: each device's 3 frames (12 per clip, split 4 ways) in
    micro-batches of 2."""
    mesh = make_mesh({"data": 1, "fsdp": 2, "seq": 4, "tensor": 1})
    layout = Layout.of(mesh)
    plain, chunked = init_vlm(tiny_cfg(0), 0), init_vlm(tiny_cfg(2), 0)
    px = plain.cfg.vision.image_size
    frames = jax.random.uniform(jax.random.key(2), (2, 12, px, px, 3), minval=-1, maxval=1)
    want = encode_batch(plain, frames, layout=layout)
    got = encode_batch(chunked, frames, layout=layout)
    assert got.shape == want.shape
    rel = rel_err(got, want)
    assert rel < 1e-6, rel
    assert dataclasses.replace(chunked.cfg.vision, frame_chunk=0) == plain.cfg.vision
