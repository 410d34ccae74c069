"""A reproducible synthetic long-video reasoning set: small mp4 files of coloured shapes.

Every item is a real H.264 mp4 (written with PyAV, no system ffmpeg) and a question that needs
the whole video, with options A-D, a category and a chain-of-thought answer in the reasoning
format (`<think> ... </think> <answer> X </answer>`):

| qtype | category  | question                                                           |
|-------|-----------|--------------------------------------------------------------------|
| order | temporal  | in which order did the shapes appear?                              |
| count | temporal  | how many times did the <shape> appear?                             |
| move  | spatial   | which shape moved, and in which direction?                         |
| goal  | goal      | a ball heads for a corner target, turns; which target does it reach? |
| after | narrative | what appeared right after the <shape>?                            |
| corner | spatial  | the goal scene; in which corner does the ball stop? (options in a fixed order) |
| majority | temporal | the screen flashes colours; which colour fills it longest? (fixed order) |

The first five types are the default set. `corner` and `majority` are opt-in (`qtypes=`): their
options come in a fixed order (the four corners in reading order; red, green, blue, yellow), so
the answer letter names the answer directly, with no lookup of an option's text: easier tasks for
very small models. `majority` needs the whole video (the colours are shuffled over 8 equal parts
of it; 8 uniformly sampled frames see each part once) but only a global look at each frame: the
demo's task.

Events last a whole segment of the video: at most `MAX_EVENTS` = 7 segments, so 16 uniformly
sampled frames (`np.linspace`) see every event in at least 2 frames, and the motion questions are
decided by the first and last frames (which linspace always samples). Each record carries its
`timeline` ([first_frame, end_frame, what]) for checks.

Reproducibility: the same seed gives the same records and byte-identical videos, in this process
or in worker processes (`workers` > 1). x264 runs single-threaded and without its macroblock-tree
rate control: with it, its assembly wrote different bytes for a few videos depending on what the
process had encoded before (in 3 of 13 seeds a jax-configured process and fresh workers differed).

Layout under the output folder: `{split}.jsonl` for train / val (LongVideo-Reason form) and test
(multiple-choice benchmark form: question, options, answer letter, category), videos in
`videos/{split}/{problem_id}.mp4`, and `meta.json` with the settings. The same seed gives the same
records (see Reproducibility above); the correct letter is balanced within every split.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np

from lvr_jax.data.prompts import LETTERS, format_options

log = logging.getLogger(__name__)

COLORS = {"red": (225, 35, 35), "green": (40, 200, 60), "blue": (45, 85, 235),
          "yellow": (240, 220, 30), "magenta": (215, 50, 215), "cyan": (40, 205, 215),
          "orange": (245, 140, 20), "white": (240, 240, 240)}
SHAPES = ("square", "circle", "triangle")
QTYPES = {"order": "temporal", "count": "temporal", "move": "spatial", "goal": "goal",
          "after": "narrative", "corner": "spatial", "majority": "temporal"}
DEFAULT_QTYPES = ("order", "count", "move", "goal", "after")
CATEGORIES = ("temporal", "spatial", "goal", "narrative")
SPLITS = {"train": 0, "val": 1, "test": 2}
MAX_EVENTS = 7
NUM_OPTIONS = 4
MIN_FRAMES, MAX_FRAMES = 16, 1024
CELL_NAMES = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left",
              (1, 1): "center", (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom",
              (2, 2): "bottom right"}


@dataclasses.dataclass(frozen=True)
class Track:
    """A shape drawn at `pos[t]` (row, col in pixels) on the frames where `pos[t]` is not NaN."""
    shape: str
    color: str
    radius: float
    pos: np.ndarray            # [T, 2] float, NaN = hidden


@dataclasses.dataclass(frozen=True)
class Item:
    question: str
    correct: str               # the correct option's text
    distractors: list[str]     # at least NUM_OPTIONS - 1 other options
    steps: list[str]           # reasoning sentences (the final "so ... option X" is added)
    qtype: str
    tracks: list[Track]
    timeline: list[list]       # [first_frame, end_frame, description]
    options: list[str] | None = None   # a fixed option order (else shuffled around the answer)


# ---------------------------------------------------------------------------------------------
# Rendering


def _shape_mask(shape: str, rr: np.ndarray, cc: np.ndarray, radius: float) -> np.ndarray:
    ar, ac = np.abs(rr), np.abs(cc)
    if shape == "square":
        return (ar <= radius * 0.85) & (ac <= radius * 0.85)
    if shape == "circle":
        return rr ** 2 + cc ** 2 <= radius ** 2
    if shape == "triangle":   # apex up
        return (rr >= -radius) & (rr <= radius * 0.8) & (ac <= (rr + radius) * 0.55)
    raise ValueError(f"unknown shape {shape!r}")


def render(tracks: list[Track], num_frames: int, size: int, background=(18, 18, 28)) -> np.ndarray:
    """Draw the tracks -> uint8 [T, size, size, 3]; later tracks are drawn on top."""
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    frames[:] = np.asarray(background, np.uint8)
    grid = np.arange(size, dtype=np.float64) + 0.5
    for tr in tracks:
        color = np.asarray(COLORS[tr.color], np.uint8)
        visible = ~np.isnan(tr.pos[:, 0])
        for t in np.nonzero(visible)[0]:
            r, c = tr.pos[t]
            mask = _shape_mask(tr.shape, grid[:, None] - r, grid[None, :] - c, tr.radius)
            frames[t][mask] = color
    return frames


def write_video(path, frames: np.ndarray, fps: int = 8, *, crf: int = 12) -> None:
    """uint8 [T, H, W, 3] -> H.264 mp4 (yuv420p, single-threaded x264 without macroblock-tree rate
    control: byte-reproducible)."""
    import av

    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {h}x{w}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with av.open(str(tmp), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # mbtree=0: with it, x264's assembly wrote different bytes for the same frames depending on
        # what the process had encoded before (7 of 744 test-size videos; none with mbtree=0)
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1",
                          "x264-params": "mbtree=0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Scene / question generators


def _objects(rng: np.random.Generator, n: int, exclude=()) -> list[tuple[str, str]]:
    """n distinct (color, shape) pairs with distinct colours."""
    colors = [c for c in COLORS if c not in {e[0] for e in exclude}]
    picked = rng.choice(len(colors), size=n, replace=False)
    return [(colors[i], SHAPES[rng.integers(len(SHAPES))]) for i in picked]


def _name(obj: tuple[str, str]) -> str:
    return f"{obj[0]} {obj[1]}"


def _segments(num_frames: int, n: int) -> list[tuple[int, int]]:
    b = np.linspace(0, num_frames, n + 1).astype(int)
    return [(int(b[i]), int(b[i + 1])) for i in range(n)]


def _cell_center(cell, size: int) -> np.ndarray:
    return (np.asarray(cell, np.float64) + 0.5) * size / 3


def _event_tracks(rng, events: list[tuple[str, str]], num_frames: int, size: int):
    """One track per event, shown during its segment at a random cell (never the previous cell)."""
    tracks, timeline, prev = [], [], None
    for (t0, t1), obj in zip(_segments(num_frames, len(events)), events):
        cells = [c for c in CELL_NAMES if c != prev]
        cell = cells[rng.integers(len(cells))]
        prev = cell
        pos = np.full((num_frames, 2), np.nan)
        pos[t0:t1] = _cell_center(cell, size)
        tracks.append(Track(obj[1], obj[0], size / 7, pos))
        timeline.append([t0, t1, _name(obj)])
    return tracks, timeline


def _ordinal(i: int, n: int) -> str:
    return "first" if i == 0 else "last" if i == n - 1 else f"number {i + 1}"


def q_order(rng, num_frames: int, size: int) -> Item:
    objs = _objects(rng, 4)
    tracks, timeline = _event_tracks(rng, objs, num_frames, size)
    names = [_name(o) for o in objs]
    perms = {tuple(range(4))}
    while len(perms) < NUM_OPTIONS:
        perms.add(tuple(int(i) for i in rng.permutation(4)))
    options = [", ".join(names[i] for i in p) for p in perms if p != tuple(range(4))]
    steps = ["The video shows one shape at a time."]
    words = ["At the start a {} appears.", "Next comes a {}.", "After that a {} appears.",
             "Finally, at the end, a {} appears."]
    steps += [w.format(n) for w, n in zip(words, names)]
    steps.append(f"So the order is {', '.join(names)}.")
    return Item("In which order did the shapes appear in the video?", ", ".join(names), options,
                steps, "order", tracks, timeline)


def q_count(rng, num_frames: int, size: int) -> Item:
    target, *others = _objects(rng, 3)
    n_events = int(rng.integers(5, MAX_EVENTS + 1))
    k = int(rng.integers(1, (n_events + 1) // 2 + 1))          # non-adjacent: at most ceil(E/2)
    slots = sorted(rng.choice(n_events - k + 1, size=k, replace=False))
    target_slots = {int(s) + j for j, s in enumerate(slots)}   # gaps >= 1 between picks
    events = [target if i in target_slots else others[int(rng.integers(2))] for i in range(n_events)]
    for i in range(1, n_events):                               # no two identical events in a row
        if events[i] == events[i - 1] and events[i] != target:
            events[i] = others[0] if events[i] == others[1] else others[1]
    tracks, timeline = _event_tracks(rng, events, num_frames, size)
    counts = [c for c in range(0, 8) if c != k]
    wrong = [str(int(c)) for c in rng.choice(counts, size=NUM_OPTIONS - 1, replace=False)]
    seq = ", ".join(_name(e) for e in events)
    steps = [f"Going through the whole video, the shapes appear in this sequence: {seq}.",
             f"The {_name(target)} shows up at positions "
             f"{', '.join(str(i + 1) for i in sorted(target_slots))} of the {n_events} appearances.",
             f"So the {_name(target)} appears {k} time{'s' if k != 1 else ''}."]
    return Item(f"How many times did the {_name(target)} appear in the video?", str(k), wrong,
                steps, "count", tracks, timeline)


_DIRS = {(-1, 0): "up", (1, 0): "down", (0, -1): "to the left", (0, 1): "to the right",
         (-1, -1): "to the upper left", (-1, 1): "to the upper right",
         (1, -1): "to the lower left", (1, 1): "to the lower right"}


def q_move(rng, num_frames: int, size: int) -> Item:
    mover, still = _objects(rng, 2)
    cells = list(CELL_NAMES)
    order = rng.permutation(len(cells))
    start, still_cell = cells[order[0]], cells[order[1]]
    ends = [c for c in cells if c not in (start, still_cell)]
    end = ends[rng.integers(len(ends))]
    direction = _DIRS[(int(np.sign(end[0] - start[0])), int(np.sign(end[1] - start[1])))]
    # still for the first and last ~10%, moving linearly in between
    t = np.clip((np.arange(num_frames) / max(num_frames - 1, 1) - 0.1) / 0.8, 0, 1)[:, None]
    pos = (1 - t) * _cell_center(start, size) + t * _cell_center(end, size)
    still_pos = np.broadcast_to(_cell_center(still_cell, size), (num_frames, 2)).copy()
    tracks = [Track(still[1], still[0], size / 7, still_pos), Track(mover[1], mover[0], size / 7, pos)]
    wrong_dirs = [d for d in _DIRS.values() if d != direction]
    picks = rng.choice(len(wrong_dirs), size=3, replace=False)
    distractors = [f"the {_name(mover)} moved {wrong_dirs[picks[0]]}",
                   f"the {_name(still)} moved {direction}",
                   f"the {_name(still)} moved {wrong_dirs[picks[1]]}",
                   f"the {_name(mover)} moved {wrong_dirs[picks[2]]}"]
    steps = [f"At the start the {_name(mover)} is at the {CELL_NAMES[start]} and the "
             f"{_name(still)} is at the {CELL_NAMES[still_cell]}.",
             f"By the end the {_name(mover)} is at the {CELL_NAMES[end]}, while the "
             f"{_name(still)} has not moved.",
             f"So the {_name(mover)} moved {direction}."]
    timeline = [[0, num_frames, f"{_name(mover)} moves {CELL_NAMES[start]} -> {CELL_NAMES[end]}"]]
    return Item("One of the shapes moved during the video. Which shape moved, and in which "
                "direction?", f"the {_name(mover)} moved {direction}", distractors, steps, "move",
                tracks, timeline)


_CORNERS = [(0, 0), (0, 2), (2, 0), (2, 2)]


def _ball_scene(rng, num_frames: int, size: int, goal: int | None = None):
    """Four corner targets and a white ball that heads for a decoy corner, turns, and ends on the
    goal corner -> (tracks, target (colour, shape) pairs, goal, decoy, timeline)."""
    targets = _objects(rng, 4, exclude=[("white", "")])
    if goal is None:
        goal, decoy = (int(i) for i in rng.choice(4, size=2, replace=False))
    else:
        decoy = int(rng.choice([i for i in range(4) if i != goal]))
    center = _cell_center((1, 1), size)
    corner = [_cell_center(c, size) for c in _CORNERS]
    tracks = [Track("square", col, size / 8, np.broadcast_to(corner[i], (num_frames, 2)).copy())
              for i, (col, _) in enumerate(targets)]
    # 0-40%: halfway toward the decoy; 40-85%: to the goal; then stays on it
    u = np.arange(num_frames) / max(num_frames - 1, 1)
    half = center + 0.5 * (corner[decoy] - center)
    a = np.clip(u / 0.4, 0, 1)[:, None]
    b = np.clip((u - 0.4) / 0.45, 0, 1)[:, None]
    pos = np.where(u[:, None] < 0.4, (1 - a) * center + a * half, (1 - b) * half + b * corner[goal])
    tracks.append(Track("circle", "white", size / 13, pos))   # smaller: the target stays visible
    i_turn = int(0.4 * (num_frames - 1))
    timeline = [[0, i_turn, f"ball heads to {targets[decoy][0]}"],
                [i_turn, num_frames, f"ball goes to {targets[goal][0]}"]]
    return tracks, targets, goal, decoy, timeline


def q_goal(rng, num_frames: int, size: int) -> Item:
    tracks, targets, goal, decoy, timeline = _ball_scene(rng, num_frames, size)
    names = {i: f"the {targets[i][0]} target" for i in range(4)}
    where = {i: CELL_NAMES[_CORNERS[i]] for i in range(4)}
    steps = ["Four targets sit in the corners: " + ", ".join(f"{targets[i][0]} at the {where[i]}"
                                                            for i in range(4)) + ".",
             f"The white ball starts in the middle and first heads toward {names[decoy]}.",
             f"Partway through the video it turns and ends on {names[goal]} at the {where[goal]}.",
             f"So the ball finally reaches {names[goal]}."]
    return Item("The white ball travels toward the coloured targets in the corners. Which target "
                "does it finally reach?", names[goal], [names[i] for i in range(4) if i != goal],
                steps, "goal", tracks, timeline)


def q_corner(rng, num_frames: int, size: int, answer_slot: int | None = None) -> Item:
    """The goal scene, asking for the corner; options are the corners in reading order, so the
    answer's slot is the goal corner (`answer_slot` picks it)."""
    tracks, _, goal, decoy, timeline = _ball_scene(rng, num_frames, size, answer_slot)
    corners = [f"the {CELL_NAMES[c]} corner" for c in _CORNERS]
    steps = [f"The white ball starts in the middle and first heads toward {corners[decoy]}.",
             f"Partway through the video it turns and stops in {corners[goal]}."]
    return Item("The white ball travels toward the coloured targets in the corners. In which "
                "corner does it stop?", corners[goal], [c for c in corners if c != corners[goal]],
                steps, "corner", tracks, timeline, options=corners)


