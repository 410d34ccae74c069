"""Plot metrics.jsonl files into one PNG: one labelled panel per quantity (SFT loss and token
accuracy, GRPO reward, accuracy, format rate, KL, reply length, validation accuracy; those with data;
`lvr_jax.train.metrics.PANELS`), one line per file, each step read once; and print each curve's
mean over its first and last `--window` steps.
    python launch/plot_metrics.py runs/demo/grpo/metrics.jsonl [more.jsonl] --out=curves.png"""

from __future__ import annotations

import sys

from absl import app, flags

from lvr_jax.train.metrics import first_last, plot, read_runs

_OUT = flags.DEFINE_string("out", "curves.png", "the PNG to write")
_WINDOW = flags.DEFINE_integer("window", 20, "steps averaged at each end")


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more metrics.jsonl files", exitcode=2)
    if _WINDOW.value < 1:
        raise app.UsageError("--window must be >= 1", exitcode=2)
    try:
        print(plot(paths, _OUT.value))
    except (ValueError, FileNotFoundError) as e:   # no known metric; a path that is not a file
        sys.exit(str(e))
    window = _WINDOW.value
    for run, rows in read_runs(paths).items():
        for name, (a, b) in first_last(rows, window).items():
            print(f"{run:8s} {name:16s} first {window}: {a:.4g}  last {window}: {b:.4g}")


if __name__ == "__main__":
    app.run(main)
