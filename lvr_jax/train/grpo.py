"""Stage 2, GRPO: one step = encode -> rollout -> rewards -> reference log-probs -> update.

Data flow of `grpo_step` (ARCHITECTURE.md): the clips' vision features are computed once
(`models.vlm.encode_batch`, frame-parallel) and spliced into left-padded prompts
(`models.vlm.make_prompts`); the sampler prefills each prompt once and decodes G branches against
the shared prefix (`rollout.sampler`); rewards and group advantages on the host (`rl.rewards`,
`rl.grpo`); the frozen reference and the update run the same shared-prefix forward
(`rl.policy`: prompt once per group, responses as branches) on the cached features.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lvr_jax.models.vlm import encode_batch, make_prompts
from lvr_jax.rl.grpo import filter_groups, group_advantages
from lvr_jax.rl.policy import group_logprobs, grpo_step_loss
from lvr_jax.rl.rewards import batch_rewards
from lvr_jax.rollout.sampler import Sampler
from lvr_jax.train import settings
from lvr_jax.train.loop import loop
from lvr_jax.train.state import Run, setup
from sharding.mesh import UNSHARDED
from sharding.multihost import gather_rows


@functools.partial(nnx.jit, static_argnames=("temperature", "layout"), graph_updates=False)
def logprobs_under(model, feats, ids, attn, responses, temperature, layout=UNSHARDED):
    """log p of the responses under `model` (the reference, or the policy for recomputed old
    log-probs), prompt run once per group."""
    return group_logprobs(model, feats, ids, attn, responses, temperature=temperature,
                          layout=layout)


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
                settings, layout=UNSHARDED, rows=None, on_policy=False):
    """One optimizer step on the GRPO loss (`GRPOSettings` `settings`) of a rollout batch, or of
    its prompts `rows` (a PPO minibatch: all G samples of each). `on_policy`: the policy has not
    changed since the rollout, so old = the policy's own log-probs (ratio exactly 1) and
    `old_lp` is not read."""
    if rows is not None:
        feats, ids, attn, responses, resp_mask, old_lp, ref_lp, adv = minibatch(
            rows, feats, ids, attn, responses, resp_mask, old_lp, ref_lp, adv)

    def loss_fn(model):
        return grpo_step_loss(model, feats, ids, attn, responses, resp_mask,
                              None if on_policy else old_lp, ref_lp, adv, settings=settings,
                              layout=layout)

    (loss, metrics), grads = nnx.value_and_grad(
        loss_fn, has_aux=True, argnums=nnx.DiffState(0, optimizer.wrt))(model)
    optimizer.update(model, grads)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    return metrics


UPDATE_METRICS = ("loss", "policy_loss", "kl", "clip_frac", "entropy", "grad_norm",
                  "dual_clip_frac", "ratio_mean")


def ppo_updates(model, optimizer, feats, ids, attn, responses, resp_mask, old_lp, ref_lp, adv,
                settings, *, layout=UNSHARDED, minibatches: int = 1, seed: int = 0) -> list[dict]:
    """The optimizer steps on one rollout of P prompts x G samples: one step on all of it, or
    `minibatches` M steps on its prompts shuffled (by `seed`) into M equal minibatches (all G
    samples of a prompt together, so each minibatch keeps the shared prefix). The first
    minibatch is on-policy (ratio exactly 1); the later ones compare with `old_lp`, the policy's
    log-probs before the first step, so their ratios move off 1 and clipping acts. Returns each
    step's metrics."""
    if minibatches == 1:
        return [grpo_update(model, optimizer, feats, ids, attn, responses, resp_mask, old_lp,
                            ref_lp, adv, settings, layout=layout)]
    order = minibatch_order(responses.shape[0], minibatches, seed)
    return [grpo_update(model, optimizer, feats, ids, attn, responses, resp_mask, old_lp, ref_lp,
                        adv, settings, layout=layout, rows=rows, on_policy=m == 0)
            for m, rows in enumerate(order)]


def minibatch_order(prompts: int, minibatches: int, seed: int) -> np.ndarray:
    """int32 [minibatches, prompts / minibatches]: the prompts of each minibatch, shuffled."""
    if prompts % minibatches:
        raise ValueError(f"{prompts} prompts per rollout is not a multiple of {minibatches} "
                         f"minibatches")
    order = np.random.default_rng(seed).permutation(prompts)
    return order.reshape(minibatches, -1).astype(np.int32)


