"""The compiled pieces of a training step: prompt embedding from cached vision features, the
CoT-SFT loss and the GRPO loss on the shared-prefix forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lvr_jax.models.vlm import splice
from lvr_jax.rl.grpo import grpo_loss, masked_mean
from lvr_jax.rl.policy import response_logprobs
from lvr_jax.rl.sft import sft_loss, shift_for_next_token


def expand_like_video(ids, per_token, video_token_id: int, num_video: int, fill):
    """A per-token array [B, L] -> [B, L - 1 + num_video], aligned with `embed_prompt`: the
    placeholder's entry becomes `num_video` entries equal to `fill`."""
    def one(row, where):
        return splice(row[:, None], where, jnp.full((num_video, 1), fill, row.dtype))[:, 0]

    return jax.vmap(one)(per_token, ids == video_token_id)


def prompt_embeds(model, feats, ids, attn):
    """Cached vision features [B, T, N, C] + right-padded prompt ids / attention mask [B, L] ->
    (embeds [B, L - 1 + T * tokens_per_frame, E], valid [B, same])."""
    b = feats.shape[0]
    video = jax.vmap(model.project_frames)(feats)
    video = video.reshape(b, -1, video.shape[-1])
    embeds = model.embed_prompt(ids, video)
    valid = expand_like_video(ids, attn.astype(jnp.int32), model.cfg.video_token_id,
                              video.shape[1], 1)
    return embeds, valid.astype(bool)


def to_left_padded(x, valid, multiple: int = 1):
    """Right-padded [B, L, ...] (valid tokens first) -> left-padded, length a multiple of
    `multiple`; returns (x, valid)."""
    length = x.shape[1]
    target = -(-length // multiple) * multiple
    if target != length:
        x = jnp.pad(x, [(0, 0), (0, target - length)] + [(0, 0)] * (x.ndim - 2))
        valid = jnp.pad(valid, [(0, 0), (0, target - length)])
    shift = target - jnp.sum(valid, axis=1)
    roll = jax.vmap(lambda a, s: jnp.roll(a, s, axis=0))
    return roll(x, shift), roll(valid, shift)


def sft_step_loss(model, feats, ids, attn, loss_mask, *, mesh=None):
    """Masked next-token loss on the assistant reply of video prompts (right padded)."""
    embeds, valid = prompt_embeds(model, feats, ids, attn)
    num_video = embeds.shape[1] - ids.shape[1] + 1
    vid = model.cfg.video_token_id
    exp_ids = expand_like_video(ids, ids, vid, num_video, 0)
    exp_mask = expand_like_video(ids, loss_mask.astype(jnp.int32), vid, num_video, 0)
    pos = jnp.broadcast_to(jnp.arange(embeds.shape[1]), exp_ids.shape)
    seg = jnp.where(valid, 0, -1)
    logits = model(embeds, pos, segment_ids=seg, mesh=mesh)
    targets, target_mask = shift_for_next_token(exp_ids, exp_mask)
    return sft_loss(logits, targets, target_mask)


def rollout_prompts(model, feats, ids, attn, multiple: int):
    """Left-padded prompt embeddings [B, Lp, E] and mask for the sampler and the GRPO forward."""
    embeds, valid = prompt_embeds(model, feats, ids, attn)
    return to_left_padded(embeds, valid, multiple)


def group_logprobs(model, feats, ids, attn, responses, *, temperature, multiple, mesh=None,
                   with_entropy=False):
    """log p of responses [B, G, T] under `model`, prompt run once per group."""
    x, m = rollout_prompts(model, feats, ids, attn, multiple)
    return response_logprobs(model.llm, x, m, responses, temperature=temperature, mesh=mesh,
                             with_entropy=with_entropy)


def grpo_step_loss(model, feats, ids, attn, responses, resp_mask, old_lp, ref_lp, adv, *, rl,
                   multiple, mesh=None):
    """GRPO loss of a rollout batch: responses [B, G, T], resp_mask / old_lp / ref_lp [B*G, T],
    adv [B*G]; returns (loss, metrics incl. entropy)."""
    b, g, t = responses.shape
    lp, ent = group_logprobs(model, feats, ids, attn, responses, temperature=rl.temperature,
                             multiple=multiple, mesh=mesh, with_entropy=True)
    loss, metrics = grpo_loss(lp.reshape(b * g, t), old_lp, ref_lp, adv, resp_mask,
                              clip_low=rl.clip_low, clip_high=rl.clip_high, beta=rl.beta,
                              loss_agg=rl.loss_agg)
    metrics["entropy"] = masked_mean(ent.reshape(b * g, t), resp_mask)
    return loss, metrics
