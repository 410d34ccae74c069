"""Training checkpoints on orbax: params, optimizer state, step, RNG and data-iterator state.

One checkpoint = one orbax step directory `<dir>/<step>/` holding a composite of four items:
  params     StandardSave  any pytree of arrays (e.g. an nnx params State), sharded arrays as is
  opt_state  StandardSave  the optax state pytree
  rng        StandardSave  {"rng": RNG pytree}; typed PRNG keys are stored as their uint32 key data
  meta       JsonSave      {"step", "data_state" (JSON-able iterator state), "rng_impls", "has_rng",
                           "has_opt_state", "extra"}

`rng` is written only when given; `opt_state` may be left out too, which makes a params-only
checkpoint (`save_params`, e.g. `launch/convert_checkpoint.py --to=orbax`): it restores with
`restore_params` / `restore(..., opt_state=None)` but cannot resume training (asking for its
`opt_state` raises `CheckpointError`). `restore_params` reads the params of either kind.

Saves are asynchronous by default (`enable_async_checkpointing`): `save` returns once the arrays are
copied off the device and the write continues in a background thread; `wait_until_finished` blocks
until it is committed. Orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>`
after writing `commit_success.txt`, so an interrupted save never looks complete; on top of orbax's
listing, a step directory without `commit_success.txt` (e.g. a half-copied one) is skipped too.

Restoring takes abstract targets (`jax.ShapeDtypeStruct` with `.sharding`, or concrete arrays, see
`abstract_like`): arrays come back with the target's sharding, dtype and pytree structure, so a
params State sharded over a mesh restores sharded. A target whose structure or shapes differ from
the checkpoint raises `CheckpointError` naming the step, item and directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from lvr_jax.weights.io import CheckpointError, replace_dir

log = logging.getLogger(__name__)

COMMIT_FILE = "commit_success.txt"
ITEMS = ("params", "opt_state", "rng", "meta")


@dataclasses.dataclass
class Restored:
    """What `restore` / `restore_latest` return."""
    step: int
    params: Any
    opt_state: Any
    rng: Any
    data_state: Any
    extra: dict


def abstract_like(tree: Any) -> Any:
    """Arrays -> `jax.ShapeDtypeStruct` keeping shape, dtype and sharding (others left as is)."""
    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(one, tree)


def _is_key(x: Any) -> bool:
    """True for typed PRNG key arrays (concrete or abstract)."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _rng_to_data(rng: Any) -> tuple[Any, list[str | None]]:
    """Typed keys -> uint32 key data; also the impl name per leaf (None for plain arrays)."""
    leaves, tree = jax.tree.flatten(rng)
    impls = [str(jax.random.key_impl(x)) if _is_key(x) else None for x in leaves]
    data = [jax.random.key_data(x) if _is_key(x) else x for x in leaves]
    return jax.tree.unflatten(tree, data), impls


def _rng_data_target(rng_target: Any) -> Any:
    """Abstract target for the stored key data of an RNG target pytree."""
    def one(x):
        if _is_key(x):
            return jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        return abstract_like(x)
    return jax.tree.map(one, rng_target)


def _rng_from_data(data: Any, rng_target: Any, impls: list[str | None]) -> Any:
    """Wrap restored key data back into typed keys where the target has keys; keep target sharding."""
    leaves, tree = jax.tree.flatten(data)
    targets = jax.tree.leaves(rng_target)
    if len(impls) != len(leaves) or len(targets) != len(leaves):
        raise CheckpointError(f"rng: checkpoint has {len(impls)} leaves, target {len(targets)}")
    out = []
    for x, t, impl in zip(leaves, targets, impls):
        if _is_key(t):
            if impl is None:
                raise CheckpointError("rng: target leaf is a PRNG key but the checkpoint stored a plain "
                                      "array there")
            x = jax.random.wrap_key_data(x, impl=impl)
            sharding = getattr(t, "sharding", None)
            if sharding is not None:
                x = jax.device_put(x, sharding)
        out.append(x)
    return jax.tree.unflatten(tree, out)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _array_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'llm/layers/q_kernel': shape} of a pytree of arrays / abstract arrays / orbax array
    metadata (a trailing '.value' of nnx Variables is dropped, as orbax stores it)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        if shape is None:
            continue
        names = [_key_name(k) for k in path]
        if names and names[-1] == "value":
            names = names[:-1]
        out["/".join(names)] = tuple(shape)
    return out


