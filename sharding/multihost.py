"""Moving data between hosts and a mesh that may span several JAX processes.

In a multi-process run (`jax.distributed.initialize`) an array on the mesh is global: each
process holds only its devices' shards, `jax.device_put` cannot target devices of other
processes, and `np.asarray` of a sharded array fails. These helpers work the same for one
process and for many:

* `batch_rows` - which rows of a global batch this process feeds (a contiguous block, or all of
  them when the batch is replicated over processes) -> the data shard it loads;
* `put_batch` - this process's rows -> one global array sharded over the batch axes;
* `put_replicated` - a value every process holds -> a replicated global array;
* `host_array` / `gather_rows` / `gather_json` - back to the host, on every process.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from sharding.mesh import logical_to_spec


def batch_sharding(mesh, shape, rules=None, names=("batch",)) -> NamedSharding:
    """Sharding of a [batch, ...] array: its leading dims by the logical `names` (dim 0
    'batch'; e.g. ("batch", "frames") for clips), each only where its mesh axes divide it; the
    other dims replicated."""
    names = tuple(names) + (None,) * (len(shape) - len(names))
    return NamedSharding(mesh, logical_to_spec(names, tuple(shape), mesh, rules))


def batch_rows(mesh, batch: int, rules=None) -> tuple[int, int]:
    """(shard index, shard count): this process feeds rows [i * batch / count, (i + 1) * batch /
    count) of the global batch. (0, 1) when every process needs the whole batch."""
    sharding = batch_sharding(mesh, (batch,), rules)
    spans = {(s.start or 0, batch if s.stop is None else s.stop)
             for (s,) in sharding.addressable_devices_indices_map((batch,)).values()}
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    size = stop - start
    covered = sum(b - a for a, b in spans)
    if covered != size or batch % size or start % size:
        raise ValueError(f"process {jax.process_index()} holds batch rows {sorted(spans)} of "
                         f"{batch}, not one aligned block; order the mesh devices by process")
    return start // size, batch // size


def put_batch(local: np.ndarray, mesh, batch: int, rules=None, names=("batch",)) -> jax.Array:
    """This process's rows (or the whole batch) [rows, ...] -> a global [batch, ...] array
    sharded like `batch_sharding` (`names`: logical names of the leading dims)."""
    local = np.asarray(local)
    shape = (batch,) + local.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding(mesh, shape, rules, names),
                                                  local, shape)


def put_replicated(value, mesh) -> jax.Array:
    """A value that is the same on every process (array or typed PRNG key) -> replicated on
    the mesh. Unlike `jax.device_put`, this works when the mesh spans processes."""
    is_key = jax.dtypes.issubdtype(getattr(value, "dtype", None), jax.dtypes.prng_key)
    data = np.asarray(jax.device_get(jax.random.key_data(value) if is_key else value))
    out = jax.make_array_from_callback(data.shape, NamedSharding(mesh, PartitionSpec()),
                                       lambda idx: data[idx])
    return jax.random.wrap_key_data(out, impl=jax.random.key_impl(value)) if is_key else out


def host_array(x) -> np.ndarray:
    """The whole of a (possibly multi-process, sharded) array as NumPy on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def gather_rows(local: np.ndarray, shard: tuple[int, int]) -> np.ndarray:
    """Concatenate every shard's rows in shard order (`shard` = `batch_rows`); with one shard
    (every process holds everything) the local rows are already the whole."""
    index, count = shard
    if count == 1:
        return np.asarray(local)
    parts = multihost_utils.process_allgather(np.asarray(local)[None], tiled=True)
    indices = multihost_utils.process_allgather(np.asarray([index]), tiled=True)
    by_shard = {}
    for p, i in enumerate(indices):
        by_shard.setdefault(int(i), parts[p])
    if sorted(by_shard) != list(range(count)):
        raise RuntimeError(f"rows of shards {sorted(by_shard)} gathered, expected 0..{count - 1}")
    return np.concatenate([by_shard[i] for i in range(count)])


def gather_json(obj) -> list:
    """A JSON-able value from every process, in process order (the same list on all)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size]), tiled=True)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = multihost_utils.process_allgather(padded[None], tiled=True)
    return [json.loads(bytes(r[:n]).decode()) for r, n in zip(rows, sizes)]
