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
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from lvr_jax.data.dataset import DataConfig, load_records, make_iter_dataset
from lvr_jax.data.video import Preprocessor
from lvr_jax.eval.video_qa import evaluate, make_sampler, write_report
from lvr_jax.rl.grpo import filter_groups, group_advantages
from lvr_jax.rl.rewards import batch_rewards
from lvr_jax.rollout.sampler import Sampler, SamplingParams
from lvr_jax.train import steps
from lvr_jax.train.checkpoint import Checkpointer, install_sigterm_save
from lvr_jax.train.metrics import MetricsWriter
from lvr_jax.weights import hf
from sharding.frame_parallel import vision_features
from sharding.mesh import make_mesh, rules_from_strings
from sharding.multihost import batch_rows, gather_json, gather_rows, put_batch, put_replicated

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay, global-norm clipping, non-finite skipping, accumulation.
    `total_steps` counts training steps; with `grad_accum_steps` = k the schedule (and
    `warmup_steps`) counts optimizer updates, one per k steps."""
    updates = max(1, total_steps // max(1, optim.grad_accum_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, optim.lr, max(1, min(optim.warmup_steps, updates - 1)), max(updates, 2),
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
    step sees the same placements (no recompile after the first update, restorable shardings,
    and global arrays when the mesh spans processes)."""
    state = nnx.state(module)
    placed = jax.tree.map(lambda x: x if len(x.sharding.device_set) == mesh.size
                          else put_replicated(x, mesh), state)
    nnx.update(module, placed)


def say(message: str) -> None:
    """Print a progress line (process 0 only)."""
    if jax.process_index() == 0:
        print(message, flush=True)


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


BATCH_AXES = {"frames": ("batch", "frames"), "input_ids": ("batch",),
              "attention_mask": ("batch",), "loss_mask": ("batch",)}


def device_batch(run: "Run", batch: dict) -> dict:
    """The array fields of this process's rows of a batch -> global arrays, rows over the batch
    axes and clips' frames over the frame axis (strings stay on the host)."""
    return {k: put_batch(batch[k], run.mesh, run.global_batch, run.rules, names=names)
            for k, names in BATCH_AXES.items() if k in batch}


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
    global_batch: int = 1                 # prompts per step over all processes
    shard: tuple[int, int] = (0, 1)       # this process's block of the batch (multihost.batch_rows)
    rules: dict | None = None


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
    rules = sharding_rules(config)
    global_batch = int(config.data.pipeline.batch_size)
    shard = batch_rows(mesh, global_batch, rules)
    local_batch = global_batch // shard[1]
    data_cfg = data_config(config, mode=mode, num_epochs=None, batch_size=local_batch)
    train_files = data_files(config, "train")
    records = load_records(train_files, on_error=data_cfg.on_error)
    say(f"[data] {len(records)} training items from {train_files}")
    pre = Preprocessor.from_pretrained(Path(config.init_checkpoint) / "vision_tower")
    data = make_iter_dataset(records, data_cfg, tok, pre, shard_index=shard[0],
                             shard_count=shard[1], block=local_batch)
    if shard[1] > 1:
        log.info("process %d feeds batch rows block %d of %d (%d of %d prompts per step)",
                 jax.process_index(), shard[0], shard[1], local_batch, global_batch)
    run = Run(config, workdir, mesh, model, tok, optimizer,
              Checkpointer(workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints),
              MetricsWriter(str(workdir)), data, iter(data), 0,
              put_replicated(jax.random.key(config.train.seed), mesh), global_batch, shard, rules)
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
    data_state = got.data_state
    if isinstance(data_state, dict) and "processes" in data_state:
        states = data_state["processes"]
        if len(states) == jax.process_count():
            data_state = states[jax.process_index()]
        else:
            log.warning("checkpoint step %d was written by %d processes, this run has %d: the data "
                        "iterator starts from the beginning", got.step, len(states),
                        jax.process_count())
            data_state = None
    if data_state is not None:
        run.data_iter.set_state(data_state)
    log.info("resumed from %s at step %d", run.ckpt.directory, got.step)
    say(f"[train] resumed from checkpoint step {got.step} in {run.workdir / 'checkpoints'}")


def save(run: Run, *, force: bool = False) -> None:
    """Checkpoint the step (every process calls it); the data state of every process is kept."""
    data_state = {"processes": gather_json(run.data_iter.get_state())}
    run.ckpt.save(run.step, params=nnx.state(run.model, nnx.Param),
                  opt_state=nnx.state(run.optimizer, nnx.optimizer.OptState), rng=run.rng,
                  data_state=data_state, force=force)


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


