"""Orbax checkpoints: sharded round trip, keep-N, incomplete steps ignored (the stop on SIGTERM
is the loop's: tests/test_trainer.py, tests/test_multihost.py)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from lvr_jax.train.checkpoint import (
    COMMIT_FILE,
    CheckpointError,
    Checkpointer,
    abstract_like,
)



class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(16, 32, rngs=rngs)
        self.out = nnx.Linear(32, 8, rngs=rngs)


def _sharded_state(seed=0):
    """Params of a tiny nnx model sharded over 8 devices, adamw state after one update, a key.

    Built in one jitted call (eager nnx init compiles many tiny ops, slow on 2 CPU cores).
    """
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    row, rep = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
    make = lambda: nnx.state(Tiny(nnx.Rngs(seed)), nnx.Param)
    shardings = jax.tree.map(lambda x: row if x.shape[0] % 8 == 0 else rep, jax.eval_shape(make))
    tx = optax.adamw(1e-2)

    @jax.jit
    def build():
        params = jax.lax.with_sharding_constraint(make(), shardings)
        opt_state = tx.init(params)
        grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = build()
    rng = {"key": jax.random.key(seed + 7), "count": jnp.uint32(3)}
    return params, opt_state, rng


def _assert_trees_equal(a, b, check_sharding=True):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.dtype == y.dtype
        if check_sharding:
            assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)


def test_sharded_round_trip(tmp_path):
    params, opt_state, rng = _sharded_state()
    assert isinstance(params["inp"]["kernel"].sharding, NamedSharding)
    assert params["inp"]["kernel"].sharding.spec[0] == "fsdp"
    data_state = {"epoch": 1, "index": 123, "shuffle_seed": 9, "files": ["a.jsonl"]}
    with Checkpointer(tmp_path / "ck", max_to_keep=2) as ck:
        assert ck.save(5, params=params, opt_state=opt_state, rng=rng, data_state=data_state,
                       extra={"loss": 1.5})
        ck.wait_until_finished()
        assert ck.latest_step() == 5

    # A fresh manager (as after a restart), abstract targets carrying the shardings.
    with Checkpointer(tmp_path / "ck") as ck:
        abstract = jax.eval_shape(lambda: rng)
        r = ck.restore_latest(params=abstract_like(params), opt_state=abstract_like(opt_state),
                              rng=abstract)
    assert r.step == 5 and r.data_state == data_state and r.extra == {"loss": 1.5}
    assert isinstance(r.params, nnx.State)
    _assert_trees_equal(r.params, params)
    _assert_trees_equal(r.opt_state, opt_state)
    assert r.params["inp"]["kernel"].sharding.spec[0] == "fsdp"
    assert jax.dtypes.issubdtype(r.rng["key"].dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(r.rng["key"]) == jax.random.key_impl(rng["key"])
    np.testing.assert_array_equal(jax.random.key_data(r.rng["key"]), jax.random.key_data(rng["key"]))
    assert int(r.rng["count"]) == 3


def test_keep_n_and_errors(tmp_path):
    params, opt_state, _ = _sharded_state()
    with Checkpointer(tmp_path / "ck", max_to_keep=2, async_save=False) as ck:
        with pytest.raises(CheckpointError, match="no complete checkpoint"):
            ck.restore_latest(params=params, opt_state=opt_state)
        for step in range(1, 5):
            assert ck.save(step, params=params, opt_state=opt_state, data_state={"i": step})
        assert not ck.save(4, params=params, opt_state=opt_state)          # already saved
        with pytest.raises(CheckpointError, match="JSON"):
            ck.save(9, params=params, opt_state=opt_state, data_state={"x": object()})
        ck.wait_until_finished()
        assert ck.all_steps() == [3, 4]
        assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["3", "4"]
        wrong = {"inp": params["inp"]}                                      # missing a layer
        with pytest.raises(CheckpointError, match="'params' of checkpoint step 4"):
            ck.restore_latest(params=wrong, opt_state=opt_state)
        with pytest.raises(CheckpointError, match="no rng"):
            ck.restore_latest(params=params, opt_state=opt_state, rng=jax.random.key(0))
        with pytest.raises(CheckpointError, match="step 7"):
            ck.restore(7, params=params, opt_state=opt_state)


def test_latest_complete_wins_over_partial(tmp_path):
    params, opt_state, rng = _sharded_state()
    root = tmp_path / "ck"
    with Checkpointer(root, max_to_keep=5) as ck:
        ck.save(2, params=params, opt_state=opt_state, rng=rng, data_state={"i": 2})
        ck.wait_until_finished()
    # Half-written later saves: orbax's tmp dir of an interrupted save, and a step dir without
    # the commit file (e.g. an interrupted copy), both with truncated contents.
    for name in ("9.orbax-checkpoint-tmp-1712345678", "8"):
        shutil.copytree(root / "2", root / name)
        (root / name / COMMIT_FILE).unlink(missing_ok=True)
        shutil.rmtree(root / name / "opt_state")
    with Checkpointer(root, max_to_keep=5) as ck:
        assert ck.latest_step() == 2
        r = ck.restore_latest(params=abstract_like(params), opt_state=abstract_like(opt_state))
        assert r.step == 2 and r.data_state == {"i": 2} and r.rng is None
        _assert_trees_equal(r.params, params)
        # Training resumes from 2 and reaches step 8 again: the broken directory is replaced.
        assert ck.save(8, params=params, opt_state=opt_state, data_state={"i": 8})
        ck.wait_until_finished()
        assert ck.all_steps() == [2, 8]
        assert ck.restore_latest(params=params, opt_state=opt_state).data_state == {"i": 8}
    # resumed from 2 again with an incomplete 8 left: the saves before 8 happen (orbax had
    # skipped every step up to its latest folder, so a kill before 8 lost that work); the
    # interrupted save's tmp folder is cleaned up when the checkpointer opens the directory
    shutil.copytree(root / "2", root / "6.orbax-checkpoint-tmp-1712345679")
    shutil.rmtree(root / "8" / "opt_state")
    (root / "8" / COMMIT_FILE).unlink()
    with Checkpointer(root, max_to_keep=5) as ck:
        assert ck.latest_step() == 2
        assert ck.save(4, params=params, opt_state=opt_state, data_state={"i": 4})
        ck.wait_until_finished()
        assert ck.all_steps() == [2, 4]
    assert sorted(p.name for p in root.iterdir()) == ["2", "4"]


def test_a_reader_leaves_a_running_save_alone(tmp_path):
    """restore_params (convert, best/ readers) opens another run's directory read-only: the
    temporary folder of that run's save in flight stays (a writer's Checkpointer deletes it),
    nothing is created, and a read-only Checkpointer refuses to save instead of orbax skipping
    the save silently."""
    from lvr_jax.train.checkpoint import restore_params

    params, _, _ = _sharded_state()
    root = tmp_path / "ck"
    with Checkpointer(root, max_to_keep=5, async_save=False) as ck:
        ck.save(2, params=params)
    in_flight = root / "3.orbax-checkpoint-tmp-1712345680"
    shutil.copytree(root / "2", in_flight)
    (in_flight / COMMIT_FILE).unlink()
    r = restore_params(root, abstract_like(params))
    assert r.step == 2 and in_flight.is_dir()
    _assert_trees_equal(r.params, params)
    with pytest.raises(CheckpointError, match="no complete checkpoint to restore"):
        restore_params(in_flight, abstract_like(params))
    assert {p.name for p in in_flight.iterdir()} == {p.name for p in (root / "2").iterdir()} - {
        COMMIT_FILE}
    with Checkpointer(root, read_only=True) as ck, \
            pytest.raises(CheckpointError, match="opened read-only"):
        ck.save(4, params=params)
    assert sorted(p.name for p in root.iterdir()) == ["2", in_flight.name]
