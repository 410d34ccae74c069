"""CoT-SFT and GRPO training loops: model + optimizer state, data, checkpoints, metrics.

Both loops: restore the latest complete checkpoint of `workdir` if there is one (params,
optimizer, step, RNG, data-iterator state), else start from `config.init_checkpoint`; save every
`train.checkpoint_every` steps and on SIGTERM; skip (and count) updates whose loss or gradients
are not finite and stop after `train.max_nonfinite` in a row; write metrics as JSONL and
TensorBoard scalars; profile `profile.num_steps` steps from `profile.start_step` when asked.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lvr_jax.data.dataset import DataConfig, load_records, make_iter_dataset
from lvr_jax.data.video import Preprocessor
from lvr_jax.eval.video_qa import evaluate, stop_ids, write_report
from lvr_jax.rl.grpo import filter_groups, group_advantages
from lvr_jax.rl.rewards import batch_rewards
from lvr_jax.rollout.sampler import Sampler, SamplingParams
from lvr_jax.train import steps
from lvr_jax.train.checkpoint import Checkpointer, install_sigterm_save
from lvr_jax.train.metrics import MetricsWriter
from lvr_jax.weights import hf
from sharding.frame_parallel import vision_features
from sharding.mesh import make_mesh, rules_from_strings

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay, global-norm clipping, non-finite skipping, accumulation."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, optim.lr, max(1, min(optim.warmup_steps, total_steps - 1)), max(total_steps, 2),
        end_value=optim.lr * optim.final_lr_fraction)
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                     optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                                 weight_decay=optim.weight_decay))
    tx = optax.apply_if_finite(tx, max_consecutive_errors=1 << 30)
    if optim.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum_steps)
    return tx


def trainable_filter(freeze_vision: bool):
    """Params that get gradients: everything, or everything but the vision tower."""
    if not freeze_vision:
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision")))


def nonfinite_counts(opt_state) -> tuple[int, int]:
    """(consecutive, total) skipped updates recorded by optax.apply_if_finite."""
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState)):
        if isinstance(s, optax.ApplyIfFiniteState):
            return int(s.notfinite_count), int(s.total_notfinite)
    return 0, 0


def replicate_stray_arrays(module, mesh) -> None:
    """Put arrays that live on one device (optimizer counters) replicated on the mesh, so every
    step sees the same placements (no recompile after the first update, restorable shardings)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = nnx.state(module)
    placed = jax.tree.map(lambda x: x if len(x.sharding.device_set) == mesh.size
                          else jax.device_put(x, replicated), state)
    nnx.update(module, placed)


def sharding_rules(config):
    """The logical-axis rules of a config (`config.sharding_rules`, DEFAULT_RULES when absent)."""
    table = config.get("sharding_rules")
    return rules_from_strings(table) if table else None


def load_model(config, checkpoint, mesh, **kw):
    """`hf.load_vlm` with the config's dtypes and sharding rules."""
    mc = config.model
    return hf.load_vlm(checkpoint, mesh=mesh, dtype=jnp.dtype(mc.dtype),
                       param_dtype=jnp.dtype(mc.param_dtype), rules=sharding_rules(config), **kw)


def data_files(config, split: str) -> str:
    """`data.<split>_files`, default `<data.dir>/<split>.jsonl`."""
    given = config.data.get(f"{split}_files", "")
    return given or str(Path(config.data.dir) / f"{split}.jsonl")


def data_config(config, **overrides) -> DataConfig:
    """The pipeline settings; the dataset root defaults to `data.dir`."""
    fields = dict(config.data.pipeline)
    fields["root"] = fields.get("root") or config.data.dir
    return DataConfig(**{**fields, **overrides})


def host_batch(batch: dict) -> dict:
    """The array fields of a data batch as jnp arrays (strings stay on the host)."""
    keys = ("frames", "input_ids", "attention_mask", "loss_mask")
    return {k: jnp.asarray(batch[k]) for k in keys if k in batch}


@dataclasses.dataclass
class Run:
    """Everything a loop needs; built by `setup`."""
    config: object
    workdir: Path
    mesh: object
    model: object
    tokenizer: object
    optimizer: nnx.Optimizer
    ckpt: Checkpointer
    writer: MetricsWriter
    data: object
    data_iter: object
    step: int = 0
    rng: jax.Array | None = None


