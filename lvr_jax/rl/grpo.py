"""GRPO pieces: group-normalised advantages, group filter, clipped surrogate + k3 KL loss, log-probs.

Conventions (as in verl / EasyR1, on which the reference Long-RL is built):
- A batch of N = B * G responses is laid out prompt-major: the G samples of prompt b are the rows
  b*G ... b*G + G - 1.
- Advantages use the UNBIASED group standard deviation (ddof=1, like `torch.std`), and a group of
  size 1 gets mean 0 and std 1 (verl's convention), so its advantage is the raw reward.
- Log-probs are float32 and per token; `mask` is 1 on response tokens that count in the loss.
All functions are jit-able (`group_size`, `loss_agg` and the clip/beta constants are static Python
values).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

LossAgg = Literal["token-mean", "seq-mean-token-mean"]
LOSS_AGGS = ("token-mean", "seq-mean-token-mean")


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """The loss settings a compiled GRPO update needs (hashable: a static argument). The
    temperature is the sampling one: log-probs are taken at it."""
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    beta: float = 0.01
    loss_agg: str = "token-mean"
    dual_clip: float | None = None    # c of dual-clip PPO (A < 0 losses capped at -A * c)

    def __post_init__(self):
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")
        if self.temperature <= 0:
            raise ValueError(f"the GRPO temperature must be > 0, got {self.temperature}")


def _grouped(rewards: jax.Array, group_size: int) -> jax.Array:
    """`[N]` -> `[N // G, G]`, with a clear error when N is not a multiple of G."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {rewards.shape}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards is not a multiple of group_size={group_size}")
    return rewards.reshape(-1, group_size)


def group_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-6,
                     scale_by_std: bool = True) -> jax.Array:
    """`(r - group_mean) / (group_std + eps)` per group of G consecutive samples; `[N]` -> `[N]` f32.

    std is the unbiased one (ddof=1, as `torch.std` in verl/EasyR1); G=1 uses mean 0, std 1.
    `scale_by_std=False` gives the plain centred reward (Dr. GRPO style).
    """
    r = _grouped(rewards, group_size)
    if group_size == 1:
        return r.reshape(-1)
    # Shift by the group's first reward first (mean and std are shift-invariant): a group of equal
    # rewards then gives exactly 0, where float32 mean(0.9 x G) != 0.9 would leave (r - mean) / eps
    # of order 0.1.
    d = r - r[:, :1]
    adv = d - d.mean(axis=1, keepdims=True)
    if scale_by_std:
        std = jnp.std(d, axis=1, keepdims=True, ddof=1)
        adv = adv / (std + eps)
    return adv.reshape(-1)


def filter_groups(rewards: jax.Array, group_size: int, per_sample: bool = False) -> jax.Array:
    """Bool mask of groups whose rewards are not all equal: `[N // G]`, or `[N]` with per_sample.

    Such groups have zero advantage everywhere and carry no policy-gradient signal (DAPO's dynamic
    sampling filter). Equality is exact (rewards from the same rule are bit-identical).
    """
    r = _grouped(rewards, group_size)
    keep = jnp.any(r != r[:, :1], axis=1)
    return jnp.repeat(keep, group_size) if per_sample else keep


