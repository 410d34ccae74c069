"""The Markdown report of a `gpu_check.json` (`launch/gpu_check.py` writes it beside the JSON; the
README's GPU table is this file): the figures of each section, and the three benchmark goals of
issue 14 judged on a GPU (a CPU run is not judged: its figures are smoke, not measurements)."""

from __future__ import annotations

import dataclasses

MIB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Goal:
    name: str
    section: str
    key: str
    limit: float
    at_least: bool          # True: the figure must be >= limit; False: <= limit
    unit: str = "x"


GOALS = (
    Goal("ring's fused sub-block, forward+backward, speed-up over its einsum blocks",
         "sub_block", "ring_fused_speedup_forward_backward", 3.0, True),
    Goal("1.5B-size prefill at 32k tokens, model FLOPs utilisation", "prefill", "mfu", 0.5, True,
         "MFU"),
    Goal("decode step / one HBM read of the bf16 weights and prefix K/V", "decode",
         "vs_hbm_read", 2.0, False),
)


def judge(result: dict, goal: Goal) -> tuple[float | None, str]:
    """(the figure or None, verdict): 'met', 'not met', 'not judged (...)' or 'failed (...)'."""
    section = result.get(goal.section)
    if section is None:
        return None, "not run"
    if "error" in section:
        return None, f"failed ({section['error'].split(':')[0]})"
    value = section.get(goal.key)
    if result["device"]["backend"] != "gpu":
        return value, f"not judged ({result['device']['backend']} smoke run)"
    if value is None:
        return None, f"not judged (no peak figures for {result['device']['device_kind']})"
    ok = value >= goal.limit if goal.at_least else value <= goal.limit
    return value, "met" if ok else "not met"


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _failed(result: dict, name: str) -> str | None:
    section = result.get(name)
    if section is None:
        return f"{name}: not run"
    return f"{name}: **failed**, {section['error']}" if "error" in section else None


def _sub_block(s: dict) -> list[str]:
    out = [f"Attention sub-block {s['shape']} (B, L, H, KVH, D), causal, {s['dtype']}; fused "
           f"implementation {s['fused_implementation']}, the ring's {s['ring_kernel']}; the "
           f"ring's fused blocks' relative error to the einsum ones: "
           + ", ".join(f"{k} {v:.1e}" for k, v in s["ring_fused_rel_err"].items()) + ".", "",
           "| kernel | forward TFLOP/s | fwd+bwd TFLOP/s | fwd+bwd ms | forward temp MiB "
           "| backward temp MiB |", "|---|---:|---:|---:|---:|---:|"]
    for kind, label, bwd in (
            ("einsum", "ring's einsum blocks", "einsum_backward"),
            ("ring_fused", "ring's fused blocks", "ring_fused_backward"),
            ("fused", "jax.nn.dot_product_attention (fwd+bwd in one)", "fused_forward_backward")):
        out.append(f"| {label} | {s[kind + '_forward_tflops']:.3g} | "
                   f"{s[kind + '_forward_backward_tflops']:.3g} | "
                   f"{1e3 * s[kind + '_forward_backward_s']:.3g} | "
                   f"{s[kind + '_forward_temp_bytes'] / MIB:.1f} | "
                   f"{s[bwd + '_temp_bytes'] / MIB:.1f} |")
    return out + [""]


def _prefill(p: dict) -> list[str]:
    return [f"Prefill, {p['tokens']} tokens: {p['seconds']:.3g} s, {p['tflops']:.3g} TFLOP/s "
            f"(model FLOPs by formula), MFU {_fmt(p['mfu'], '.1%')}, temp "
            f"{p['temp_bytes'] / MIB:.0f} MiB.", ""]


def _decode(d: dict) -> list[str]:
    return [f"Decode, G = {d['group']} branches on a {d['prefix']}-token prefix, {d['steps']} "
            f"steps: {d['ms_per_step']:.3g} ms/step; one HBM read of weights + prefix "
            f"{_fmt(d['hbm_read_ms'])} ms ({_fmt(d['vs_hbm_read'], '.2f')}x); prefix copies "
            f"written per step in the loop: {d['prefix_copies_in_loop']}.", ""]


def _grpo(g: dict) -> list[str]:
    phases = list(g["timed"])
    return [f"One GRPO step, {g['frames']} frames, G = {g['group']}, {g['new_tokens']} new "
            f"tokens: {g['step_s']:.3g} s (timed after a warm-up step).", "",
            "| " + " | ".join(phases) + " |", "|" + "---:|" * len(phases),
            "| " + " | ".join(f"{g['timed'][p]:.3g} s" for p in phases) + " |", ""]


SECTIONS = {"sub_block": _sub_block, "prefill": _prefill, "decode": _decode, "grpo": _grpo}


def table(result: dict) -> str:
    """The report: device, goals, then one table per section that ran."""
    dev = result["device"]
    out = [f"Device: {dev['device_kind']} x {dev['devices']} ({dev['backend']}), jax {dev['jax']}, "
           f"cuDNN {dev['cudnn'] or '-'}.", "",
           "| goal | limit | measured | verdict |", "|---|---:|---:|---|"]
    for goal in GOALS:
        value, verdict = judge(result, goal)
        limit = f"{'>=' if goal.at_least else '<='} " + (f"{goal.limit:.0%}" if goal.unit == "MFU"
                                                          else f"{goal.limit:g}x")
        shown = _fmt(value, ".1%") if goal.unit == "MFU" and value is not None else _fmt(value, ".2f")
        out.append(f"| {goal.name} | {limit} | {shown} | {verdict} |")
    out.append("")
    for name, render in SECTIONS.items():
        msg = _failed(result, name)
        out += render(result[name]) if msg is None else [msg, ""]
    ran = [n for n in SECTIONS if n in result]
    out += ["Wall seconds per section, compiles included: "
            + ", ".join(f"{n} {result[n].get('section_s', 0):.0f}" for n in ran) + ".", ""]
    return "\n".join(out)