class Checkpointer:
    """Keep-N, optionally asynchronous orbax checkpoints of a training state.

    Usage:
        ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
        ckpt.save(step, params=params, opt_state=opt_state, rng=key, data_state=it.get_state())
        ...
        if ckpt.latest_step() is not None:
            r = ckpt.restore_latest(params=abstract_like(params), opt_state=abstract_like(opt_state),
                                    rng=key)
        ckpt.close()
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True, read_only: bool = False):
        """`read_only`: for a reader of another run's checkpoints (convert, evaluate): nothing is
        created, and the temporary folders of that run's saves in flight are left alone."""
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else save_interval_steps,
            enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only)   # a save killed mid-write leaves a tmp folder
        handlers = {name: ocp.StandardCheckpointHandler() for name in ITEMS[:3]}
        handlers["meta"] = ocp.JsonCheckpointHandler()
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._warned: set[int] = set()

    # -- listing --------------------------------------------------------------------------------
    def _is_complete(self, step: int) -> bool:
        """Orbax lists only renamed (finalized) steps; also require the commit file."""
        return (self.directory / str(step) / COMMIT_FILE).is_file()

    def all_steps(self) -> list[int]:
        """Complete checkpoint steps, ascending (steps whose save is still in flight are not listed)."""
        steps = sorted(self._manager.all_steps())
        complete = [s for s in steps if self._is_complete(s)]
        for s in sorted(set(steps) - set(complete) - self._warned):
            self._warned.add(s)
            log.warning("checkpoint step %d in %s has no %s; ignoring it as incomplete",
                        s, self.directory, COMMIT_FILE)
        return complete

    def latest_step(self) -> int | None:
        """Latest complete step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- saving ---------------------------------------------------------------------------------
    def save(self, step: int, *, params: Any, opt_state: Any = None, rng: Any = None,
             data_state: Any = None, extra: dict | None = None, force: bool = False) -> bool:
        """Start saving a checkpoint for `step`; returns whether a save was started.

        `opt_state=None` (and `rng=None`) leave that item out: a params-only checkpoint.

        Skipped (False) when `step` is not a multiple of `save_interval_steps` (unless force) or
        is already saved completely; an incomplete directory for `step`, or for a later step (a
        run killed mid-save, resumed from an earlier one: orbax would skip every save up to it),
        is deleted and rewritten.
        `data_state` and `extra` must be JSON-serialisable (checked here, before anything is
        written). The write is asynchronous unless the manager was made with
        async_save=False; call `wait_until_finished` before reading the files.
        """
        if self.read_only:   # orbax would skip the save silently
            raise CheckpointError(f"cannot save step {step}: {self.directory} was opened read-only")
        step = int(step)
        later = [s for s in self._manager.all_steps() if s > step]
        if later:
            self._manager.wait_until_finished()
            for s in later:
                if not self._is_complete(s):
                    log.warning("deleting incomplete checkpoint step %d in %s (after step %d)",
                                s, self.directory, step)
                    self._manager.delete(s)
        if step in self._manager.all_steps():
            self._manager.wait_until_finished()      # it may be our own save, still in flight
            if self._is_complete(step):
                log.info("checkpoint step %d already exists in %s; not saving again", step,
                         self.directory)
                return False
            log.warning("replacing incomplete checkpoint step %d in %s", step, self.directory)
            self._manager.delete(step)
        rng_data, impls = _rng_to_data({} if rng is None else rng)
        meta = {"step": step, "data_state": data_state, "rng_impls": impls,
                "has_rng": rng is not None, "has_opt_state": opt_state is not None,
                "extra": extra or {}}
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"data_state / extra must be JSON-serialisable: {e}") from e
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if rng is not None:
            items["rng"] = ocp.args.StandardSave({"rng": rng_data})   # a bare key is not a tree
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))

    def wait_until_finished(self) -> None:
        """Block until every started save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restoring ------------------------------------------------------------------------------
    def restore(self, step: int, *, params: Any, opt_state: Any = None, rng: Any = None) -> Restored:
        """Restore `step` into the given targets (abstract or concrete; see `abstract_like`).

        `opt_state=None` / `rng=None` skip that item (returned as None); typed-key leaves of an
        `rng` target come back as typed keys.
        """
        step = int(step)
        meta = self.meta(step)
        if rng is not None and not meta.get("has_rng"):
            raise CheckpointError(f"checkpoint step {step} in {self.directory} holds no rng state")
        if opt_state is not None and not meta.get("has_opt_state", True):
            raise CheckpointError(f"checkpoint step {step} in {self.directory} holds params only (no "
                                  f"'opt_state'); it cannot resume training")
        self._check_shapes(step, "params", params)
        params_out = self._restore_item(step, "params", ocp.args.StandardRestore(abstract_like(params)))
        opt_out = None
        if opt_state is not None:
            opt_out = self._restore_item(step, "opt_state",
                                         ocp.args.StandardRestore(abstract_like(opt_state)))
        rng_out = None
        if rng is not None:
            data = self._restore_item(step, "rng", ocp.args.StandardRestore({"rng": _rng_data_target(rng)}))
            rng_out = _rng_from_data(data["rng"], rng, meta.get("rng_impls") or [])
        return Restored(step=int(meta.get("step", step)), params=params_out, opt_state=opt_out,
                        rng=rng_out, data_state=meta.get("data_state"), extra=meta.get("extra") or {})

    def restore_latest(self, *, params: Any, opt_state: Any = None, rng: Any = None) -> Restored:
        """Restore the latest complete checkpoint; CheckpointError when there is none."""
        step = self.latest_step()
        if step is None:
            raise CheckpointError(f"no complete checkpoint to restore in {self.directory}")
        return self.restore(step, params=params, opt_state=opt_state, rng=rng)

    def restore_params(self, params: Any, *, step: int | None = None) -> Restored:
        """Only the params of `step` (default: the latest complete one) of a training or a
        params-only checkpoint; `opt_state` and `rng` of the result are None."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no complete checkpoint to restore in {self.directory}")
        return self.restore(step, params=params)

    def _check_shapes(self, step: int, name: str, target: Any) -> None:
        """Compare the stored array shapes of an item with the target before reading anything, so
        a checkpoint of another architecture fails with the params named (and orbax does not
        leave reads in flight). Paths that cannot be matched at all are left to orbax."""
        try:
            meta = self._manager.item_metadata(step)[name]
            stored = _array_shapes(getattr(meta, "tree", meta))
        except Exception:  # noqa: BLE001 - no usable metadata: orbax's own checks still apply
            return
        want = _array_shapes(target)
        if not set(want) & set(stored):
            return
        wrong = [(k, stored[k], want[k]) for k in sorted(set(want) & set(stored))
                 if stored[k] != want[k]]
        missing, extra = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} arrays differ in shape, e.g. " + "; ".join(
                f"{k}: checkpoint {a}, target {b}" for k, a, b in wrong[:3]))
        if missing:
            parts.append(f"{len(missing)} target arrays are not in the checkpoint, e.g. "
                         f"{missing[:3]}")
        if extra:
            parts.append(f"{len(extra)} checkpoint arrays are not in the target, e.g. {extra[:3]}")
        if parts:
            raise CheckpointError(f"cannot restore '{name}' of checkpoint step {step} in "
                                  f"{self.directory} into the given target: " + "; ".join(parts))

    def meta(self, step: int) -> dict:
        """The JSON item of complete step `step`: {"step", "data_state", "extra", ...}."""
        if step not in self.all_steps():
            raise CheckpointError(f"no complete checkpoint for step {step} in {self.directory} "
                                  f"(complete steps: {self.all_steps()})")
        return self._restore_item(step, "meta", ocp.args.JsonRestore())

    def _restore_item(self, step: int, name: str, args: Any) -> Any:
        """orbax restore of one item, with errors that name the step, item and directory."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(
                f"cannot restore '{name}' of checkpoint step {step} in {self.directory} into the given "
                f"target (structure, shape or missing item): {e}") from e


