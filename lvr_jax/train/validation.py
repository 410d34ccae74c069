"""Validation during training: every `eval.every` steps (and at the last step) the loop answers the
validation split (as `evaluate`: greedy unless eval.temperature > 0) with the model it trains,
logs the accuracy with the step's metrics, and keeps the best validated params apart from the
keep-N training checkpoints.

Config (`eval` section): `every` (steps; 0 = off), `num_examples` (0 = the whole split; N = a fixed
subset of N items, the same every time: `fixed_subset`), `split`, `batch_size`, `max_new_tokens`;
the headline accuracy is `rl.reward_style`'s. Works the same for SFT and GRPO (`train.loop.loop`
calls it), for 1..N processes, and across resumes.

Layering: train -> `lvr_jax.eval.accuracy`, which imports nothing from `lvr_jax.train` (no cycle).
Its `evaluate` is what `lvr_jax.eval.video_qa.evaluate_checkpoint` runs, and that function builds its
batches with `validation_batches` here (eval -> train), so a checkpoint on disk and the model in
training are scored by the same code.

Metrics (`validation_metrics`), merged into the step's row (one row per step in metrics.jsonl and
TensorBoard):
  val_accuracy, val_format_rate                   the headline reward style
  val_accuracy_<style>, val_format_rate_<style>   every style of `lvr_jax.rl.rewards.REWARD_STYLES`
  val_accuracy/<category>, val_format_rate/<category>
                                                  per problem_type (the records' category), headline
  val_n, val_time_s                               items scored, seconds the validation took

Best checkpoint (`BestCheckpoint`): a validation whose headline accuracy beats every earlier one of
this workdir (strictly: a tie keeps the earlier step) saves the params alone (no optimizer state) as
an orbax checkpoint `<workdir>/best/<k>/` (k counts the saves; keep 1: the previous best is deleted
once the new one is committed), then writes `<workdir>/best.json` = {"step", "val_accuracy",
"reward_style", "val_accuracy_by_style", "val_format_rate", "val_n", "checkpoint"} ("checkpoint"
relative to the workdir; without a usable best.json the latest complete `best/<k>` is read back
from its own metadata). A separate
params checkpoint rather than a protected training checkpoint: the best step need not be a
`checkpoint_every` step, and the training keep-N stays what it says. Use it with
`launch/convert_checkpoint.py --to=hf --src=<workdir>/best --like=<init checkpoint> --dst=DIR` or
`lvr_jax.train.checkpoint.restore_params(<workdir>/best, target)`. best.json is written only after
its checkpoint is committed, and read back on resume (trusted only when the checkpoint it names is
complete): it is the best of every validation run in this workdir, one by a killed run after the
restored step included (that step is redone and validated again; a tie keeps the first).

Multi-process: every process runs the evaluation on the whole subset (collective decode, the same
result everywhere), process 0's "better" is broadcast, every process takes part in the save,
process 0 writes best.json (and the metrics).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from lvr_jax.data.dataset import make_iter_dataset
from lvr_jax.data.records import load_records
from lvr_jax.data.video import Preprocessor
from lvr_jax.eval.accuracy import evaluate
from lvr_jax.rollout.sampler import Sampler
from lvr_jax.train import settings
from lvr_jax.train.checkpoint import COMMIT_FILE, Checkpointer
from lvr_jax.train.metrics import say
from lvr_jax.weights.io import atomic_write

log = logging.getLogger(__name__)

BEST_FILE = "best.json"
BEST_DIR = "best"
SUBSET_SEED = 0


def fixed_subset(records: list, n: int, seed: int = SUBSET_SEED) -> list:
    """`n` records picked with a fixed seed, in file order (all of them for n <= 0 or n >= the
    count): the same items at every validation, on every process, after every resume; spread over
    the file, so a file sorted by category still gives every category its share."""
    if n <= 0 or n >= len(records):
        return list(records)
    keep = np.sort(np.random.default_rng(seed).permutation(len(records))[:n])
    return [records[i] for i in keep]


def validation_batches(config, tokenizer, vision_tower, *, split: str | None = None,
                       num_examples: int = 0, records=None):
    """(records, dataset) of a split of the config's data for `evaluate`: RL-mode prompts, one
    pass in file order, `eval.batch_size` items per batch, the last batch short; every process
    reads every item (shard (0, 1)); frames always decoded (a training feature cache is not
    used: `evaluate` encodes the frames). `iter(dataset)` starts a fresh pass over the same items.
    `records`: the split's records when the caller has loaded them already."""
    no_cache = {"feature_cache": ""} if config.data.pipeline.get("feature_cache") else {}
    dcfg = settings.data_config(config, mode="rl", num_epochs=1, shuffle=False,
                                drop_remainder=False, batch_size=int(config.eval.batch_size),
                                **no_cache)
    if records is None:
        records = load_records(settings.data_files(config, split or config.eval.split),
                               on_error=dcfg.on_error)
    records = fixed_subset(records, num_examples)
    pre = Preprocessor.from_pretrained(Path(vision_tower))
    return records, make_iter_dataset(records, dcfg, tokenizer, pre, shard_index=0, shard_count=1)


