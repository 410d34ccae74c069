"""What `launch/bench_sampler.py` writes: medians of the timed rounds, the Markdown table, the JSON
and the PNG (wall seconds split into the first token and the decode loop, and decode ms per step,
per sampler)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

SAMPLERS = ("hf", "shared", "repeated")       # transformers generate(); ours shared; ours repeated
LABELS = {"hf": "transformers generate", "shared": "lvr_jax, shared prefix",
          "repeated": "lvr_jax, prompt repeated G times"}


def summarise(seconds: dict, new: int) -> dict:
    """`seconds`: per run name (a sampler, or a sampler + '_first' for its one-token call) the
    timed rounds. Returns medians, decode ms per step ((call - first token) / (new - 1)) and each
    of ours as a speed-up over transformers (its seconds / ours, call and decode step)."""
    for name in (*SAMPLERS, *(n + "_first" for n in SAMPLERS)):
        if not seconds.get(name):
            raise ValueError(f"no timed rounds for '{name}'")
    med = {n: statistics.median(t) for n, t in seconds.items()}
    step_ms = {n: 1e3 * (med[n] - med[n + "_first"]) / max(new - 1, 1) for n in SAMPLERS}
    return {"median_s": med, "decode_ms_per_step": step_ms,
            "vs_hf": {n: med["hf"] / med[n] for n in SAMPLERS[1:]},
            "decode_vs_hf": {n: step_ms["hf"] / step_ms[n] for n in SAMPLERS[1:]}}


def table(summary: dict, flags: dict, cost: dict, torch_version: str) -> str:
    """The Markdown table: one row per sampler, then the prefill FLOPs and prefix bytes of one
    batch with and without the shared prefix (`cost`: {'shared'|'repeated': (flops, bytes)})."""
    med, step = summary["median_s"], summary["decode_ms_per_step"]
    rows = flags["prompts"] * flags["group"]
    tok = rows * flags["new"]
    lines = [
        f"Tiny Qwen2 (64 wide, 2 layers), {flags['prompts']} prompts x G={flags['group']}, prompt "
        f"{flags['prompt_len']} tokens, {flags['new']} new tokens, greedy, CPU "
        f"({flags.get('cpu_devices', '?')} JAX device(s); torch {torch_version}), median of "
        f"{flags['repeats']} interleaved rounds, each call warmed by the same call for at least "
        f"{flags.get('warm_s', 0)} s.",
        "", "| sampler | wall s | tokens/s | vs HF generate | first token s | decode ms/step "
        "| decode vs HF |", "|---|---:|---:|---:|---:|---:|---:|"]
    for n in SAMPLERS:
        label = LABELS[n] + (f" (batch {rows})" if n == "hf" else "")
        lines.append(f"| {label} | {med[n]:.3f} | {tok / med[n]:.0f} | {med['hf'] / med[n]:.2f} | "
                     f"{med[n + '_first']:.3f} | {step[n]:.2f} | {step['hf'] / step[n]:.2f} |")
    (sf, sb), (rf, rb) = cost["shared"], cost["repeated"]
    lines += ["", "| prefill of one batch | FLOPs | prefix K/V bytes |", "|---|---:|---:|",
              f"| shared prefix (B={flags['prompts']}) | {sf:.3e} | {sb} |",
              f"| repeated (B x G={rows}) | {rf:.3e} | {rb} |",
              f"| ratio | {rf / sf:.2f}x | {rb / sb:.2f}x |"]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path) -> None:
    """Two panels: wall seconds per call stacked as first token + decode loop, and decode ms per
    step, one bar per sampler."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    med, step = summary["median_s"], summary["decode_ms_per_step"]
    names = [LABELS[n].replace(", ", ",\n") for n in SAMPLERS]
    first = [med[n + "_first"] for n in SAMPLERS]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, first, label="prefill + first token")
    a.bar(names, [med[n] - f for n, f in zip(SAMPLERS, first)], bottom=first, label="decode loop")
    a.set_ylabel("wall s per call (median)")
    a.legend()
    b.bar(names, [step[n] for n in SAMPLERS], color="tab:green")
    b.set_ylabel("decode ms / step")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out, seconds: dict, flags: dict, cost: dict, torch_version: str) -> str:
    """bench_sampler.md / .json / .png under `out`; returns the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(seconds, flags["new"])
    md = table(summary, flags, cost, torch_version)
    (out / "bench_sampler.md").write_text(md)
    (out / "bench_sampler.json").write_text(json.dumps(
        {"seconds": seconds, **summary, "prefill_cost": cost, "flags": flags}, indent=1))
    plot(summary, out / "bench_sampler.png")
    return md
