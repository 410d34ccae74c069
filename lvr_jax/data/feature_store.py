"""Vision-tower features of records cached on disk (the RL loop's frozen SigLIP).

With a frozen vision tower every GRPO epoch would decode the same videos and run SigLIP on them
again; Long-RL caches them (`<cache_dir>/<video>.pt`). Here one entry holds what
`VLM.batch_features` gives for one clip: the tower's features [T, N, C] (the projector is NOT
applied: it may be trained) and the frame indices they come from.

Key (`EntryKeys.fields`, sha256 of its canonical JSON = the file name):
* the video file's content: sha256 of its bytes (`FileHashes`: computed once per file, then
  remembered by (path, size, mtime) in memory and under `<cache_dir>/videos/`);
* the frame sampling: num_frames, fps, the short-video policy and `SAMPLING_VERSION` (the sampled
  indices are a function of these and the content; they are stored in the entry and returned
  with the features, so a hit never opens the video);
* the preprocessing: every field of the `Preprocessor`;
* the tower: `TowerId` = sha256 of the tower's config and weights (`lvr_jax.train.features`)
  plus the features' shape [N, C] and dtype.

File: `<cache_dir>/<key[:2]>/<key>.safetensors`, tensors `features` (the tower's output dtype:
float32 for the tiny model, bfloat16 for a bf16 model, stored as its uint16 bits since
safetensors' numpy API has no bfloat16) and `frame_indices` (int32 [T]); metadata: `format`,
`key`, `fields` (JSON), `crc32` of the tensor bytes, `bfloat16_tensors`. Written atomically (temp file +
rename). `FeatureStore.read` returns None, with a warning, for anything it cannot vouch for: a
missing, truncated or unparsable file, other metadata or fields, a wrong shape or dtype, a
checksum mismatch; the caller then computes the features again and overwrites the entry.

NumPy only (no jax, no grain): the data workers read entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import safetensors.numpy

from lvr_jax.weights.io import atomic_write

log = logging.getLogger(__name__)

FORMAT = "lvr-features-1"
# Bump when lvr_jax.data.video's sampling changes which frames (num_frames, fps, short) select.
SAMPLING_VERSION = 1
FEATURES, INDICES = "features", "frame_indices"
BF16_KEY = "bfloat16_tensors"     # metadata: tensors stored as the uint16 bits of bfloat16


def np_dtype(name: str) -> np.dtype:
    """numpy dtype of a name ("bfloat16" through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class TowerId:
    """Which vision tower computed an entry: `digest` (sha256 hex of its config + weights) and
    the features it gives per frame: [tokens, channels] of `dtype`."""
    digest: str
    tokens: int
    channels: int
    dtype: str

    def encode(self) -> str:
        """One string (DataConfig.feature_tower): "<digest>:<tokens>x<channels>:<dtype>"."""
        return f"{self.digest}:{self.tokens}x{self.channels}:{self.dtype}"

    @classmethod
    def decode(cls, text: str) -> TowerId:
        try:
            digest, shape, dtype = text.split(":")
            tokens, channels = (int(x) for x in shape.split("x"))
            np_dtype(dtype)
        except (ValueError, TypeError) as e:
            raise ValueError(f"not a tower id <digest>:<tokens>x<channels>:<dtype>: {text!r}") from e
        return cls(digest, tokens, channels, dtype)


@dataclasses.dataclass(frozen=True)
class Entry:
    features: np.ndarray       # [T, N, C]
    frame_indices: np.ndarray  # int32 [T]


class FileHashes:
    """sha256 of files' bytes, computed once per (path, size, mtime_ns): remembered in memory
    and, with a `folder`, in one small file per (path, size, mtime) so that later processes and
    runs do not read the video again. A file rewritten in place with the same size and mtime
    would keep its old hash (as with any mtime-based cache)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder else None
        self._memo: dict[tuple, str] = {}

    def __call__(self, path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        sig = (str(path), st.st_size, st.st_mtime_ns)
        if sig in self._memo:
            return self._memo[sig]
        memo = None
        if self.folder is not None:
            name = hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:40]
            memo = self.folder / name[:2] / name
            try:
                got = memo.read_text().strip()
                if len(got) == 64 and all(c in "0123456789abcdef" for c in got):
                    self._memo[sig] = got
                    return got
            except OSError:
                pass
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        digest = h.hexdigest()
        self._memo[sig] = digest
        if memo is not None:
            try:
                atomic_write(memo, digest.encode())
            except OSError as e:
                log.warning("cannot remember the hash of %s in %s: %s", path, memo, e)
        return digest


class EntryKeys:
    """What a record's entry is keyed by (see the module doc). `fields(video_path)` -> dict;
    `key(fields)` -> the hex name of its file."""

    def __init__(self, tower: TowerId, *, num_frames: int, fps: float, short: str,
                 preprocessor, hashes: FileHashes):
        self.tower = tower
        self.sampling = {"num_frames": int(num_frames), "fps": float(fps), "short": str(short),
                         "version": SAMPLING_VERSION}
        self.preprocess = {k: list(v) if isinstance(v, tuple) else v
                           for k, v in dataclasses.asdict(preprocessor).items()}
        self.hashes = hashes

    def fields(self, video_path) -> dict:
        """The key fields of the entry of the clip of `video_path` (reads / remembers the file's
        hash; OSError when it cannot be read)."""
        return {"format": FORMAT, "video_sha256": self.hashes(video_path),
                "sampling": self.sampling, "preprocess": self.preprocess,
                "tower": self.tower.encode()}

    @staticmethod
    def key(fields: dict) -> str:
        return hashlib.sha256(canonical(fields).encode()).hexdigest()


def canonical(fields: dict) -> str:
    """The one JSON text of key fields (sorted keys, no spaces)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The safetensors file (`safetensors.numpy.save`) of `tensors` with string `metadata`.
    safetensors' numpy API has no bfloat16: such tensors are stored as their uint16 bits and
    named in the metadata's `BF16_KEY` (`parse_safetensors` turns them back)."""
    stored, bf16 = {}, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype == np_dtype("bfloat16"):
            arr, _ = arr.view(np.uint16), bf16.append(name)
        stored[name] = arr
    meta = {**metadata, **({BF16_KEY: ",".join(bf16)} if bf16 else {})}
    return safetensors.numpy.save(stored, metadata=meta)


def parse_safetensors(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file's bytes (`safetensors.numpy.load`; the metadata
    from its JSON header); ValueError saying what is wrong (truncated, unreadable)."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 <= n <= len(data) - 8:
        raise ValueError(f"{len(data)} bytes, header of {n} (truncated)")
    try:
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        tensors = safetensors.numpy.load(data)
    except Exception as e:           # SafetensorError, JSON and UTF-8 errors
        raise ValueError(f"truncated or unreadable ({e})") from e
    for name in filter(None, str(meta.get(BF16_KEY, "")).split(",")):
        if name in tensors:
            tensors[name] = tensors[name].view(np_dtype("bfloat16"))
    return tensors, {k: v for k, v in meta.items() if k != BF16_KEY}


def checksum(tensors: dict[str, np.ndarray]) -> str:
    """crc32 of the tensors' bytes in name order (accidental corruption: bit flips, torn writes;
    3 GB/s here, twice sha256's speed on entries of up to hundreds of MB)."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(np.ascontiguousarray(tensors[name]).reshape(-1).view(np.uint8), crc)
    return f"{crc:08x}"


class FeatureStore:
    """The cache folder: `<root>/<key[:2]>/<key>.safetensors` (see the module doc)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def write(self, key: str, fields: dict, features: np.ndarray, frame_indices) -> Path:
        """Write (atomically) the entry `key` of key `fields`: features [T, N, C] and the T
        frame indices they come from."""
        tower = TowerId.decode(fields["tower"])
        features = np.asarray(features)
        idx = np.asarray(frame_indices, np.int32)
        problem = check_entry(features, idx, tower, fields)
        if problem:
            raise ValueError(f"entry {key}: {problem}")
        tensors = {FEATURES: features, INDICES: idx}
        meta = {"format": FORMAT, "key": key, "fields": canonical(fields),
                "crc32": checksum(tensors)}
        path = self.path(key)
        atomic_write(path, safetensors_bytes(tensors, meta))
        return path

    def read(self, key: str, fields: dict) -> Entry | None:
        """The entry `key` if present and valid for `fields`; None when absent, and None plus a
        warning naming the file and the problem when it is stale or corrupt."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("feature cache entry %s unreadable (%s); recomputing", path, e)
            return None
        problem = self._problem(data, key, fields)
        if isinstance(problem, str):
            log.warning("feature cache entry %s is stale or corrupt (%s); recomputing", path,
                        problem)
            return None
        return problem

    @staticmethod
    def _problem(data: bytes, key: str, fields: dict) -> str | Entry:
        try:
            tensors, meta = parse_safetensors(data)
        except ValueError as e:
            return str(e)
        if meta.get("format") != FORMAT:
            return f"format {meta.get('format')!r}, expected {FORMAT!r}"
        if meta.get("key") != key:
            return f"key {meta.get('key')!r} in the file, {key!r} expected"
        if EntryKeys.key(fields) != key:
            return f"the key fields hash to {EntryKeys.key(fields)!r}, not the key {key!r}"
        if meta.get("fields") != canonical(fields):
            return f"other key fields: {meta.get('fields')!r}"
        if set(tensors) != {FEATURES, INDICES}:
            return f"tensors {sorted(tensors)}, expected {[FEATURES, INDICES]}"
        if meta.get("crc32") != checksum(tensors):
            return f"checksum {checksum(tensors)} != {meta.get('crc32')} in the metadata"
        feats, idx = tensors[FEATURES], tensors[INDICES]
        problem = check_entry(feats, idx, TowerId.decode(fields["tower"]), fields)
        return problem or Entry(feats, idx)


def check_entry(features: np.ndarray, idx: np.ndarray, tower: TowerId, fields: dict) -> str:
    """'' when features [T, N, C] and indices [T] fit the tower and the sampling, else why not."""
    want = (tower.tokens, tower.channels)
    if features.ndim != 3 or features.shape[1:] != want:
        return f"features of shape {features.shape}, expected [T, {want[0]}, {want[1]}]"
    if features.dtype != np_dtype(tower.dtype):
        return f"features of dtype {features.dtype}, expected {tower.dtype}"
    t = features.shape[0]
    if idx.dtype != np.int32 or idx.shape != (t,):
        return f"frame_indices {idx.dtype} {idx.shape}, expected int32 ({t},)"
    if not 1 <= t <= fields["sampling"]["num_frames"]:
        return f"{t} frames, expected 1..{fields['sampling']['num_frames']}"
    return ""


def for_pipeline(cfg, preprocessor) -> tuple[FeatureStore, EntryKeys] | None:
    """(store, keys) of a DataConfig with `feature_cache` and `feature_tower` set, else None."""
    if not (cfg.feature_cache and cfg.feature_tower):
        return None
    root = Path(cfg.feature_cache)
    keys = EntryKeys(TowerId.decode(cfg.feature_tower), num_frames=cfg.num_frames, fps=cfg.fps,
                     short=cfg.short_video, preprocessor=preprocessor,
                     hashes=FileHashes(root / "videos"))
    return FeatureStore(root), keys