def save_params(directory: str | os.PathLike, params: Any, *, step: int = 0,
                extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write `params` alone as a one-step orbax checkpoint directory (`<directory>/<step>/params`
    + `meta`, the `Checkpointer` layout without opt_state / rng), atomically: it is built in a
    hidden sibling folder and renamed into place, so `directory` is either untouched or complete.
    An existing `directory` is an error unless `overwrite`. Single-process only."""
    if jax.process_count() > 1:
        raise CheckpointError("save_params writes from a single process; run it with one process")
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")

    def build(tmp: Path) -> None:
        with Checkpointer(tmp, max_to_keep=None, async_save=False) as ck:
            ck.save(step, params=params, extra=extra)
            ck.wait_until_finished()
            if ck.latest_step() != int(step):
                raise CheckpointError(f"saving params to {tmp} did not complete step {step}")

    return replace_dir(build, directory, overwrite=overwrite)


def restore_params(directory: str | os.PathLike, params: Any, *, step: int | None = None) -> Restored:
    """The params of checkpoint `step` (default: latest) in an existing checkpoint directory
    (a training run's `checkpoints/` or a `save_params` directory), read-only: nothing is created
    or deleted, not even the temporary folder of a save that run has in flight."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    with Checkpointer(directory, async_save=False, read_only=True) as ck:
        return ck.restore_params(params, step=step)
