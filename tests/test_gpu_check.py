"""The GPU check's CPU smoke run (same code paths, toy sizes) and the GPU launch settings."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from lvr_jax import cli
from lvr_jax.eval import gpu_check_report
from lvr_jax.eval.gpu_check import loop_writes, qwen2_flops

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """launch/gpu_check.py --cpu-smoke: (its folder, gpu_check.json)."""
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu_check.py"), "--cpu-smoke",
                          f"--out={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp_path, json.loads((tmp_path / "gpu_check.json").read_text())


def test_gpu_check_cpu_smoke(smoke):
    tmp_path, got = smoke
    assert got["device"]["backend"] == "cpu"
    for section in ("sub_block", "prefill", "decode", "grpo"):
        assert "error" not in got[section], got[section]
    block = got["sub_block"]
    assert block["fused_implementation"] == "xla"          # CPU: XLA's, same contract
    assert block["ring_kernel"] == "xla"
    assert max(block["ring_fused_rel_err"].values()) < 1e-5, block["ring_fused_rel_err"]
    assert min(block[f"{k}_s"] for k in ("einsum_forward", "einsum_backward", "fused_forward",
                                         "fused_forward_backward", "ring_fused_forward",
                                         "ring_fused_backward")) > 0
    assert got["prefill"]["tflops"] > 0 and got["prefill"]["mfu"] is None   # no CPU peak
    assert got["decode"]["ms_per_step"] > 0
    # XLA:CPU writes each layer's prefix K and V out of the stacked prefix every step (the layer
    # scan's dynamic slice); on a GPU the same count says whether its gemms read them in place
    assert got["decode"]["prefix_copies_in_loop"] >= 2, got["decode"]
    assert set(got["grpo"]["timed"]) == {"encode", "prompts", "rollout", "reference", "update"}
    report = (tmp_path / "gpu_check.md").read_text()
    assert report == gpu_check_report.table(got)
    assert report.count("| not judged (cpu smoke run) |") == len(gpu_check_report.GOALS)


def test_report_judges_the_goals_on_a_gpu_only(smoke):
    """The goals' verdicts on a GPU result: at or past the limit is met, either way round; a
    failed section, or a device without peak figures, is reported as such, not judged."""
    got = copy.deepcopy(smoke[1])
    got["device"].update(backend="gpu", device_kind="NVIDIA H200", cudnn=91000)
    got["sub_block"]["ring_fused_speedup_forward_backward"] = 3.0
    got["prefill"]["mfu"] = 0.4999
    got["decode"]["vs_hbm_read"] = 2.0
    verdicts = [gpu_check_report.judge(got, g)[1] for g in gpu_check_report.GOALS]
    assert verdicts == ["met", "not met", "met"]
    got["decode"]["vs_hbm_read"] = 2.01
    assert gpu_check_report.judge(got, gpu_check_report.GOALS[2]) == (2.01, "not met")
    report = gpu_check_report.table(got)
    assert "| >= 50% | 50.0% | not met |" in report and "cuDNN 91000" in report
    got["decode"] = {"error": "XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory"}
    got["prefill"]["mfu"] = None
    got["device"]["device_kind"] = "NVIDIA L4"
    verdicts = [gpu_check_report.judge(got, g)[1] for g in gpu_check_report.GOALS]
    assert verdicts == ["met", "not judged (no peak figures for NVIDIA L4)",
                        "failed (XlaRuntimeError)"]
    report = gpu_check_report.table(got)
    assert "decode: **failed**, XlaRuntimeError: RESOURCE_EXHAUSTED" in report
    del got["grpo"]
    assert "grpo: not run" in gpu_check_report.table(got)


def test_qwen2_flops_formula():
    """Per layer: 2 x tokens x (q, k, v, o, gate, up, down weights) + 4 x tokens^2 x heads x
    head_dim (halved when causal); plus the head's rows."""
    class Cfg:
        hidden_size, intermediate_size, head_dim = 64, 128, 16
        num_heads, num_kv_heads, num_layers, vocab_size = 4, 2, 3, 100

    t = 10
    layer = 2 * t * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 4 * t * t * 64
    assert qwen2_flops(Cfg, t, causal=False, logits=t) == 3 * layer + 2 * t * 64 * 100
    assert qwen2_flops(Cfg, t) == 3 * (layer - 2 * t * t * 64) + 2 * 64 * 100


