"""KV-cache sampler vs full-forward recompute, shared prefix vs repeated prompts, EOS / stops,
the logit filters against transformers' warpers."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from lvr_jax.models.attention import AttentionOptions
from lvr_jax.models.qwen2 import left_pad
from lvr_jax.models.vlm import init_vlm, vlm_config_from
from lvr_jax.rollout.sampler import (Sampler, SamplingParams, categorical, filter_logits,
                                    first_argmax)
from sharding.mesh import DEFAULT_RULES, make_mesh
from tests.conftest import perturb
from tests.torch_reference import rel_err

T = 6


def make_vlm(implementation="auto", options=None):
    cfg = vlm_config_from(tiny.get_config().model)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(
        cfg.llm, attention=options or AttentionOptions(implementation=implementation)))
    return perturb(init_vlm(cfg, 1), seed=5, scale=0.3)


@pytest.fixture(scope="module")
def vlm():
    return make_vlm()


@pytest.fixture(scope="module")
def prompts(vlm):
    """Three prompts of different lengths: two token-id prompts and one with a video spliced."""
    rng = np.random.default_rng(1)
    clip = jax.random.normal(jax.random.key(2), (2, 28, 28, 3))
    video = vlm.encode_video(clip)
    ids = rng.integers(0, 512, 9)
    with_video = jnp.concatenate([vlm.llm.embed_tokens(jnp.asarray(ids[:3])), video,
                                  vlm.llm.embed_tokens(jnp.asarray(ids[3:]))])
    return [rng.integers(0, 512, 5), with_video, rng.integers(0, 512, 14)]


def teacher_forced(llm, prompt, tokens, temperature=1.0):
    """Logits of a full forward over prompt + generated tokens, at the positions predicting them."""
    emb = llm.embed_tokens(jnp.asarray(prompt)) if np.ndim(prompt) == 1 else prompt
    full = jnp.concatenate([emb, llm.embed_tokens(jnp.asarray(tokens))])
    logits = llm(full[None], jnp.arange(full.shape[0])[None])[0]
    return logits[emb.shape[0] - 1:-1] / temperature


# ring 2: ring tests. seq 4 with G = 4: each device decodes one branch of each prompt
# (`Layout.branch_axis`); seq 8 with G = 2: every device decodes all of them. "xla": the ring's
# sub-blocks and the prefix attention through the fused kernels' contract (`sharding.fused_blocks`)
@pytest.mark.parametrize("shape,g,impl", [(None, 2, "auto"), ({"seq": 4, "data": -1}, 4, "auto"),
                                          ({"seq": 8}, 2, "auto"),
                                          ({"seq": 4, "data": -1}, 4, "xla")])
def test_greedy_equals_full_recompute_argmax(vlm, prompts, shape, g, impl):
    mesh = make_mesh(shape) if shape else None      # the recompute: `vlm`, dense attention
    sampler = Sampler(make_vlm(impl) if impl != "auto" else vlm, mesh)
    assert sampler.layout.branch_axis(3, g) == ("seq" if g == 4 else None)
    toks, lps, lens = sampler.generate(prompts, num_samples=g, max_new_tokens=T, temperature=0)
    assert toks.shape == (3 * g, T) and (lens == T).all()
    assert len({tuple(r) for r in toks}) > 1          # prompts lead to different answers
    for r in range(3 * g):
        logits = teacher_forced(vlm.llm, prompts[r // g], toks[r])
        np.testing.assert_array_equal(np.argmax(logits, -1), toks[r])
        want = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), toks[r][:, None], 1)
        np.testing.assert_allclose(lps[r], want[:, 0], atol=2e-5)


def test_prefix_is_heads_first_but_under_the_stand_in(vlm, prompts):
    """Every kernel's prefill keeps the prefix heads-first (what decode's einsum matmuls read in
    place); only the memory planner's `prefix` stand-in takes it by token. All hold the same K/V;
    a decode step reads the prefix through the einsum partials whatever the kernel."""
    x, mask = left_pad([vlm.llm.embed_tokens(jnp.asarray(p)) for p in prompts[::2]])
    stand_in = AttentionOptions(prefix=lambda *a, **kw: None)      # never called by a prefill
    first = vlm.llm.prefill(x, mask)
    fused = make_vlm("xla").llm.prefill(x, mask)
    by_token = make_vlm(options=stand_in).llm.prefill(x, mask)
    assert first.heads_first and fused.heads_first and not by_token.heads_first
    cfg = vlm.llm.cfg
    assert first.k.shape == (cfg.num_layers, 2, cfg.num_kv_heads, x.shape[1], cfg.head_dim)
    assert first.kv_heads == fused.kv_heads == by_token.kv_heads == cfg.num_kv_heads
    for other in (fused, by_token):
        for a, b in zip(first.by_token(), other.by_token()):
            assert a.shape == b.shape and rel_err(a, b) < 1e-5
    xla = AttentionOptions(implementation="xla")
    assert xla.prefix_kernel(jnp.float32, 1) == "tiled" and xla.prefix_kernel(jnp.float32, 2) == "xla"
    assert AttentionOptions().prefix_kernel(jnp.float32, 8) == "tiled"      # CPU: no fused kernel


@pytest.mark.parametrize("shape", [None, {"seq": 4, "data": -1}])
def test_shared_prefix_equals_independent_prefills(vlm, prompts, shape):
    mesh = make_mesh(shape) if shape else None
    kw = dict(num_samples=3, max_new_tokens=T, temperature=0.8, top_k=50, top_p=0.95, seed=7)
    shared = Sampler(vlm, mesh).generate(prompts, **kw)
    repeated = Sampler(vlm, mesh, share_prefix=False).generate(prompts, **kw)
    np.testing.assert_array_equal(shared[0], repeated[0])
    # float32 noise of a B=3 vs a B=9 ring prefill: up to 1.55e-5 on some x86 CPUs
    np.testing.assert_allclose(shared[1], repeated[1], rtol=1e-5, atol=2e-5)
    assert len({tuple(r) for r in shared[0][:3]}) > 1  # the 3 samples of a prompt differ
    # returned logprobs are those of a teacher-forced pass at the sampling temperature
    for r in range(9):
        logits = teacher_forced(vlm.llm, prompts[r // 3], shared[0][r], temperature=0.8)
        want = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), shared[0][r][:, None], 1)
        np.testing.assert_allclose(shared[1][r], want[:, 0], atol=2e-5)


def test_eos_and_stop_sequences_end_only_their_branch(vlm, prompts):
    kw = dict(num_samples=2, max_new_tokens=T, temperature=1.0, seed=3)
    toks, _, lens = Sampler(vlm).generate(prompts, **kw)
    assert (lens == T).all()
    eos = int(toks[0, 2])                               # a token row 0 emits at step 2
    first = {r: int(np.argmax(toks[r] == eos)) if (toks[r] == eos).any() else None for r in range(6)}
    t2, lp2, l2 = Sampler(vlm, eos_ids=[eos], pad_id=0).generate(prompts, **kw)
    for r in range(6):
        want_len = T if first[r] is None else first[r] + 1
        assert l2[r] == want_len
        np.testing.assert_array_equal(t2[r, :want_len], toks[r, :want_len])
        assert (t2[r, want_len:] == 0).all() and (lp2[r, want_len:] == 0).all()
    assert (l2 == T).any() and (l2 < T).any()           # one branch stopped, others went on
    # every branch stopped by step 2: the loop ends early, and the steps it never ran hold the
    # pad id (not 0) and log-prob 0, as the ones it ran after a branch stopped do
    early = sorted({int(t) for t in toks[:, 1]})
    t4, lp4, l4 = Sampler(vlm, eos_ids=early, pad_id=5).generate(prompts, **kw)
    assert (l4 <= 2).all()
    for r in range(6):
        np.testing.assert_array_equal(t4[r, :l4[r]], toks[r, :l4[r]])
        assert (t4[r, l4[r]:] == 5).all() and (lp4[r, l4[r]:] == 0).all()
    stop = [int(toks[1, 1]), int(toks[1, 2])]           # a two-token stop sequence of row 1
    _, _, l3 = Sampler(vlm, stop_token_seqs=[stop]).generate(prompts, **kw)
    assert l3[1] <= 3 and l3.max() == T


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 0.9), (1.3, 17, 1.0), (1.0, 40, 0.5),
                                                     (0.5, 3, 0.999), (1.0, 100, 0.3)])
def test_filter_logits_matches_transformers_warpers(temperature, top_k, top_p):
    """Temperature, then top-k, then top-p over the renormalised rest: what transformers'
    TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper keep (ties at the cut kept;
    k at or past the vocabulary keeps everything)."""
    import torch
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    rng = np.random.default_rng(top_k + int(100 * top_p))
    logits = rng.standard_normal((6, 64)).astype(np.float32) * 3
    logits[0, :8] = logits[0, 8]                      # ties around the cut
    got = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
    want = TemperatureLogitsWarper(temperature)(None, torch.from_numpy(logits))
    if top_k:
        want = TopKLogitsWarper(min(top_k, 64))(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    want = want.numpy()
    np.testing.assert_array_equal(np.isfinite(got[1:]), np.isfinite(want[1:]))
    kept = np.isfinite(want)
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6)
    assert np.isfinite(got[0]).sum() >= np.isfinite(want[0]).sum()   # ties: we keep all of them
    assert np.isfinite(got).sum(-1).min() >= 1


@pytest.mark.parametrize("bad,message", [(dict(temperature=-0.5), "temperature must be"),
                                         (dict(temperature=float("nan")), "temperature must be"),
                                         (dict(top_p=0.0), "top_p must be in (0, 1]"),
                                         (dict(top_p=1.5), "top_p must be in (0, 1]"),
                                         (dict(top_k=-1), "top_k must be >= 0")])
def test_sampling_params_reject_bad_values(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(**bad)


def test_first_argmax_and_categorical_are_jax_s():
    """The sampler's argmax (two plain reductions) is `jnp.argmax`'s: the first maximum, a NaN
    counted as the maximum, an all -inf row 0; its Gumbel draw is `jax.random.categorical`'s."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 33)).astype(np.float32)
    x[1, [4, 20]] = x[1].max() + 1                      # a tie: the first wins
    x[2, [3, 30]] = np.nan
    x[3] = -np.inf
    x[4, 5:] = -np.inf
    got = np.asarray(jax.jit(first_argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    np.testing.assert_array_equal(got[:4], [np.argmax(x[0]), 4, 3, 0])
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(3), r))(jnp.arange(200))
    logits = jnp.asarray(np.where(rng.random((200, 33)) < 0.3, -np.inf,
                                  rng.standard_normal((200, 33)) * 2), jnp.float32)
    want = jax.vmap(jax.random.categorical)(keys, logits)
    np.testing.assert_array_equal(np.asarray(jax.jit(categorical)(keys, logits)), want)
    assert len(set(np.asarray(want).tolist())) > 10


