"""launch/bench_sampler.py and launch/bench_data.py at toy sizes: the table, JSON and PNG they
write, their figures against formulas, and clear errors for bad flags."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import launch_env

ROOT = Path(__file__).resolve().parents[1]


def run(script, *flags, ok=True):
    done = subprocess.run([sys.executable, f"launch/{script}", *flags], cwd=ROOT, env=launch_env(),
                          capture_output=True, text=True, timeout=600)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done


def test_bench_sampler_writes_its_figures(tmp_path):
    prompts, group, length, new, repeats = 2, 3, 16, 4, 2
    run("bench_sampler.py", f"--out={tmp_path}", f"--prompts={prompts}", f"--group={group}",
        f"--prompt_len={length}", f"--new={new}", f"--repeats={repeats}", "--warm_s=0.01")
    got = json.loads((tmp_path / "bench_sampler.json").read_text())
    assert (tmp_path / "bench_sampler.png").stat().st_size > 0
    md = (tmp_path / "bench_sampler.md").read_text()
    assert md.count("| lvr_jax") == 2 and f"(batch {prompts * group})" in md
    assert "for at least 0.01 s" in md and got["flags"]["warm_s"] == 0.01
    sec = got["seconds"]
    assert set(sec) == {n + t for n in ("hf", "shared", "repeated") for t in ("", "_first")}
    assert all(len(t) == repeats and min(t) > 0 for t in sec.values())
    med = {n: float(np.median(t)) for n, t in sec.items()}
    for n in ("shared", "repeated"):
        assert got["vs_hf"][n] == pytest.approx(med["hf"] / med[n], rel=1e-9)
        step = 1e3 * (med[n] - med[n + "_first"]) / (new - 1)
        assert got["decode_ms_per_step"][n] == pytest.approx(step, rel=1e-9)
    # the tiny model: 2 layers, 2 KV heads of 16; float32 K and V of every prompt token
    (shared_flops, shared_bytes), (rep_flops, rep_bytes) = (got["prefill_cost"][k]
                                                            for k in ("shared", "repeated"))
    assert shared_bytes == 2 * prompts * 2 * length * 16 * 4 * 2
    assert rep_bytes == group * shared_bytes
    assert rep_flops == pytest.approx(group * shared_flops, rel=1e-12)


def test_bench_sampler_rejects_a_one_token_decode(tmp_path):
    err = run("bench_sampler.py", f"--out={tmp_path}", "--new=1", ok=False).stderr
    assert "--new must be >= 2, got 1" in err


def test_bench_data_writes_its_figures(tmp_path):
    items, batch, frames = 4, 2, 4
    run("bench_data.py", f"--out={tmp_path}", f"--num_items={items}", "--video_frames=16",
        "--video_size=32", f"--num_frames={frames}", f"--batch_size={batch}", "--workers=0,1",
        "--epochs=1")
    rows = json.loads((tmp_path / "bench_data.json").read_text())["rows"]
    assert [r["workers"] for r in rows] == [0, 1]
    for r in rows:       # the first batch is startup; the rest is the steady state
        assert r["batches"] == items // batch - 1 and r["frames"] == r["batches"] * batch * frames
        assert r["frames_per_s"] == pytest.approx(r["frames"] / r["steady_s"], rel=1e-9)
        assert r["startup_s"] > 0 and r["drain_s"] >= 0
    assert (tmp_path / "bench_data.md").read_text().count("\n| ") == 1 + len(rows)   # header + rows
    assert (tmp_path / "bench_data.png").stat().st_size > 0
    err = run("bench_data.py", f"--out={tmp_path}", "--workers=1,x", ok=False).stderr
    assert "--workers must be comma-separated integers, got '1,x'" in err