def local_rewards(run: Run, batch: dict, tokens, lengths) -> dict:
    """Rewards of this process's prompts' G responses each, gathered into the whole batch's
    {"reward", "accuracy", "format"} [B * G] on every process."""
    rl = run.config.rl
    index, count = run.shard
    rows = slice(index * tokens.shape[0] // count, (index + 1) * tokens.shape[0] // count)
    texts = run.tokenizer.batch_decode([t[:n] for t, n in zip(tokens[rows], lengths[rows])],
                                       skip_special_tokens=True)
    scores = batch_rewards(texts, list(batch["answer"]), style=settings.reward_style(run.config),
                           accuracy_weight=rl.accuracy_weight, format_weight=rl.format_weight)
    return {k: gather_rows(np.asarray(scores[k]), run.shard) for k in ("reward", "accuracy", "format")}


def grpo_step(run: Run, batch: dict, ref, sampler: Sampler) -> dict:
    """Rollout G responses per prompt, score, reference (and old) log-probs, `rl.ppo_minibatches`
    policy updates. Phases are named in profiler traces: encode, prefill, decode (sampler),
    reward, logprob, update. Update metrics are the mean over the minibatches."""
    rl = run.config.rl
    layout = run.layout
    params = settings.sampling_params(run.config)
    loss_settings = settings.grpo_settings(run.config)
    g = params.num_samples
    minibatches = settings.ppo_minibatches(run.config)
    b = run.device_batch(batch)
    t0 = time.perf_counter()
    with jax.profiler.TraceAnnotation("encode"):
        feats = encode_batch(run.model, b.pop("frames"), layout=layout)    # frames freed here
        x, mask = make_prompts(run.model, feats, b["input_ids"], b["attention_mask"],
                               layout.pad_multiple)
    seed = int(jax.random.randint(jax.random.fold_in(run.rng, run.step), (), 0, 2**30))
    tokens, old_lp, lengths = sampler.generate_padded(x, mask, params, seed=seed)
    with jax.profiler.TraceAnnotation("reward"):
        scores = local_rewards(run, batch, tokens, lengths)
        adv = np.asarray(group_advantages(scores["reward"], g))
        resp_mask = np.arange(tokens.shape[1])[None] < lengths[:, None]
        if rl.filter_groups:
            keep = np.asarray(filter_groups(scores["reward"], g, per_sample=True))
            resp_mask = resp_mask & keep[:, None]
    t_rollout = time.perf_counter() - t0
    responses = tokens.reshape(-1, g, tokens.shape[1])
    with jax.profiler.TraceAnnotation("logprob"):
        ref_lp = logprobs_under(ref, feats, b["input_ids"], b["attention_mask"], responses,
                                loss_settings.temperature, layout=layout).reshape(tokens.shape)
        old = old_lp
        if rl.recompute_old_logprobs or minibatches > 1:
            old = logprobs_under(run.model, feats, b["input_ids"], b["attention_mask"], responses,
                                 loss_settings.temperature, layout=layout).reshape(tokens.shape)
        jax.block_until_ready(ref_lp)
    t_logprob = time.perf_counter() - t0 - t_rollout
    with jax.profiler.TraceAnnotation("update"):
        steps = ppo_updates(run.model, run.optimizer, feats, b["input_ids"], b["attention_mask"],
                            responses, resp_mask, old, ref_lp, adv, loss_settings, layout=layout,
                            minibatches=minibatches, seed=seed + 1)
        steps = jax.block_until_ready([{k: m[k] for k in UPDATE_METRICS} for m in steps])
        means = {k: float(np.mean([float(m[k]) for m in steps])) for k in UPDATE_METRICS}
    t_update = time.perf_counter() - t0 - t_rollout - t_logprob
    n_tok = int(lengths.sum())
    metrics = {k: means.pop(k) for k in UPDATE_METRICS[:6]}     # the progress line shows 8
    metrics.update(
        reward_mean=float(scores["reward"].mean()), reward_std=float(scores["reward"].std()),
        accuracy=float(scores["accuracy"].mean()), format_rate=float(scores["format"].mean()),
        response_length=float(lengths.mean()), rollout_tokens_per_s=n_tok / max(t_rollout, 1e-9),
        time_rollout_s=t_rollout, time_logprob_s=t_logprob, time_update_s=t_update, **means)
    return metrics


def train_grpo(config, workdir) -> Run:
    """Stage 2: GRPO with a frozen reference model (the initial policy); returns the run."""
    settings.reward_style(config)          # a bad style is a config error before any work
    run = setup(config, workdir, mode="rl")
    ref, _, _ = settings.load_model(config, config.init_checkpoint, run.mesh)
    sampler = Sampler.for_tokenizer(run.model, run.mesh, run.tokenizer,
                                    rules=run.layout.table)
    loop(run, lambda r, b: grpo_step(r, b, ref, sampler), what="grpo")
    return run
