"""GRPO loss / gradients, advantages, group filter, log-probs, entropy and SFT loss vs NumPy (float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvr_jax.rl.grpo import (entropy, filter_groups, group_advantages, grpo_loss, k3_kl,
                             token_logprobs)
from lvr_jax.rl.sft import sft_loss, shift_for_next_token

CLIP_LOW, CLIP_HIGH, BETA = 0.2, 0.28, 0.05
AGGS = ("token-mean", "seq-mean-token-mean")


# ---- NumPy reference -------------------------------------------------------------------------
def np_weights(mask, agg):
    """d loss / d per_token: the aggregation as a fixed weight per token."""
    mask = mask.astype(np.float64)
    if agg == "token-mean":
        return mask / max(mask.sum(), 1.0)
    n = mask.sum(1, keepdims=True)
    n_seq = max((n > 0).sum(), 1)
    return mask / np.maximum(n, 1.0) / n_seq


def np_grpo(logp, old, ref, adv, mask, agg, cl=CLIP_LOW, ch=CLIP_HIGH, beta=BETA, dual=None):
    """Loss, analytic d loss / d logp, and the clipped-token masks (low, high, dual), all float64;
    `dual`: the c of dual-clip PPO (losses of A < 0 capped at -A * c), None = off."""
    logp, old, ref, adv = (np.asarray(x, np.float64) for x in (logp, old, ref, adv))
    a = adv[:, None]
    ratio = np.exp(logp - old)
    pg1, pg2 = -a * ratio, -a * np.clip(ratio, 1 - cl, 1 + ch)
    clipped = pg2 > pg1
    pg = np.where(clipped, pg2, pg1)
    capped = (a < 0) & (pg > -a * dual) if dual is not None else np.zeros_like(clipped)
    pg = np.where(capped, -a * (dual or 0.0), pg)
    d = ref - logp
    kl = np.exp(d) - d - 1
    w = np_weights(mask, agg)
    loss = np.sum(w * (pg + beta * kl))
    grad = w * (np.where(clipped | capped, 0.0, -a * ratio) + beta * (1 - np.exp(d)))
    low = clipped & (a < 0) & (ratio < 1 - cl)
    high = clipped & (a > 0) & (ratio > 1 + ch)
    return loss, grad, dict(pg=np.sum(w * pg), kl=np.sum(w * kl), clipped=clipped, low=low, high=high,
                            ratio=ratio, capped=capped)


def random_inputs(seed, b=8, t=48):
    rng = np.random.default_rng(seed)
    old = np.log(rng.dirichlet(np.ones(20), size=(b, t))[..., 0] + 1e-3).astype(np.float32)
    logp = (old + 0.4 * rng.standard_normal((b, t))).astype(np.float32)
    ref = (old + 0.3 * rng.standard_normal((b, t))).astype(np.float32)
    adv = (np.abs(rng.standard_normal(b)) + 0.1) * np.where(np.arange(b) % 2, 1.0, -1.0)
    mask = (rng.random((b, t)) < 0.7).astype(np.float32)
    mask[b // 2 - 1] = 0.0                         # a sequence with no valid token
    mask[b - 1, t // 2:] = 0.0                     # a short one
    return logp, old, ref, adv.astype(np.float32), mask


# ---- GRPO loss -------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", AGGS)
def test_grpo_loss_and_grad_match_numpy(agg):
    fn = jax.jit(jax.value_and_grad(
        functools.partial(grpo_loss, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, beta=BETA, loss_agg=agg),
        has_aux=True))
    for seed in (0, 1):
        logp, old, ref, adv, mask = random_inputs(seed)
        (loss, metrics), grad = fn(logp, old, ref, adv, mask)
        want, want_grad, ex = np_grpo(logp, old, ref, adv, mask, agg)
        valid = mask > 0
        assert ex["low"][valid].sum() >= 5 and ex["high"][valid].sum() >= 5   # both clip sides hit
        assert (~ex["clipped"][valid]).sum() >= 50
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
        rel = np.linalg.norm(np.asarray(grad, np.float64) - want_grad) / np.linalg.norm(want_grad)
        assert rel < 1e-5, rel
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6 * np.abs(want_grad).max())
        np.testing.assert_allclose(float(metrics["policy_loss"]), ex["pg"], rtol=1e-5)
        np.testing.assert_allclose(float(metrics["kl"]), ex["kl"], rtol=1e-5)
        np.testing.assert_allclose(float(loss), float(metrics["policy_loss"]) + BETA * float(metrics["kl"]),
                                   rtol=1e-6)
        for key, m in (("clip_frac", ex["clipped"]), ("clip_frac_low", ex["low"]),
                       ("clip_frac_high", ex["high"])):
            np.testing.assert_allclose(float(metrics[key]), m[valid].mean(), rtol=1e-6)
        np.testing.assert_allclose(float(metrics["ratio_mean"]), ex["ratio"][valid].mean(), rtol=1e-5)
        assert float(metrics["num_tokens"]) == mask.sum()


@pytest.mark.parametrize("agg", AGGS)
def test_dual_clip_caps_negative_advantage_losses_as_numpy(agg):
    """Dual-clip PPO (c = 3): tokens with A < 0 and a ratio far above 1 + clip_high lose at most
    -A * c, with zero gradient; everything else as the plain clipped loss."""
    fn = jax.jit(jax.value_and_grad(
        functools.partial(grpo_loss, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, beta=BETA, loss_agg=agg,
                          dual_clip=3.0), has_aux=True))
    logp, old, ref, adv, mask = random_inputs(7)
    logp = (old + 2.5 * (logp - old)).astype(np.float32)          # ratios up to e^3 and more
    ref = (logp + (ref - old)).astype(np.float32)                  # KL within its clamp (10)
    (loss, metrics), grad = fn(logp, old, ref, adv, mask)
    want, want_grad, ex = np_grpo(logp, old, ref, adv, mask, agg, dual=3.0)
    valid = mask > 0
    assert ex["capped"][valid].sum() >= 5 and (~ex["capped"][valid]).sum() >= 50
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6 * np.abs(want_grad).max())
    np.testing.assert_allclose(float(metrics["dual_clip_frac"]), ex["capped"][valid].mean(), rtol=1e-6)
    plain = float(grpo_loss(logp, old, ref, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                            beta=BETA, loss_agg=agg)[0])
    assert plain > float(loss)                                   # the cap lowers the loss
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        grpo_loss(logp, old, ref, adv, mask, dual_clip=1.0)


def test_on_policy_ratio_is_exactly_one():
    """old_logprobs=None: old = the log-probs themselves, ratio exactly 1, gradient = -A w."""
    logp, _, ref, adv, mask = random_inputs(3)
    (loss, metrics), grad = jax.value_and_grad(
        functools.partial(grpo_loss, beta=0.0), has_aux=True)(logp, None, ref, adv, mask)
    assert float(metrics["ratio_mean"]) == 1.0 and float(metrics["clip_frac"]) == 0.0
    want = -adv[:, None] * np_weights(mask, "token-mean")
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-9)


def test_numpy_gradient_is_right():
    """The analytic NumPy gradient agrees with central finite differences (float64)."""
    logp, old, ref, adv, mask = (x.astype(np.float64) for x in random_inputs(2, b=4, t=12))
    for agg in AGGS:
        _, grad, ex = np_grpo(logp, old, ref, adv, mask, agg)
        ratio = ex["ratio"]
        near_edge = (np.abs(ratio - (1 - CLIP_LOW)) < 1e-3) | (np.abs(ratio - (1 + CLIP_HIGH)) < 1e-3)
        h = 1e-6
        for i, j in zip(*np.nonzero(~near_edge)):
            up, dn = logp.copy(), logp.copy()
            up[i, j] += h
            dn[i, j] -= h
            fd = (np_grpo(up, old, ref, adv, mask, agg)[0]
                  - np_grpo(dn, old, ref, adv, mask, agg)[0]) / (2 * h)
            assert fd == pytest.approx(grad[i, j], rel=1e-5, abs=1e-9)


def test_grpo_loss_without_reference_and_on_policy():
    logp, _, _, adv, mask = random_inputs(3)
    loss, metrics = jax.jit(grpo_loss)(logp, logp, None, adv, mask)
    # On-policy (ratio 1): loss = -aggregate(A), no clipping, no KL.
    want = -np.sum(np_weights(mask, "token-mean") * adv[:, None])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["clip_frac"]) == 0.0 and float(metrics["kl"]) == 0.0
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="loss_agg"):
        grpo_loss(jnp.asarray(logp), jnp.asarray(logp), None, jnp.asarray(adv), jnp.asarray(mask),
                  loss_agg="sum")


def test_beta_zero_reports_the_kl_without_adding_it():
    """beta = 0 with reference log-probs: the loss is the policy loss alone (and so its gradient),
    while metrics['kl'] still reports the KL to the reference (it had read 0)."""
    logp, old, ref, adv, mask = random_inputs(4)
    fn = jax.jit(jax.value_and_grad(functools.partial(grpo_loss, clip_low=CLIP_LOW,
                                                      clip_high=CLIP_HIGH, beta=0.0), has_aux=True))
    (loss, metrics), grad = fn(logp, old, ref, adv, mask)
    want, want_grad, ex = np_grpo(logp, old, ref, adv, mask, "token-mean", beta=0.0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6 * np.abs(want_grad).max())
    assert ex["kl"] > 0.01
    np.testing.assert_allclose(float(metrics["kl"]), ex["kl"], rtol=1e-5)


def test_k3_kl_clamps_the_gap_first_as_verl():
    """ref - logp is clamped to [-20, 20] before exp, as verl's low_var_kl: a 93-nat gap (exp
    past float32) on a token, masked or not, gives the clamped KL and finite gradients (it had
    back-propagated 0 * inf = NaN through the loss into every parameter)."""
    logp = np.array([[-1.0, -95.0, -3.0], [-0.5, -2.0, -40.0]], np.float32)
    ref = np.array([[-1.2, -2.0, -1.0], [-0.4, -2.5, -1.0]], np.float32)
    d = np.clip(ref.astype(np.float64) - logp, -20, 20)
    want = np.clip(np.exp(d) - d - 1, -10, 10)                  # verl's formula, float64
    np.testing.assert_allclose(k3_kl(jnp.asarray(logp), jnp.asarray(ref)), want, rtol=1e-5)
    for mask in (np.ones_like(logp), np.array([[1, 0, 1], [1, 1, 0]], np.float32)):
        grad = jax.grad(lambda lp, m=mask: grpo_loss(lp, lp, jnp.asarray(ref), jnp.zeros((2,)),
                                                     jnp.asarray(m))[0])(jnp.asarray(logp))
        assert np.isfinite(np.asarray(grad)).all()


# ---- advantages and group filter ---------------------------------------------------------------
def test_group_advantages_match_numpy_ddof1():
    rng = np.random.default_rng(0)
    g = 5
    rewards = rng.random(4 * g).astype(np.float32)
    rewards[5:10] = 0.9                          # a group with identical rewards
    rewards[10:15] = [0.0, 1.0, 1.0, 0.0, 1.0]
    got = np.asarray(jax.jit(group_advantages, static_argnums=1)(rewards, g))
    r = rewards.astype(np.float64).reshape(-1, g)
    want = ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[5:10] == 0.0)
    np.testing.assert_allclose(np.asarray(group_advantages(rewards, 1)), rewards)   # verl: mean 0, std 1
    centred = np.asarray(group_advantages(rewards, g, scale_by_std=False))
    np.testing.assert_allclose(centred, (r - r.mean(1, keepdims=True)).reshape(-1), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(rewards, 3)


def test_filter_groups():
    rewards = np.array([1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5, 0, 0, 0], np.float32)
    keep = np.asarray(filter_groups(rewards, 3))
    np.testing.assert_array_equal(keep, [False, True, False, False])
    np.testing.assert_array_equal(np.asarray(filter_groups(rewards, 3, per_sample=True)),
                                  np.repeat([False, True, False, False], 3))
    np.testing.assert_array_equal(np.asarray(filter_groups(rewards, 6)), [True, True])


# ---- log-probs, entropy, SFT -----------------------------------------------------------------
def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_token_logprobs_and_entropy_match_numpy():
    rng = np.random.default_rng(1)
    logits = (4 * rng.standard_normal((3, 7, 50))).astype(np.float32)
    tokens = rng.integers(0, 50, (3, 7))
    mask = (rng.random((3, 7)) < 0.6).astype(np.float32)
    got = jax.jit(token_logprobs)(logits, tokens)
    assert got.dtype == jnp.float32 and got.shape == (3, 7)
    lsm = np_log_softmax(logits)
    want = np.take_along_axis(lsm, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert jax.eval_shape(token_logprobs, jnp.asarray(logits, jnp.bfloat16), tokens).dtype == jnp.float32
    ent = -(np.exp(lsm) * lsm).sum(-1)
    ent_fn = jax.jit(entropy)
    np.testing.assert_allclose(np.asarray(ent_fn(logits)), ent, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(ent_fn(logits, mask)), (ent * mask).sum() / mask.sum(), rtol=1e-5)
    masked_vocab = np.where(np.arange(50) < 10, -np.inf, logits).astype(np.float32)
    assert np.all(np.isfinite(np.asarray(ent_fn(masked_vocab))))


def test_sft_loss_matches_numpy():
    rng = np.random.default_rng(2)
    b, t, v = 3, 9, 40
    ids = rng.integers(0, v, (b, t))
    loss_mask = np.zeros((b, t), np.float32)
    loss_mask[:, 4:] = 1.0                         # the assistant reply
    loss_mask[2, 7:] = 0.0                         # padding
    targets, tmask = jax.jit(shift_for_next_token)(ids, loss_mask)
    np.testing.assert_array_equal(targets[:, :-1], ids[:, 1:])
    np.testing.assert_array_equal(tmask[:, :-1], loss_mask[:, 1:])
    assert np.all(np.asarray(tmask[:, -1]) == 0)

    logits = (3 * rng.standard_normal((b, t, v))).astype(np.float32)
    logits[0, 5, ids[0, 6]] += 20.0                # one surely-correct prediction
    loss_fn = jax.jit(sft_loss)
    loss, metrics = loss_fn(logits, targets, tmask)
    lsm = np_log_softmax(logits[:, :-1])
    nll = -np.take_along_axis(lsm, ids[:, 1:, None], -1)[..., 0]
    m = loss_mask[:, 1:]
    np.testing.assert_allclose(float(loss), (nll * m).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["nll_sum"]), (nll * m).sum(), rtol=1e-5)
    assert float(metrics["num_tokens"]) == m.sum()
    acc = ((logits[:, :-1].argmax(-1) == ids[:, 1:]) * m).sum() / m.sum()
    np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)
    assert float(metrics["accuracy"]) > 0
    zero, _ = loss_fn(logits, targets, jnp.zeros_like(tmask))
    assert float(zero) == 0.0
