"""Per-token log-probs of G responses per prompt with the prompt run once (shared prefix).

The prompt embeddings (video already spliced) go through the LLM once per group
(`Qwen2.prefill`, sequence-parallel under a layout with a ring axis); the G responses run as
branches against the prompt's K/V (`Qwen2.extend`). Gradients reach the prompt's activations
through the K/V of every branch, so the loss equals the one of G full sequences prompt + response.
"""

from __future__ import annotations

import jax.numpy as jnp

from lvr_jax.rl.grpo import entropy as token_entropy
from lvr_jax.rl.grpo import grpo_loss, masked_mean, token_logprobs
from sharding.mesh import UNSHARDED, Layout


def response_logprobs(llm, prompt_embeds, prompt_mask, responses, *, temperature: float = 1.0,
                      layout: Layout = UNSHARDED, with_entropy: bool = False):
    """log p(response token) [B, G, T] (float32) at the sampling temperature; optionally also
    the per-token entropy [B, G, T]. The prompt: left-padded embeddings [B, Lp, E] + mask, or a
    `RingPrompt` (mask None). The head's logits are taken `llm.cfg.logits_chunk` tokens
    at a time (`Qwen2.head_map`): never [B, G, T, V] at once, in the forward or the backward."""
    def stats(logits, tokens):
        logits = logits.astype(jnp.float32) / temperature
        lp = token_logprobs(logits, tokens)
        return (lp, token_entropy(logits)) if with_entropy else (lp,)

    prefix = llm.prefill(prompt_embeds, prompt_mask, layout=layout)
    b, g, t = responses.shape
    first = stats(jnp.broadcast_to(prefix.logits[:, None, None], (b, g, 1, prefix.logits.shape[-1])),
                  responses[:, :, :1])
    if t > 1:
        hidden, _ = llm.extend(prefix, responses[:, :, :-1], layout=layout)
        rest = llm.head_map(stats, hidden, responses[:, :, 1:], layout=layout)
        first = tuple(jnp.concatenate([a, r], axis=2) for a, r in zip(first, rest))
    return first if with_entropy else first[0]


def group_logprobs(model, feats, ids, attn, responses, *, temperature: float,
                   layout: Layout = UNSHARDED, with_entropy: bool = False,
                   forward_only: bool = False, num_frames=None):
    """log p of responses [B, G, T] under the VLM `model`, from cached vision features and
    right-padded prompt ids (`num_frames` [B]: each clip's real frames, None: all); the prompt
    (`VLM.prompts`) runs once per group. `forward_only` (the reference and old log-probs, never
    differentiated): the prompt is prefilled in the model's `prefill_chunks` chunks."""
    prompt = model.prompts(feats, ids, attn, layout, forward_only=forward_only,
                           num_frames=num_frames)
    return response_logprobs(model.llm, prompt, None, responses, temperature=temperature,
                             layout=layout, with_entropy=with_entropy)


def grpo_step_loss(model, feats, ids, attn, responses, resp_mask, old_lp, ref_lp, adv, *,
                   settings, layout: Layout = UNSHARDED, num_frames=None):
    """GRPO loss of a rollout batch under the policy `model`: responses [B, G, T], resp_mask /
    old_lp / ref_lp [B*G, T] (old_lp None: on-policy, ratio 1), adv [B*G]; `settings` a
    `GRPOSettings`; `num_frames` [B] as `group_logprobs`. Returns (loss, metrics with the
    entropy)."""
    b, g, t = responses.shape
    lp, ent = group_logprobs(model, feats, ids, attn, responses, temperature=settings.temperature,
                             layout=layout, with_entropy=True, num_frames=num_frames)
    loss, metrics = grpo_loss(lp.reshape(b * g, t), old_lp, ref_lp, adv, resp_mask,
                              clip_low=settings.clip_low, clip_high=settings.clip_high,
                              beta=settings.beta, loss_agg=settings.loss_agg,
                              dual_clip=settings.dual_clip)
    metrics["entropy"] = masked_mean(ent.reshape(b * g, t), resp_mask)
    return loss, metrics
