"""A GRPO step's vision features: from the feature cache when the data pipeline found them, else
encoded from the frames (and then cached). The cache (`lvr_jax.data.feature_store`) holds the
frozen SigLIP tower's output only; the projector runs on it every step (it may be trained).

* `tower_id` - the tower's identity: sha256 of its config (`MEMORY_SETTINGS` aside) and of every parameter's
  path, shape, dtype and bytes, in path order (each parameter gathered to the host in turn);
  plus the features' [N, C] and dtype. Measured on this 2-core CPU machine for SigLIP so400m
  (428M params): 1.1 s in float32 (1.7 GB), 0.6 s in bfloat16, sha256 at 1.7 GB/s; computed
  once when the pipeline is built (`pipeline_fields`) and once after a restore (first step).
* `pipeline_fields` - the DataConfig fields that turn the cache on in `train.state.setup` (GRPO
  with `train.freeze_vision` and `data.pipeline.feature_cache` set).
* `step_features` - used by `train.grpo`: cached rows come from the batch, the others are
  encoded, and the features of this process's encoded rows are written to the store.
* `fill_cache` - the body of launch/cache_features.py.

A batch's rows, over all processes, are all cached (nothing decoded or encoded), or the frames
are encoded for every row (zeros where a row is cached) and the cached rows' features replace the
encoded ones: every process agrees on the path (`gather_json` of one flag pair per step), so the
collective encode is entered by all or none.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvr_jax.data import feature_store
from lvr_jax.data.dataset import ExampleBuilder
from lvr_jax.data.records import RecordError, load_records
from lvr_jax.data.video import Preprocessor
from lvr_jax.models.vlm import encode_batch
from lvr_jax.train import settings
from sharding.multihost import batch_rows, batch_sharding, gather_json, put_batch

log = logging.getLogger(__name__)

FEATURE_AXES = ("batch", "frames")       # logical names of features' / frames' leading dims


# the tower's settings that change only memory, not the features (a cache filled under one
# `model.vision_chunk` serves every other)
MEMORY_SETTINGS = ("remat", "frame_chunk")


def tower_id(vision) -> feature_store.TowerId:
    """The identity of a vision tower (`SiglipVision`): see the module doc."""
    h = hashlib.sha256()
    cfg = {k: str(v) for k, v in dataclasses.asdict(vision.cfg).items()
           if k not in MEMORY_SETTINGS}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(vision, nnx.Param))
    for path, x in sorted(((jax.tree_util.keystr(p), x) for p, x in leaves), key=lambda px: px[0]):
        arr = np.ascontiguousarray(host_value(x))
        h.update(json.dumps([path, list(arr.shape), arr.dtype.name]).encode())
        h.update(arr.reshape(-1).view(np.uint8))
    size = vision.cfg.image_size
    graphdef, state = nnx.split(vision)
    out = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, size, size, 3))), state)
    return feature_store.TowerId(h.hexdigest(), int(out.shape[1]), int(out.shape[2]),
                                 np.dtype(out.dtype).name)


def host_value(x) -> np.ndarray:
    """A parameter on the host, whole (gathered over processes when it is spread over them)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


_TOWERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def run_tower(model) -> feature_store.TowerId:
    """`tower_id` of a run's (frozen) tower, computed at its first use and then remembered."""
    vision = model.vision
    if vision not in _TOWERS:
        _TOWERS[vision] = tower_id(vision)
    return _TOWERS[vision]


def cache_dir(config) -> str:
    return str(config.data.pipeline.get("feature_cache", "") or "")


def pipeline_fields(config, model, mode: str) -> dict:
    """DataConfig overrides for `train.state.setup`: the tower id when GRPO runs with a feature
    cache and a frozen tower; the cache off when the tower trains (features would go stale)."""
    if not cache_dir(config) or mode != "rl":
        return {}
    if not config.train.freeze_vision:
        log.warning("data.pipeline.feature_cache is ignored: train.freeze_vision is off")
        return {"feature_cache": ""}
    return {"feature_tower": tower_id(model.vision).encode()}


def _take_cached(encoded, cached, use, sharding):
    """encoded [B, T, N, C] with the (row, frame) positions `use` [B, T] taken from `cached`
    (None: none), laid out as exactly `sharding` (one spec object: jit caches tell
    P('fsdp', 'seq') from P('fsdp', 'seq', None, None))."""
    return _merger(sharding)(encoded, cached, use)


@functools.lru_cache(maxsize=None)
def _merger(sharding):
    def merge(encoded, cached, use):
        if cached is None:
            return encoded
        return jnp.where(use[:, :, None, None], cached.astype(encoded.dtype), encoded)

    return jax.jit(merge, out_shardings=sharding, donate_argnums=(0,))


def feature_sharding(run, shape):
    """The one layout of the features step_features returns with the cache on (rows over the
    batch axes, frames over the frame axis): cached and encoded steps give the same input
    shardings to the compiled functions after them (no second compilation)."""
    return batch_sharding(run.layout.mesh, tuple(shape), run.layout.table, FEATURE_AXES)


