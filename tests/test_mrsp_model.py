"""MR-SP on the whole model: frame-parallel encoding and the seq-sharded prefill equal the
unsharded VLM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from lvr_jax.models.vlm import init_vlm, vlm_config_from
from sharding.frame_parallel import encode_frames
from sharding.mesh import make_mesh
from tests.conftest import perturb
from tests.torch_reference import rel_err


@pytest.fixture(scope="module")
def model():
    cfg = vlm_config_from(tiny.get_config().model)
    return perturb(init_vlm(cfg, 3), seed=11, scale=0.05)


@pytest.mark.parametrize("frames,shape", [(5, {"seq": 8}), (8, {"seq": 4, "data": 2}),
                                          (3, {"seq": 2, "fsdp": 2, "tensor": 2})])
def test_frame_parallel_equals_unsharded(model, frames, shape):
    clip = jax.random.normal(jax.random.key(frames), (frames, 28, 28, 3))
    want = model.encode_video(clip)
    mesh = make_mesh(shape)
    got = jax.jit(lambda m, x: encode_frames(m, x, mesh=mesh))(model, clip)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-5


def prompt_batch(model, rng):
    """Two prompts of different lengths (left padding as segment -1) holding a short clip."""
    clip = jax.random.normal(jax.random.key(5), (3, 28, 28, 3))
    video = model.encode_video(clip)
    ids = rng.integers(10, 300, (2, 12))
    embeds = model.llm.embed_tokens(jnp.asarray(ids))
    embeds = jnp.concatenate([embeds[:, :4], jnp.broadcast_to(video, (2, *video.shape)),
                              embeds[:, 4:]], axis=1)
    length = embeds.shape[1]
    pad = np.zeros((2, length), np.int32)
    pad[1, :7] = -1                                    # prompt 1 is 7 tokens shorter
    positions = np.maximum(np.cumsum(pad == 0, axis=1) - 1, 0)
    return embeds, jnp.asarray(positions), jnp.asarray(pad)


@pytest.mark.parametrize("shape", [{"seq": 2, "data": -1}, {"seq": 4, "data": -1}, {"seq": 8},
                                   {"seq": 2, "tensor": 2, "fsdp": 2}])
def test_seq_sharded_prefill_equals_unsharded(model, shape):
    embeds, pos, seg = prompt_batch(model, np.random.default_rng(0))
    want, want_kv = model(embeds, pos, segment_ids=seg, return_kv=True)
    mesh = make_mesh(shape)
    fwd = jax.jit(lambda m, e, p, s: m(e, p, segment_ids=s, mesh=mesh, return_kv=True))
    got, got_kv = fwd(model, embeds, pos, seg)
    valid = np.asarray(seg) >= 0
    assert rel_err(np.asarray(got)[valid], np.asarray(want)[valid]) < 1e-5
    assert rel_err(got_kv[0], want_kv[0]) < 1e-5 and rel_err(got_kv[1], want_kv[1]) < 1e-5
    # gradients through the ring equal the dense ones
    def loss(m, e, mesh_):
        return jnp.sum(jnp.where(valid[..., None], m(e, pos, segment_ids=seg, mesh=mesh_), 0) ** 2)
    g_want = jax.grad(loss, argnums=1)(model, embeds, None)
    g_got = jax.jit(jax.grad(loss, argnums=1), static_argnums=2)(model, embeds, mesh)
    assert rel_err(g_got, g_want) < 1e-5