MAJORITY_COLORS = ("red", "green", "blue", "yellow")
# how many of the 8 parts each colour fills: the answer's share first, always strictly the largest
_MAJORITY_SHARES = ((4, 2, 2), (4, 2, 1, 1), (4, 3, 1), (5, 3), (5, 2, 1), (5, 1, 1, 1), (6, 2),
                    (6, 1, 1))


def q_majority(rng, num_frames: int, size: int, answer_slot: int | None = None) -> Item:
    """The whole screen shows a colour in each of 8 equal parts of the video, in shuffled order;
    which colour fills it longest? Options: `MAJORITY_COLORS` in that order (`answer_slot` picks
    the answer)."""
    top = int(rng.integers(4)) if answer_slot is None else answer_slot
    shares = _MAJORITY_SHARES[rng.integers(len(_MAJORITY_SHARES))]
    others = [int(i) for i in rng.permutation([i for i in range(4) if i != top])]
    parts = [c for c, n in zip([top] + others, shares) for _ in range(n)]
    parts = [parts[i] for i in rng.permutation(len(parts))]
    tracks, timeline = [], []
    for (t0, t1), c in zip(_segments(num_frames, len(parts)), parts):
        pos = np.full((num_frames, 2), np.nan)
        pos[t0:t1] = size / 2
        tracks.append(Track("square", MAJORITY_COLORS[c], size, pos))   # fills the frame
        timeline.append([t0, t1, MAJORITY_COLORS[c]])
    name = MAJORITY_COLORS[top]
    steps = [f"The screen changes colour during the video and is {name} for {shares[0]} of its "
             f"8 parts, longer than any other colour.", f"So the colour shown longest is {name}."]
    return Item("The screen flashes different colours during the video. Which colour fills it "
                "for the longest time?", name, [c for c in MAJORITY_COLORS if c != name], steps,
                "majority", tracks, timeline, options=list(MAJORITY_COLORS))