def setup(config, workdir, *, mode: str) -> Run:
    """Mesh, model (latest checkpoint or init), optimizer, data iterator, checkpointer."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(dict(config.mesh))
    if not config.init_checkpoint:
        raise ValueError("set --config.init_checkpoint to a VILA-layout checkpoint folder")
    model, tok, _ = load_model(config, config.init_checkpoint, mesh, remat=config.model.remat)
    log.info("initial weights from %s", config.init_checkpoint)
    total = int(config.train.steps)
    optimizer = nnx.Optimizer(model, make_optimizer(config.optim, total),
                              wrt=trainable_filter(config.train.freeze_vision))
    replicate_stray_arrays(optimizer, mesh)
    data_cfg = data_config(config, mode=mode, num_epochs=None)
    records = load_records(data_files(config, "train"), on_error=data_cfg.on_error)
    pre = Preprocessor.from_pretrained(Path(config.init_checkpoint) / "vision_tower")
    data = make_iter_dataset(records, data_cfg, tok, pre)
    run = Run(config, workdir, mesh, model, tok, optimizer,
              Checkpointer(workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints),
              MetricsWriter(str(workdir)), data, iter(data), 0, jax.random.key(config.train.seed))
    restore(run)
    return run


def restore(run: Run) -> None:
    """Resume from the latest complete checkpoint in the workdir, if any."""
    if run.ckpt.latest_step() is None:
        return
    params = nnx.state(run.model, nnx.Param)
    opt_state = nnx.state(run.optimizer, nnx.optimizer.OptState)
    got = run.ckpt.restore_latest(params=params, opt_state=opt_state, rng=run.rng)
    nnx.update(run.model, got.params)
    nnx.update(run.optimizer, got.opt_state)
    run.step, run.rng = got.step, got.rng
    if got.data_state is not None:
        run.data_iter.set_state(got.data_state)
    log.info("resumed from %s at step %d", run.ckpt.directory, got.step)
    print(f"[train] resumed from checkpoint step {got.step} in {run.workdir / 'checkpoints'}",
          flush=True)


def save(run: Run, *, force: bool = False) -> None:
    run.ckpt.save(run.step, params=nnx.state(run.model, nnx.Param),
                  opt_state=nnx.state(run.optimizer, nnx.optimizer.OptState), rng=run.rng,
                  data_state=run.data_iter.get_state(), force=force)


def check_finite(run: Run, metrics: dict) -> None:
    """Count skipped non-finite updates into `metrics`; stop after train.max_nonfinite in a row."""
    check_finite_counts(run, nnx.state(run.optimizer, nnx.optimizer.OptState), metrics)


def check_finite_counts(run, opt_state, metrics: dict) -> None:
    consecutive, total = nonfinite_counts(opt_state)
    metrics["nonfinite_skipped"] = total
    if consecutive:
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d total)",
                    run.step, consecutive, total)
    if consecutive >= run.config.train.max_nonfinite:
        raise NonFiniteError(f"{consecutive} consecutive steps with a non-finite loss or "
                             f"gradient (last at step {run.step}); lower optim.lr or check data")


def loop(run: Run, step_fn, *, what: str) -> list[dict]:
    """Run `step_fn(run, batch) -> metrics` until train.steps; checkpoint, log, profile."""
    cfg = run.config
    total = int(cfg.train.steps)
    uninstall = install_sigterm_save(lambda: (save(run, force=True), run.ckpt.wait_until_finished()))
    prof = cfg.profile
    rows = []
    try:
        while run.step < total:
            if prof.num_steps and run.step == prof.start_step:
                jax.profiler.start_trace(str(run.workdir / "trace"), create_perfetto_trace=True)
            batch = next(run.data_iter)
            t0 = time.perf_counter()
            metrics = step_fn(run, batch)
            run.step += 1
            check_finite(run, metrics)
            metrics["step_time_s"] = time.perf_counter() - t0
            metrics["data_skipped"] = getattr(run.data_iter, "skipped", 0)
            rows.append(run.writer.write(run.step, metrics))
            if prof.num_steps and run.step == prof.start_step + prof.num_steps:
                jax.profiler.stop_trace()
                print(f"[train] XLA trace of steps {prof.start_step}..{run.step - 1} in "
                      f"{run.workdir / 'trace'}", flush=True)
            if run.step % cfg.train.log_every == 0 or run.step == total:
                shown = {k: v for k, v in rows[-1].items() if isinstance(v, float)}
                print(f"[{what}] step {run.step}/{total} " + " ".join(
                    f"{k}={v:.4g}" for k, v in list(shown.items())[:8]), flush=True)
            if run.step % cfg.train.checkpoint_every == 0 or run.step == total:
                save(run)
    finally:
        run.ckpt.wait_until_finished()
        uninstall()
    print(f"[{what}] done: checkpoints in {run.workdir / 'checkpoints'}, metrics in "
          f"{run.writer.path}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# SFT


def batch_features(model, frames, mesh=None):
    """Vision features [B, T, N, C] of a batch of clips [B, T, H, W, 3], frame-parallel."""
    return jnp.stack([vision_features(model.vision, f, mesh=mesh) for f in frames])


@functools.partial(nnx.jit, static_argnames=("mesh", "freeze_vision"))
def sft_update(model, optimizer, frames, ids, attn, loss_mask, mesh=None, freeze_vision=True):
    feats = batch_features(model, frames, mesh)
    if freeze_vision:
        feats = jax.lax.stop_gradient(feats)

    def loss_fn(model):
        return steps.sft_step_loss(model, feats, ids, attn, loss_mask, mesh=mesh)

    (loss, metrics), grads = nnx.value_and_grad(
        loss_fn, has_aux=True, argnums=nnx.DiffState(0, optimizer.wrt))(model)
    optimizer.update(model, grads)
    metrics["grad_norm"] = optax.global_norm(grads)
    return metrics


def sft_step(run: Run, batch: dict) -> dict:
    b = host_batch(batch)
    metrics = sft_update(run.model, run.optimizer, b["frames"], b["input_ids"],
                         b["attention_mask"], b["loss_mask"], mesh=run.mesh,
                         freeze_vision=bool(run.config.train.freeze_vision))
    return {k: metrics[k] for k in ("loss", "accuracy", "num_tokens", "grad_norm")}


def train_sft(config, workdir) -> Run:
    """Stage 1: long CoT-SFT."""
    run = setup(config, workdir, mode="sft")
    loop(run, sft_step, what="sft")
    return run


# ---------------------------------------------------------------------------------------------
# GRPO


@functools.partial(nnx.jit, static_argnames=("mesh",))
def encode_batch(model, frames, mesh=None):
    """Vision features of every prompt's frames, computed once per step (frozen tower)."""
    return batch_features(model, frames, mesh)


