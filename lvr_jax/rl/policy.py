"""Per-token log-probs of G responses per prompt with the prompt run once (shared prefix).

The prompt embeddings (video already spliced) go through the LLM once per group, sharded over
`seq` with the ring when the mesh has seq > 1; the G responses run as branches against the
prompt's K/V (`lvr_jax.rollout.branches`). Gradients reach the prompt's activations through the
K/V of every branch, so the loss equals the one of G full sequences prompt + response.
"""

from __future__ import annotations

import jax.numpy as jnp

from lvr_jax.rl.grpo import entropy as token_entropy
from lvr_jax.rl.grpo import token_logprobs
from lvr_jax.rollout.branches import branch_forward
from lvr_jax.rollout.sampler import prefill


def response_logits(llm, prompt_embeds, prompt_mask, responses, *, mesh=None, axis="seq"):
    """Logits [B, G, T, V] predicting responses [B, G, T] after left-padded prompts [B, Lp, E]."""
    prefix = prefill(llm, prompt_embeds, prompt_mask, mesh=mesh, axis=axis)
    b, g, t = responses.shape
    first = jnp.broadcast_to(prefix.logits[:, None, None], (b, g, 1, prefix.logits.shape[-1]))
    if t == 1:
        return first
    hidden, _ = branch_forward(llm, prefix.k, prefix.v, prefix.valid, prefix.lengths,
                               responses[:, :, :-1], mesh=mesh, axis=axis)
    rest = llm.head(hidden.reshape(b, g * (t - 1), -1)).reshape(b, g, t - 1, -1)
    return jnp.concatenate([first, rest], axis=2)


def response_logprobs(llm, prompt_embeds, prompt_mask, responses, *, temperature: float = 1.0,
                      mesh=None, axis="seq", with_entropy: bool = False):
    """log p(response token) [B, G, T] (float32) at the sampling temperature; optionally also
    the per-token entropy [B, G, T]."""
    logits = response_logits(llm, prompt_embeds, prompt_mask, responses, mesh=mesh, axis=axis)
    logits = logits.astype(jnp.float32) / temperature
    lp = token_logprobs(logits, responses)
    if not with_entropy:
        return lp
    return lp, token_entropy(logits)
