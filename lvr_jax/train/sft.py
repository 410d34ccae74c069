"""Stage 1, long CoT-SFT: masked next-token loss on the assistant reply of video prompts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lvr_jax.models.vlm import expand_like_video
from lvr_jax.rl.sft import sft_loss, shift_for_next_token
from lvr_jax.train.loop import loop
from lvr_jax.train.state import Run, setup
from sharding.mesh import UNSHARDED, Layout


def sft_step_loss(model, feats, ids, attn, loss_mask, *, layout: Layout = UNSHARDED,
                  num_frames=None):
    """Masked next-token loss on the reply of right-padded prompts, from cached features
    (`num_frames` [B]: each clip's real frames; None: all)."""
    embeds, valid = model.prompt_from_features(feats, ids, attn, num_frames)
    num_video = embeds.shape[1] - ids.shape[1] + 1
    vid = model.cfg.video_token_id
    exp_ids = expand_like_video(ids, ids, vid, num_video, 0)
    exp_mask = expand_like_video(ids, loss_mask.astype(jnp.int32), vid, num_video, 0)
    pos = jnp.broadcast_to(jnp.arange(embeds.shape[1]), exp_ids.shape)
    if num_frames is not None:     # the text after a short clip follows its last real frame
        t, f = feats.shape[1], num_video // feats.shape[1]
        after = pos >= jnp.argmax(ids == vid, axis=1)[:, None] + t * f
        pos = pos - jnp.where(after, (t - jnp.asarray(num_frames)[:, None]) * f, 0)
    seg = jnp.where(valid, 0, -1)
    logits = model.llm.forward(embeds, pos, segment_ids=seg, layout=layout)
    targets, target_mask = shift_for_next_token(exp_ids, exp_mask)
    return sft_loss(logits, targets, target_mask)


@functools.partial(nnx.jit, static_argnames=("layout", "freeze_vision"),
                   donate_argnames=("model", "optimizer"))
def sft_update(model, optimizer, frames, ids, attn, loss_mask, layout=UNSHARDED,
               freeze_vision=True, num_frames=None):
    """One optimizer step of CoT-SFT: frames encoded frame-parallel inside the differentiated
    function, so with `freeze_vision` off the tower gets its gradient (with it on, none flows
    back through the features)."""

    def loss_fn(model):
        feats = model.batch_features(frames, layout)
        if freeze_vision:
            feats = jax.lax.stop_gradient(feats)
        return sft_step_loss(model, feats, ids, attn, loss_mask, layout=layout,
                             num_frames=num_frames)

    (loss, metrics), grads = nnx.value_and_grad(
        loss_fn, has_aux=True, argnums=nnx.DiffState(0, optimizer.wrt))(model)
    optimizer.update(model, grads)
    metrics["grad_norm"] = optax.global_norm(grads)
    return metrics


def sft_step(run: Run, batch: dict) -> dict:
    b = run.device_batch(batch)
    metrics = sft_update(run.model, run.optimizer, b["frames"], b["input_ids"],
                         b["attention_mask"], b["loss_mask"], layout=run.layout,
                         freeze_vision=bool(run.config.train.freeze_vision),
                         num_frames=b["num_frames"])
    return {k: metrics[k] for k in ("loss", "accuracy", "num_tokens", "grad_norm")}


def train_sft(config, workdir) -> Run:
    """Stage 1: long CoT-SFT; returns the finished run."""
    run = setup(config, workdir, mode="sft")
    loop(run, sft_step, what="sft")
    return run