def eta(done: int, total: int, elapsed: float, *, start: int = 0, unit: str = "step") -> str:
    """'40/200 (20%, 1.20 s/step, eta 3m12s)' for a progress line; `elapsed` seconds were spent
    on the items after `start` (a resumed run)."""
    rate = elapsed / max(done - start, 1)
    left = int(rate * (total - done))
    return (f"{done}/{total} ({100 * done // max(total, 1)}%, {rate:.2f} s/{unit}, "
            f"eta {left // 60}m{left % 60:02d}s)")


class StopRequest:
    """SIGTERM / SIGINT in a multi-process run: every process checks at each step boundary
    whether any process was asked to stop; then all save one checkpoint together and exit
    (a save is collective, so it cannot run inside one process's signal handler)."""

    def __init__(self):
        self.asked = False
        self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handler(self, signum, _frame):
        log.warning("received signal %d: saving a checkpoint at the end of this step", signum)
        self.asked = True

    def agreed(self) -> bool:
        return bool(np.any(multihost_utils.process_allgather(np.asarray([self.asked]))))

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def trace_dir(run: Run) -> Path:
    """Where the XLA trace goes (one subfolder per process in multi-process runs)."""
    base = run.workdir / "trace"
    return base / f"process_{jax.process_index()}" if jax.process_count() > 1 else base


