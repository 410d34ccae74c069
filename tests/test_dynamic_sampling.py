"""DAPO dynamic sampling (`rl.dynamic_sampling`, Long-RL's online_filtering): the keep rule, the
assembly of P groups over several draws (draw order, the bound, the fill), the device-side merge
of held and new rollouts, and an end-to-end GRPO run through launch/train_grpo.py."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import demo
from lvr_jax.rl.grpo import keep_in_band
from lvr_jax.train.rollouts import (Assembler, Rollout, assemble, dynamic_sampling, merge_rollouts,
                                select_groups)
from sharding.mesh import make_mesh
from sharding.multihost import put_batch
from tests.conftest import launch_env, synthetic_run_inputs

ROOT = Path(__file__).resolve().parents[1]
T = True
F = False


def test_keep_rule_is_a_strict_band_on_the_group_mean():
    scores = np.asarray([0, 0, 0, 0,             # all wrong: mean 0
                         1, 1, 1, 1,             # all right: mean 1
                         0, 1, 0, 0,             # 0.25
                         0.1, 0.1, 0.1, 0.1,     # equal middling rewards (format only): kept
                         1, 1, 1, 0], np.float32)
    keep = np.asarray(keep_in_band(scores, 4, 0.01, 0.99))
    assert keep.tolist() == [F, F, T, T, T]
    assert np.asarray(keep_in_band(scores, 4, 0.01, 0.99, per_sample=True)).tolist() == \
        np.repeat(keep, 4).tolist()
    # strict on both ends
    assert np.asarray(keep_in_band(scores, 4, 0.25, 0.75)).tolist() == [F, F, F, F, F]
    assert np.asarray(keep_in_band(scores, 4, 0.2, 0.8)).tolist() == [F, F, T, F, T]


def lazy(keeps, seen):
    for i, k in enumerate(keeps):
        seen.append(i)
        yield np.asarray(k)


def test_assembly_takes_the_first_p_kept_in_draw_order_and_reads_no_more_draws():
    draws = [[T, F, T, F], [F, F, F, F], [T, T, T, F], [T, T, T, T]]
    seen = []
    got = assemble(lazy(draws, seen), needed=4, max_draws=20)
    assert seen == [0, 1, 2]                             # the 4th draw is never rolled out
    assert got.chosen.tolist() == [0, 2, 8, 9] and not got.filled.any()
    assert (got.draws, got.drawn, got.kept, got.dropped, got.groups_filled) == (3, 12, 5, 7, 0)
    keeps = np.concatenate(draws[:3])
    assert keeps[got.chosen].all()

    # the first draw is enough: the batch is that draw as is
    got = assemble(iter([[T, T, T, T]]), needed=4, max_draws=1)
    assert got.chosen.tolist() == [0, 1, 2, 3] and got.draws == 1


def test_assembly_at_the_bound_fills_with_dropped_groups_in_draw_order():
    draws = [[F, T, F, F], [F, F, F, T], [T, T, T, T]]
    seen = []
    got = assemble(lazy(draws, seen), needed=4, max_draws=2)
    assert seen == [0, 1]
    assert got.chosen.tolist() == [1, 7, 0, 2]
    assert got.filled.tolist() == [F, F, T, T]
    assert (got.draws, got.drawn, got.kept, got.dropped, got.groups_filled) == (2, 8, 2, 6, 2)

    got = assemble(iter([[F, F, F]]), needed=3, max_draws=1)      # nothing kept at all
    assert got.chosen.tolist() == [0, 1, 2] and got.filled.all() and got.kept == 0


def test_held_rows_rebuild_the_assembly_for_any_draws():
    """`Assembler.add`'s rows, applied to [held, new] after every draw, end on exactly the
    chosen groups (what grpo_step holds on the devices between draws)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        needed, max_draws = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        acc = Assembler(needed, max_draws)
        held, start = np.zeros(0, np.int64), 0
        while not acc.done:
            keep = rng.random(needed) < rng.random()
            rows = acc.add(keep)
            held = np.concatenate([held, start + np.arange(needed)])[rows]
            start += needed
        got = acc.result()
        assert held.tolist() == got.chosen.tolist()
        want, filled = select_groups(acc.keeps, needed)
        assert got.chosen.tolist() == want.tolist() and got.filled.tolist() == filled.tolist()
        assert got.draws == max_draws or got.kept >= needed
        assert got.groups_filled == max(0, needed - got.kept)


def config(**rl):
    c = ml_collections.ConfigDict({"rl": {"dynamic_sampling": True, **rl}})
    return c


def test_settings_are_checked():
    assert dynamic_sampling(ml_collections.ConfigDict({"rl": {}})) is None
    got = dynamic_sampling(config())
    assert (got.key, got.low, got.high, got.max_draws) == ("reward", 0.01, 0.99, 20)
    assert dynamic_sampling(demo.get_config()) is None             # off by default
    for bad in (dict(dynamic_keep_key="overall"), dict(dynamic_low=0.5, dynamic_high=0.5),
                dict(dynamic_max_draws=0)):
        with pytest.raises(ValueError, match="rl.dynamic"):
            dynamic_sampling(config(**bad))


