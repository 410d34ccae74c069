"""Per-step metrics: one JSON line per step and TensorBoard scalars (tensorboardX, no TF); progress
lines (`say`); reading the JSONL back as curves and a PNG (launch/plot_metrics.py).

Resume hygiene: a run killed after its last checkpoint has logged steps it will redo. On restore,
`MetricsWriter.drop_after(step)` (process 0) rewrites metrics.jsonl without the rows after the
restored step (a new file renamed over the old one, so a crash leaves either file whole; a line
torn by the kill goes too) and reopens the TensorBoard writer with `purge_step = step + 1`:
tensorboardX writes a SessionLog.START event at that step and TensorBoard then hides the older
events at or after it (the old event files stay on disk; without the purge TensorBoard would show
both timelines' points for those steps). Second line of defence, for files written before this or
by other tools: `read_runs` keeps the last row of a step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import jax
import numpy as np

from lvr_jax.weights.io import atomic_write

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
        self.tb_dir = os.path.join(workdir, "tb")
        self.tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                self.tb = self._summary_writer()
            log.info("metrics -> %s and %s", self.path, self.tb_dir)

    def _summary_writer(self, purge_step: int | None = None):
        from tensorboardX import SummaryWriter
        # the file name holds the second it was made: a suffix keeps the purging writer's file
        # apart from the one opened a moment before
        return SummaryWriter(self.tb_dir, purge_step=purge_step,
                             filename_suffix="" if purge_step is None else f".from_step{purge_step}")

    def drop_after(self, step: int) -> int:
        """Resume hygiene (the module docstring): remove the rows after `step` (and torn lines)
        from metrics.jsonl atomically, purge TensorBoard's events after it. Process 0 only;
        returns the number of lines dropped (0 elsewhere)."""
        if not self.active or not os.path.exists(self.path):
            return 0
        kept, dropped = [], 0
        with open(self.path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:                  # torn by the kill
                    dropped += 1
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
                    dropped += 1
                    continue
                kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            atomic_write(self.path, "".join(kept).encode())
            if self.tb is not None:
                self.tb.close()
                self.tb = self._summary_writer(purge_step=int(step) + 1)
            log.info("dropped %d metrics rows after step %d from %s", dropped, step, self.path)
        return dropped

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
    """The rows of a metrics.jsonl file, in file order (a line that does not parse, e.g. one torn
    by a kill, is skipped with a warning)."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                log.warning("%s:%d: not a JSON line, skipped", path, i)
    return rows


# ---------------------------------------------------------------------------------------------
# reading metrics.jsonl files back: curves, first/last-window means, a PNG (launch/plot_metrics.py)

CURVES = ("loss", "reward_mean", "accuracy", "format_rate", "kl", "response_length")


def one_row_per_step(rows: list[dict]) -> list[dict]:
    """The last row of each step, by step (a resumed run's file written without `drop_after`
    holds the redone steps twice: the later row is the run's); rows without an integer step go."""
    last = {}
    for r in rows:
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            last[r["step"]] = r
    return [last[s] for s in sorted(last)]