def q_after(rng, num_frames: int, size: int) -> Item:
    n_events = int(rng.integers(5, MAX_EVENTS + 1))
    objs = _objects(rng, n_events + 1)
    events, absent = objs[:n_events], objs[n_events]
    tracks, timeline = _event_tracks(rng, events, num_frames, size)
    i = int(rng.integers(0, n_events - 1))
    answer = _name(events[i + 1])
    others = [_name(e) for j, e in enumerate(events) if j not in (i, i + 1)]
    distractors = [others[j] for j in rng.permutation(len(others))[:2]] + [_name(absent)]
    seq = ", ".join(_name(e) for e in events)
    steps = [f"The shapes appear one after another: {seq}.",
             f"The {_name(events[i])} is the {_ordinal(i, n_events)} to appear, and the next one is "
             f"the {answer}."]
    return Item(f"What appeared right after the {_name(events[i])}?", f"the {answer}",
                [f"the {d}" for d in distractors], steps, "after", tracks, timeline)


GENERATORS = {"order": q_order, "count": q_count, "move": q_move, "goal": q_goal, "after": q_after,
              "corner": q_corner, "majority": q_majority}
FIXED_ORDER = {"corner", "majority"}      # generators that take the answer's slot and fix the option order


# ---------------------------------------------------------------------------------------------
# Items and splits


