"""PPO minibatches on one GRPO rollout (Long-RL's update structure): M optimizer steps over the
rollout's prompts; the first step is on-policy (ratio exactly 1), later ones compare with the
old log-probs, and every step's loss equals a NumPy dual-clip formula on the policy's log-probs
just before it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs import tiny
from lvr_jax.models.vlm import init_vlm, vlm_config_from
from lvr_jax.rl.grpo import GRPOSettings
from lvr_jax.train.grpo import grpo_update, logprobs_under, minibatch_order, ppo_updates
from tests.conftest import perturb
from tests.test_grpo_loss import np_grpo

P, G, T, M = 4, 2, 5, 4
SETTINGS = GRPOSettings(temperature=1.0, clip_low=0.2, clip_high=0.3, beta=0.05, dual_clip=3.0)


def rollout(model, seed):
    """A fake rollout of P prompts x G samples on cached features (what grpo_step holds)."""
    rng = np.random.default_rng(seed)
    cfg = model.cfg
    feats = jnp.asarray(rng.normal(size=(P, 2, cfg.vision.grid ** 2, cfg.vision.hidden_size)),
                        jnp.float32)
    ids = rng.integers(10, 300, (P, 9)).astype(np.int32)
    ids[:, 2] = cfg.video_token_id
    attn = np.ones((P, 9), np.int32)
    attn[1, 7:] = 0                                             # a shorter prompt
    responses = rng.integers(10, 300, (P, G, T)).astype(np.int32)
    mask = rng.random((P * G, T)) < 0.9
    adv = rng.normal(size=P * G).astype(np.float32)
    return feats, jnp.asarray(ids), jnp.asarray(attn), jnp.asarray(responses), mask, adv


def samples(x, rows):
    """The G samples of each prompt in `rows` of a prompt-major [P * G, ...] array."""
    x = np.asarray(x)
    return x.reshape(P, G, *x.shape[1:])[rows].reshape(-1, *x.shape[1:])


def policy(seed):
    cfg = vlm_config_from(tiny.get_config().model)
    cfg = type(cfg)(cfg.llm, cfg.vision, cfg.projector_type, video_token_id=3, newline_token_id=4)
    model = perturb(init_vlm(cfg, 1), seed=seed, scale=0.2)
    return model, nnx.Optimizer(model, optax.adam(2e-3), wrt=nnx.Param)


def test_minibatch_steps_ratio_and_loss_match_numpy():
    model, opt = policy(7)
    feats, ids, attn, responses, mask, adv = rollout(model, 3)
    lp_of = lambda m: np.asarray(  # noqa: E731
        logprobs_under(m, feats, ids, attn, responses, 1.0)).reshape(-1, T)
    old = lp_of(model)                                          # before the first step
    ref = old + np.random.default_rng(5).normal(0, 0.1, old.shape).astype(np.float32)
    order = minibatch_order(P, M, seed=11)
    assert sorted(order.ravel().tolist()) == list(range(P)) and order.shape == (M, P // M)
    ratios = []
    for m, rows in enumerate(order):
        mk, o, rf, ad, lp = (samples(x, rows) for x in (mask, old, ref, adv, lp_of(model)))
        # lp: the policy just before step m, on the minibatch's samples
        want, _, ex = np_grpo(lp, lp if m == 0 else o, rf, ad, mk, "token-mean", cl=0.2, ch=0.3,
                              beta=0.05, dual=3.0)
        got = grpo_update(model, opt, feats, ids, attn, responses, mask, old, ref, adv, SETTINGS,
                          rows=rows, on_policy=m == 0)
        np.testing.assert_allclose(float(got["loss"]), want, rtol=2e-5, err_msg=f"minibatch {m}")
        ratios.append(float(got["ratio_mean"]))
    assert ratios[0] == 1.0, ratios                             # on-policy: exactly 1
    assert all(abs(r - 1.0) > 1e-3 for r in ratios[1:]), ratios

    # ppo_updates runs the same steps from the same start
    model2, opt2 = policy(7)
    steps = ppo_updates(model2, opt2, feats, ids, attn, responses, mask, old, ref, adv, SETTINGS,
                        minibatches=M, seed=11)
    assert len(steps) == M
    np.testing.assert_allclose([float(s["ratio_mean"]) for s in steps], ratios, rtol=1e-5)
    assert float(steps[0]["ratio_mean"]) == 1.0 and float(steps[-1]["clip_frac"]) >= 0.0
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                    jax.tree.leaves(nnx.state(model2, nnx.Param))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
