"""launch/bench_grpo_step.py: the JSON it writes, the three modes' equal loss and gradient norm on
the same rollout, and the FLOP formulas against cost_analysis of unrolled loops."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import demo
from lvr_jax.eval import bench_step, flops

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"mode", "setting", "frames", "step_s", "phases_s", "flops", "peak_bytes_per_device"}


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    """The launch script at toy size (own process: 8 CPU devices, fast-compiling XLA flags)."""
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true"))
    cmd = [sys.executable, "launch/bench_grpo_step.py", "--quick", "--quick_frames=2",
           "--steps=1", "--prompts=2", "--group=2", "--new_tokens=3", "--text=12", f"--out={out}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "bench_grpo_step.md").read_text().count("| 2 |") == 3
    assert (out / "bench_grpo_step.png").stat().st_size > 0
    return json.loads((out / "bench_grpo_step.json").read_text())


def test_json_rows_have_the_fields(quick_rows):
    assert [r["mode"] for r in quick_rows] == list(bench_step.MODES)
    for r in quick_rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["setting"] == "run" and r["frames"] == 2
        assert set(r["phases_s"]) == set(bench_step.PHASES)
        assert r["step_s"] > 0 and r["flops"] > 0 and r["peak_bytes_per_device"] > 0
        assert abs(sum(r["phases_s"].values()) - r["step_s"]) <= 0.5 * r["step_s"]
    by = {r["mode"]: r for r in quick_rows}
    assert by["naive"]["flops"] > by["mrsp"]["flops"] > by["mrsp_shared"]["flops"]


def test_modes_give_the_same_loss_and_grad_norm(quick_rows):
    """Same weights, batch and rollout responses: naive (G full sequences, features encoded per
    sample, no ring), mrsp (full sequences, ring) and mrsp_shared (shared prefix) agree."""
    want = quick_rows[0]["fixed"]
    assert want["grad_norm"] > 0
    for r in quick_rows[1:]:
        for k in ("loss", "grad_norm", "ref_logprob_mean"):
            assert r["fixed"][k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (r["mode"], k)


def test_flop_formula_matches_unrolled_cost_analysis():
    """At one size where matmuls dominate, on one device: every phase's formula within 5% of
    cost_analysis of the program with its scans / fori loops unrolled (decode: one step, the
    while loop's body)."""
    config = demo.get_config()
    config.mesh = dict(data=1, fsdp=1, seq=1, tensor=1)
    config.model.llm.update(hidden_size=256, intermediate_size=1024, num_heads=4, num_kv_heads=2)
    config.model.vision.update(hidden_size=128, intermediate_size=512, num_heads=2)
    shape = dict(prompts=1, group=2, new_tokens=4, text=16)
    with flops.unrolled_loops():
        rows = bench_step.compile_setting(config, [2], modes=("naive", "mrsp_shared"),
                                          devices=jax.devices()[:1], count_flops=True,
                                          log=lambda m: None, **shape)
    for r in rows:
        want, got = r["flops_by_phase"], r["cost_flops_by_phase"]
        for phase in ("encode", "prefill", "reference", "update"):
            assert got[phase] == pytest.approx(want[phase], rel=0.05), (r["mode"], phase)
        assert got["decode"] == pytest.approx(want["decode"] / shape["new_tokens"], rel=0.05)


@pytest.mark.parametrize("length,n", [(335, 8), (64, 4), (50, 2)])
def test_prefill_block_counts(length, n):
    """bench_mrsp's sub-block counts: the zigzag ring computes 2n+1 of 4n on every device; a
    contiguous split needs, per device, the sub-blocks with any unmasked (query >= key, both real)
    pair, counted here on the full [L, L] mask."""
    from lvr_jax.eval.bench_prefill import computed_blocks
    from sharding.sequence_parallel import padded_length

    if n == 8:                      # one ring compile is enough
        assert computed_blocks(length, n, True).tolist() == [2 * n + 1] * n
    lp = padded_length(length, n)
    h = lp // (2 * n)
    pos = np.arange(lp)
    allowed = (pos[:, None] >= pos[None, :]) & (pos[:, None] < length) & (pos[None, :] < length)
    blocks = allowed.reshape(2 * n, h, 2 * n, h).any(axis=(1, 3))
    want = blocks.reshape(n, 2, 2 * n).sum(axis=(1, 2))
    assert computed_blocks(length, n, False).tolist() == want.tolist()
