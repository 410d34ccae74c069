"""Report of `eval.bench_step`: the Markdown tables, the PNG and the files of
launch/bench_grpo_step.py."""

from __future__ import annotations

import json
from pathlib import Path

from lvr_jax.eval.bench_step import GIB, MIB, MODES, PHASES


def markdown(rows) -> str:
    """Tables: per frame count and mode, step and phase seconds, FLOPs, peak memory, and the
    naive / mode ratios (speed-up, FLOPs) of each frame count."""
    naive = {(r["setting"], r["frames"]): r for r in rows if r["mode"] == "naive"}
    ratio = lambda r, k: (naive[r["setting"], r["frames"]][k] / r[k]  # noqa: E731
                          if (r["setting"], r["frames"]) in naive and r[k] else float("nan"))
    out = []
    run = [r for r in rows if r["setting"] == "run"]
    if run:
        out += ["| frames | prompt tokens | mode | step s | " + " | ".join(PHASES)
                + " | GFLOP | peak MiB / device | naive / mode step s | naive / mode FLOPs |",
                "|---:|---:|---|---:|" + "---:|" * len(PHASES) + "---:|---:|---:|---:|"]
        out += [f"| {r['frames']} | {r['prompt_tokens']} | {r['mode']} | {r['step_s']:.3f} | "
                + " | ".join(f"{r['phases_s'][p]:.3f}" for p in PHASES)
                + f" | {r['flops'] / 1e9:.2f} | {r['peak_bytes_per_device'] / MIB:.1f} | "
                f"{ratio(r, 'step_s'):.2f} | {ratio(r, 'flops'):.2f} |" for r in run]
    comp = [r for r in rows if r["setting"] == "compile"]
    if comp:
        out += ["", "| frames | prompt tokens | mode | TFLOP | naive / mode FLOPs | peak GiB / "
                "device | " + " | ".join(p for p in PHASES if p != "reward") + " | 80 GiB |",
                "|---:|---:|---|---:|---:|---:|" + "---:|" * (len(PHASES) - 1) + "---|"]
        out += [f"| {r['frames']} | {r['prompt_tokens']} | {r['mode']} | {r['flops'] / 1e12:.0f} | "
                f"{ratio(r, 'flops'):.2f} | **{r['peak_bytes_per_device'] / GIB:.1f}** | "
                + " | ".join(f"{r['peak_bytes_by_phase'].get(p, 0) / GIB:.1f}" for p in PHASES
                             if p != "reward")
                + f" | {'fits' if r['peak_bytes_per_device'] <= 80 * GIB else 'no'} |"
                for r in comp]
    return "\n".join(out) + "\n"


def plot(rows, path) -> None:
    """Step seconds and peak memory per device against frames, one line per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("run", "step_s", 1, "step s (CPU run)"),
              ("run", "peak_bytes_per_device", MIB, "peak MiB / device (CPU run)"),
              ("compile", "peak_bytes_per_device", GIB, "peak GiB / device (7B compile)")]
    panels = [p for p in panels if any(r["setting"] == p[0] for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (setting, key, unit, title) in zip(axes[0], panels):
        for mode in MODES:
            sel = sorted((r for r in rows if r["setting"] == setting and r["mode"] == mode),
                         key=lambda r: r["frames"])
            if sel:
                ax.plot([r["frames"] for r in sel], [r[key] / unit for r in sel], "o-",
                        label=mode)
        if setting == "compile":
            ax.axhline(80, color="gray", ls="--", label="80 GiB")
        ax.set(xscale="log", yscale="log", xlabel="frames", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_outputs(rows, out, header: str = "", log=print) -> None:
    """<out>/bench_grpo_step.json (the rows), .md (header + tables) and .png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_grpo_step.json").write_text(json.dumps(rows, indent=1))
    table = (header + "\n\n" if header else "") + markdown(rows)
    (out / "bench_grpo_step.md").write_text(table)
    plot(rows, out / "bench_grpo_step.png")
    log(table)
    log(f"[bench_grpo_step] wrote {out}/bench_grpo_step.json, .md and .png")
