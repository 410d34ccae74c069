"""Reading and writing safetensors checkpoint folders (single file or sharded with an index)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX_NAME = "model.safetensors.index.json"
TORCH_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")


class CheckpointError(ValueError):
    """A checkpoint (HF folder, tensor, or orbax step) that cannot be loaded or does not fit its
    target; the message names the file, key or step."""


def read_json(path: Path) -> dict:
    """Parse a JSON file, naming it in any error."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


class TensorDir:
    """Lazy, per-key access to the safetensors weights of one checkpoint folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {self.folder} does not exist")
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map'")
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.folder / name).is_file():
                    raise FileNotFoundError(f"{index} lists {name}, which is missing in "
                                            f"{self.folder}")
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                pickles = sorted(p.name for p in self.folder.glob("*.bin"))
                if pickles:
                    raise CheckpointError(
                        f"{self.folder / pickles[0]} is a PyTorch pickle; only safetensors "
                        f"weights are loaded. Convert it first (e.g. torch.load(..., "
                        f"weights_only=True) then safetensors.torch.save_file).")
                raise FileNotFoundError(f"no *.safetensors weights in {self.folder}")
        self.key_to_file: dict[str, str] = {}
        for name in files:
            with safe_open(self.folder / name, framework="numpy") as f:
                for key in f.keys():
                    self.key_to_file[key] = name
        self._handles: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def file_of(self, key: str) -> Path:
        return self.folder / self.key_to_file.get(key, "?")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        """The tensor `key` as a NumPy array; error naming the folder when it is absent."""
        if key not in self.key_to_file:
            raise CheckpointError(f"tensor {key!r} not found in {self.folder} "
                                  f"({len(self.key_to_file)} keys)")
        return self._handle(key).get_tensor(key)

    def _handle(self, key: str):
        name = self.key_to_file[key]
        if name not in self._handles:
            self._handles[name] = safe_open(self.folder / name, framework="numpy").__enter__()
        return self._handles[name]

    def find_prefix(self, anchor: str) -> str:
        """The prefix before `anchor` in this folder's keys ('' or e.g. 'vision_model.')."""
        hits = sorted(k[: -len(anchor)] for k in self.key_to_file if k.endswith(anchor))
        if not hits:
            raise CheckpointError(f"no tensor ending in {anchor!r} in {self.folder}")
        return min(hits, key=len)


def write_tensors(folder: Path, tensors: Iterable[tuple[str, np.ndarray]],
                  max_shard_bytes: int = 4 << 30) -> None:
    """Write (key, array) pairs as model.safetensors, or sharded files + index when large."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, arr in tensors:
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = np.ascontiguousarray(arr)
        size += arr.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        for key, arr in shard.items():
            weight_map[key] = name
            total += arr.nbytes
    (folder / INDEX_NAME).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _umask() -> int:
    """The process umask, read without changing it (Linux /proc; else the common 0o022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder + rename (readers see the
    old file or the whole new one, never part of it), with the permissions a plain `open` gives
    (mkstemp's own are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(build, target: str | os.PathLike, *, overwrite: bool) -> Path:
    """Run `build(tmp_folder)` then move it to `target`; on failure `target` is untouched."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
