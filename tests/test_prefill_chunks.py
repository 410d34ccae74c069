"""A prompt prefilled in chunks (`model.prefill_chunks`, `Qwen2._prefill_chunks`) gives the same
prefix as the whole-prompt prefill: K/V of every real token, the first token's logits and the
responses' log-probs; and its compiled prefill holds no activation longer than a chunk."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from lvr_jax.models.vlm import init_vlm, vlm_config_from
from lvr_jax.rl.policy import response_logprobs
from sharding.mesh import Layout, make_mesh
from sharding.sequence_parallel import unzigzag, zigzag, zigzag_indices
from tests.conftest import perturb
from tests.test_ring_prompt import inputs
from tests.torch_reference import rel_err


@pytest.fixture(scope="module")
def model():
    cfg = vlm_config_from(tiny.get_config().model)
    return perturb(init_vlm(cfg, 3), seed=4, scale=0.2)


@pytest.mark.parametrize("n,chunks", [(1, 3), (2, 1), (2, 3), (4, 2)])
def test_chunked_zigzag_is_each_chunk_zigzagged(n, chunks):
    """Device d's block holds, chunk by chunk, pieces d and 2n-1-d of that chunk (NumPy formula);
    `zigzag` equals taking `zigzag_indices`, and `unzigzag` undoes it."""
    piece = 3
    length = 2 * n * chunks * piece
    x = np.random.default_rng(n * chunks).normal(size=(2, length, 5)).astype(np.float32)
    want = []
    for d in range(n):
        for s in range(chunks):
            for j in (d, 2 * n - 1 - d):
                start = s * 2 * n * piece + j * piece
                want.extend(range(start, start + piece))
    np.testing.assert_array_equal(zigzag_indices(length, n, chunks), want)
    np.testing.assert_array_equal(zigzag(jnp.asarray(x), n, chunks=chunks), x[:, want])
    np.testing.assert_array_equal(unzigzag(jnp.asarray(x[:, want]), n, chunks=chunks), x)


def layout_of(ring: bool):
    return Layout.of(make_mesh({"seq": 4, "data": -1}) if ring else None)


def natural(a, prompt):
    """Per-token array a [..., B, Lp, ...] (axis -3 for K/V, else the last two) of a RingPrompt's
    real tokens, in position order: one [tokens, ...] array per row."""
    pos, seg = np.asarray(prompt.positions), np.asarray(prompt.segments)
    out = []
    for b in range(pos.shape[0]):
        keep = np.flatnonzero(seg[b] >= 0)
        out.append(np.asarray(a[:, b])[:, keep[np.argsort(pos[b, keep])]])
    return out


def run(model, case, layout, chunks, ring_prompt, compiled_only=False, dynamic=False):
    """(prompt, prefix, log-probs) for the case, with the prompt in `chunks` chunks (or the
    compiled prefill of that prompt); `dynamic`: dynamic RoPE (x4) past 8 positions."""
    feats, ids, attn, resp = inputs(model, case)
    m = nnx.merge(*nnx.split(model))
    m.cfg = dataclasses.replace(m.cfg, ring_prompt=ring_prompt, prefill_chunks=chunks)
    if dynamic:
        m.llm.cfg = dataclasses.replace(m.llm.cfg, rope_scaling_type="dynamic",
                                        rope_scaling_factor=4.0, max_position_embeddings=8)
    graphdef, state = nnx.split(m)
    prompt = jax.jit(lambda st: nnx.merge(graphdef, st).prompts(feats, ids, attn, layout,
                                                                forward_only=True))(state)
    if compiled_only:
        return prompt, jax.jit(lambda st, p: nnx.merge(graphdef, st).llm.prefill(
            p, layout=layout)).lower(state, prompt).compile()

    @jax.jit
    def forward(state, prompt):
        m = nnx.merge(graphdef, state)
        prefix = m.llm.prefill(prompt, layout=layout)
        return prefix, response_logprobs(m.llm, prompt, None, resp, temperature=0.9,
                                         layout=layout)

    return (prompt, *forward(state, prompt))


@pytest.mark.parametrize("case,ring,chunks,ring_prompt,dynamic", [
    ("short", False, 3, False, False), ("long", True, 3, True, False),
    ("short", True, 2, False, False), ("short", False, 3, False, True)])
def test_chunked_prefill_equals_whole(model, case, ring, chunks, ring_prompt, dynamic):
    """The same K/V of every real token (in position order), first-token logits and responses'
    log-probs (which the sampler and the reference pass read from the prefix); with dynamic
    RoPE too (every chunk rotates with the whole prompt's length, as the whole prefill does)."""
    layout = layout_of(ring)
    want = run(model, case, layout, 1, ring_prompt, dynamic=dynamic)
    got = run(model, case, layout, chunks, ring_prompt, dynamic=dynamic)
    assert got[0].chunks == chunks and got[0].x.shape[1] % (2 * 4 ** ring * chunks) == 0
    assert got[1].heads_first and want[1].heads_first     # what decode reads in place
    np.testing.assert_array_equal(got[1].lengths, want[1].lengths)
    assert rel_err(got[1].logits, want[1].logits) < 1e-5
    for got_kv, want_kv in zip(got[1].by_token(), want[1].by_token()):
        for g, w in zip(natural(got_kv, got[0]), natural(want_kv, want[0])):
            assert g.shape == w.shape and rel_err(g, w) < 1e-5
    assert rel_err(got[2], want[2]) < 1e-5


def test_no_activation_longer_than_a_chunk(model):
    """On the seq = 4 ring, the compiled chunked prefill's [B, tokens, E] values (other than its
    input) are at most a device's share of one chunk; the whole prefill's are its whole share."""
    layout, e = layout_of(True), model.cfg.llm.hidden_size

    def longest(chunks):
        prompt, compiled = run(model, "long", layout, chunks, True, compiled_only=True)
        lines = [ln for ln in compiled.as_text().splitlines() if "parameter(" not in ln]
        found = re.findall(rf"= \w+\[{prompt.x.shape[0]},(\d+),{e}\]", "\n".join(lines))
        return prompt.x.shape[1], max(int(t) for t in found)

    whole, most = longest(1)
    assert most == whole // 4
    whole, most = longest(4)
    assert most == whole // (4 * 4)


def test_switch_reaches_forward_only_prompts(model):
    """`model.prefill_chunks` -> `VLMConfig`; `make_prompts` (rollout, evaluation) lays prompts out
    in that many chunks, the training forward's prompts stay whole; bad counts are refused."""
    from configs import common
    from lvr_jax.models.vlm import VLMConfig, make_prompts

    section = tiny.get_config().model
    section.prefill_chunks = 3
    assert vlm_config_from(section).prefill_chunks == 3
    with pytest.raises(ValueError, match="model.prefill_chunks must be >= 1, got 0"):
        dataclasses.replace(model.cfg, prefill_chunks=0)
    assert "prefill_chunks" in common.model_config({}, {}) and VLMConfig.prefill_chunks == 1
    feats, ids, attn, _ = inputs(model, "short")
    m = nnx.merge(*nnx.split(model))
    m.cfg = dataclasses.replace(m.cfg, prefill_chunks=3)
    assert make_prompts(m, feats, ids, attn).chunks == 3
    assert m.prompts(feats, ids, attn).chunks == 1