def check_qtypes(qtypes) -> tuple[str, ...]:
    """A non-empty list of known question types (a comma-separated string works too)."""
    if isinstance(qtypes, str):
        qtypes = [q.strip() for q in qtypes.split(",") if q.strip()]
    qtypes = tuple(dict.fromkeys(qtypes))
    unknown = [q for q in qtypes if q not in GENERATORS]
    if unknown or not qtypes:
        raise ValueError(f"unknown question types {unknown or qtypes!r}; known: {list(GENERATORS)}")
    return qtypes


def _balanced(rng: np.random.Generator, n: int, values: list) -> list:
    """n values, each used floor(n/k) or ceil(n/k) times, in a seeded random order."""
    reps = np.resize(np.arange(len(values)), n)
    return [values[i] for i in rng.permutation(reps)]


def make_item(seed: int, split: str, i: int, qtype: str, slot: int, *, num_frames: int, size: int,
              fps: int, out: Path) -> dict:
    """Generate, render and write item i of a split; returns its JSONL record."""
    rng = np.random.default_rng([seed, SPLITS[split], i])
    if qtype in FIXED_ORDER:
        item = GENERATORS[qtype](rng, num_frames, size, answer_slot=slot)
        options = item.options
    else:
        item = GENERATORS[qtype](rng, num_frames, size)
        wrong = [item.distractors[j] for j in rng.permutation(len(item.distractors))]
        wrong = [w for w in dict.fromkeys(wrong) if w != item.correct][:NUM_OPTIONS - 1]
        options = wrong[:slot] + [item.correct] + wrong[slot:]
    letter = LETTERS[options.index(item.correct)]
    pid = f"{split}-{i:05d}"
    rel = f"videos/{split}/{pid}.mp4"
    background = tuple(int(v) for v in rng.integers(10, 40, size=3))
    write_video(out / rel, render(item.tracks, num_frames, size, background), fps)
    reasoning = " ".join(item.steps + [f"That is option {letter}."])
    rec = {"problem_id": pid, "videos": rel}
    if split == "test":   # multiple-choice benchmark form
        rec.update(question=item.question, options=options, answer=letter,
                   category=QTYPES[qtype])
    else:                 # LongVideo-Reason form
        rec.update(problem=f"{item.question}\n{format_options(options)}",
                   problem_type=QTYPES[qtype], answer=f"<answer>{letter}</answer>")
    rec.update(reasoning=f"<think> {reasoning} </think> <answer> {letter} </answer>",
               qtype=qtype, num_frames=num_frames, fps=fps, timeline=item.timeline)
    return rec