def _put(run, x, names=FEATURE_AXES):
    return put_batch(x, run.layout.mesh, run.global_batch, run.layout.table, names=names)


def step_features(run, batch: dict, device_batch: dict):
    """Vision features [B, T, N, C] of a step's batch (global array); pops "frames" / "features"
    from `device_batch` (`Run.device_batch(batch)`; a field it lacks is put here)."""
    model, layout = run.model, run.layout
    if "cached" not in batch:                                  # no feature cache
        return encode_batch(model, device_batch.pop("frames"), layout=layout)
    tower = run_tower(model)
    fields = json.loads(batch["cache_fields"][0]) if batch["cache_fields"][0] else {}
    if fields and fields["tower"] != tower.encode():
        raise RuntimeError(f"the data pipeline's feature cache keys are for tower "
                           f"{fields['tower']}, the model's tower is {tower.encode()} (were other "
                           f"vision weights restored?); set data.pipeline.feature_cache=''")
    hits = np.asarray(batch["cached"], bool)
    t = batch["frame_indices"].shape[1]
    short = np.asarray(batch["num_frames"]) < t
    votes = [[bool(hits.all()), bool(hits.any()), bool(short.any())]]
    if jax.process_count() > 1:
        votes = gather_json(votes[0])
    all_hit = all(v[0] for v in votes)
    any_hit, any_short = any(v[1] for v in votes), any(v[2] for v in votes)
    if all_hit:
        device_batch.pop("frames", None)
        feats = device_batch.pop("features", None)
        if feats is None:
            feats = _put(run, batch["features"])
        if not any_short:
            return _take_cached(feats, None, None, feature_sharding(run, feats.shape))
        # padded frames: what encoding the zero frames that pad them gives
        pad = encode_batch(model, _put(run, _zero_frames(model, hits.shape[0], 1)), layout=layout)
        return _take_cached(jnp.broadcast_to(pad, feats.shape).astype(feats.dtype), feats,
                            _put(run, _valid(batch)), feature_sharding(run, feats.shape))
    frames = device_batch.pop("frames", None)
    if frames is None:
        frames = _put(run, _zero_frames(model, hits.shape[0], t))
    feats = encode_batch(model, frames, layout=layout)
    del frames
    cached = use = None
    if any_hit:
        cached = device_batch.pop("features", None)
        if cached is None:
            cached = _put(run, batch["features"] if "features" in batch else
                          np.zeros((hits.shape[0],) + feats.shape[1:], np.dtype(feats.dtype)))
        use = _put(run, hits[:, None] & _valid(batch))
    feats = _take_cached(feats, cached, use, feature_sharding(run, feats.shape))
    if run.config.train.freeze_vision:
        write_rows(run, feature_store.FeatureStore(cache_dir(run.config)), batch, feats, ~hits)
    return feats


def _valid(batch) -> np.ndarray:
    """bool [B, T]: the frames of each clip (not the padding)."""
    t = batch["frame_indices"].shape[1]
    return np.arange(t)[None] < np.asarray(batch["num_frames"])[:, None]


def _zero_frames(model, rows: int, t: int) -> np.ndarray:
    size = model.cfg.vision.image_size
    return np.zeros((rows, t, size, size, 3), np.float32)


def my_rows(shard: tuple[int, int], rows: int) -> tuple[int, list[int]]:
    """(first global row of this process's `rows` local rows, the local rows it writes): its own
    block; when every process holds the whole batch (shard count 1), every process_count-th."""
    index, count = shard
    if count == 1 and jax.process_count() > 1:
        return 0, list(range(jax.process_index(), rows, jax.process_count()))
    return index * rows, list(range(rows))


