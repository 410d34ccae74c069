"""Lean storage for long prompts: the bf16 reference model (rl.reference_dtype) and bf16 Adam first
moments (optim.mu_dtype) against their float32 versions, and the settings' checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import demo
from lvr_jax.models.qwen2 import left_pad
from lvr_jax.rl.policy import response_logprobs
from lvr_jax.train import settings
from lvr_jax.train.state import make_optimizer
from tests.torch_reference import rel_err

# bf16 storage rounds each weight by up to 2^-9 relative. On the tiny model below the per-token
# log-probs moved by at most 0.016 nats (mean 0.004) when measured; the bounds leave ~3x room. The
# reference only enters the loss through the k3 KL (rl.beta = 0.01).
MAX_TOL, MEAN_TOL = 0.05, 0.0125


def test_bf16_reference_logprobs_within_tolerance_of_float32(vila_dir):
    config = demo.get_config("grpo")
    config.model.logits_chunk = 3
    config.rl.reference_dtype = "bfloat16"
    config.model.ring_prompt, config.model.prefill_chunks = True, 2
    ref, _, _ = settings.load_model(config, vila_dir, None,
                                    param_dtype=settings.reference_dtype(config))
    full, _, _ = settings.load_model(config, vila_dir, None)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(ref, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(nnx.state(full, nnx.Param))} == {jnp.dtype(jnp.float32)}
    assert ref.llm.cfg.logits_chunk == 3                   # model.logits_chunk reaches the model
    assert (ref.cfg.ring_prompt, ref.cfg.prefill_chunks) == (True, 2)     # and the prompt layout
    rng = np.random.default_rng(0)
    prompts = [jnp.asarray(rng.integers(0, 200, n)) for n in (9, 14)]
    responses = jnp.asarray(rng.integers(0, 200, (2, 3, 6)))

    def logprobs(model):
        embeds, mask = left_pad([model.llm.embed_tokens(p) for p in prompts])
        return response_logprobs(model.llm, embeds, mask, responses, temperature=0.9)

    lp_ref, lp_full = logprobs(ref), logprobs(full)
    diff = jnp.abs(lp_ref - lp_full)
    assert 0 < float(diff.max()) < MAX_TOL and float(diff.mean()) < MEAN_TOL, diff


def test_bf16_adam_first_moment_tracks_float32():
    optim = demo.get_config("grpo").optim
    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(64, 32)), jnp.float32)}
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params) for i in range(5)]

    def run(mu_dtype):
        optim.mu_dtype = mu_dtype
        tx = make_optimizer(optim, 100)
        state, p = tx.init(params), params
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p, state

    p32, s32 = run("")
    p16, s16 = run("bfloat16")
    mu, nu = s16.inner_state[1][0].mu, s16.inner_state[1][0].nu
    assert mu["w"].dtype == jnp.bfloat16 and nu["w"].dtype == jnp.float32
    assert s32.inner_state[1][0].mu["w"].dtype == jnp.float32
    moved = p32["w"] - params["w"]
    assert rel_err(p16["w"] - params["w"], moved) < 2e-2 and float(jnp.abs(moved).max()) > 0


@pytest.mark.parametrize("value", ["float16", "bf16", "int8"])
def test_storage_dtypes_are_checked(value):
    config = demo.get_config("grpo")
    config.rl.reference_dtype = value
    with pytest.raises(ValueError, match="rl.reference_dtype must be one of"):
        settings.reference_dtype(config)
    config.optim.mu_dtype = value
    with pytest.raises(ValueError, match="optim.mu_dtype must be one of"):
        make_optimizer(config.optim, 10)