def test_gpu_settings_add_flags_and_keep_the_users():
    env = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false"}
    added = cli.gpu_settings(env)
    assert "--xla_gpu_enable_latency_hiding_scheduler" not in added       # the user's wins
    assert env["XLA_FLAGS"].count("latency_hiding") == 1
    assert "--xla_gpu_all_reduce_combine_threshold_bytes=268435456" in env["XLA_FLAGS"]
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
    assert cli.gpu_settings(env) == {}                                   # idempotent
    assert set(cli.GPU_XLA_FLAGS) <= set(added) | {"--xla_gpu_enable_latency_hiding_scheduler"}


def test_cuda_plugin_probe_without_jax_platforms(monkeypatch):
    """Without JAX_PLATFORMS the probe looks for the CUDA plugins; on this CPU-only install (no
    `jax_plugins` package) it answers False instead of raising ModuleNotFoundError."""
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert cli.has_cuda_plugin() is False
    assert cli._module_exists("jax_plugins.xla_cuda13") is False
    assert cli._module_exists("json") is True
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cli.has_cuda_plugin() is False


def test_loop_writes_counts_arrays_written_in_loop_bodies_only():
    hlo = """%fused_computation (p: f32[1,2,8,4]) -> f32[1,2,8,4] {
  %p = f32[1,2,8,4]{3,2,1,0} parameter(0)
  ROOT %neg = f32[1,2,8,4]{3,2,1,0} negate(%p)
}

%body (t: (s32[], f32[3,2,8,4])) -> (s32[], f32[3,2,8,4]) {
  %t = (s32[], f32[3,2,8,4]) parameter(0)
  %c = f32[3,2,8,4]{3,2,1,0} get-tuple-element(%t), index=1
  %ds = f32[1,2,8,4]{3,2,1,0} dynamic-slice(%c, %i, %z, %z, %z), dynamic_slice_sizes={1,2,8,4}
  %b = f32[2,8,4]{2,1,0} bitcast(%ds)
  %h = bf16[2,8,4]{2,1,0} convert(%b)
  %f = f32[2,8,4]{2,1,0} fusion(%ds), kind=kLoop, calls=%fused_computation
  ROOT %r = (s32[], f32[3,2,8,4]) tuple(%i, %c)
}

ENTRY %main (a: f32[3,2,8,4]) -> f32[2,8,4] {
  %a = f32[3,2,8,4]{3,2,1,0} parameter(0)
  %s = f32[1,2,8,4]{3,2,1,0} slice(%a), slice={[0:1], [0:2], [0:8], [0:4]}
  %w = (s32[], f32[3,2,8,4]) while(%t0), condition=%cond, body=%body
}
"""
    # in the body: the dynamic slice and the fusion (not the bitcast, nor the bf16 convert);
    # the entry's slice and the fusion's own body are outside the loop
    assert loop_writes(hlo, jnp.float32, (2, 8, 4)) == 2
    assert loop_writes(hlo, jnp.bfloat16, (1, 2, 8, 4)) == 1
    assert loop_writes(hlo, jnp.float32, (2, 8, 5)) == 0


def test_a_run_cut_short_keeps_the_sections_it_measured(smoke, tmp_path, monkeypatch):
    """The JSON and the report are written after each section: a section interrupted (the
    device's time limit, Ctrl-C) leaves the earlier ones on disk."""
    from lvr_jax.eval import gpu_check

    def cut(sizes):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check, "SECTIONS", {"sub_block": lambda sizes: dict(smoke[1]["sub_block"]),
                                                "prefill": cut})
    with pytest.raises(KeyboardInterrupt):
        gpu_check.run_checks(gpu_check.CPU_SMOKE, tmp_path, ("sub_block", "prefill"),
                             log=lambda m: None)
    kept = json.loads((tmp_path / "gpu_check.json").read_text())
    assert kept["sub_block"]["einsum_forward_s"] == smoke[1]["sub_block"]["einsum_forward_s"]
    assert kept["sub_block"]["section_s"] >= 0 and "prefill" not in kept
    assert "prefill: not run" in (tmp_path / "gpu_check.md").read_text()