def run_names(paths) -> list[str]:
    """One name per file: its folder, with as many parent folders as make the names differ
    (runs/a/sft and runs/b/sft -> a/sft, b/sft); the whole path when even that does not."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep)[:-1] for p in paths]
    for depth in range(1, max(len(q) for q in parts) + 1):
        names = ["/".join(q[-depth:]) for q in parts]
        if len(set(names)) == len(names):
            return names
    return [os.fspath(p) for p in paths]


def read_runs(paths) -> dict[str, list[dict]]:
    """{run name (`run_names`): rows, one per step (`one_row_per_step`)}; a path that is not a
    file is a FileNotFoundError naming it (a misspelt run is not left out of the plot)."""
    missing = [os.fspath(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"no metrics file {missing}")
    return {name: one_row_per_step(read_metrics(p)) for name, p in zip(run_names(paths), paths)}


def curve(rows: list[dict], name: str) -> list[tuple[int, float]]:
    """(step, value) of the rows that log `name` as a number."""
    return [(r["step"], r[name]) for r in rows
            if isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool)]


def first_last(rows: list[dict], window: int = 20) -> dict[str, tuple[float, float]]:
    """{metric: (mean of its first `window` values, mean of its last `window`)} for CURVES."""
    out = {}
    for name in CURVES:
        vals = [v for _, v in curve(rows, name)]
        if vals:
            out[name] = (sum(vals[:window]) / len(vals[:window]),
                         sum(vals[-window:]) / len(vals[-window:]))
    return out


@dataclasses.dataclass(frozen=True)
class Panel:
    """One quantity of the curves' figure: metrics key `key` of the runs of `stage` ("sft",
    "grpo" or "any"; `stage_of`), drawn as a line, or as points (`points`: logged every few
    steps)."""
    key: str
    stage: str
    title: str
    ylabel: str
    points: bool = False


PANELS = (
    Panel("loss", "sft", "SFT: next-token loss on the reply", "cross-entropy (nats / token)"),
    Panel("accuracy", "sft", "SFT: next-token accuracy on the reply\n(teacher-forced)",
          "fraction of reply tokens"),
    Panel("reward_mean", "grpo", "GRPO: mean reward of the sampled replies\n(rl.temperature)",
          "reward"),
    Panel("accuracy", "grpo", "GRPO: answer accuracy of the sampled replies\n(rl.temperature)",
          "fraction correct"),
    Panel("format_rate", "grpo", "GRPO: format rate of the sampled replies", "fraction well-formed"),
    Panel("kl", "grpo", "GRPO: KL to the reference model (k3)", "KL per token"),
    Panel("response_length", "grpo", "GRPO: mean length of the sampled replies", "tokens"),
    Panel("val_accuracy", "any", "Validation: accuracy of greedy answers\n(eval.every steps)",
          "fraction correct", points=True),
)
COLUMNS = 3


def stage_of(rows: list[dict]) -> str:
    """"grpo" for a run that logs rollout rewards, else "sft"."""
    return "grpo" if any("reward_mean" in r for r in rows) else "sft"


def panels(runs: dict[str, list[dict]]) -> list[tuple[Panel, dict[str, list]]]:
    """[(panel, {run: (step, value) points})] of the PANELS some run has data for."""
    out = []
    for p in PANELS:
        series = {run: pts for run, rows in runs.items()
                  if p.stage in ("any", stage_of(rows)) and (pts := curve(rows, p.key))}
        if series:
            out.append((p, series))
    return out


def draw(paths):
    """The curves' matplotlib Figure: one labelled panel per quantity with data (`PANELS`), in
    rows of COLUMNS, one line (or set of points) per file, the same colour for a file in every
    panel. ValueError when no file has any of them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = read_runs(paths)
    chosen = panels(runs)
    if not chosen:
        known = sorted({p.key for p in PANELS})
        raise ValueError(f"no known metrics ({', '.join(known)}) in {paths}")
    colour = {run: f"C{i}" for i, run in enumerate(runs)}
    cols = min(COLUMNS, len(chosen))
    nrows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.0 * cols, 3.6 * nrows), squeeze=False)
    for ax, (p, series) in zip(axes.flat, chosen):
        for run, pts in series.items():
            style = dict(marker="o", linestyle=":", markersize=4) if p.points else dict(linewidth=1.2)
            ax.plot(*zip(*pts), label=run, color=colour[run], **style)
        ax.set_title(p.title, fontsize=10)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(p.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.flat[len(chosen):]:
        fig.delaxes(ax)
    fig.tight_layout()
    return fig


def plot(paths, out: str) -> str:
    """`draw` the metrics.jsonl files `paths` into the PNG `out`; returns `out`. ValueError when no
    file has any known metric."""
    fig = draw(paths)                     # selects the Agg backend before pyplot is imported
    import matplotlib.pyplot as plt

    try:
        fig.savefig(out, dpi=90)
    finally:
        plt.close(fig)
    return out
