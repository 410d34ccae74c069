"""Metrics files after a resume (each step once) and the curves' figure (one labelled panel per
quantity, SFT and GRPO kept apart, validation as points), without a model."""

import json
import struct

import pytest

from lvr_jax.train.metrics import PANELS, MetricsWriter, draw, plot, read_metrics, read_runs


def write_rows(path, rows, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def events(path) -> list:
    """The Event protos of a TensorBoard event file (TFRecord: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event
    data, out, at = path.read_bytes(), [], 0
    while at < len(data):
        (n,) = struct.unpack("<Q", data[at:at + 8])
        out.append(Event.FromString(data[at + 12:at + 12 + n]))
        at += 12 + n + 4
    return out


def test_drop_after_rewrites_the_file_without_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [{"step": s, "loss": 1.0 / s} for s in range(1, 11)], tail='{"step": 11, "lo')
    writer = MetricsWriter(str(tmp_path))
    inode = path.stat().st_ino
    assert writer.drop_after(6) == 5                       # steps 7..10 and the torn line
    assert path.stat().st_ino != inode                     # a new file renamed into place
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]   # no temp file left
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 7))
    assert writer.tb.purge_step == 7                       # TensorBoard hides the old steps 7..
    writer.write(7, {"loss": 0.5})
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 8))
    assert writer.drop_after(7) == 0 and path.read_text().count("\n") == 7
    writer.close()
    # the reopened TensorBoard file starts with a SessionLog.START at step 7: TensorBoard purges
    # the older files' events from step 7 on
    files = sorted((tmp_path / "tb").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    starts = [e.step for f in files for e in events(f) if e.session_log.status == 1]
    assert starts == [7]
    assert [(e.step, e.summary.value[0].tag) for e in events(files[-1]) if e.summary.value] == [
        (7, "loss")]


def test_read_runs_keeps_the_last_row_of_each_step(tmp_path):
    path = tmp_path / "sft" / "metrics.jsonl"
    write_rows(path, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 9.0},
                      {"step": 2, "loss": 2.5}, {"step": 3, "loss": 1.5}, {"note": "no step"}],
               tail="{torn\n")
    rows = read_runs([path])
    assert list(rows) == ["sft"]
    assert rows["sft"] == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5},
                           {"step": 3, "loss": 1.5}]
    # a misspelt file is an error naming it (it had been left out of the plot silently)
    with pytest.raises(FileNotFoundError, match="missing/metrics.jsonl"):
        read_runs([path, tmp_path / "missing" / "metrics.jsonl"])


def test_runs_in_folders_of_the_same_name_stay_apart(tmp_path):
    """cmp/a/sft and cmp/b/sft are two runs (both had been 'sft': one line, one summary)."""
    paths = [tmp_path / "cmp" / x / "sft" / "metrics.jsonl" for x in "ab"]
    for i, p in enumerate(paths):
        write_rows(p, [{"step": 1, "loss": 9.0 + i}])
    rows = read_runs(paths)
    assert rows == {"a/sft": [{"step": 1, "loss": 9.0}], "b/sft": [{"step": 1, "loss": 10.0}]}
    fig = draw(paths)
    assert sorted(line.get_label() for line in fig.axes[0].get_lines()) == ["a/sft", "b/sft"]


def runs(tmp_path):
    sft = [{"step": s, "loss": 2.0 / s, "accuracy": 0.1 * s} for s in range(1, 7)]
    grpo = [{"step": s, "loss": 0.01, "reward_mean": 0.1 * s, "accuracy": 0.05 * s,
             "format_rate": 0.5, "kl": 0.001 * s, "response_length": 20.0 + s} for s in range(1, 5)]
    for rows, every in ((sft, 3), (grpo, 2)):
        for r in rows[every - 1::every]:
            r.update(val_accuracy=0.25, val_format_rate=0.5)
    paths = [tmp_path / "sft" / "metrics.jsonl", tmp_path / "grpo" / "metrics.jsonl"]
    write_rows(paths[0], sft)
    write_rows(paths[1], grpo)
    return paths


def test_each_quantity_has_its_own_labelled_panel(tmp_path):
    paths = runs(tmp_path)
    fig = draw(paths)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [p.title for p in PANELS]             # every panel has data here, in order
    assert len(set(titles)) == len(titles)
    by_title = dict(zip(titles, fig.axes))
    sft_acc = by_title["SFT: next-token accuracy on the reply\n(teacher-forced)"]
    grpo_acc = by_title["GRPO: answer accuracy of the sampled replies\n(rl.temperature)"]
    assert [line.get_label() for line in sft_acc.lines] == ["sft"]
    assert [line.get_label() for line in grpo_acc.lines] == ["grpo"]
    assert list(grpo_acc.lines[0].get_ydata()) == pytest.approx([0.05, 0.1, 0.15, 0.2])
    val = by_title["Validation: accuracy of greedy answers\n(eval.every steps)"]
    assert {line.get_label(): list(line.get_xdata()) for line in val.lines} == {
        "sft": [3, 6], "grpo": [2, 4]}
    assert all(line.get_marker() == "o" for line in val.lines)
    assert all(ax.get_xlabel() == "training step" and ax.get_ylabel() for ax in fig.axes)
    assert {ax.get_subplotspec().get_gridspec().ncols for ax in fig.axes} == {3}
    # a file's colour is the same in every panel
    assert sft_acc.lines[0].get_color() == [ln for ln in val.lines if ln.get_label() == "sft"][0].get_color()
    out = plot(paths, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0 and out.endswith("curves.png")


def test_only_panels_with_data(tmp_path):
    sft_only = runs(tmp_path)[:1]
    titles = [ax.get_title() for ax in draw(sft_only).axes]
    assert titles == [PANELS[0].title, PANELS[1].title, PANELS[-1].title]
    empty = tmp_path / "x" / "metrics.jsonl"
    write_rows(empty, [{"step": 1, "step_time_s": 1.0}])
    with pytest.raises(ValueError, match="no known metrics"):
        draw([empty])
