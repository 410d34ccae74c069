"""Parity of the nnx models with transformers' PyTorch models and a NumPy projector."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lvr_jax.models.projector import Projector
from lvr_jax.weights import hf
from tests import torch_reference as ref

TOL = 1e-4


@pytest.mark.parametrize("tie,heads,kv_heads", [(False, 4, 2), (True, 4, 1), (True, 4, 4)])
def test_qwen2_logits_match_transformers(tmp_path, tie, heads, kv_heads):
    torch_llm = ref.tiny_qwen2(seed=3 + heads + kv_heads, tie=tie, heads=heads,
                               kv_heads=kv_heads)
    torch_llm.save_pretrained(tmp_path)
    model, cfg = hf.load_llm(tmp_path)
    assert cfg.tie_word_embeddings == tie and (model.lm_head is None) == tie
    ids = np.random.default_rng(heads + kv_heads).integers(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        want = torch_llm(torch.from_numpy(ids)).logits.numpy()
    pos = jnp.broadcast_to(jnp.arange(13), (2, 13))
    got = model(model.embed_tokens(jnp.asarray(ids)), pos)
    assert got.shape == want.shape
    assert ref.rel_err(got, want) < TOL


# 7 x 7 and 6 x 6 patch grids; 30 px: 7 x 7 patches of 4, the last 2 rows and columns unused
# (transformers' stride-4 convolution; the tower had refused such a config)
@pytest.mark.parametrize("image_size", [28, 24, 30])
def test_siglip_features_match_hidden_states_minus_2(tmp_path, image_size):
    torch_vis = ref.tiny_siglip(seed=image_size, image_size=image_size)
    torch_vis.save_pretrained(tmp_path)
    model, cfg = hf.load_vision_tower(tmp_path)
    images = np.random.default_rng(image_size).standard_normal(
        (3, image_size, image_size, 3)).astype(np.float32)
    with torch.no_grad():
        out = torch_vis(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                        output_hidden_states=True)
    assert ref.rel_err(model(jnp.asarray(images)), out.hidden_states[-2].numpy()) < TOL
    assert ref.rel_err(model(jnp.asarray(images), post_norm=True),
                       out.last_hidden_state.numpy()) < TOL


def numpy_projector(x: np.ndarray, params: dict, factor: int, layout) -> np.ndarray:
    """Merge each factor x factor block by explicit loops, then LN / Linear / erf-GELU."""
    b, n, c = x.shape
    s = math.isqrt(n)
    grid = x.reshape(b, s, s, c)
    t = -(-s // factor)
    padded = np.zeros((b, t * factor, t * factor, c), x.dtype)
    padded[:, :s, :s] = grid
    merged = np.zeros((b, t * t, factor * factor * c), x.dtype)
    for i in range(t):
        for j in range(t):
            blocks = [padded[:, factor * i + dr, factor * j + dc]
                      for dr in range(factor) for dc in range(factor)]
            merged[:, i * t + j] = np.concatenate(blocks, axis=-1)
    y = merged.astype(np.float64)
    erf = np.vectorize(math.erf)
    last = [idx for idx, what, _, _ in layout if what == "linear"][-1]
    for idx, what, _, _ in layout:
        if what == "ln":
            mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
            y = (y - mu) / np.sqrt(var + 1e-5) * params[f"layer{idx}_scale"] + \
                params[f"layer{idx}_bias"]
        else:
            y = y @ params[f"layer{idx}_kernel"] + params[f"layer{idx}_bias"]
            if idx != last:
                y = 0.5 * y * (1 + erf(y / math.sqrt(2)))
    return y


@pytest.mark.parametrize("kind,grid", [("mlp_downsample_2x2_fix", 7), ("mlp_downsample_2x2_fix", 8),
                                       ("mlp_downsample_3x3_fix", 7), ("mlp_downsample_3x3_fix", 6)])
def test_projector_matches_numpy(kind, grid):
    proj = Projector(kind, 8, 24, rngs=nnx.Rngs(grid))
    # fresh random LN/bias values too (init gives ones/zeros)
    key = jax.random.key(grid + 100)
    for _, var in nnx.to_flat_state(nnx.state(proj, nnx.Param)):
        key, sub = jax.random.split(key)
        var.set_value(var.get_value() + 0.3 * jax.random.normal(sub, var.shape))
    params = {p[0]: np.asarray(v.get_value(), np.float64)
              for p, v in nnx.to_flat_state(nnx.state(proj, nnx.Param))}
    x = np.random.default_rng(grid).standard_normal((2, grid * grid, 8)).astype(np.float32)
    want = numpy_projector(x, params, proj.factor, proj.layout)
    got = proj(jnp.asarray(x))
    f = proj.factor
    assert got.shape == (2, (-(-grid // f)) ** 2, 24)
    assert ref.rel_err(got, want) < TOL


def test_vlm_matches_torch_composition(vila_dir, vila_parts):
    model, tok, cfg = hf.load_vlm(vila_dir)
    assert cfg.tokens_per_frame == 16 + 1  # 7x7 grid -> padded 8x8 -> 4x4 + newline
    frames = np.random.default_rng(7).standard_normal((3, 28, 28, 3)).astype(np.float32)
    ids = np.asarray(tok.encode("the video <vila/video> shows a red ball"), np.int64)
    assert (ids == cfg.video_token_id).sum() == 1
    want = ref.torch_vlm_logits(*vila_parts, frames, ids, cfg.video_token_id, cfg.newline_token_id)
    video = model.encode_video(jnp.asarray(frames))
    assert video.shape == (3 * 17, 64)
    embeds = model.embed_prompt(jnp.asarray(ids), video)
    got = model(embeds[None], jnp.arange(embeds.shape[0])[None])[0]
    assert got.shape == want.shape
    assert ref.rel_err(got, want) < TOL
    # the same under jit (traced placeholder position) and batched
    batched = jax.jit(model.embed_prompt)(jnp.asarray(ids)[None].repeat(2, 0), video[None].repeat(2, 0))
    np.testing.assert_allclose(batched[1], embeds, rtol=0, atol=0)
    # concrete batched ids are checked row by row (under vmap the rows had been tracers: a row
    # without a placeholder got the video over its first token)
    rows = np.stack([ids, np.where(ids == cfg.video_token_id, 5, ids),
                     np.where(ids == ids[0], cfg.video_token_id, ids)])
    with pytest.raises(ValueError, match=r"exactly one video placeholder .*\[\(1, 0\), \(2, 2\)\]"):
        model.embed_prompt(jnp.asarray(rows), video[None].repeat(3, 0))