def _make_item_star(args):
    return make_item(*args[:5], **args[5])


def generate_split(out, split: str, num: int, *, num_frames: int = 64, size: int = 32,
                   seed: int = 0, fps: int = 8, workers: int = 0,
                   qtypes=DEFAULT_QTYPES) -> Path:
    """Write `num` items of `split` under `out` (question types `qtypes`, balanced); returns the
    JSONL path."""
    qtypes = check_qtypes(qtypes)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}")
    if not MIN_FRAMES <= num_frames <= MAX_FRAMES:
        raise ValueError(f"frames must be in [{MIN_FRAMES}, {MAX_FRAMES}], got {num_frames}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be even and >= 16, got {size}")
    out = Path(out)
    rng = np.random.default_rng([seed, SPLITS[split], 1 << 20])
    qtypes = _balanced(rng, num, list(qtypes))
    slots = _balanced(rng, num, list(range(NUM_OPTIONS)))
    kw = dict(num_frames=num_frames, size=size, fps=fps, out=out)
    jobs = [(seed, split, i, qtypes[i], slots[i], kw) for i in range(num)]
    every = max(1, num // 10)

    def logged(results):
        for i, rec in enumerate(results, 1):
            if i % every == 0 or i == num:
                log.info("synthetic %s: %d/%d videos written to %s", split, i, num, out)
            yield rec

    if workers > 1 and num > 1:
        # spawn, not fork: the caller may have started threads (JAX, grain)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            records = list(logged(pool.map(_make_item_star, jobs, chunksize=8)))
    else:
        records = list(logged(map(_make_item_star, jobs)))
    path = out / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return path


def generate_dataset(out, *, num_train: int = 64, num_val: int = 16, num_test: int = 16,
                     num_frames: int = 64, size: int = 32, seed: int = 0, fps: int = 8,
                     workers: int = 0, qtypes=DEFAULT_QTYPES) -> dict[str, Path]:
    """All three splits plus meta.json under `out`; returns {split: jsonl path}."""
    qtypes = check_qtypes(qtypes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, num in (("train", num_train), ("val", num_val), ("test", num_test)):
        if num > 0:
            paths[split] = generate_split(out, split, num, num_frames=num_frames, size=size,
                                          seed=seed, fps=fps, workers=workers, qtypes=qtypes)
    meta = dict(num_train=num_train, num_val=num_val, num_test=num_test, frames=num_frames,
                size=size, seed=seed, fps=fps, qtypes={q: QTYPES[q] for q in qtypes},
                max_events=MAX_EVENTS)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return paths
