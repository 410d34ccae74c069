"""The synthetic long-video reasoning set: reproducible, balanced, answerable from sampled frames."""

import collections
import hashlib
import json
import re

import numpy as np
import pytest

from lvr_jax.data import synthetic
from lvr_jax.data.records import load_records
from lvr_jax.data.video import read_frames, sample_indices


def _seed():
    return int(np.random.SeedSequence().entropy % (2 ** 31))


def _digest(folder):
    """sha256 of every file under folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def seed():
    return _seed()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, seed):
    out = tmp_path_factory.mktemp("synth")
    paths = synthetic.generate_dataset(out, num_train=22, num_val=5, num_test=10, num_frames=16,
                                       size=32, seed=seed)
    return out, paths


def test_reproducible_for_a_seed(tmp_path, dataset, seed):
    out, _ = dataset                                      # written in this (jax-configured) process
    again = tmp_path / "again"
    synthetic.generate_dataset(again, num_train=22, num_val=5, num_test=10, num_frames=16, size=32,
                               seed=seed, workers=2)      # fresh worker processes
    # byte-identical videos too: x264's macroblock-tree pass once made them depend on what the
    # process had encoded before (13 seeds: 3 differed here; with mbtree=0, 26 seeds: none did)
    assert _digest(out) == _digest(again)
    other = tmp_path / "other"
    synthetic.generate_dataset(other, num_train=22, num_val=5, num_test=10, num_frames=16, size=32,
                               seed=seed + 1)
    assert (other / "train.jsonl").read_text() != (out / "train.jsonl").read_text()


def test_records_load_in_both_forms(dataset):
    out, paths = dataset
    assert set(paths) == {"train", "val", "test"}
    train = load_records(paths["train"], need_reasoning=True)
    test = load_records(paths["test"], need_reasoning=True)
    assert len(train) == 22 and len(test) == 10
    raw_test = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    assert all({"question", "options", "answer", "category"} <= set(r) for r in raw_test)
    raw_train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert all({"problem_id", "videos", "problem", "problem_type", "reasoning", "answer"} <= set(r)
               for r in raw_train)
    for rec in train + test:
        assert (out / rec.video).is_file()
        assert rec.category in synthetic.CATEGORIES
        m = re.fullmatch(r"<think> (.+) </think> <answer> ([A-D]) </answer>", rec.reasoning, re.S)
        assert m and m.group(2) == rec.letter and f"option {rec.letter}" in m.group(1)
        assert len(re.findall(r"^[A-D]\. ", rec.question, re.M)) == 4


def test_answers_and_question_types_balanced(dataset):
    _, paths = dataset
    for split, path in paths.items():
        recs = load_records(path)
        for counts, k in [(collections.Counter(r.letter for r in recs), 4),
                          (collections.Counter(json.loads(line)["qtype"]
                                               for line in path.read_text().splitlines()), 5)]:
            assert len(counts) == min(k, len(recs)), (split, counts)
            assert max(counts.values()) - min(counts.values()) <= 1, (split, counts)


def test_options_distinct_and_correct_one_named_in_reasoning(dataset):
    _, paths = dataset
    for line in paths["test"].read_text().splitlines():
        r = json.loads(line)
        assert len(set(r["options"])) == 4
        correct = r["options"]["ABCD".index(r["answer"])]
        assert correct.removeprefix("the ").split(" moved")[0] in r["reasoning"]


def test_events_span_several_sampled_frames(dataset):
    _, paths = dataset
    idx = sample_indices(16, 16)
    for line in paths["train"].read_text().splitlines():
        r = json.loads(line)
        for t0, t1, _ in r["timeline"]:
            assert t1 - t0 >= 2 and ((idx >= t0) & (idx < t1)).sum() >= 2, r["timeline"]
    big = synthetic.q_count(np.random.default_rng(_seed()), 1000, 32)
    coverage = [((sample_indices(1000, 16) >= a) & (sample_indices(1000, 16) < b)).sum()
                for a, b, _ in big.timeline]
    assert min(coverage) >= 2


def _dominant_colors(frames, background):
    """Per frame, the palette colour nearest to the pixels that differ from the background."""
    names = list(synthetic.COLORS)
    palette = np.asarray([synthetic.COLORS[n] for n in names], np.float32)
    out = []
    for f in frames.astype(np.float32):
        fg = f[np.abs(f - background).sum(-1) > 90]
        if len(fg) == 0:
            out.append(None)
            continue
        d = ((fg[:, None] - palette[None]) ** 2).sum(-1).argmin(1)
        out.append(names[np.bincount(d, minlength=len(names)).argmax()])
    return out


def _background(frames):
    """The most frequent colour of the video (shapes cover a small part of each frame)."""
    q = frames.reshape(-1, 3) // 8
    vals, counts = np.unique(q, axis=0, return_counts=True)
    return vals[counts.argmax()].astype(np.float32) * 8 + 4


def _centroid_cell(frame, color):
    """The 3x3 grid cell (name) holding the pixels close to `color`."""
    d = np.abs(frame.astype(np.float32) - np.asarray(synthetic.COLORS[color], np.float32)).sum(-1)
    rows, cols = np.nonzero(d < 90)
    size = frame.shape[0]
    cell = (int(rows.mean() * 3 // size), int(cols.mean() * 3 // size))
    return synthetic.CELL_NAMES[cell]


def test_video_shows_the_answer(dataset):
    """Decode 16 uniformly sampled frames and read the answer back from the pixels."""
    out, paths = dataset
    checked = collections.Counter()
    for path in paths.values():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            frames = read_frames(out / r["videos"], 16)
            if r["qtype"] in ("order", "after", "count"):   # the event sequence, by colour
                seen = [c for c in _dominant_colors(frames, _background(frames)) if c]
                collapsed = [c for i, c in enumerate(seen) if i == 0 or c != seen[i - 1]]
                assert collapsed == [ev[2].split()[0] for ev in r["timeline"]], r["problem_id"]
            elif r["qtype"] == "move":                         # start and end cell of the mover
                m = re.fullmatch(r"(\w+) \w+ moves (.+) -> (.+)", r["timeline"][0][2])
                color, start, end = m.groups()
                assert _centroid_cell(frames[0], color) == start, r["problem_id"]
                assert _centroid_cell(frames[-1], color) == end, r["problem_id"]
            else:                                              # the ball ends on the goal corner
                corner = re.search(r"ends on the \w+ target at the ([\w ]+)\.", r["reasoning"]).group(1)
                assert _centroid_cell(frames[-1], "white") == corner, r["problem_id"]
            checked[r["qtype"]] += 1
    assert set(checked) == set(synthetic.DEFAULT_QTYPES), checked


def test_frame_range_and_size_checked(tmp_path):
    with pytest.raises(ValueError, match="frames"):
        synthetic.generate_split(tmp_path, "train", 1, num_frames=8)
    with pytest.raises(ValueError, match="even"):
        synthetic.generate_split(tmp_path, "train", 1, num_frames=16, size=33)


def test_cli(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "launch" / "make_synthetic.py"

    def cli(args):
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                              timeout=300)

    out = cli(["--out", str(tmp_path / "d"), "--num_train", "3", "--num_val", "1", "--num_test", "2",
               "--frames", "16", "--size", "28", "--seed", str(_seed()), "--qtypes", "corner,move"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["items"] == 6
    assert len((tmp_path / "d" / "train.jsonl").read_text().splitlines()) == 3
    assert len((tmp_path / "d" / "test.jsonl").read_text().splitlines()) == 2
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["size"] == 28 and meta["frames"] == 16
    assert meta["qtypes"] == {"corner": "spatial", "move": "spatial"}
    bad = cli(["--out", str(tmp_path / "e"), "--qtypes", "corner,nope"])     # a usage error
    assert bad.returncode == 2 and "--qtypes: unknown question types ['nope']" in bad.stderr
    assert read_frames(tmp_path / "d" / "videos" / "val" / "val-00000.mp4", 4).shape == (4, 28, 28, 3)
    bad = cli(["--out", str(tmp_path / "e"), "--frames", "2048"])
    assert bad.returncode == 2 and "--frames must be in" in bad.stderr
    assert not (tmp_path / "e").exists()


def test_question_type_subset_and_fixed_order_corner(tmp_path):
    """`qtypes` picks the types (balanced, recorded in meta.json); `corner` lists the corners in
    reading order, its letter is the corner the white ball stops in on the last frame."""
    paths = synthetic.generate_dataset(tmp_path, num_train=8, num_val=0, num_test=4, num_frames=16,
                                       size=28, seed=_seed(), qtypes="corner,goal")
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["qtypes"] == {"corner": "spatial", "goal": "goal"}
    corners = ["the top left corner", "the top right corner", "the bottom left corner",
               "the bottom right corner"]
    kinds = collections.Counter()
    for line in paths["train"].read_text().splitlines() + paths["test"].read_text().splitlines():
        r = json.loads(line)
        kinds[r["qtype"]] += 1
        if r["qtype"] != "corner":
            continue
        options = r.get("options") or re.findall(r"^[A-D]\. (.+)$", r["problem"], re.M)
        assert options == corners
        letter = re.search(r"\b([A-D])\b", r["answer"]).group(1)    # "C" or "<answer>C</answer>"
        stop = re.search(r"stops in the ([\w ]+) corner\.", r["reasoning"]).group(1)
        assert corners["ABCD".index(letter)] == f"the {stop} corner"
        frames = read_frames(tmp_path / r["videos"], 16)
        assert _centroid_cell(frames[-1], "white") == stop, r["problem_id"]
    assert kinds == {"corner": 6, "goal": 6}
    with pytest.raises(ValueError, match="unknown question types.*known"):
        synthetic.generate_split(tmp_path, "train", 1, num_frames=16, qtypes=("goal", "colour"))


def test_majority_answer_is_the_colour_seen_most(tmp_path):
    """`majority`: options are the four colours in a fixed order; in the 8 frames the demo samples
    from a 32-frame video (one per part), the answer's colour fills the screen strictly most
    often, as counted from the decoded pixels; answers are balanced."""
    paths = synthetic.generate_dataset(tmp_path, num_train=12, num_val=0, num_test=4, num_frames=32,
                                       size=28, seed=_seed(), qtypes="majority")
    palette = np.asarray([synthetic.COLORS[c] for c in synthetic.MAJORITY_COLORS], np.float32)
    letters = collections.Counter()
    for line in paths["train"].read_text().splitlines() + paths["test"].read_text().splitlines():
        r = json.loads(line)
        options = r.get("options") or re.findall(r"^[A-D]\. (.+)$", r["problem"], re.M)
        assert options == list(synthetic.MAJORITY_COLORS)
        letter = re.search(r"\b([A-D])\b", r["answer"]).group(1)
        letters[letter] += 1
        frames = read_frames(tmp_path / r["videos"], 8).astype(np.float32)
        means = frames.reshape(8, -1, 3).mean(1)                       # one colour per frame
        seen = np.abs(means[:, None] - palette[None]).sum(-1).argmin(1)
        assert np.abs(means - palette[seen]).sum(-1).max() < 40, r["problem_id"]   # a flat fill
        counts = np.bincount(seen, minlength=4)
        assert counts.argmax() == "ABCD".index(letter), (r["problem_id"], counts)
        assert (counts < counts.max()).sum() == 3, (r["problem_id"], counts)        # no tie
        assert f"is {options['ABCD'.index(letter)]} for {counts.max()} of its 8" in r["reasoning"]
    assert sorted(letters.values()) == [4, 4, 4, 4]