def loop(run: Run, step_fn, *, what: str) -> list[dict]:
    """Run `step_fn(run, batch) -> metrics` until train.steps; checkpoint, log, profile."""
    cfg = run.config
    total = int(cfg.train.steps)
    if jax.process_count() > 1:
        stop = StopRequest()
        uninstall = stop.uninstall
    else:
        stop = None
        uninstall = install_sigterm_save(lambda: (save(run, force=True),
                                                  run.ckpt.wait_until_finished()))
    prof = cfg.profile
    rows = []
    first, t_start = run.step, time.perf_counter()
    say(f"[{what}] steps {run.step}..{total}: checkpoints every {cfg.train.checkpoint_every} in "
        f"{run.ckpt.directory}, metrics in {run.writer.path}")
    try:
        while run.step < total:
            if prof.num_steps and run.step == prof.start_step:
                jax.profiler.start_trace(str(trace_dir(run)), create_perfetto_trace=True)
            batch = next(run.data_iter)
            t0 = time.perf_counter()
            with jax.profiler.StepTraceAnnotation(what, step_num=run.step):
                # block: the update is dispatched asynchronously, and the step time should count
                # its compute, not just the dispatch
                metrics = jax.block_until_ready(step_fn(run, batch))
            run.step += 1
            check_finite(run, metrics)
            metrics["step_time_s"] = time.perf_counter() - t0
            metrics["data_skipped"] = getattr(run.data_iter, "skipped", 0)
            rows.append(run.writer.write(run.step, metrics))
            if prof.num_steps and run.step == prof.start_step + prof.num_steps:
                jax.profiler.stop_trace()
                say(f"[train] XLA trace (xplane + perfetto) of steps {prof.start_step}.."
                    f"{run.step - 1} in {trace_dir(run)}")
            if run.step % cfg.train.log_every == 0 or run.step == total:
                shown = {k: v for k, v in rows[-1].items() if isinstance(v, float)}
                progress = eta(run.step, total, time.perf_counter() - t_start, start=first)
                say(f"[{what}] step {progress} "
                    + " ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:8]))
            if run.step % cfg.train.checkpoint_every == 0 or run.step == total:
                save(run)
            if stop is not None and run.step < total and stop.agreed():
                save(run, force=True)
                run.ckpt.wait_until_finished()
                say(f"[{what}] stopped by a signal at step {run.step}; checkpoint saved in "
                    f"{run.ckpt.directory}")
                raise SystemExit(0)
    finally:
        run.ckpt.wait_until_finished()
        uninstall()
    say(f"[{what}] done: checkpoints in {run.ckpt.directory}, metrics in {run.writer.path}")
    return rows


# ---------------------------------------------------------------------------------------------
# SFT


def batch_features(model, frames, mesh=None):
    """Vision features [B, T, N, C] of a batch of clips [B, T, H, W, 3], frame-parallel."""
    return jnp.stack([vision_features(model.vision, f, mesh=mesh) for f in frames])


@functools.partial(nnx.jit, static_argnames=("mesh", "freeze_vision"),
                   donate_argnames=("model", "optimizer"))
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
    b = device_batch(run, batch)
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


@functools.partial(nnx.jit, static_argnames=("mesh",), graph_updates=False)
def encode_batch(model, frames, mesh=None):
    """Vision features of every prompt's frames, computed once per step (frozen tower)."""
    return batch_features(model, frames, mesh)


@functools.partial(nnx.jit, static_argnames=("multiple",), graph_updates=False)
def make_prompts(model, feats, ids, attn, multiple):
    return steps.rollout_prompts(model, feats, ids, attn, multiple)


@functools.partial(nnx.jit, static_argnames=("temperature", "multiple", "mesh"), graph_updates=False)
def logprobs_under(model, feats, ids, attn, responses, temperature, multiple, mesh=None):
    """log p of the responses under `model` (the reference, or the policy for recomputed old
    log-probs), prompt run once per group."""
    return steps.group_logprobs(model, feats, ids, attn, responses, temperature=temperature,
                                multiple=multiple, mesh=mesh)


@functools.partial(nnx.jit, static_argnames=("rl", "multiple", "mesh"),
                   donate_argnames=("model", "optimizer"))
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


def local_rewards(run: Run, batch: dict, tokens, lengths) -> dict:
    """Rewards of this process's prompts' G responses each, gathered into the whole batch's
    {"reward", "accuracy", "format"} [B * G] on every process."""
    rl = run.config.rl
    index, count = run.shard
    rows = slice(index * tokens.shape[0] // count, (index + 1) * tokens.shape[0] // count)
    texts = run.tokenizer.batch_decode([t[:n] for t, n in zip(tokens[rows], lengths[rows])],
                                       skip_special_tokens=True)
    scores = batch_rewards(texts, list(batch["answer"]), accuracy_weight=rl.accuracy_weight,
                           format_weight=rl.format_weight)
    return {k: gather_rows(np.asarray(scores[k]), run.shard) for k in ("reward", "accuracy", "format")}


def grpo_step(run: Run, batch: dict, ref, sampler: Sampler) -> dict:
    """Rollout G responses per prompt, score, reference log-probs, one policy update. Phases are
    named in profiler traces: encode, prefill, decode (sampler), reward, logprob, update."""
    rl = run.config.rl
    g = int(rl.group_size)
    b = device_batch(run, batch)
    t0 = time.perf_counter()
    multiple = sampler.pad_multiple
    with jax.profiler.TraceAnnotation("encode"):
        feats = encode_batch(run.model, b.pop("frames"), mesh=run.mesh)    # frames freed here
        x, mask = make_prompts(run.model, feats, b["input_ids"], b["attention_mask"], multiple)
    params = SamplingParams(int(rl.max_new_tokens), float(rl.temperature), float(rl.top_p),
                            int(rl.top_k), g)
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
    settings = RLSettings(float(rl.temperature), float(rl.clip_low), float(rl.clip_high),
                          float(rl.beta), str(rl.loss_agg))
    with jax.profiler.TraceAnnotation("logprob"):
        ref_lp = logprobs_under(ref, feats, b["input_ids"], b["attention_mask"], responses,
                                settings.temperature, multiple, mesh=run.mesh)
        ref_lp = ref_lp.reshape(tokens.shape)
        old = old_lp
        if rl.recompute_old_logprobs:
            old = logprobs_under(run.model, feats, b["input_ids"], b["attention_mask"], responses,
                                 settings.temperature, multiple, mesh=run.mesh).reshape(tokens.shape)
        jax.block_until_ready(ref_lp)
    t_logprob = time.perf_counter() - t0 - t_rollout
    with jax.profiler.TraceAnnotation("update"):
        metrics = grpo_update(run.model, run.optimizer, feats, b["input_ids"], b["attention_mask"],
                              responses, resp_mask, old, ref_lp, adv, settings, multiple,
                              mesh=run.mesh)
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
    sampler = make_sampler(run.model, run.mesh, run.tokenizer)
    loop(run, lambda r, b: grpo_step(r, b, ref, sampler), what="grpo")
    return run


def export(run: Run, path) -> Path:
    """Write the trained model as a VILA-layout HF checkpoint (with the tokenizer)."""
    out = hf.save_hf(run.model, path, tokenizer=run.tokenizer, overwrite=True)
    say(f"[train] exported HF checkpoint to {out}")
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
    total = len(records) if limit is None else min(limit, len(records))
    t0 = time.perf_counter()

    def progress(done: int, correct: int) -> None:
        say(f"[eval] {name}: {eta(done, total, time.perf_counter() - t0, unit='item')} "
            f"accuracy so far {correct / max(done, 1):.3f}")

    result = evaluate(model, tok, batches, mesh=mesh, max_new_tokens=int(config.eval.max_new_tokens),
                      features_fn=lambda m, f: encode_batch(m, f, mesh=mesh),
                      prompt_fn=make_prompts, limit=limit, on_batch=progress)
    md_path = Path(out_dir) / f"{name}.md"
    if jax.process_index() == 0:
        _, md_path = write_report(result, out_dir, name)
    say(f"[eval] {checkpoint} on {split}: accuracy {result['accuracy']:.3f} over {result['n']} "
        f"(format {result['format_rate']:.3f}); report {md_path}")
    return result