def keep_in_band(scores: jax.Array, group_size: int, low: float, high: float,
                 per_sample: bool = False) -> jax.Array:
    """Bool mask of groups whose MEAN score lies strictly between `low` and `high`: `[N // G]`, or
    `[N]` with per_sample.

    DAPO's dynamic-sampling rule as Long-RL (verl) applies it (`algorithm.online_filtering`,
    `RayPPOTrainer._make_batch_data`: keep a uid when `filter_low < mean(filter_key) <
    filter_high`, examples/config.yaml: filter_key "overall", 0.01, 0.99). On accuracy this drops
    the groups all right or all wrong; on the reward ("overall") it drops only groups at the ends
    of the reward range and keeps a group of equal middling rewards (zero advantages)."""
    m = _grouped(scores, group_size).mean(axis=1)
    keep = (m > low) & (m < high)
    return jnp.repeat(keep, group_size) if per_sample else keep


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[token] in float32: logits `[..., V]`, tokens `[...]` -> `[...]`.

    Computed as `logit[token] - logsumexp(logits)`, so the full `[..., V]` log-softmax is never kept.
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum(x * mask) / max(sum(mask), 1) over `axis` (all when None), in float32."""
    mask = mask.astype(jnp.float32)
    return (x * mask).sum(axis=axis) / jnp.maximum(mask.sum(axis=axis), 1.0)


def entropy(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Entropy of softmax(logits) per token `[B, T]` (mask None), or its masked token mean (scalar)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    ent = lse - jnp.sum(jnp.where(probs > 0, probs * logits, 0.0), axis=-1)  # -inf logits: 0 * -inf
    return ent if mask is None else masked_mean(ent, mask)


def aggregate(per_token: jax.Array, mask: jax.Array, loss_agg: LossAgg = "token-mean") -> jax.Array:
    """Reduce a `[B, T]` per-token quantity to a scalar.

    'token-mean': sum over all valid tokens / number of valid tokens (long responses weigh more).
    'seq-mean-token-mean': mean over each sequence's valid tokens, then mean over the sequences that
    have at least one valid token (sequences with none are left out, not counted as 0).
    """
    mask = mask.astype(jnp.float32)
    if loss_agg == "token-mean":
        return masked_mean(per_token, mask)
    if loss_agg == "seq-mean-token-mean":
        seq = masked_mean(per_token, mask, axis=-1)
        has_tokens = (mask.sum(axis=-1) > 0).astype(jnp.float32)
        return masked_mean(seq, has_tokens)
    raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")


def k3_kl(logprobs: jax.Array, ref_logprobs: jax.Array, clip: float | None = 10.0) -> jax.Array:
    """Per-token k3 estimator of KL(pi || ref): `exp(ref - logp) - (ref - logp) - 1` (>= 0).

    Like verl's 'low_var_kl': ref - logp clamped to [-20, 20] first (past ~88.7 nats exp
    overflows float32, and the clamp below then back-propagates 0 * inf = NaN, even from a
    masked token), then the KL clamped to [-clip, clip] (None: no clamp); that clamp only
    matters for tokens where the two policies differ by ~e^2 or more.
    """
    d = jnp.clip(ref_logprobs - logprobs, -20.0, 20.0)
    kl = jnp.exp(d) - d - 1.0
    return kl if clip is None else jnp.clip(kl, -clip, clip)


def grpo_loss(logprobs: jax.Array, old_logprobs: jax.Array | None, ref_logprobs: jax.Array | None,
              advantages: jax.Array, mask: jax.Array, *, clip_low: float = 0.2,
              clip_high: float = 0.28, beta: float = 0.01, loss_agg: LossAgg = "token-mean",
              kl_clip: float | None = 10.0, log_ratio_clip: float = 20.0,
              dual_clip: float | None = None):
    """Clipped-surrogate GRPO loss plus beta * k3 KL to the reference policy.

    Shapes: logprobs / old_logprobs / ref_logprobs / mask `[B, T]` (mask 1 on counted response
    tokens), advantages `[B]`. Per token, with ratio = exp(logp - old) and A the row's advantage:
        pg = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
        pg = min(pg, -A * dual_clip) where A < 0          (dual-clip PPO, when dual_clip is set)
        kl = exp(ref - logp) - (ref - logp) - 1
        loss = aggregate(pg + beta * kl, mask, loss_agg)
    old/ref log-probs are constants (stop_gradient); `old_logprobs=None` is on-policy: old =
    logprobs, so the ratio is exactly 1 (the first update on a fresh rollout). `log_ratio_clip`
    bounds logp - old before the exp (verl uses 20) to avoid overflow; `ref_logprobs=None` or
    beta=0 drops the KL term.

    Returns (loss, metrics): metrics['policy_loss'] = aggregate(pg), metrics['kl'] = aggregate(kl)
    (so loss = policy_loss + beta * kl), and token means over valid tokens of: 'clip_frac' (share
    where the clipped branch was taken, i.e. its loss is strictly larger), 'clip_frac_low' (ratio
    below 1 - clip_low with A < 0), 'clip_frac_high' (ratio above 1 + clip_high with A > 0),
    'dual_clip_frac' (A < 0 and the loss capped at -A * dual_clip), 'ratio_mean'; plus
    'num_tokens'.
    """
    if logprobs.ndim != 2 or advantages.ndim != 1 or advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(f"grpo_loss expects logprobs [B, T] and advantages [B], got "
                         f"{logprobs.shape} and {advantages.shape}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    logprobs = logprobs.astype(jnp.float32)
    old = jax.lax.stop_gradient(logprobs if old_logprobs is None else
                                old_logprobs.astype(jnp.float32))
    mask = mask.astype(jnp.float32)
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))[:, None]

    log_ratio = jnp.clip(logprobs - old, -log_ratio_clip, log_ratio_clip)
    ratio = jnp.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    took_clipped = pg_clipped > pg_unclipped
    pg = jnp.where(took_clipped, pg_clipped, pg_unclipped)
    dual = jnp.zeros_like(took_clipped)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual = (adv < 0) & (pg > cap)
        pg = jnp.where(dual, cap, pg)
    policy_loss = aggregate(pg, mask, loss_agg)

    if ref_logprobs is None:
        kl_mean = jnp.zeros((), jnp.float32)
        loss = policy_loss
    else:
        ref = jax.lax.stop_gradient(ref_logprobs.astype(jnp.float32))
        kl_mean = aggregate(k3_kl(logprobs, ref, kl_clip), mask, loss_agg)
        # beta = 0: the KL is still reported (a metric), not part of the loss
        loss = policy_loss + beta * kl_mean if beta else policy_loss

    low = took_clipped & (adv < 0) & (ratio < 1.0 - clip_low)
    high = took_clipped & (adv > 0) & (ratio > 1.0 + clip_high)
    metrics = {
        "policy_loss": policy_loss,
        "kl": kl_mean,
        "clip_frac": masked_mean(took_clipped.astype(jnp.float32), mask),
        "clip_frac_low": masked_mean(low.astype(jnp.float32), mask),
        "clip_frac_high": masked_mean(high.astype(jnp.float32), mask),
        "dual_clip_frac": masked_mean(dual.astype(jnp.float32), mask),
        "ratio_mean": masked_mean(ratio, mask),
        "num_tokens": mask.sum(),
    }
    return loss, metrics
