"""Per-step metrics: one JSON line per step and TensorBoard scalars (tensorboardX, no TF); progress
lines (`say`); reading the JSONL back as curves and a PNG (launch/plot_metrics.py)."""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import numpy as np

log = logging.getLogger(__name__)


def say(message: str) -> None:
    """Print a progress line (process 0 only)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def to_python(metrics: dict) -> dict:
    """Device / NumPy scalars -> plain floats (non-finite kept as str for JSON)."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(jax.device_get(v)).item() if hasattr(v, "shape") or hasattr(v, "dtype") else v
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out


class MetricsWriter:
    """Appends `{"step": s, ...}` lines to `<workdir>/metrics.jsonl` and TensorBoard events to
    `<workdir>/tb`. Only process 0 writes."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            log.info("metrics -> %s and %s", self.path, os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict) -> dict:
        row = {"step": int(step), **to_python(metrics)}
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self.tb.add_scalar(k, v, step)
        return row

    def close(self):
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# reading metrics.jsonl files back: curves, first/last-window means, a PNG (launch/plot_metrics.py)

CURVES = ("loss", "reward_mean", "accuracy", "format_rate", "kl", "response_length")


def read_runs(paths) -> dict[str, list[dict]]:
    """{run name (the file's folder): rows} for the files that exist."""
    return {os.path.basename(os.path.dirname(p)) or os.fspath(p): read_metrics(p)
            for p in paths if os.path.exists(p)}


def curve(rows: list[dict], name: str) -> list[tuple[int, float]]:
    """(step, value) of the rows that log `name` as a number."""
    return [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]


def first_last(rows: list[dict], window: int = 20) -> dict[str, tuple[float, float]]:
    """{metric: (mean of its first `window` values, mean of its last `window`)} for CURVES."""
    out = {}
    for name in CURVES:
        vals = [v for _, v in curve(rows, name)]
        if vals:
            out[name] = (sum(vals[:window]) / len(vals[:window]),
                         sum(vals[-window:]) / len(vals[-window:]))
    return out


def plot(paths, out: str) -> str:
    """One panel per metric present in any file; one line per file. Returns `out`; ValueError
    when no file has any of CURVES."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_runs(paths)
    names = [c for c in CURVES if any(c in r for rows in runs.values() for r in rows)]
    if not names:
        raise ValueError(f"no known metrics ({', '.join(CURVES)}) in {paths}")
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        for run, rows in runs.items():
            pts = curve(rows, name)
            if pts:
                ax.plot(*zip(*pts), label=run)
        ax.set(title=name, xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
