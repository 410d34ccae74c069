"""Stage 2, GRPO: one step = encode -> rollout -> rewards -> reference log-probs -> update.

Data flow of `grpo_step` (ARCHITECTURE.md): the clips' vision features are computed once
(`models.vlm.encode_batch`, frame-parallel; or read from the feature cache, `train.features`)
and spliced into left-padded prompts (`models.vlm.make_prompts`); the sampler prefills each
prompt once and decodes G branches against the shared prefix (`rollout.sampler`); rewards and
group advantages on the host (`rl.reward_fns`, `rl.grpo`; with dynamic sampling, more rollouts
until P groups pass: `train.rollouts`); the frozen reference and the update run the same
shared-prefix forward (`rl.policy`: prompt once per group, responses as branches) on those
features.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lvr_jax.rl.grpo import filter_groups
from lvr_jax.rl.policy import group_logprobs, grpo_step_loss
from lvr_jax.rollout.sampler import Sampler
from lvr_jax.train import settings
from lvr_jax.train.judge import check_reward_fn, run_reward_fn
from lvr_jax.train.loop import loop
from lvr_jax.train.rollouts import dynamic_batch, dynamic_metrics, dynamic_sampling, draw_seed, roll_out
from lvr_jax.train.state import Run, setup
from sharding.mesh import UNSHARDED

log = logging.getLogger(__name__)


@functools.partial(nnx.jit, static_argnames=("temperature", "layout"), graph_updates=False)
def logprobs_under(model, feats, ids, attn, responses, temperature, layout=UNSHARDED,
                   num_frames=None):
    """log p of the responses under `model` (the reference, or the policy for recomputed old
    log-probs), prompt run once per group (`num_frames` [B]: each clip's real frames)."""
    return group_logprobs(model, feats, ids, attn, responses, temperature=temperature,
                          layout=layout, forward_only=True, num_frames=num_frames)


def minibatch(rows, feats, ids, attn, responses, resp_mask, old_lp, ref_lp, adv):
    """The prompts `rows` [P'] of a rollout batch (all G samples of each): per-prompt arrays
    [P, ...] and per-sample arrays [P * G, ...] (prompt-major) cut to those prompts."""
    g = responses.shape[1]
    take = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731

    def samples(x):
        return None if x is None else take(x.reshape(-1, g, *x.shape[1:])).reshape(-1, *x.shape[1:])

    return (take(feats), take(ids), take(attn), take(responses), samples(resp_mask),
            samples(old_lp), samples(ref_lp), samples(adv))


@functools.partial(nnx.jit, static_argnames=("settings", "layout", "on_policy"),
                   donate_argnames=("model", "optimizer"))
def grpo_update(model, optimizer, feats, ids, attn, responses, resp_mask, old_lp, ref_lp, adv,
                settings, layout=UNSHARDED, rows=None, on_policy=False, num_frames=None):
    """One optimizer step on the GRPO loss (`GRPOSettings` `settings`) of a rollout batch, or of
    its prompts `rows` (a PPO minibatch: all G samples of each). `on_policy`: the policy has not
    changed since the rollout, so old = the policy's own log-probs (ratio exactly 1) and
    `old_lp` is not read. `num_frames` [B]: each clip's real frames (None: all)."""
    if rows is not None:
        feats, ids, attn, responses, resp_mask, old_lp, ref_lp, adv = minibatch(
            rows, feats, ids, attn, responses, resp_mask, old_lp, ref_lp, adv)
        num_frames = None if num_frames is None else jnp.take(num_frames, rows, axis=0)

    def loss_fn(model):
        return grpo_step_loss(model, feats, ids, attn, responses, resp_mask,
                              None if on_policy else old_lp, ref_lp, adv, settings=settings,
                              layout=layout, num_frames=num_frames)

    return optimizer_step(model, optimizer, loss_fn)


def optimizer_step(model, optimizer, loss_fn) -> dict:
    """One update of the optimizer's params (`optimizer.wrt`) along the gradient of
    `loss_fn(model) -> (loss, metrics)`; returns the metrics with "loss" and "grad_norm"."""
    (loss, metrics), grads = nnx.value_and_grad(
        loss_fn, has_aux=True, argnums=nnx.DiffState(0, optimizer.wrt))(model)
    optimizer.update(model, grads)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    return metrics


UPDATE_METRICS = ("loss", "policy_loss", "kl", "clip_frac", "entropy", "grad_norm",
                  "dual_clip_frac", "ratio_mean")


def ppo_updates(model, optimizer, feats, ids, attn, responses, resp_mask, old_lp, ref_lp, adv,
                settings, *, layout=UNSHARDED, minibatches: int = 1, seed: int = 0,
                num_frames=None) -> list[dict]:
    """The optimizer steps on one rollout of P prompts x G samples: one step on all of it, or
    `minibatches` M steps on its prompts shuffled (by `seed`) into M equal minibatches (all G
    samples of a prompt together, so each minibatch keeps the shared prefix; `num_frames` [P]:
    each clip's real frames). The first
    minibatch is on-policy (ratio exactly 1); the later ones compare with `old_lp`, the policy's
    log-probs before the first step, so their ratios move off 1 and clipping acts. Returns each
    step's metrics."""
    if minibatches == 1:
        return [grpo_update(model, optimizer, feats, ids, attn, responses, resp_mask, old_lp,
                            ref_lp, adv, settings, layout=layout, num_frames=num_frames)]
    order = minibatch_order(responses.shape[0], minibatches, seed)
    return [grpo_update(model, optimizer, feats, ids, attn, responses, resp_mask, old_lp, ref_lp,
                        adv, settings, layout=layout, rows=rows, on_policy=m == 0,
                        num_frames=num_frames)
            for m, rows in enumerate(order)]


def minibatch_order(prompts: int, minibatches: int, seed: int) -> np.ndarray:
    """int32 [minibatches, prompts / minibatches]: the prompts of each minibatch, shuffled."""
    if prompts % minibatches:
        raise ValueError(f"{prompts} prompts per rollout is not a multiple of {minibatches} "
                         f"minibatches")
    order = np.random.default_rng(seed).permutation(prompts)
    return order.reshape(minibatches, -1).astype(np.int32)


def grpo_step(run: Run, batch: dict, ref, sampler: Sampler) -> dict:
    """Rollout G responses per prompt, score, reference (and old) log-probs, `rl.ppo_minibatches`
    policy updates. Phases are named in profiler traces: encode, prefill, decode (sampler),
    reward, logprob, update. Update metrics are the mean over the minibatches.

    Dynamic sampling (`rl.dynamic_sampling`, DAPO as Long-RL's `online_filtering`): keep the
    groups whose mean `rl.dynamic_keep_key` score lies strictly between `rl.dynamic_low` and
    `rl.dynamic_high` (`rl.grpo.keep_in_band`); while fewer than P (prompts per step) are kept
    and fewer than `rl.dynamic_max_draws` rollouts were made, roll out the next batch of
    `run.data_iter` (so a checkpoint's data state covers every draw). The update sees exactly P
    groups: the first P kept in draw order (Long-RL: `batch[:rollout_batch_size * n]`). When the
    bound stops it short (Long-RL raises instead), the first dropped groups in draw order fill
    the batch with advantage 0 and loss mask 0, so they add nothing to the loss (policy
    gradient, KL, token count), as `rl.filter_groups` does; one warning line says so. Advantages
    are per group, so selection leaves them unchanged; `rl.filter_groups` still applies to the
    assembled batch.

    Metrics: `reward_mean`, `reward_std`, `accuracy`, `format_rate`, `response_length` and
    `rollout_tokens_per_s` are over every sample rolled out this step (all draws; Long-RL's
    `reward/*` metrics are too, its `all_metrics` gathered before filtering), `time_rollout_s`
    covers every draw, the update metrics the assembled batch. With dynamic
    sampling also: `draws` (rollouts), `prompts_drawn` (P x draws), `groups_kept` /
    `groups_dropped` (groups of all draws that pass / fail the rule), `groups_filled` (failing
    groups in the batch, 0 unless the bound was hit), `draw_bound_hit` (1 when it was), and
    `batch_reward_mean` / `batch_accuracy` over the P x G samples of the update's batch
    (Long-RL's `critic/score/mean`)."""
    rl = run.config.rl
    layout = run.layout
    params = settings.sampling_params(run.config)
    loss_settings = settings.grpo_settings(run.config)
    g = params.num_samples
    minibatches = settings.ppo_minibatches(run.config)
    dyn = dynamic_sampling(run.config)
    t0 = time.perf_counter()
    seed = draw_seed(run, 0)
    if dyn is None:
        roll = roll_out(run, batch, sampler, seed, host_ids=False)
        seen, extra = [roll], {}
    else:
        roll, got, seen = dynamic_batch(run, batch, sampler, dyn, g, seed)
        extra = dynamic_metrics(run, got, roll)
        if got.groups_filled:
            roll.adv = np.where(np.repeat(got.filled, g), 0.0, roll.adv).astype(roll.adv.dtype)
    if roll.dev is None:                 # an assembled batch: its prompts to the devices
        index, count = run.shard
        block = slice(index * roll.ids.shape[0] // count, (index + 1) * roll.ids.shape[0] // count)
        roll.dev = run.device_batch({"input_ids": roll.ids[block],
                                     "attention_mask": roll.attn[block],
                                     "num_frames": roll.nf[block]})
    feats, ids, attn = roll.feats, roll.dev["input_ids"], roll.dev["attention_mask"]
    nf = roll.dev["num_frames"]
    tokens, old_lp, lengths, adv = roll.tokens, roll.old_lp, roll.lengths, roll.adv
    with jax.profiler.TraceAnnotation("reward"):
        resp_mask = np.arange(tokens.shape[1])[None] < lengths[:, None]
        if dyn is not None and got.groups_filled:
            resp_mask = resp_mask & ~np.repeat(got.filled, g)[:, None]
        if rl.filter_groups:
            keep = np.asarray(filter_groups(roll.scores["reward"], g, per_sample=True))
            resp_mask = resp_mask & keep[:, None]
    t_rollout = time.perf_counter() - t0
    responses = tokens.reshape(-1, g, tokens.shape[1])
    with jax.profiler.TraceAnnotation("logprob"):
        ref_lp = logprobs_under(ref, feats, ids, attn, responses, loss_settings.temperature,
                                layout=layout, num_frames=nf).reshape(tokens.shape)
        old = old_lp
        if rl.recompute_old_logprobs or minibatches > 1:
            old = logprobs_under(run.model, feats, ids, attn, responses,
                                 loss_settings.temperature, layout=layout,
                                 num_frames=nf).reshape(tokens.shape)
        jax.block_until_ready(ref_lp)
    t_logprob = time.perf_counter() - t0 - t_rollout
    with jax.profiler.TraceAnnotation("update"):
        steps = ppo_updates(run.model, run.optimizer, feats, ids, attn, responses, resp_mask, old,
                            ref_lp, adv, loss_settings, layout=layout, minibatches=minibatches,
                            seed=seed + 1, num_frames=nf)
        steps = jax.block_until_ready([{k: m[k] for k in UPDATE_METRICS} for m in steps])
        means = {k: float(np.mean([float(m[k]) for m in steps])) for k in UPDATE_METRICS}
    t_update = time.perf_counter() - t0 - t_rollout - t_logprob
    every = {k: np.concatenate([r.scores[k] for r in seen]) for k in seen[0].scores}
    all_lengths = np.concatenate([r.lengths for r in seen])
    metrics = {k: means.pop(k) for k in UPDATE_METRICS[:6]}     # the progress line shows 8
    metrics.update(
        reward_mean=float(every["reward"].mean()), reward_std=float(every["reward"].std()),
        accuracy=float(every["accuracy"].mean()), format_rate=float(every["format"].mean()),
        reward_errors=int(every["error"].sum()),
        response_length=float(all_lengths.mean()),
        rollout_tokens_per_s=int(all_lengths.sum()) / max(t_rollout, 1e-9),
        time_rollout_s=t_rollout, time_logprob_s=t_logprob, time_update_s=t_update, **means,
        **extra)
    return metrics


def train_grpo(config, workdir) -> Run:
    """Stage 2: GRPO with a frozen reference model (the initial policy); returns the run."""
    if not config.train.freeze_vision:     # the update reads the rollout's features as inputs
        raise ValueError("train.freeze_vision=False: GRPO trains with the vision tower frozen "
                         "(its updates take the rollout's video features, so the tower would get "
                         "no gradient, only weight decay); train it in the SFT stage")
    settings.reward_style(config)          # a bad style is a config error before any work
    dynamic_sampling(config)               # so are bad rl.dynamic_* settings
    check_reward_fn(config)                # and a reward_fn that does not resolve
    ref_dtype = settings.reference_dtype(config)   # and a bad rl.reference_dtype
    run = setup(config, workdir, mode="rl")
    run_reward_fn(run)                     # the judge (if any) loads before the first rollout
    ref, _, _ = settings.load_model(config, config.init_checkpoint, run.mesh,
                                    param_dtype=ref_dtype)
    sampler = Sampler.for_tokenizer(run.model, run.mesh, run.tokenizer,
                                    rules=run.layout.table)
    loop(run, lambda r, b: grpo_step(r, b, ref, sampler), what="grpo")
    return run
