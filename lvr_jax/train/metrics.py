"""Per-step metrics: one JSON line per step and TensorBoard scalars (tensorboardX, no TF)."""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import numpy as np

log = logging.getLogger(__name__)


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