def test_one_new_token_is_the_first_of_longer_runs(vlm, prompts):
    """The last token is chosen after the decode loop: with max_new_tokens=1 the loop runs no
    step, and the token and log-prob are those a longer run starts with (sampled, same seed)."""
    sampler = Sampler(vlm)
    kw = dict(num_samples=2, temperature=1.0, seed=4)
    one, lp1, len1 = sampler.generate(prompts, max_new_tokens=1, **kw)
    six, lp6, _ = sampler.generate(prompts, max_new_tokens=T, **kw)
    np.testing.assert_array_equal(one[:, 0], six[:, 0])
    np.testing.assert_allclose(lp1[:, 0], lp6[:, 0], rtol=1e-6)
    assert (len1 == 1).all()


def test_prefix_split_without_the_ring(vlm, prompts):
    """Rules that turn the ring off ('length' replicated) but keep the prefix cache split over
    'seq': prompts are padded to that axis (`Layout.pad_multiple`; the split had failed inside
    the prefix attention's shard_map), and decoding equals the unsharded sampler's."""
    sampler = Sampler(vlm, make_mesh({"seq": 4, "data": -1}), rules={**DEFAULT_RULES, "length": None})
    assert sampler.layout.seq_axis is None and sampler.layout.pad_multiple == 4
    kw = dict(num_samples=4, max_new_tokens=T, temperature=0)
    got, want = sampler.generate(prompts, **kw), Sampler(vlm).generate(prompts, **kw)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=2e-5)