def validation_metrics(result: dict) -> dict:
    """The metrics of an `evaluate` result (the keys are listed in the module docstring)."""
    out = {"val_accuracy": result["accuracy"], "val_format_rate": result["format_rate"]}
    out.update({f"val_accuracy_{s}": v for s, v in result["accuracy_by_style"].items()})
    out.update({f"val_format_rate_{s}": v for s, v in result["format_rate_by_style"].items()})
    out.update({f"val_accuracy/{c}": r["accuracy"] for c, r in result["per_category"].items()})
    out.update({f"val_format_rate/{c}": r["format_rate"] for c, r in result["per_category"].items()})
    out["val_n"] = int(result["n"])
    return out


def agreed(flag: bool) -> bool:
    """Process 0's `flag` on every process."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def write_json_atomic(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


class BestCheckpoint:
    """The best validated params of a workdir: `<workdir>/best/<k>/` + `<workdir>/best.json`."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.path = self.workdir / BEST_FILE
        self.ckpt = Checkpointer(self.workdir / BEST_DIR, max_to_keep=1)
        self.record = self._load()

    def _load(self) -> dict | None:
        """best.json when it names a complete checkpoint (its path relative to the workdir, so
        a moved workdir keeps it; older files hold it absolute), else what the latest complete
        `best/<k>` says of itself (a kill between its commit and best.json's rewrite, or a
        lost best.json)."""
        if self.path.exists():
            try:
                record = json.loads(self.path.read_text())
                if (self.workdir / record["checkpoint"] / COMMIT_FILE).is_file():
                    return record
                log.warning("%s names %s, which is not a complete checkpoint", self.path,
                            record["checkpoint"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring %s: %s", self.path, e)
        k = self.ckpt.latest_step()
        if k is None:
            return None
        extra = self.ckpt.meta(k).get("extra", {})
        if "val_accuracy" not in extra:
            return None
        log.warning("best params from %s/%d (step %s, val_accuracy %s)", BEST_DIR, k,
                    extra.get("train_step"), extra["val_accuracy"])
        return {"step": extra.get("train_step"), "val_accuracy": extra["val_accuracy"],
                "checkpoint": f"{BEST_DIR}/{k}"}

    @property
    def accuracy(self) -> float | None:
        return None if self.record is None else float(self.record["val_accuracy"])

    def offer(self, step: int, result: dict, params) -> bool:
        """Keep `params` (validated at `step` with `result`) when they beat the best so far;
        collective (every process calls it). Returns whether they did."""
        if not agreed(self.accuracy is None or result["accuracy"] > self.accuracy):
            return False
        k = (self.ckpt.latest_step() or 0) + 1
        self.ckpt.save(k, params=params, extra={"train_step": int(step),
                                                "val_accuracy": result["accuracy"]})
        self.ckpt.wait_until_finished()            # best.json only names committed checkpoints
        self.record = {"step": int(step), "val_accuracy": result["accuracy"],
                       "reward_style": result["reward_style"],
                       "val_accuracy_by_style": result["accuracy_by_style"],
                       "val_format_rate": result["format_rate"], "val_n": int(result["n"]),
                       "checkpoint": f"{BEST_DIR}/{k}"}      # relative to the workdir
        if jax.process_index() == 0:
            write_json_atomic(self.path, self.record)
        return True

    def close(self) -> None:
        self.ckpt.close()


class Validator:
    """What the loop calls at the steps `due` says: `validator(run) -> metrics`."""

    def __init__(self, run, what: str):
        cfg = run.config
        self.what, self.every = what, int(cfg.eval.get("every", 0) or 0)
        num = int(cfg.eval.get("num_examples", 0) or 0)
        if self.every < 0 or num < 0:
            raise ValueError(f"eval.every and eval.num_examples must be >= 0 (0: off / the whole "
                             f"split), got {self.every} and {num}")
        self.reward_style = settings.reward_style(cfg)
        self.max_new_tokens = int(cfg.eval.max_new_tokens)
        self.sampling = settings.eval_sampling(cfg)               # checked before any step runs
        split = cfg.eval.split
        self.records, self.data = validation_batches(
            cfg, run.tokenizer, Path(cfg.init_checkpoint) / "vision_tower", num_examples=num)
        if not self.records:
            raise ValueError(f"eval.every={self.every} but the {split!r} split "
                             f"({settings.data_files(cfg, split)}) has no items")
        self.sampler = Sampler.for_tokenizer(run.model, run.mesh, run.tokenizer,
                                             rules=run.layout.table)
        self.best = BestCheckpoint(run.workdir)
        best = ("" if self.best.record is None else
                f"; best so far {self.best.accuracy:.3f} at step {self.best.record['step']}")
        how = self.sampling
        how = ("greedy" if not how["temperature"] else
               f"temperature {how['temperature']}, top_p {how['top_p']}, seed {how['seed']}")
        say(f"[{what}] validation every {self.every} steps and at the end: {len(self.records)} "
            f"{split} items, {how}, {self.max_new_tokens} new tokens, {self.reward_style} "
            f"accuracy{best}")

    @classmethod
    def of(cls, run, what: str) -> Validator | None:
        """A Validator when `eval.every` > 0, else None."""
        return cls(run, what) if int(run.config.eval.get("every", 0) or 0) else None

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def __call__(self, run) -> dict:
        t0 = time.perf_counter()
        batches = iter(self.data)
        try:
            result = evaluate(run.model, run.tokenizer, batches, layout=run.layout,
                              max_new_tokens=self.max_new_tokens, reward_style=self.reward_style,
                              sampler=self.sampler, **self.sampling)
        finally:
            getattr(batches, "close", lambda: None)()
        metrics = validation_metrics(result)
        metrics["val_time_s"] = time.perf_counter() - t0
        better = self.best.offer(run.step, result, nnx.state(run.model, nnx.Param))
        by_style = ", ".join(f"{s} {v:.3f}" for s, v in result["accuracy_by_style"].items())
        mark = (f"new best, params in {self.best.record['checkpoint']}" if better else
                f"best {self.best.accuracy:.3f} at step {self.best.record['step']}")
        say(f"[{self.what}] validation at step {run.step}: accuracy {result['accuracy']:.3f} "
            f"({self.reward_style}; {by_style}), format {result['format_rate']:.3f}, "
            f"n={result['n']}, {metrics['val_time_s']:.1f}s; {mark}")
        return metrics

    def close(self) -> None:
        self.best.close()