@functools.partial(nnx.jit, static_argnames=("multiple",))
def make_prompts(model, feats, ids, attn, multiple):
    return steps.rollout_prompts(model, feats, ids, attn, multiple)


@functools.partial(nnx.jit, static_argnames=("temperature", "multiple", "mesh"))
def logprobs_under(model, feats, ids, attn, responses, temperature, multiple, mesh=None):
    """log p of the responses under `model` (the reference, or the policy for recomputed old
    log-probs), prompt run once per group."""
    return steps.group_logprobs(model, feats, ids, attn, responses, temperature=temperature,
                                multiple=multiple, mesh=mesh)


@functools.partial(nnx.jit, static_argnames=("rl", "multiple", "mesh"))
def grpo_update(model, optimizer, feats, ids, attn, responses, resp_mask, old_lp, ref_lp, adv,
                rl, multiple, mesh=None):
    def loss_fn(model):
        return steps.grpo_step_loss(model, feats, ids, attn, responses, resp_mask, old_lp, ref_lp,
                                    adv, rl=rl, multiple=multiple, mesh=mesh)

    (loss, metrics), grads = nnx.value_and_grad(
        loss_fn, has_aux=True, argnums=nnx.DiffState(0, optimizer.wrt))(model)
    optimizer.update(model, grads)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    return metrics


@dataclasses.dataclass(frozen=True)
class RLSettings:
    """The hashable RL settings the compiled loss needs."""
    temperature: float
    clip_low: float
    clip_high: float
    beta: float
    loss_agg: str


