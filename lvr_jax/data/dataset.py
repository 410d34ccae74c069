"""The grain pipeline per JAX process: records -> decoded, tokenized, collated batches.

Records come from `lvr_jax.data.records` (`load_records`). Pipeline (`make_iter_dataset`):
`MapDataset.source(records)` -> `.shuffle(seed)` -> this process's shard (disjoint across
processes; with `drop_remainder` every shard has the same length) -> `.repeat(num_epochs)`
(reshuffled each epoch) -> `.map(ExampleBuilder)` (decode + preprocess + tokenize) ->
`to_iter_dataset` -> `mp_prefetch` (decoding in `num_workers` worker processes) -> skip
accounting + batching in the main process. The iterator's `get_state()` / `set_state()` resume
exactly (worker processes included); `iterator.skipped` counts the records skipped with
`on_error="skip"` (each one is logged with its reason).

Feature cache (`feature_cache` + `feature_tower`, `lvr_jax.data.feature_store`): a record whose
vision features are cached is not decoded; its example carries the features instead of the
frames (`ExampleBuilder`, `collate`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import grain
import numpy as np

from lvr_jax.data import feature_store, prompts
from lvr_jax.data.records import Record, RecordError, SkipLog, check_on_error, resolve_video
from lvr_jax.data.video import Preprocessor, VideoError, read_frames

log = logging.getLogger(__name__)

MODES = ("rl", "sft")


# ---------------------------------------------------------------------------------------------
# Examples


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data pipeline settings (an ml_collections section converts with `DataConfig(**section)`)."""
    root: str = "."                  # dataset root: `videos` paths are relative to it
    mode: str = "rl"                 # "rl": prompt ids; "sft": prompt + reply ids and loss mask
    num_frames: int = 16
    fps: float = 0.0                 # > 0 caps the sampling rate (fewer frames for short videos)
    short_video: str = "all"         # fewer frames than asked: "all" (each once: reference),
                                     # "repeat" (linspace repeats) or "error"
    batch_size: int = 1
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1       # None: repeat forever (reshuffled every epoch)
    drop_remainder: bool = True      # equal-length shards and full batches only
    on_error: str = "raise"          # bad record: "raise" or "skip" (counted and logged)
    max_consecutive_skips: int = 100  # "skip" mode gives up when this many fail in a row
    num_workers: int = 0             # decoding processes (0: in the main process)
    worker_buffer_size: int = 2      # examples buffered per worker
    read_threads: int = 1            # threads per process mapping examples
    decode_threads: int = 1          # decord threads per video
    max_length: int | None = None    # pad token ids to this length; longer prompts are bad records
    system_prompt: str | None = None
    prompt_template: str = prompts.DEFAULT_TEMPLATE  # user turn: "longrl", "instruct" or "..{question}.."
    feature_cache: str = ""          # folder of cached vision features ("" = off; feature_store)
    feature_tower: str = ""          # the tower the features must come from (TowerId.encode(); set
    #                                  by the trainer from the loaded weights; "" = cache not used)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        check_on_error(self.on_error)
        if self.batch_size < 1 or self.num_frames < 1:
            raise ValueError("batch_size and num_frames must be >= 1")
        prompts.resolve_template(self.prompt_template)      # ValueError saying what is wrong
        if self.feature_tower:
            feature_store.TowerId.decode(self.feature_tower)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Placeholder for a record that failed with on_error="skip" (travels from the workers)."""
    source: str
    problem_id: str
    reason: str


class ExampleBuilder:
    """Record -> example dict: decoded + preprocessed frames and token ids (runs in workers).

    Keys: frames float32 [T, S, S, 3], frame_indices int32 [T], input_ids int32 [L],
    loss_mask int32 [L] (sft), index int64, problem_id, answer (the record's answer as the reward
    grades it: "<answer>B</answer>", "B", "3", free text), category, question (str; the reward
    functions' records, `lvr_jax.rl.reward_fns`).

    With a feature cache (`cfg.feature_cache` and `cfg.feature_tower` set) also cache_key (str),
    cache_fields (the key fields, JSON) and cached (bool); a record whose entry is valid is not
    decoded: its example has features [T, N, C] (the tower's dtype) and the stored frame_indices
    instead of frames. A stale or corrupt entry is logged and the record decoded as usual.
    """

    def __init__(self, cfg: DataConfig, tokenizer, preprocessor: Preprocessor):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.cache = feature_store.for_pipeline(cfg, preprocessor)

    def build(self, rec: Record) -> dict:
        cfg = self.cfg
        path = resolve_video(cfg.root, rec.video, rec.source, rec.problem_id)
        cache, entry = self.lookup(path)
        if entry is None:
            try:
                frames, idx = read_frames(path, cfg.num_frames, cfg.fps, short=cfg.short_video,
                                          threads=cfg.decode_threads, return_indices=True)
            except VideoError as e:
                raise RecordError(rec.source, rec.problem_id, f"video {e}") from e
            ex = {"frames": self.preprocessor(frames), "frame_indices": idx.astype(np.int32)}
        else:
            ex = {"features": entry.features, "frame_indices": entry.frame_indices}
        ids, mask = self.token_ids(rec)
        ex.update(input_ids=ids, index=np.int64(rec.index), problem_id=rec.problem_id,
                  answer=rec.answer, category=rec.category, question=rec.question)
        if mask is not None:
            ex["loss_mask"] = mask
        if cache is not None:
            ex.update(cache_key=cache[0], cache_fields=cache[1], cached=entry is not None)
        return ex

    def lookup(self, path):
        """((key, fields JSON), valid entry or None) of the video at `path`; (None, None) without
        a cache. A file that cannot be hashed is a miss (decoding then says what is wrong)."""
        if self.cache is None:
            return None, None
        store, keys = self.cache
        try:
            fields = keys.fields(path)
        except OSError:
            return ("", ""), None
        key = keys.key(fields)
        return (key, feature_store.canonical(fields)), store.read(key, fields)

    def token_ids(self, rec: Record):
        """(prompt ids, loss mask or None) of a record; RecordError when it cannot be used."""
        cfg = self.cfg
        try:
            if cfg.mode == "sft":
                if not rec.reasoning.strip():
                    raise ValueError("no 'reasoning' for SFT")
                reply = prompts.reasoning_response(rec.reasoning, rec.reply_answer,
                                                   open_ended=rec.open_ended)
                ids, mask = prompts.sft_ids_and_mask(self.tokenizer, rec.question, reply,
                                                     system=cfg.system_prompt,
                                                     template=cfg.prompt_template)
            else:
                ids = prompts.rl_prompt_ids(self.tokenizer, rec.question, system=cfg.system_prompt,
                                            template=cfg.prompt_template)
                mask = None
        except ValueError as e:
            raise RecordError(rec.source, rec.problem_id, str(e)) from e
        if cfg.max_length is not None and len(ids) > cfg.max_length:
            raise RecordError(rec.source, rec.problem_id,
                              f"{len(ids)} tokens, more than max_length={cfg.max_length}")
        return ids, mask

    def __call__(self, rec: Record) -> dict | Skipped:
        try:
            return self.build(rec)
        except RecordError as e:
            if self.cfg.on_error == "raise":
                raise
            return Skipped(rec.source, rec.problem_id, str(e))


def collate(examples: Sequence[dict], *, pad_id: int, max_length: int | None = None,
            frames: int = 0) -> dict:
    """Stack examples: token ids right-padded with `pad_id` (to max_length, else the longest),
    frames zero-padded to `frames` (the config's num_frames: every batch the same shape, however
    short its clips) or the most frames, if more. Adds attention_mask [B, L], length [B],
    num_frames [B] (each clip's real frames: the prompts mask the rest out).

    Cached features (feature cache on): `features` [B, T, N, C] when any example has them,
    `frames` when any example has frames; in a batch with both (the cache is filling) each row
    has one of them and zeros in the other, `cached` [B] says which (True: features). Then
    `lvr_jax.train.features.step_features` encodes the frames and takes the cached rows from the
    features; an all-features batch is never decoded nor encoded. Also cache_key / cache_fields
    [B] (str)."""
    lengths = [len(e["input_ids"]) for e in examples]
    width = max_length if max_length is not None else max(lengths)
    clip_len = [len(e["frame_indices"]) for e in examples]
    t_max = max(max(clip_len), frames)
    b = len(examples)
    ids = np.full((b, width), pad_id, np.int32)
    attn = np.zeros((b, width), np.int32)
    frame_idx = np.full((b, t_max), -1, np.int32)
    out = {}
    for name in ("frames", "features"):
        have = [e[name] for e in examples if name in e]
        if have:
            out[name] = np.zeros((b, t_max) + have[0].shape[1:], have[0].dtype)
    for i, e in enumerate(examples):
        n, t = lengths[i], clip_len[i]
        ids[i, :n] = e["input_ids"]
        attn[i, :n] = 1
        for name in ("frames", "features"):
            if name in e:
                out[name][i, :t] = e[name]
        frame_idx[i, :t] = e["frame_indices"]
    out.update(input_ids=ids, attention_mask=attn, length=np.asarray(lengths, np.int32),
               frame_indices=frame_idx, num_frames=np.asarray(clip_len, np.int32),
               index=np.asarray([e["index"] for e in examples], np.int64),
               problem_id=np.asarray([e["problem_id"] for e in examples]),
               answer=np.asarray([e["answer"] for e in examples]),
               question=np.asarray([e.get("question", "") for e in examples]),
               category=np.asarray([e["category"] for e in examples]))
    if "loss_mask" in examples[0]:
        loss = np.zeros((b, width), np.int32)
        for i, e in enumerate(examples):
            loss[i, :lengths[i]] = e["loss_mask"]
        out["loss_mask"] = loss
    if "cache_key" in examples[0]:
        out.update(cached=np.asarray([bool(e["cached"]) for e in examples]),
                   cache_key=np.asarray([e["cache_key"] for e in examples]),
                   cache_fields=np.asarray([e["cache_fields"] for e in examples]))
    return out


# ---------------------------------------------------------------------------------------------
# grain pipeline


def default_shard() -> tuple[int, int]:
    """(this JAX process's index, number of processes)."""
    import jax
    return jax.process_index(), jax.process_count()


class BlockShard(grain.MapDataset):
    """Shard `index` of `count` in blocks of `block`: its j-th block is the parent's elements
    [(j * count + index) * block, ... + block). With block = per-process batch, the global batch
    of step j (the parent's elements [j * count * block, (j + 1) * count * block)) is the same
    whatever the number of shards. The parent is trimmed to a multiple of count * block; indices
    past the end continue into the parent's next epoch (as grain's slices do)."""

    def __init__(self, parent: grain.MapDataset, index: int, count: int, block: int):
        super().__init__(parent)
        self._index, self._count, self._block = index, count, block
        self._parent_length = len(parent)
        self._length = (self._parent_length // (count * block)) * block

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, i: int) -> int:
        epoch, offset = divmod(i, self._length)
        j, r = divmod(offset, self._block)
        return epoch * self._parent_length + (j * self._count + self._index) * self._block + r

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"BlockShard({self._index}/{self._count}, block={self._block})"


def shard_records(ds: grain.MapDataset, shard_index: int, shard_count: int, *, even: bool,
                  block: int = 1):
    """This shard's part of a (shuffled) MapDataset: elements shard_index, +shard_count, ...;
    with `even`, first trimmed to a multiple of shard_count so all shards have equal length.
    `block` > 1 deals blocks of that many consecutive elements instead (`BlockShard`; needs
    `even`; each epoch is trimmed to a multiple of shard_count * block, whatever the count)."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if block > 1:
        if not even:
            raise ValueError("block sharding needs drop_remainder=True (equal shards)")
        return BlockShard(ds, shard_index, shard_count, block)
    if even:
        ds = ds[: (len(ds) // shard_count) * shard_count]
    return ds[shard_index::shard_count]


def mark_flags_parsed(*_args) -> None:
    """grain reads absl flags; worker processes (and pytest) never parse argv."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_map_dataset(records: Sequence[Record], cfg: DataConfig, tokenizer, preprocessor, *,
                     shard_index: int | None = None, shard_count: int | None = None,
                     block: int = 1):
    """The MapDataset part: shuffle -> shard (in blocks of `block`) -> repeat ->
    map(ExampleBuilder)."""
    if (shard_index is None) != (shard_count is None):
        raise ValueError("give both shard_index and shard_count, or neither")
    if shard_index is None:
        shard_index, shard_count = default_shard()
    records = [dataclasses.replace(r, index=i) for i, r in enumerate(records)]
    if not records:
        raise ValueError("no records")
    ds = grain.MapDataset.source(records)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = shard_records(ds, shard_index, shard_count, even=cfg.drop_remainder, block=block)
    if len(ds) == 0:
        raise ValueError(f"shard {shard_index}/{shard_count} of {len(records)} records is empty")
    if cfg.num_epochs != 1:
        ds = ds.repeat(cfg.num_epochs)
    return ds.map(ExampleBuilder(cfg, tokenizer, preprocessor))


class BatchIterator(grain.DatasetIterator):
    """Drops (counts, logs) `Skipped` examples and collates batches, in the main process.

    State = the parent's state (worker processes included) + the skip counter.
    """

    def __init__(self, parent: grain.DatasetIterator, cfg: DataConfig, pad_id: int):
        super().__init__(parent)
        self._cfg = cfg
        self._pad_id = pad_id
        self.skip_log = SkipLog()

    @property
    def skipped(self) -> int:
        """Records skipped so far (on_error="skip"); restored by set_state."""
        return self.skip_log.count

    def __next__(self) -> dict:
        cfg = self._cfg
        batch: list[dict] = []
        in_a_row = 0
        while len(batch) < cfg.batch_size:
            try:
                ex = next(self._parent)
            except StopIteration:
                if batch and not cfg.drop_remainder:
                    break
                if batch:      # short of a full batch at the end of the data (skips can cause it)
                    log.warning("end of data: %d good example(s) short of a full batch of %d "
                                "dropped (drop_remainder)", len(batch), cfg.batch_size)
                raise
            if isinstance(ex, Skipped):
                self.skip_log.add(ex.reason)
                in_a_row += 1
                if in_a_row >= cfg.max_consecutive_skips:
                    raise RuntimeError(f"{in_a_row} records in a row failed; last: {ex.reason}")
                continue
            in_a_row = 0
            batch.append(ex)
        return collate(batch, pad_id=self._pad_id, max_length=cfg.max_length,
                       frames=cfg.num_frames)

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "skipped": self.skip_log.count}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.skip_log = SkipLog()
        self.skip_log.count = int(state["skipped"])

    def close(self) -> None:
        """Stop the worker processes (also done at garbage collection)."""
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()


class BatchDataset(grain.IterDataset):
    """IterDataset whose iterator is a `BatchIterator`."""

    def __init__(self, parent: grain.IterDataset, cfg: DataConfig, pad_id: int):
        super().__init__(parent)
        self._cfg = cfg
        self._pad_id = pad_id

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self._parent.__iter__(), self._cfg, self._pad_id)

    def __str__(self) -> str:
        return f"BatchDataset(batch_size={self._cfg.batch_size})"


def make_iter_dataset(records: Sequence[Record], cfg: DataConfig, tokenizer, preprocessor: Preprocessor,
                      *, shard_index: int | None = None, shard_count: int | None = None,
                      block: int = 1):
    """The full pipeline as a grain IterDataset of batches (see the module docstring).

    `iter(ds)` gives an iterator with `get_state()` / `set_state()` (save it with the training
    checkpoint; a fresh iterator restored from it yields exactly the batches that would have come
    next), `.skipped` and `.skip_log`, and `close()` (stops the worker processes).
    Shards default to `jax.process_index()` / `jax.process_count()`; `block` = the per-shard
    batch size makes every step's global batch independent of the shard count (`BlockShard`).
    """
    mark_flags_parsed()
    ds = make_map_dataset(records, cfg, tokenizer, preprocessor, shard_index=shard_index,
                          shard_count=shard_count, block=block)
    threads = max(0, cfg.read_threads)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=max(threads, 1)))
    if cfg.num_workers > 0:
        # small arrays (token ids, indices) are pickled; frames travel through shared memory
        it = grain.experimental.WithOptionsIterDataset(
            it, grain.experimental.DatasetOptions(min_shm_size=1 << 16))
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                         per_worker_buffer_size=cfg.worker_buffer_size),
                            worker_init_fn=mark_flags_parsed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return BatchDataset(it, cfg, int(pad_id))


def num_batches(num_records: int, cfg: DataConfig, shard_count: int = 1) -> int:
    """Batches per epoch for one shard, before skips (without drop_remainder: the largest
    shard's count)."""
    per_shard = num_records // shard_count if cfg.drop_remainder else -(-num_records // shard_count)
    return per_shard // cfg.batch_size if cfg.drop_remainder else -(-per_shard // cfg.batch_size)
