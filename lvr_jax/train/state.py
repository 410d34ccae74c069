"""Training state: model + optimizer on the mesh, the data iterator, checkpoints (`Run`).

`setup` restores the latest complete checkpoint of the workdir when there is one (params,
optimizer, step, RNG, every process's data-iterator state), else starts from
`config.init_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import optax
from flax import nnx

from lvr_jax.data.dataset import make_iter_dataset
from lvr_jax.data.records import load_records
from lvr_jax.data.video import Preprocessor
from lvr_jax.models.vlm import remat_setting
from lvr_jax.train import settings
from lvr_jax.train.checkpoint import Checkpointer
from lvr_jax.train.features import pipeline_fields
from lvr_jax.train.metrics import MetricsWriter, say
from lvr_jax.weights import hf
from sharding.mesh import Layout
from sharding.multihost import batch_rows, gather_json, put_batch, put_replicated

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


SCHEDULES = ("cosine", "constant")


def learning_rate(optim, updates: int) -> optax.Schedule:
    """`optim.schedule` over `updates` optimizer updates: "cosine" = linear warmup over
    `warmup_steps` (none for 0: the first update at `lr`), cosine decay to `final_lr_fraction`;
    "constant" = linear warmup (none for 0), then constant (Long-RL's)."""
    kind = optim.get("schedule", "cosine")
    if kind == "constant":
        if optim.warmup_steps <= 0:
            return optax.constant_schedule(optim.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, optim.warmup_steps),
                                     optax.constant_schedule(optim.lr)], [optim.warmup_steps])
    if kind != "cosine":
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {kind!r}")
    if optim.warmup_steps <= 0:      # the first update at the full rate
        return optax.cosine_decay_schedule(optim.lr, max(updates, 1),
                                           alpha=optim.final_lr_fraction)
    return optax.warmup_cosine_decay_schedule(
        0.0, optim.lr, max(1, min(optim.warmup_steps, updates - 1)), max(updates, 2),
        end_value=optim.lr * optim.final_lr_fraction)


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
    """AdamW on the `learning_rate` schedule, global-norm clipping, non-finite skipping,
    accumulation. `total_steps` counts update calls; with `grad_accum_steps` = k the schedule
    (and `warmup_steps`) counts optimizer updates, one per k calls."""
    updates = max(1, total_steps // max(1, optim.grad_accum_steps))
    schedule = learning_rate(optim, updates)
    mu_dtype = settings.storage_dtype(optim.get("mu_dtype", ""), "optim.mu_dtype")
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                     optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                                 weight_decay=optim.weight_decay, mu_dtype=mu_dtype))
    tx = optax.apply_if_finite(tx, max_consecutive_errors=1 << 30)
    if optim.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum_steps)
    return tx


def trainable_filter(freeze_vision: bool, freeze_projector: bool = False):
    """Params that get gradients: everything but the frozen towers (vision, projector)."""
    frozen = [name for name, on in (("vision", freeze_vision), ("projector", freeze_projector))
              if on]
    if not frozen:
        return nnx.Param
    return nnx.All(nnx.Param, *(nnx.Not(nnx.PathContains(name)) for name in frozen))


def nonfinite_counts(opt_state) -> tuple[int, int]:
    """(consecutive, total) skipped updates recorded by optax.apply_if_finite."""
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState)):
        if isinstance(s, optax.ApplyIfFiniteState):
            return int(s.notfinite_count), int(s.total_notfinite)
    return 0, 0


def check_finite_counts(step: int, opt_state, max_nonfinite: int, metrics: dict) -> None:
    """Count skipped non-finite updates into `metrics`; NonFiniteError after `max_nonfinite` in
    a row."""
    consecutive, total = nonfinite_counts(opt_state)
    metrics["nonfinite_skipped"] = total
    if consecutive:
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d total)",
                    step, consecutive, total)
    if consecutive >= max_nonfinite:
        raise NonFiniteError(f"{consecutive} consecutive steps with a non-finite loss or "
                             f"gradient (last at step {step}); lower optim.lr or check data")


def replicate_stray_arrays(module, mesh) -> None:
    """Put arrays that live on one device (optimizer counters) replicated on the mesh, so every
    step sees the same placements (no recompile after the first update, restorable shardings,
    and global arrays when the mesh spans processes)."""
    state = nnx.state(module)
    placed = jax.tree.map(lambda x: x if len(x.sharding.device_set) == mesh.size
                          else put_replicated(x, mesh), state)
    nnx.update(module, placed)