def host_rows(x: jax.Array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a global array on this process's host: collective when the array
    spans processes (every process calls it), a copy of the local rows otherwise."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x[start:stop]))
    mesh = x.sharding.mesh
    y = jax.jit(lambda a: a, out_shardings=batch_sharding(mesh, x.shape))(x)   # rows only
    out = np.empty((stop - start,) + x.shape[1:], np.dtype(x.dtype))
    done = np.zeros(stop - start, bool)
    for s in y.addressable_shards:
        lo, hi = s.index[0].start or 0, s.index[0].stop or x.shape[0]
        a, b = max(lo, start), min(hi, stop)
        if a < b and not done[a - start:b - start].all():
            out[a - start:b - start] = np.asarray(s.data)[a - lo:b - lo]
            done[a - start:b - start] = True
    if not done.all():
        raise RuntimeError(f"rows {start}..{stop} are not all on this process")
    return out


def write_rows(run, store, batch: dict, feats, want: np.ndarray) -> int:
    """Write the features of this process's rows `want` (local bool [b]) that have a cache key;
    returns how many. Collective when `feats` spans processes. A failed write is logged."""
    n = want.shape[0]
    start, mine = my_rows(run.shard, n)
    rows = [i for i in mine if want[i] and batch["cache_key"][i]]
    if not rows and feats.is_fully_addressable:
        return 0
    local = host_rows(feats, start, start + n)
    written = 0
    for i in rows:
        t = int(batch["num_frames"][i])
        try:
            store.write(str(batch["cache_key"][i]), json.loads(batch["cache_fields"][i]),
                        local[i, :t], batch["frame_indices"][i, :t])
            written += 1
        except (OSError, ValueError) as e:
            log.warning("feature cache: cannot write %s: %s", store.path(batch["cache_key"][i]), e)
    return written


def fill_cache(config, checkpoint, *, split: str = "train", limit: int = 0, say=print) -> dict:
    """Compute and store the features of a split's records with `checkpoint`'s vision tower
    (frame-parallel on the config's mesh; every process builds and writes its own rows of each
    global batch of `data.pipeline.batch_size` records). Returns the summary."""
    root = cache_dir(config)
    if not root:
        raise ValueError("set --config.data.pipeline.feature_cache=<folder>")
    mesh, layout = settings.mesh_and_layout(config)
    model, tok, _ = settings.load_model(config, checkpoint, mesh)
    tower = tower_id(model.vision)
    cfg = settings.data_config(config, mode="rl", feature_tower=tower.encode())
    records = load_records(settings.data_files(config, split), on_error=cfg.on_error)
    records = records[:limit] if limit > 0 else records
    builder = ExampleBuilder(cfg, tok, Preprocessor.from_pretrained(Path(checkpoint) / "vision_tower"))
    store = builder.cache[0]
    batch = int(config.data.pipeline.batch_size)
    shard = batch_rows(mesh, batch, layout.table)
    k = batch // shard[1]
    run = _FillRun(model, layout, batch, shard, config)
    counts = dict(items=0, hit=0, written=0, skipped=0)
    t0 = time.perf_counter()
    say(f"[cache] {len(records)} {split} items -> {root} (tower {tower.digest[:12]}, "
        f"{jax.process_count()} process(es), {batch} per batch)")
    steps = -(-len(records) // batch)
    _, mine = my_rows(shard, k)
    for step in range(steps):
        first = step * batch + shard[0] * k
        exs = []
        for i, j in enumerate(range(first, first + k)):
            ex = None
            if j < len(records):
                counts["items"] += i in mine
                try:
                    ex = builder.build(records[j])
                except RecordError as e:
                    if cfg.on_error == "raise":
                        raise
                    log.warning("skipping %s", e)
                    counts["skipped"] += i in mine
            counts["hit"] += bool(ex and ex["cached"] and i in mine)
            exs.append(ex if ex and not ex["cached"] else None)
        t_local = max([len(e["frame_indices"]) for e in exs if e] or [0])
        votes = gather_json([t_local]) if jax.process_count() > 1 else [[t_local]]
        t = max(v[0] for v in votes)
        if t:
            counts["written"] += _encode_and_write(run, store, exs, t)
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            rate = counts["items"] / max(time.perf_counter() - t0, 1e-9)
            say(f"[cache] {min((step + 1) * batch, len(records))}/{len(records)}: this process "
                f"{counts['items']} items, {counts['hit']} hit, {counts['written']} written, "
                f"{counts['skipped']} skipped ({rate:.1f} items/s)")
    total = {key: sum(c[key] for c in gather_json(counts)) for key in counts}
    total.update(seconds=round(time.perf_counter() - t0, 2), cache=root, tower=tower.encode(),
                 split=split)
    say("[cache] done: " + json.dumps(total))
    return total


@dataclasses.dataclass
class _FillRun:
    """The fields of a `Run` that `write_rows` / `_put` read."""
    model: object
    layout: object
    global_batch: int
    shard: tuple[int, int]
    config: object


def _encode_and_write(run, store, exs: list[dict | None], t: int) -> int:
    """Encode this process's examples `exs` (None: nothing to compute) as rows of one global
    batch of clips of `t` frames (collective) and write their features."""
    size = run.model.cfg.vision.image_size
    frames = np.zeros((len(exs), t, size, size, 3), np.float32)
    idx = np.zeros((len(exs), t), np.int32)
    n = np.zeros(len(exs), np.int32)
    for i, e in enumerate(exs):
        if e:
            n[i] = len(e["frame_indices"])
            frames[i, :n[i]], idx[i, :n[i]] = e["frames"], e["frame_indices"]
    feats = encode_batch(run.model, _put(run, frames), layout=run.layout)
    batch = dict(num_frames=n, frame_indices=idx,
                 cache_key=[e["cache_key"] if e else "" for e in exs],
                 cache_fields=[e["cache_fields"] if e else "" for e in exs])
    return write_rows(run, store, batch, feats, np.asarray([e is not None for e in exs]))
