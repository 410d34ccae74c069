"""Validation during training: a short SFT run validates every `eval.every` steps and at the end
on a fixed subset, logs the val_* metrics with those steps' rows, marks the best checkpoint, and the
curves show it; the best survives a restart (best.json + its params checkpoint)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvr_jax.rl.rewards import REWARD_STYLES
from lvr_jax.train.checkpoint import COMMIT_FILE, abstract_like, restore_params
from lvr_jax.train.metrics import draw, read_metrics
from lvr_jax.train.validation import BEST_FILE, BestCheckpoint, fixed_subset
from tests.conftest import launch_env, synthetic_run_inputs

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY, NUM = 7, 3, 4


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """7 CoT-SFT steps of a random tiny VLM, validated at steps 3, 6 and 7 on 4 of 6 items."""
    root = synthetic_run_inputs(tmp_path_factory.mktemp("validation"), num_train=6, num_val=6)
    workdir = root / "sft"
    cmd = [sys.executable, str(ROOT / "launch" / "train_sft.py"),
           f"--config={ROOT / 'configs' / 'demo.py'}:sft", f"--workdir={workdir}",
           f"--config.init_checkpoint={root / 'init'}", f"--config.data.dir={root / 'data'}",
           f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=100",
           "--config.train.log_every=100", "--config.data.pipeline.batch_size=2",
           "--config.data.pipeline.num_frames=4", f"--config.eval.every={EVERY}",
           f"--config.eval.num_examples={NUM}", "--config.eval.max_new_tokens=8",
           "--config.eval.batch_size=4"]
    out = subprocess.run(cmd, env=launch_env(), timeout=600,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return workdir, out.stdout


def test_validation_metrics_every_n_steps_and_at_the_end(sft_run):
    workdir, stdout = sft_run
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    validated = [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in validated] == [3, 6, 7]
    for r in validated:
        assert r["val_n"] == NUM
        for key in ["val_accuracy", "val_format_rate"] + [f"val_{m}_{s}" for s in REWARD_STYLES
                                                          for m in ("accuracy", "format_rate")]:
            assert 0.0 <= r[key] <= 1.0, key
        assert r["val_accuracy"] == r["val_accuracy_longrl"]         # the demo's reward style
        cats = [k for k in r if k.startswith("val_accuracy/")]
        assert cats and all(0.0 <= r[k] <= 1.0 for k in cats), cats
        fmts = [k for k in r if k.startswith("val_format_rate/")]
        assert sorted(k.split("/")[1] for k in fmts) == sorted(k.split("/")[1] for k in cats)
        assert all(0.0 <= r[k] <= 1.0 for k in fmts), fmts
        assert r["val_time_s"] > 0 and "loss" in r                   # merged into the step's row
    assert all(not any(k.startswith("val_") for k in r) for r in rows if r["step"] not in (3, 6, 7))
    for step in (3, 6, 7):
        assert f"[sft] validation at step {step}: accuracy" in stdout
    # the same 4 items each time: their categories are the same
    assert len({tuple(sorted(k for k in r if k.startswith("val_accuracy/"))) for r in validated}) == 1

    best = json.loads((workdir / BEST_FILE).read_text())
    top = max(r["val_accuracy"] for r in validated)
    assert best["val_accuracy"] == top
    assert best["step"] == next(r["step"] for r in validated if r["val_accuracy"] == top)  # tie: first
    assert best["val_n"] == NUM and best["reward_style"] == "longrl"
    assert (workdir / best["checkpoint"] / COMMIT_FILE).is_file()
    assert Path(best["checkpoint"]).parent == Path("best")          # relative to the workdir
    assert [p.name for p in (workdir / "best").iterdir() if p.name.isdigit()] == [
        Path(best["checkpoint"]).name]

    titles = [ax.get_title() for ax in draw([workdir / "metrics.jsonl"]).axes]
    assert titles[-1].startswith("Validation: accuracy of greedy answers"), titles
    assert titles[0].startswith("SFT: next-token loss") and not any("GRPO" in t for t in titles)


def result(acc):
    return {"accuracy": acc, "reward_style": "longrl", "format_rate": 0.5, "n": 4,
            "accuracy_by_style": {s: acc for s in REWARD_STYLES}}


def test_best_checkpoint_survives_a_restart_and_keeps_one(tmp_path):
    params = {"w": jnp.arange(3.0)}
    best = BestCheckpoint(tmp_path)
    assert best.record is None
    assert best.offer(3, result(0.5), params)
    assert not best.offer(6, result(0.5), {"w": params["w"] + 7})    # a tie keeps the first
    best.close()

    best = BestCheckpoint(tmp_path)                                # a resumed run reads it back
    assert best.record["step"] == 3 and best.accuracy == 0.5
    assert not best.offer(9, result(0.25), params)
    assert best.offer(12, result(0.75), {"w": params["w"] + 1})
    best.close()
    record = json.loads((tmp_path / BEST_FILE).read_text())
    assert record["step"] == 12 and record["val_accuracy"] == 0.75
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["2"]   # keep 1
    got = restore_params(tmp_path / "best", abstract_like(params))
    np.testing.assert_array_equal(jax.device_get(got.params["w"]), [1.0, 2.0, 3.0])
    assert got.extra == {"train_step": 12, "val_accuracy": 0.75}

    # a best.json naming a checkpoint that is not there (a kill after best/3 was committed and
    # best/2 deleted, before best.json named 3), or no best.json at all: the latest complete
    # best/<k> is read back from its own metadata, so a worse later result cannot replace it
    for broken in ({**record, "checkpoint": "best/1"}, None):
        if broken is None:
            (tmp_path / BEST_FILE).unlink()
        else:
            (tmp_path / BEST_FILE).write_text(json.dumps(broken))
        best = BestCheckpoint(tmp_path)
        assert (best.record["step"], best.accuracy, best.record["checkpoint"]) == (12, 0.75, "best/2")
        assert not best.offer(15, result(0.5), params)
        best.close()
    # the workdir moved: best.json's relative path still names the checkpoint
    best = BestCheckpoint(tmp_path)
    assert best.offer(18, result(0.8), params)
    best.close()
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    tmp_path.rename(moved)
    best = BestCheckpoint(moved)
    assert (best.record["step"], best.record["reward_style"]) == (18, "longrl")   # best.json's
    best.close()


def test_fixed_subset_is_the_same_items_in_file_order():
    items = list(range(50))
    a, b = fixed_subset(items, 8), fixed_subset(items, 8)
    assert a == b == sorted(a) and len(set(a)) == 8 and a != items[:8]
    assert fixed_subset(items, 0) == items and fixed_subset(items, 80) == items