def grpo_step(run: Run, batch: dict, ref, sampler: Sampler) -> dict:
    """Rollout G responses per prompt, score, reference log-probs, one policy update."""
    rl = run.config.rl
    g = int(rl.group_size)
    b = host_batch(batch)
    t0 = time.perf_counter()
    feats = encode_batch(run.model, b["frames"], mesh=run.mesh)
    multiple = sampler.pad_multiple
    x, mask = make_prompts(run.model, feats, b["input_ids"], b["attention_mask"], multiple)
    params = SamplingParams(int(rl.max_new_tokens), float(rl.temperature), float(rl.top_p),
                            int(rl.top_k), g)
    seed = int(jax.random.randint(jax.random.fold_in(run.rng, run.step), (), 0, 2**30))
    tokens, old_lp, lengths = sampler.generate_padded(x, mask, params, seed=seed)
    texts = run.tokenizer.batch_decode([t[:n] for t, n in zip(tokens, lengths)],
                                       skip_special_tokens=True)
    scores = batch_rewards(texts, list(batch["answer"]), accuracy_weight=rl.accuracy_weight,
                           format_weight=rl.format_weight)
    adv = np.asarray(group_advantages(scores["reward"], g))
    resp_mask = np.arange(tokens.shape[1])[None] < lengths[:, None]
    if rl.filter_groups:
        keep = np.asarray(filter_groups(scores["reward"], g, per_sample=True))
        resp_mask = resp_mask & keep[:, None]
    t_rollout = time.perf_counter() - t0
    responses = jnp.asarray(tokens.reshape(-1, g, tokens.shape[1]))
    settings = RLSettings(float(rl.temperature), float(rl.clip_low), float(rl.clip_high),
                          float(rl.beta), str(rl.loss_agg))
    ref_lp = logprobs_under(ref, feats, b["input_ids"], b["attention_mask"], responses,
                          settings.temperature, multiple, mesh=run.mesh)
    ref_lp = ref_lp.reshape(tokens.shape)
    old = jnp.asarray(old_lp)
    if rl.recompute_old_logprobs:
        old = logprobs_under(run.model, feats, b["input_ids"], b["attention_mask"], responses,
                           settings.temperature, multiple, mesh=run.mesh).reshape(tokens.shape)
    jax.block_until_ready(ref_lp)
    t_logprob = time.perf_counter() - t0 - t_rollout
    metrics = grpo_update(run.model, run.optimizer, feats, b["input_ids"], b["attention_mask"],
                          responses, jnp.asarray(resp_mask), old, ref_lp, jnp.asarray(adv),
                          settings, multiple, mesh=run.mesh)
    metrics = {k: metrics[k] for k in ("loss", "policy_loss", "kl", "clip_frac", "entropy",
                                       "grad_norm")}
    jax.block_until_ready(metrics)
    t_update = time.perf_counter() - t0 - t_rollout - t_logprob
    n_tok = int(lengths.sum())
    metrics.update(
        reward_mean=float(scores["reward"].mean()), reward_std=float(scores["reward"].std()),
        accuracy=float(scores["accuracy"].mean()), format_rate=float(scores["format"].mean()),
        response_length=float(lengths.mean()), rollout_tokens_per_s=n_tok / max(t_rollout, 1e-9),
        time_rollout_s=t_rollout, time_logprob_s=t_logprob, time_update_s=t_update)
    return metrics


def train_grpo(config, workdir) -> Run:
    """Stage 2: GRPO with a frozen reference model (the initial policy)."""
    run = setup(config, workdir, mode="rl")
    ref, _, _ = load_model(config, config.init_checkpoint, run.mesh)
    tok = run.tokenizer
    eos = stop_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    sampler = Sampler(run.model, run.mesh, eos_ids=eos, pad_id=int(pad))
    loop(run, lambda r, b: grpo_step(r, b, ref, sampler), what="grpo")
    return run


def export(run: Run, path) -> Path:
    """Write the trained model as a VILA-layout HF checkpoint (with the tokenizer)."""
    out = hf.save_hf(run.model, path, tokenizer=run.tokenizer, overwrite=True)
    print(f"[train] exported HF checkpoint to {out}", flush=True)
    return out



def evaluate_checkpoint(config, checkpoint, out_dir, *, split: str | None = None,
                        limit: int | None = None, name: str = "eval") -> dict:
    """Greedy multiple-choice accuracy of a VILA-layout checkpoint on a split; writes reports."""
    mesh = make_mesh(dict(config.mesh))
    model, tok, _ = load_model(config, checkpoint, mesh)
    split = split or config.eval.split
    dcfg = data_config(config, mode="rl", num_epochs=1, shuffle=False, drop_remainder=False,
                       batch_size=int(config.eval.batch_size))
    records = load_records(data_files(config, split), on_error=dcfg.on_error)
    pre = Preprocessor.from_pretrained(Path(checkpoint) / "vision_tower")
    batches = iter(make_iter_dataset(records, dcfg, tok, pre, shard_index=0, shard_count=1))
    result = evaluate(model, tok, batches, mesh=mesh, max_new_tokens=int(config.eval.max_new_tokens),
                      features_fn=lambda m, f: encode_batch(m, f, mesh=mesh),
                      prompt_fn=make_prompts, limit=limit)
    json_path, md_path = write_report(result, out_dir, name)
    print(f"[eval] {checkpoint} on {split}: accuracy {result['accuracy']:.3f} over {result['n']} "
          f"(format {result['format_rate']:.3f}); report {md_path}", flush=True)
    return result