def test_merge_keeps_features_sharded_on_the_devices():
    mesh = make_mesh(dict(data=1, fsdp=2, seq=4, tensor=1))
    p, g, t = 4, 2, 3

    def fake(draw):
        base = 100 * draw
        feats = (base + np.arange(p, dtype=np.float32))[:, None, None, None] * np.ones(
            (p, 8, 5, 3), np.float32)
        feats = put_batch(feats, mesh, p, names=("batch", "frames"))
        sample = base + np.arange(p * g)
        return Rollout(feats=feats, tokens=np.repeat(sample[:, None], t, 1),
                       old_lp=np.repeat(sample[:, None], t, 1).astype(np.float32),
                       lengths=sample, adv=sample.astype(np.float32),
                       scores={k: sample.astype(np.float32) for k in ("reward", "accuracy")},
                       ids=np.repeat(base + np.arange(p)[:, None], 6, 1),
                       attn=np.ones((p, 6), np.int32), nf=base + np.arange(p))

    acc, held = Assembler(p, 3), None
    draws = [fake(d) for d in range(3)]
    for d, keep in enumerate([[F, T, F, F], [T, F, F, T], [F, F, T, F]]):
        held = merge_rollouts(held, draws[d], acc.add(keep), g)
    got = acc.result()
    assert got.chosen.tolist() == [1, 4, 7, 10] and not got.filled.any()
    prompt = np.asarray([100 * (c // p) + c % p for c in got.chosen])
    assert held.feats.sharding == draws[0].feats.sharding
    assert isinstance(held.feats, jax.Array)
    np.testing.assert_array_equal(np.asarray(held.feats)[:, 0, 0, 0], prompt)
    np.testing.assert_array_equal(held.ids[:, 0], prompt)
    np.testing.assert_array_equal(held.nf, prompt)       # each clip's real frames follow it
    sample = (100 * (prompt // 100))[:, None] + (prompt % 100)[:, None] * g + np.arange(g)
    for x in (held.lengths, held.adv, held.scores["reward"], held.tokens[:, 0], held.old_lp[:, -1]):
        np.testing.assert_array_equal(np.asarray(x), sample.reshape(-1))
    assert held.dev is None                              # an assembled batch goes up again

    # a draw kept whole (or held unchanged) is passed through, device batch included
    first = fake(0)
    first.dev = {"input_ids": jnp.zeros(1)}
    assert merge_rollouts(None, first, np.arange(p), g) is first


# ----------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A small synthetic set and a random tiny VILA checkpoint with its tokenizer."""
    return synthetic_run_inputs(tmp_path_factory.mktemp("dynamic"), num_train=12)


def test_grpo_run_with_dynamic_sampling(tiny_setup, tmp_path):
    """A random model never gets a group's accuracy strictly between 0.01 and 0.99, so every
    step rolls out the bound's 2 draws and fills the batch; the update still runs on P groups."""
    batch, max_draws, steps = 2, 2, 2
    cmd = [sys.executable, str(ROOT / "launch" / "train_grpo.py"),
           f"--config={ROOT / 'configs' / 'demo.py'}", f"--workdir={tmp_path / 'run'}",
           f"--config.init_checkpoint={tiny_setup / 'init'}",
           f"--config.data.dir={tiny_setup / 'data'}", f"--config.train.steps={steps}",
           "--config.train.checkpoint_every=100", "--config.train.log_every=100",
           f"--config.data.pipeline.batch_size={batch}", "--config.data.pipeline.num_frames=4",
           "--config.rl.group_size=2", "--config.rl.max_new_tokens=8",
           "--config.mesh.fsdp=8", "--config.mesh.seq=1",        # no ring: compiles faster
           "--config.rl.dynamic_sampling=True", "--config.rl.dynamic_keep_key=accuracy",
           f"--config.rl.dynamic_max_draws={max_draws}"]
    out = subprocess.run(cmd, env=launch_env(), timeout=600,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))}
    assert sorted(rows) == list(range(1, steps + 1))
    hits = [line for line in out.stderr.splitlines() if "dynamic sampling kept" in line]
    for step, r in rows.items():
        assert r["prompts_drawn"] == batch * r["draws"] >= batch
        assert r["groups_kept"] + r["groups_dropped"] == r["prompts_drawn"]
        assert r["groups_filled"] == max(0, batch - r["groups_kept"])
        assert r["draw_bound_hit"] == int(r["groups_filled"] > 0)
        assert np.isfinite(r["loss"]) and 0 <= r["batch_reward_mean"] <= 1
        logged = [line for line in hits if f"step {step}:" in line]
        assert len(logged) == r["draw_bound_hit"], hits
        if r["draw_bound_hit"]:
            assert r["draws"] == max_draws
            assert (f"kept {r['groups_kept']} of {batch} groups needed after {max_draws} draws"
                    in logged[0])
    assert sum(r["draw_bound_hit"] for r in rows.values()) == steps, rows
    # every drawn group failed the rule and is masked out of the loss: no policy gradient
    assert all(r["policy_loss"] == 0.0 for r in rows.values()), rows