# Logical names of the leading dims of the batch fields that go to the devices.
BATCH_AXES = {"frames": ("batch", "frames"), "features": ("batch", "frames"),
              "input_ids": ("batch",),
              "attention_mask": ("batch",), "loss_mask": ("batch",), "num_frames": ("batch",)}


@dataclasses.dataclass
class Run:
    """Everything a training loop needs; built by `setup`."""
    config: object
    workdir: Path
    layout: Layout
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

    @property
    def mesh(self):
        return self.layout.mesh

    def device_batch(self, batch: dict) -> dict:
        """The array fields of this process's rows of a batch -> global arrays, rows over the
        batch axes and clips' frames over the frame axis (strings stay on the host)."""
        return {k: put_batch(batch[k], self.mesh, self.global_batch, self.layout.table,
                             names=names)
                for k, names in BATCH_AXES.items() if k in batch}

    def check_finite(self, metrics: dict) -> None:
        check_finite_counts(self.step, nnx.state(self.optimizer, nnx.optimizer.OptState),
                            self.config.train.max_nonfinite, metrics)


def setup(config, workdir, *, mode: str) -> Run:
    """Mesh, model (latest checkpoint or init), optimizer, data iterator, checkpointer."""
    settings.check_counts(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh, layout = settings.mesh_and_layout(config)
    if not config.init_checkpoint:
        raise ValueError("set --config.init_checkpoint to a VILA-layout checkpoint folder")
    model, tok, _ = settings.load_model(config, config.init_checkpoint, mesh,
                                        remat=remat_setting(config.model))
    log.info("initial weights from %s", config.init_checkpoint)
    optimizer = nnx.Optimizer(model, make_optimizer(config.optim, settings.update_calls(config,
                                                                                         mode)),
                              wrt=trainable_filter(config.train.freeze_vision,
                                                   config.train.get("freeze_projector", False)))
    replicate_stray_arrays(optimizer, mesh)
    global_batch = settings.prompts_per_step(config, mode)
    shard = batch_rows(mesh, global_batch, layout.table)
    local_batch = global_batch // shard[1]
    data_cfg = settings.data_config(config, mode=mode, num_epochs=None, batch_size=local_batch,
                                    **pipeline_fields(config, model, mode))
    train_files = settings.data_files(config, "train")
    records = load_records(train_files, on_error=data_cfg.on_error)
    say(f"[data] {len(records)} training items from {train_files}")
    pre = Preprocessor.from_pretrained(Path(config.init_checkpoint) / "vision_tower")
    data = make_iter_dataset(records, data_cfg, tok, pre, shard_index=shard[0],
                             shard_count=shard[1], block=local_batch)
    if shard[1] > 1:
        log.info("process %d feeds batch rows block %d of %d (%d of %d prompts per step)",
                 jax.process_index(), shard[0], shard[1], local_batch, global_batch)
    run = Run(config, workdir, layout, model, tok, optimizer,
              Checkpointer(workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints),
              MetricsWriter(str(workdir)), data, iter(data), 0,
              put_replicated(jax.random.key(config.train.seed), mesh), global_batch, shard)
    restore(run)
    return run


def restore(run: Run) -> None:
    """Resume from the latest complete checkpoint in the workdir, if any. The metrics of steps
    after it (logged by a run killed before its next checkpoint, to be redone now) are dropped
    from metrics.jsonl and TensorBoard (`MetricsWriter.drop_after`), so each step is logged
    once; `<workdir>/best.json` is kept (`lvr_jax.train.validation`)."""
    if run.ckpt.latest_step() is None:
        drop_metrics_after(run, 0)
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
    drop_metrics_after(run, got.step)


def drop_metrics_after(run: Run, step: int) -> None:
    """Process 0 forgets the metrics logged after `step` (steps the run is about to redo)."""
    dropped = run.writer.drop_after(step)
    if dropped:
        say(f"[train] {run.writer.path}: dropped {dropped} rows after step {step} (logged after "
            f"the last checkpoint; those steps are redone)")


def save(run: Run, *, force: bool = False) -> None:
    """Checkpoint the step (every process calls it); the data state of every process is kept."""
    data_state = {"processes": gather_json(run.data_iter.get_state())}
    run.ckpt.save(run.step, params=nnx.state(run.model, nnx.Param),
                  opt_state=nnx.state(run.optimizer, nnx.optimizer.OptState), rng=run.rng,
                  data_state=data_state, force=force)


def export(run: Run, path) -> Path:
    """Write the trained model as a VILA-layout HF checkpoint (with the tokenizer)."""
    out = hf.save_hf(run.model, path, tokenizer=run.tokenizer, overwrite=True)
    say(f"[train] exported HF checkpoint to {out}")
    return out
