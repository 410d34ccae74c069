"""The shared-prefix training forward: GRPO loss and gradients equal those of G full sequences."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from lvr_jax.models.attention import AttentionOptions
from lvr_jax.models.qwen2 import left_pad
from lvr_jax.models.vlm import init_vlm, vlm_config_from
from lvr_jax.rl.grpo import grpo_loss
from lvr_jax.rl.policy import response_logprobs
from sharding.mesh import Layout, make_mesh
from tests.conftest import perturb
from tests.torch_reference import rel_err

B, T = 2, 5


def full_sequence_logprobs(llm, embeds, mask, responses, temperature):
    """Reference: every (prompt, response) as its own left-padded sequence, one causal forward."""
    b, lp = mask.shape
    G = responses.shape[1]
    seqs = jnp.concatenate([jnp.repeat(embeds, G, axis=0),
                            llm.embed_tokens(responses.reshape(b * G, T))], axis=1)
    full_mask = jnp.concatenate([jnp.repeat(mask, G, axis=0), jnp.ones((b * G, T), bool)], 1)
    pos = jnp.maximum(jnp.cumsum(full_mask, axis=1) - 1, 0)
    seg = jnp.where(full_mask, 0, -1)
    logits = llm(seqs, pos, segment_ids=seg)[:, lp - 1:-1] / temperature
    lp_ = jax.nn.log_softmax(logits, -1)
    tok = responses.reshape(b * G, T)
    return jnp.take_along_axis(lp_, tok[..., None], -1)[..., 0].reshape(b, G, T)


# G = 3 branches run on every seq device; G = 4 are split over the 4 (each device runs one);
# "xla": the ring's sub-blocks and the prefix attention through the fused kernels' contract
@pytest.mark.parametrize("shape,chunk,G,impl", [(None, None, 3, "auto"),
                                                ({"seq": 4, "data": -1}, None, 3, "auto"),
                                                ({"seq": 4, "data": -1}, 3, 4, "auto"),
                                                ({"seq": 4, "data": -1}, 3, 4, "xla")])
def test_shared_prefix_loss_and_grads_equal_full_sequences(shape, chunk, G, impl):
    cfg = vlm_config_from(tiny.get_config().model)
    if chunk:   # T - 1 = 4 teacher-forced queries, and their logits, in chunks of 3 (one padded)
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(
            cfg.llm, attention=AttentionOptions(query_chunk=chunk, implementation=impl),
            logits_chunk=chunk))
    model = perturb(init_vlm(cfg, 2), seed=9, scale=0.2)
    llm = model.llm
    # the full-sequence reference runs the default attention (dense on CPU) on the same weights
    ref_graph = nnx.graphdef(init_vlm(vlm_config_from(tiny.get_config().model), 2).llm)
    rng = np.random.default_rng(3)
    prompts = [llm.embed_tokens(jnp.asarray(rng.integers(0, 512, n))) for n in (7, 12)]
    embeds, mask = left_pad(prompts)
    responses = jnp.asarray(rng.integers(0, 512, (B, G, T)))
    old = jnp.asarray(rng.normal(-6, 0.3, (B * G, T)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=B * G), jnp.float32)
    resp_mask = jnp.asarray(rng.random((B * G, T)) < 0.85)
    layout = Layout.of(make_mesh(shape) if shape else None)
    assert layout.branch_axis(B, G) == ("seq" if G == 4 else None)

    def loss(llm, shared):
        if shared:
            lp = response_logprobs(llm, embeds, mask, responses, temperature=0.9, layout=layout)
        else:
            lp = full_sequence_logprobs(llm, embeds, mask, responses, 0.9)
        lp = lp.reshape(B * G, T)
        return grpo_loss(lp, old, old + 0.1, adv, resp_mask, beta=0.05)[0]

    graphdef, state = nnx.split(llm)
    f = lambda st, shared: loss(nnx.merge(graphdef if shared else ref_graph, st),  # noqa: E731
                                shared)
    grad = jax.jit(jax.value_and_grad(f), static_argnums=1)
    (want, g_want), (got, g_got) = grad(state, False), grad(state, True)
    assert abs(float(got - want)) / abs(float(want)) < 1e-5
    flat_want = jax.tree.leaves(g_want)
    flat_got = jax.tree.leaves(g_got)
    for a, b in zip(flat_got, flat_want):
        assert rel_err(a, b) < 1e-4
    assert sum(float(jnp.abs(x).sum()) for x in flat_want) > 0


def test_chunked_logprobs_and_entropy_equal_one_call_and_never_hold_all_logits():
    """`logits_chunk`: the same log-probs, entropy and gradients as one head call, and the
    compiled backward's temporaries shrink by most of the [B, G, T, V] float32 logits."""
    cfg = vlm_config_from(tiny.get_config().model)
    G, t, vocab = 3, 48, cfg.llm.vocab_size
    rng = np.random.default_rng(5)
    responses = jnp.asarray(rng.integers(0, 512, (B, G, t)))
    weights = jnp.asarray(rng.normal(size=(B, G, t)), jnp.float32)
    llm = perturb(init_vlm(cfg, 2), seed=9, scale=0.2).llm
    embeds, mask = left_pad([llm.embed_tokens(jnp.asarray(rng.integers(0, 512, n)))
                             for n in (7, 12)])

    def run(chunk):
        llm.cfg = dataclasses.replace(cfg.llm, logits_chunk=chunk)    # same weights, new program
        graphdef, state = nnx.split(llm)

        def f(st):
            lp, ent = response_logprobs(nnx.merge(graphdef, st), embeds, mask, responses,
                                        temperature=0.7, with_entropy=True)
            return jnp.sum(lp * weights) + jnp.sum(ent * weights[..., ::-1]), (lp, ent)

        step = jax.jit(jax.value_and_grad(f, has_aux=True)).lower(state).compile()   # once
        return step(state), step.memory_analysis().temp_size_in_bytes

    ((_, (lp, ent)), grads), temp = run(0)
    ((_, (lp_c, ent_c)), grads_c), temp_c = run(5)   # 47 tokens: 10 chunks, the last padded
    assert rel_err(lp_c, lp) < 1e-5 and rel_err(ent_c, ent) < 1e-5
    for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads)):
        assert rel_err(a, b) < 1e-4
    logits_bytes = B * G * (t - 1) * vocab * 4
    assert temp - temp_c > 0.5 * logits_bytes, (temp, temp_c, logits_bytes)
