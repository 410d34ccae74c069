"""A GRPO step's rollout: encode (or take cached features), sample G replies per prompt, score
them (`rl.reward_fn`, guarded), group advantages; and DAPO dynamic sampling, which rolls out
more batches until P groups pass the keep rule (`rl.dynamic_*`) and assembles them into one
rollout of static shape. Used by `train.grpo.grpo_step`."""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from lvr_jax.models.vlm import make_prompts
from lvr_jax.rl.grpo import group_advantages, keep_in_band
from lvr_jax.rollout.sampler import Sampler
from lvr_jax.train import settings
from lvr_jax.train.features import step_features
from lvr_jax.train.state import Run
from sharding.multihost import gather_rows

log = logging.getLogger(__name__)

def local_rewards(run: Run, batch: dict, tokens, lengths) -> dict:
    """Rewards of this process's prompts' G responses each (the run's `rl.reward_fn`, guarded:
    `lvr_jax.train.judge.run_reward_fn`), gathered into the whole batch's {"reward", "accuracy",
    "format", "error"} float32 [B * G] on every process; "error" is 1.0 where the reward function
    failed for the reply (scored 0), so `error.sum()` is the step's `reward_errors`."""
    from lvr_jax.rl.reward_fns import batch_records
    from lvr_jax.train.judge import run_reward_fn

    index, count = run.shard
    rows = slice(index * tokens.shape[0] // count, (index + 1) * tokens.shape[0] // count)
    texts = run.tokenizer.batch_decode([t[:n] for t, n in zip(tokens[rows], lengths[rows])],
                                       skip_special_tokens=True)
    group = len(texts) // max(len(batch["answer"]), 1)
    records = batch_records(batch, group, tokenizer=run.tokenizer,
                            template=run.config.data.pipeline.get("prompt_template"))
    scores = run_reward_fn(run)(texts, records)
    return {k: gather_rows(scores[k], run.shard) for k in ("reward", "accuracy", "format", "error")}


@dataclasses.dataclass(frozen=True)
class DynamicSampling:
    """`rl.dynamic_*`: DAPO dynamic sampling (see `train.grpo.grpo_step`)."""
    key: str = "reward"          # the per-sample score whose group mean is tested
    low: float = 0.01
    high: float = 0.99
    max_draws: int = 20          # rollouts per step at most, the first included


KEEP_KEYS = ("reward", "accuracy")


def dynamic_sampling(config) -> DynamicSampling | None:
    """The checked `rl.dynamic_*` settings; None when `rl.dynamic_sampling` is off."""
    rl = config.rl
    if not rl.get("dynamic_sampling", False):
        return None
    out = DynamicSampling(str(rl.get("dynamic_keep_key", "reward")),
                          float(rl.get("dynamic_low", 0.01)), float(rl.get("dynamic_high", 0.99)),
                          int(rl.get("dynamic_max_draws", 20)))
    if out.key not in KEEP_KEYS:
        raise ValueError(f"rl.dynamic_keep_key must be one of {KEEP_KEYS}, got {out.key!r}")
    if not out.low < out.high:
        raise ValueError(f"rl.dynamic_low={out.low} must be below rl.dynamic_high={out.high}")
    if out.max_draws < 1:
        raise ValueError(f"rl.dynamic_max_draws must be >= 1 (rollouts per step, the first "
                         f"included), got {out.max_draws}")
    return out


@dataclasses.dataclass
class Assembly:
    """Which groups of a step's draws the update sees. Groups are numbered over the draws in
    draw order (draw d's group i is d * P + i). `chosen` [needed]: the first `needed` kept groups
    in draw order, then, when fewer were kept, the first dropped groups in draw order (`filled`
    True for those)."""
    chosen: np.ndarray
    filled: np.ndarray
    draws: int          # rollouts
    drawn: int          # groups (prompts) rolled out
    kept: int           # of those, groups that satisfy the rule (may exceed `needed`)

    @property
    def dropped(self) -> int:
        return self.drawn - self.kept

    @property
    def groups_filled(self) -> int:
        return int(self.filled.sum())


def select_groups(keeps, needed: int) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, filled) of `Assembly` from the keep flags [P] of each draw so far."""
    flags = np.concatenate([np.asarray(k, bool) for k in keeps])
    if flags.size < needed:
        raise ValueError(f"{flags.size} groups drawn, {needed} needed")
    kept = np.flatnonzero(flags)[:needed]
    fill = np.flatnonzero(~flags)[:needed - kept.size]
    return (np.concatenate([kept, fill]).astype(np.int32),
            np.arange(needed) >= kept.size)


class Assembler:
    """Collects draws until `needed` groups satisfy the rule or `max_draws` rollouts were made,
    holding at most `needed` groups between draws: `add` returns, for the chosen groups after
    that draw, their rows in [the groups held, the new draw's] (the chosen set after a draw is
    always within those: kept groups only add up, and the fill shrinks to a prefix of the
    dropped groups already held)."""

    def __init__(self, needed: int, max_draws: int):
        self.needed, self.max_draws = needed, max_draws
        self.keeps: list[np.ndarray] = []
        self.held = np.zeros(0, np.int32)

    @property
    def kept(self) -> int:
        return int(sum(int(np.sum(k)) for k in self.keeps))

    @property
    def done(self) -> bool:
        return bool(self.keeps) and (self.kept >= self.needed or len(self.keeps) >= self.max_draws)

    def add(self, keep) -> np.ndarray:
        keep = np.asarray(keep, bool)
        start = sum(k.size for k in self.keeps)
        self.keeps.append(keep)
        chosen, _ = select_groups(self.keeps, self.needed)
        where = {int(g): i for i, g in enumerate(np.concatenate(
            [self.held, start + np.arange(keep.size)]))}
        rows = np.asarray([where[int(g)] for g in chosen], np.int32)    # KeyError: a bug
        self.held = chosen
        return rows

    def result(self) -> Assembly:
        chosen, filled = select_groups(self.keeps, self.needed)
        return Assembly(chosen, filled, len(self.keeps), sum(k.size for k in self.keeps),
                        self.kept)


def assemble(keeps, needed: int, max_draws: int) -> Assembly:
    """The groups of draws whose keep flags [P] come from the iterable `keeps` (read lazily: no
    more than needed, at most `max_draws`) as `train.grpo.grpo_step` picks them."""
    acc = Assembler(needed, max_draws)
    keeps = iter(keeps)
    while not acc.done:
        acc.add(next(keeps))
    return acc.result()


@dataclasses.dataclass
class Rollout:
    """P prompts x G samples rolled out and scored: features on the devices (global, sharded
    as encoded), the rest whole on every process (numpy)."""
    feats: jax.Array                     # [P, T, N, C]
    tokens: np.ndarray                   # [P * G, max_new_tokens], prompt-major
    old_lp: np.ndarray                   # [P * G, max_new_tokens]
    lengths: np.ndarray                  # [P * G]
    scores: dict                         # local_rewards' per-sample scores [P * G]
    adv: np.ndarray                      # [P * G], per group (unchanged by selection)
    dev: dict | None = None              # device input_ids / attention_mask / num_frames (a draw)
    ids: np.ndarray | None = None        # [P, L] the whole batch (dynamic sampling only)
    attn: np.ndarray | None = None
    nf: np.ndarray | None = None         # [P] each clip's real frames (dynamic sampling only)

    PROMPT = ("ids", "attn", "nf")
    SAMPLE = ("tokens", "old_lp", "lengths", "adv")


def roll_out(run: Run, batch: dict, sampler: Sampler, seed: int, *, host_ids: bool) -> Rollout:
    """Encode or take the cached features (`train.features`; the frames are freed after), roll
    out G samples per prompt, score; with `host_ids` also the whole batch's prompt ids / mask /
    num_frames on the host (gathered over processes)."""
    layout = run.layout
    params = settings.sampling_params(run.config)
    b = run.device_batch(batch)
    with jax.profiler.TraceAnnotation("encode"):
        feats = step_features(run, batch, b)      # cached, or encoded (frames freed here)
        prompt = make_prompts(run.model, feats, b["input_ids"], b["attention_mask"], layout,
                              b["num_frames"])
    tokens, old_lp, lengths = sampler.generate_padded(prompt, None, params, seed=seed)
    with jax.profiler.TraceAnnotation("reward"):
        scores = local_rewards(run, batch, tokens, lengths)
        adv = np.asarray(group_advantages(scores["reward"], params.num_samples))
    out = Rollout(feats, tokens, old_lp, lengths, scores, adv, dev=b)
    if host_ids:
        out.ids = gather_rows(np.asarray(batch["input_ids"]), run.shard)
        out.attn = gather_rows(np.asarray(batch["attention_mask"]), run.shard)
        out.nf = gather_rows(np.asarray(batch["num_frames"]), run.shard)
    return out


@functools.partial(jax.jit, static_argnames=("sharding",))
def take_rows(parts, rows, sharding):
    """Rows `rows` of the arrays `parts` stacked on axis 0, laid out as `sharding`: the chosen
    prompts' features stay on the devices, sharded like the draws'."""
    out = jnp.take(jnp.concatenate(parts, axis=0), rows, axis=0)
    return jax.lax.with_sharding_constraint(out, sharding)


def merge_rollouts(held: Rollout | None, new: Rollout, rows: np.ndarray, g: int) -> Rollout:
    """The prompts `rows` (`Assembler.add`) of [held, new] as one rollout."""
    parts = [r for r in (held, new) if r is not None]
    n_held = 0 if held is None else held.feats.shape[0]
    if held is not None and np.array_equal(rows, np.arange(n_held)):
        return held
    if np.array_equal(rows, n_held + np.arange(new.feats.shape[0])):
        return new
    shapes = {(p.feats.shape[1:], p.ids.shape[1:]) for p in parts}
    if len(shapes) > 1:
        raise ValueError(f"rl.dynamic_sampling: batches of different (features, prompt ids) shapes "
                         f"{sorted(shapes)} in one step; set data.pipeline.max_length")

    def cat(name, per_sample):
        x = np.concatenate([getattr(p, name) for p in parts])
        if not per_sample:
            return x[rows]
        return x.reshape(-1, g, *x.shape[1:])[rows].reshape(-1, *x.shape[1:])

    return Rollout(
        feats=take_rows(tuple(p.feats for p in parts), rows, new.feats.sharding),
        scores={k: np.concatenate([p.scores[k] for p in parts]).reshape(-1, g)[rows].reshape(-1)
                for k in new.scores},
        **{k: cat(k, False) for k in Rollout.PROMPT}, **{k: cat(k, True) for k in Rollout.SAMPLE})


def draw_seed(run: Run, draw: int) -> int:
    """The sampling seed of a step's rollout `draw` (0: the step's one rollout without dynamic
    sampling)."""
    key = jax.random.fold_in(run.rng, run.step)
    if draw:
        key = jax.random.fold_in(key, draw)
    return int(jax.random.randint(key, (), 0, 2**30))


def dynamic_batch(run: Run, batch: dict, sampler: Sampler, dyn: DynamicSampling, g: int,
                  seed: int) -> tuple[Rollout, Assembly, list[Rollout]]:
    """DAPO dynamic sampling: roll out `batch` (with `seed`), keep its groups that satisfy the
    rule, roll out the next batches of `run.data_iter` until P are kept or `dyn.max_draws`
    rollouts were made. Returns the assembled P groups, the assembly, and every draw's scores /
    lengths (feature-less rollouts, for the step's metrics). At most P groups are held between
    draws (their features on the devices), each draw's frames are freed once encoded."""
    acc = Assembler(run.global_batch, dyn.max_draws)
    held, seen = None, []
    new = roll_out(run, batch, sampler, seed, host_ids=True)
    while True:
        seen.append(dataclasses.replace(new, feats=None, dev=None, ids=None, attn=None, nf=None,
                                        tokens=None, old_lp=None))
        keep = np.asarray(keep_in_band(new.scores[dyn.key], g, dyn.low, dyn.high))
        held = merge_rollouts(held, new, acc.add(keep), g)
        new = None                       # the draw's features are freed once merged
        if acc.done:
            return held, acc.result(), seen
        new = roll_out(run, next(run.data_iter), sampler, draw_seed(run, len(acc.keeps)),
                       host_ids=True)


def dynamic_metrics(run: Run, got: Assembly, batch: Rollout) -> dict:
    """A dynamic-sampling step's counts (see `train.grpo.grpo_step`); one warning line when the draw bound
    left the batch short of kept groups."""
    if got.groups_filled and jax.process_index() == 0:
        log.warning("step %d: dynamic sampling kept %d of %d groups needed after %d draws "
                    "(rl.dynamic_max_draws); %d groups that fail the rule fill the batch with "
                    "no effect on the loss", run.step + 1, got.kept, run.global_batch, got.draws,
                    got.groups_filled)
    return dict(draws=got.draws, prompts_drawn=got.drawn, groups_kept=got.kept,
                groups_dropped=got.dropped, groups_filled=got.groups_filled,
                draw_bound_hit=int(got.groups_filled > 0),
                batch_reward_mean=float(batch.scores["reward"].mean()),
                batch_accuracy=float(batch.scores["accuracy"].mean()))
