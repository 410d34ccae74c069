"""CoT-SFT loss: masked next-token cross entropy on the assistant reply."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shift_for_next_token(ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Targets for "logits at position t predict token t + 1", keeping the length T.

    ids `[B, T]` int, loss_mask `[B, T]` (1 on tokens to be learned, e.g. the assistant reply and its
    end token). Returns targets `[B, T]` = ids shifted left by one (last column 0) and target_mask
    `[B, T]` = loss_mask shifted the same way (last column 0, as nothing follows it), so
    `sft_loss(model(ids), *shift_for_next_token(ids, loss_mask))` is the usual causal-LM loss.
    """
    pad = jnp.zeros_like(ids[:, :1])
    targets = jnp.concatenate([ids[:, 1:], pad], axis=1)
    target_mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    return targets, target_mask


def sft_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
    """Mean cross entropy over masked tokens: logits `[B, T, V]`, targets / loss_mask `[B, T]`.

    Computed in float32 as `logsumexp(logits) - logits[target]`. Returns (loss, metrics) with
    'loss', 'nll_sum' (sum over masked tokens, for exact weighting across gradient-accumulation
    micro-batches: total loss = sum(nll_sum) / sum(num_tokens)), 'num_tokens' and 'accuracy'
    (argmax == target over masked tokens). With no masked token the loss is 0.
    """
    logits = logits.astype(jnp.float32)
    mask = loss_mask.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    num_tokens = mask.sum()
    denom = jnp.maximum(num_tokens, 1.0)
    nll_sum = (nll * mask).sum()
    loss = nll_sum / denom
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {"loss": loss, "nll_sum": nll_sum, "num_tokens": num_tokens,
               "accuracy": (correct * mask).sum() / denom}
    return loss, metrics
