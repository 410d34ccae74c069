"""Prompts, open-ended and parquet records through the grain pipeline (determinism, shards, resume,
bad input); record validation itself: test_records.py."""

import dataclasses
import json
import logging
import re

import numpy as np
import pytest

from lvr_jax.data import prompts, synthetic
from lvr_jax.data.dataset import DataConfig, default_shard, make_iter_dataset, num_batches
from lvr_jax.data.records import RecordError, SkipLog, load_records, parse_record
from lvr_jax.data.video import Preprocessor
from tests.test_records import _reason_obj

IMAGE_SIZE = 28


def _seed():
    return int(np.random.SeedSequence().entropy % (2 ** 31))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from lvr_jax.weights.hf import load_tokenizer
    from lvr_jax.weights.tiny import make_tokenizer
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """12 synthetic train items (16 frames, 32 px) with a fresh seed."""
    root = tmp_path_factory.mktemp("synth")
    synthetic.generate_split(root, "train", 12, num_frames=16, size=32, seed=_seed())
    return root


@pytest.fixture(scope="module")
def records(data_root):
    return load_records(data_root / "train.jsonl")


@pytest.fixture(scope="module")
def pre():
    return Preprocessor.for_image_size(IMAGE_SIZE)


def _cfg(root, **kw):
    return DataConfig(**{**dict(root=str(root), num_frames=4, batch_size=2, seed=_seed()), **kw})


def _run(records, cfg, tok, pre, **shard):
    shard = shard or dict(shard_index=0, shard_count=1)
    it = iter(make_iter_dataset(records, cfg, tok, pre, **shard))
    try:
        return list(it), it.skipped
    finally:
        it.close()


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# Prompts


# Long-RL's user turn (NVlabs/Long-RL verl/utils/dataset.py QUESTION_TEMPLATE_VIDEO filled with PROBLEM,
# "<vila/video>" in front, nothing between, stripped), written out by hand on purpose (not built from
# prompts.LONGRL_VIDEO_TEMPLATE); "you solves" and " Question:" are Long-RL's.
PROBLEM = "What does the man do right after he opens the fridge?\nA. He closes it\nB. He sits down"
LONGRL_TURN = (
    "<vila/video>You are a helpful assistant. The user asks a question, and then you solves it.\n\n"
    "Please first think deeply about the question based on the given video, and then provide the "
    "final answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> "
    "the letter of your choice (A, B, C, or D) </answer>.\n\n Question: What does the man do right "
    "after he opens the fridge?\nA. He closes it\nB. He sits down")
LONGRL_HEAD = LONGRL_TURN.removesuffix(PROBLEM)
INSTRUCT_TURN = (   # the package's earlier user turn, byte for byte
    "<vila/video>\nWhat does the man do right after he opens the fridge?\nA. He closes it\nB. He "
    "sits down\nThink about the question step by step, using everything that happens in the video, "
    "and write your reasoning between <think> and </think>. Then give only the letter of the "
    "correct option between <answer> and </answer>, for example <answer> B </answer>.")
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("template,problem,turn", [
    (None, PROBLEM, LONGRL_TURN), ("longrl", PROBLEM, LONGRL_TURN),
    (None, " " + PROBLEM + "\n\n", LONGRL_HEAD + " " + PROBLEM),    # the raw problem; turn stripped
    ("longrl", "<video>" + PROBLEM, LONGRL_TURN),          # Long-RL removes "<video>" from problems
    ("longrl", "Is it <video> red?\nA. y\nB. n", LONGRL_HEAD + "Is it  red?\nA. y\nB. n"),
    ("instruct", PROBLEM, INSTRUCT_TURN), ("instruct", " " + PROBLEM + "\n", INSTRUCT_TURN),
    ("Q: {question} {{x}}  ", "Which? \n", "<vila/video>Q: Which? \n {x}"),
])
def test_user_turn(tokenizer, records, data_root, pre, template, problem, turn):
    """A record's user turn, alone, in the chat-templated ids and in the pipeline's examples."""
    from lvr_jax.data.dataset import ExampleBuilder
    rec = parse_record(_reason_obj(problem=problem, answer="B", videos=records[0].video), "f:1")
    assert rec.question == problem                                   # kept as stored
    assert prompts.user_message(rec.question, template=template) == turn
    assert prompts.user_message(rec.question, template=template, with_video=False) == turn[12:].lstrip("\n")
    ids = prompts.rl_prompt_ids(tokenizer, rec.question, template=template)
    assert tokenizer.decode(ids) == CHAT.format(turn) and ids.dtype == np.int32
    with pytest.raises(ValueError, match="already contains"):
        prompts.rl_prompt_ids(tokenizer, "look <vila/video> here", template=template)
    for mode in ("rl", "sft"):
        cfg = _cfg(data_root, mode=mode, prompt_template=template or "longrl")
        np.testing.assert_array_equal(ExampleBuilder(cfg, tokenizer, pre)(rec)["input_ids"][:len(ids)], ids)


def test_bad_template_refused():
    assert DataConfig().prompt_template == "longrl"
    for bad, msg in [("long-rl", "unknown"), ("Be brief.", "unknown"), ("{}", "fields"), ("{0}", "fields"),
                     ("Q: {q}", "fields"), ("{question} {question}", "fields"), ("{question} {x}", "fields"),
                     ("{question!r}", "conversion"), ("{question:9}", "conversion"), ("{question}}", "valid"),
                     ("Q: {question", "valid"), ("<vila/video>{question}", "holds")]:
        for use in (prompts.resolve_template, lambda t: DataConfig(prompt_template=t)):
            with pytest.raises(ValueError, match=re.escape(msg)):
                use(bad)


def test_sft_mask_covers_exactly_the_reply(tokenizer):
    rng = np.random.default_rng(_seed())
    letter = str(rng.choice(list("ABCD")))
    reply = prompts.reasoning_response(f"the ball moves {int(rng.integers(2, 9))} times", letter)
    assert re.fullmatch(rf"<think> .+ </think> <answer> {letter} </answer>", reply)
    q = prompts.format_question("How many moves?", ["1", "2", "3", "4"])
    ids, mask = prompts.sft_ids_and_mask(tokenizer, q, reply)
    prompt = prompts.rl_prompt_ids(tokenizer, q)
    assert len(ids) == len(mask) and mask.dtype == np.int32
    np.testing.assert_array_equal(ids[:len(prompt)], prompt)
    assert mask[:len(prompt)].sum() == 0
    assert tokenizer.decode(ids[mask == 1]) == reply + "<|im_end|>"
    on = np.nonzero(mask)[0]
    assert np.all(np.diff(on) == 1)                       # one contiguous span
    assert tokenizer.decode(ids[on[-1] + 1:]) == "\n"     # the template's trailing newline: no loss


def test_expand_like_video_mask(tokenizer):
    """`vlm.expand_like_video` on a batch of 2 whose placeholders sit at different positions
    (the second prompt has a system message), against np.concatenate of the parts."""
    from lvr_jax.models.vlm import expand_like_video
    rng = np.random.default_rng(_seed())
    q = prompts.format_question("Q?", ["a", "b"])
    reply = prompts.reasoning_response("r", "A")
    rows = [prompts.sft_ids_and_mask(tokenizer, q, reply),
            prompts.sft_ids_and_mask(tokenizer, q, reply, system="Watch the video closely.")]
    vid = tokenizer.convert_tokens_to_ids(prompts.VIDEO_TOKEN)
    width = max(len(ids) for ids, _ in rows)
    ids = np.full((2, width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((2, width), np.int32)
    for i, (r_ids, r_mask) in enumerate(rows):               # right-padded, as `collate` does
        ids[i, :len(r_ids)], mask[i, :len(r_mask)] = r_ids, r_mask
    where = [int(np.nonzero(row == vid)[0][0]) for row in ids]
    assert where[0] != where[1] and all(int((row == vid).sum()) == 1 for row in ids)
    t, per = int(rng.integers(1, 9)), 17
    n = t * per
    for fill in (0, 1):
        full = np.asarray(expand_like_video(ids, mask, vid, n, fill))
        assert full.shape == (2, prompts.expanded_length(width, t, per))
        for i, p in enumerate(where):
            assert (full[i, p:p + n] == fill).all() and full[i].sum() == mask[i].sum() + fill * n
            np.testing.assert_array_equal(full[i, p + n:], mask[i, p + 1:])
            ref = np.concatenate([mask[i, :p], np.full(n, fill, mask.dtype), mask[i, p + 1:]])
            np.testing.assert_array_equal(full[i], ref)
        # distinct values everywhere (the ids themselves): the part before the placeholder too
        full_ids = np.asarray(expand_like_video(ids, ids, vid, n, -fill))
        for i, p in enumerate(where):
            np.testing.assert_array_equal(
                full_ids[i], np.concatenate([ids[i, :p], np.full(n, -fill, ids.dtype), ids[i, p + 1:]]))


def test_answer_letter():
    for text, letter in [("<answer>B</answer>", "B"), ("<answer> c </answer>", "C"), ("D", "D"), ("(A)", "A"),
                         ("B.", "B"), ("<think> x </think> <answer> A </answer>", "A")]:
        assert prompts.answer_letter(text) == letter
    for bad in ["", "maybe", "<answer></answer>", "AB", "<answer>3</answer>"]:
        with pytest.raises(ValueError):
            prompts.answer_letter(bad)
    assert prompts.answer_text("<answer> 3 </answer><answer>4</answer>") == "3" == prompts.answer_text(" 3 ")


# ---------------------------------------------------------------------------------------------
# Records


def test_open_ended_records(tmp_path, data_root, records, tokenizer, pre):
    """Numbers, free text: letter "", answer as stored (in the batch too), SFT reply with its text."""
    v = records[0].video
    objs = [_reason_obj("n", problem="How many?\n", videos=v, answer="<answer>3</answer>", reasoning="3."),
            _reason_obj("t", problem="Which colour?", videos=v, answer="dark red",
                        reasoning="<think> It is. </think> <answer> Dark  red </answer>"),
            {"question": "How far?", "answer": 2.5, "video": v, "id": "f", "reasoning": "Some."},
            _reason_obj("mc", videos=v), _reason_obj("no-cot", videos=v, reasoning="")]
    (path := tmp_path / "open.jsonl").write_text("\n".join(json.dumps(o) for o in objs) + "\n")
    with pytest.raises(RecordError, match=r"open.jsonl:5 \(problem_id 'no-cot'\).*needed for SFT"):
        load_records(path, need_reasoning=True)
    recs = load_records(path, need_reasoning=True, on_error="skip")
    assert [(r.answer, r.letter, r.open_ended) for r in recs] == [
        ("<answer>3</answer>", "", True), ("dark red", "", True), ("2.5", "", True),
        ("<answer>C</answer>", "C", False)]
    (b,), skipped = _run(recs, _cfg(data_root, mode="sft", batch_size=4, shuffle=False), tokenizer, pre)
    assert skipped == 0 and b["answer"].tolist() == [r.answer for r in recs]
    assert [tokenizer.decode(ids[m == 1]) for ids, m in zip(b["input_ids"], b["loss_mask"])] == [
        f"<think> {t} </think> <answer> {a} </answer><|im_end|>"
        for t, a in [("3.", "3"), ("It is.", "Dark  red"), ("Some.", "2.5"), ("because", "C")]]


def test_parquet_loads_like_jsonl(tmp_path, data_root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(rows, path):                  # every row's keys as columns; absent fields are null
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "timeline"]  # unused, nested
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)

    rows = [json.loads(x) for x in (data_root / "train.jsonl").read_text().splitlines()]
    rows += [{"question": "Which?", "options": ["a", "b"], "answer": "(b)", "video": "x.mp4", "id": "mc"},
             {"problem_id": "open", "videos": "x.mp4", "problem": " How many?\n", "answer": "3"}]
    jsonl, parquet = tmp_path / "d.jsonl", tmp_path / "d.parquet"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write(rows, parquet)
    a, b = load_records(jsonl), load_records(parquet)
    assert len(b) == len(rows) and b[-2].answer == "B" and b[-1].question == " How many?\n"
    assert [dataclasses.replace(r, source=r.source.replace(str(jsonl), "F")) for r in a] == \
        [dataclasses.replace(r, source=r.source.replace(str(parquet), "F")) for r in b]
    rows[2]["answer"], rows[3]["videos"] = "<answer>F</answer>", "../escape.mp4"
    write(rows[:4], parquet)                # errors name file:row (from 1, like lines)
    with pytest.raises(RecordError, match=rf"d.parquet:3 \(problem_id '{rows[2]['problem_id']}'\).*option"):
        load_records(parquet)
    assert len(load_records(parquet, on_error="skip", skips=(skips := SkipLog()))) == 2
    assert skips.count == 2 and f"{parquet}:4 " in skips.recent[1]
    parquet.write_bytes(b"PAR1 not really")
    with pytest.raises(RecordError, match="d.parquet: cannot read the parquet file"):
        load_records(parquet, on_error="skip")


# ---------------------------------------------------------------------------------------------
# Pipeline


def test_batches_content(records, tokenizer, pre):
    cfg = _cfg(records[0].source.rsplit("/", 1)[0], mode="sft", num_frames=5)
    batches, skipped = _run(records, cfg, tokenizer, pre)
    assert skipped == 0 and len(batches) == num_batches(len(records), cfg) == 6
    b = batches[0]
    assert b["frames"].shape == (2, 5, IMAGE_SIZE, IMAGE_SIZE, 3) and b["frames"].dtype == np.float32
    assert -1.0 <= b["frames"].min() < b["frames"].max() <= 1.0
    assert b["input_ids"].shape == b["loss_mask"].shape == b["attention_mask"].shape
    for i in range(2):
        n = b["length"][i]
        assert b["attention_mask"][i].sum() == n and b["loss_mask"][i, n:].sum() == 0
        rec = records[int(b["index"][i])]
        assert b["problem_id"][i] == rec.problem_id and b["answer"][i] == rec.answer
        reply = tokenizer.decode(b["input_ids"][i][b["loss_mask"][i] == 1])
        assert reply == rec.reasoning + "<|im_end|>"
    seen = np.concatenate([x["index"] for x in batches])
    assert sorted(seen.tolist()) == list(range(len(records)))


def test_deterministic_for_a_seed(records, tokenizer, pre, data_root):
    seed = _seed()
    a, _ = _run(records, _cfg(data_root, seed=seed), tokenizer, pre)
    b, _ = _run(records, _cfg(data_root, seed=seed), tokenizer, pre)
    _same_batches(a, b)
    c, _ = _run(records, _cfg(data_root, seed=seed + 1), tokenizer, pre)
    order = lambda bs: np.concatenate([x["index"] for x in bs]).tolist()  # noqa: E731
    assert order(a) != order(c) and sorted(order(a)) == sorted(order(c))


@pytest.mark.parametrize("n_records,drop", [(12, True), (11, True), (11, False)])
def test_shards_disjoint_and_cover(records, tokenizer, pre, data_root, n_records, drop):
    recs = records[:n_records]
    cfg = _cfg(data_root, batch_size=1, drop_remainder=drop)
    parts = []
    for i in range(2):
        batches, _ = _run(recs, cfg, tokenizer, pre, shard_index=i, shard_count=2)
        parts.append(np.concatenate([b["index"] for b in batches]).tolist())
    assert not set(parts[0]) & set(parts[1])
    union = set(parts[0]) | set(parts[1])
    if drop:   # equal shards; at most shard_count - 1 records left out per epoch
        assert len(parts[0]) == len(parts[1]) == n_records // 2
        assert len(union) == n_records - n_records % 2
    else:
        assert union == set(range(n_records))


def test_epochs_reshuffle(records, tokenizer, pre, data_root):
    batches, _ = _run(records, _cfg(data_root, batch_size=3, num_epochs=2), tokenizer, pre)
    order = np.concatenate([b["index"] for b in batches]).tolist()
    n = len(records)
    assert len(order) == 2 * n
    assert sorted(order[:n]) == sorted(order[n:]) == list(range(n)) and order[:n] != order[n:]


def test_resume_from_saved_state(records, tokenizer, pre, data_root):
    cfg = _cfg(data_root, num_epochs=2, batch_size=3)
    ds = make_iter_dataset(records, cfg, tokenizer, pre, shard_index=0, shard_count=1)
    it = iter(ds)
    k = int(np.random.default_rng(_seed()).integers(1, 7))
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))       # survives a JSON checkpoint
    rest = list(it)
    fresh = iter(ds)
    fresh.set_state(state)
    _same_batches(list(fresh), rest)
    assert len(rest) == 2 * len(records) // 3 - k


def _break_some(tmp_path, data_root, records):
    """Copies of the records pointing at bad videos: missing, empty, garbage, unsupported codec,
    too short (4 frames < 6 asked with short_video="error"). Returns (records, bad problem ids)."""
    bad_dir = data_root / "bad"
    bad_dir.mkdir(exist_ok=True)
    good = (data_root / records[0].video).read_bytes()
    (bad_dir / "empty.mp4").write_bytes(b"")
    (bad_dir / "garbage.mp4").write_bytes(np.random.default_rng(_seed()).integers(
        0, 256, 3000, dtype=np.uint8).tobytes())
    (bad_dir / "codec.mp4").write_bytes(good.replace(b"avc1", b"zzzz"))
    synthetic.write_video(bad_dir / "short.mp4", np.full((4, 32, 32, 3), 99, np.uint8))
    kinds = {"missing": "bad/none.mp4", "empty": "bad/empty.mp4", "garbage": "bad/garbage.mp4",
             "codec": "bad/codec.mp4", "short": "bad/short.mp4"}
    out = list(records) + [dataclasses.replace(records[j], problem_id=f"bad-{kind}", video=rel,
                                               source=f"{tmp_path}/bad.jsonl:{j + 1}")
                           for j, (kind, rel) in enumerate(kinds.items())]
    return out, {f"bad-{k}": k for k in kinds}


@pytest.mark.parametrize("kind,reason", [("missing", "not found"), ("empty", "empty"),
                                         ("garbage", "cannot"), ("codec", "codec"),
                                         ("short", "4 frames, 6 asked")])
def test_bad_video_raises_naming_the_record(tmp_path, records, tokenizer, pre, data_root, kind, reason):
    recs, bad = _break_some(tmp_path, data_root, records)
    one = [r for r in recs if r.problem_id == f"bad-{kind}"] + recs[:3]
    cfg = _cfg(data_root, num_frames=6, short_video="error", batch_size=1, shuffle=False)
    with pytest.raises(RecordError, match=rf"bad.jsonl:\d \(problem_id 'bad-{kind}'\).*{reason}"):
        _run(one, cfg, tokenizer, pre)


def test_bad_videos_skipped_and_counted(tmp_path, records, tokenizer, pre, data_root, caplog):
    recs, bad = _break_some(tmp_path, data_root, records)
    cfg = _cfg(data_root, num_frames=6, short_video="error", on_error="skip", batch_size=2,
               drop_remainder=False)
    with caplog.at_level(logging.WARNING, logger="lvr_jax.data.records"):
        batches, skipped = _run(recs, cfg, tokenizer, pre)
    assert skipped == len(bad)
    seen = np.concatenate([b["problem_id"] for b in batches]).tolist()
    assert sorted(seen) == sorted(r.problem_id for r in records)    # every good record, once
    logged = caplog.text
    assert all(pid in logged for pid in bad)
    # the short video is fine under the reference policy (each of its 4 frames once, the rest
    # of the 6 frame slots masked) and under "repeat" (6 frames, repeated)
    for policy, frames in (("all", 4), ("repeat", 6)):
        ok, skipped = _run(recs, DataConfig(**{**cfg.__dict__, "short_video": policy}), tokenizer,
                           pre)
        assert skipped == len(bad) - 1
        got = {pid: int(n) for b in ok for pid, n in zip(b["problem_id"], b["num_frames"])}
        assert got["bad-short"] == frames and set(got.values()) == {6, frames}
    # with drop_remainder, good examples left short of a full batch at the end are logged
    cfg = DataConfig(**{**cfg.__dict__, "drop_remainder": True, "batch_size": 5})
    with caplog.at_level(logging.WARNING, logger="lvr_jax.data.dataset"):
        batches, _ = _run(recs, cfg, tokenizer, pre)
    short = len(records) - 5 * len(batches)
    assert 0 < short < 5 and f"end of data: {short} good example(s) short of a full batch" in caplog.text


def test_skip_gives_up_when_everything_fails(tmp_path, records, tokenizer, pre, data_root):
    recs, bad = _break_some(tmp_path, data_root, records)
    only_bad = [r for r in recs if r.problem_id in bad]
    cfg = _cfg(data_root, on_error="skip", num_epochs=None, max_consecutive_skips=7)
    with pytest.raises(RuntimeError, match="7 records in a row failed"):
        _run(only_bad, cfg, tokenizer, pre)


def test_worker_processes(tmp_path, records, tokenizer, pre, data_root):
    """2 decoding processes: same batches as in-process, exact resume, errors name the record."""
    cfg = _cfg(data_root, batch_size=2, num_epochs=2)
    ref, _ = _run(records, cfg, tokenizer, pre)
    wcfg = DataConfig(**{**cfg.__dict__, "num_workers": 2})
    ds = make_iter_dataset(records, wcfg, tokenizer, pre, shard_index=0, shard_count=1)
    it = iter(ds)
    k = int(np.random.default_rng(_seed()).integers(1, len(ref) - 1))
    head = [next(it) for _ in range(k)]
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    _same_batches(head, ref[:k])
    fresh = iter(ds)
    fresh.set_state(state)
    try:
        _same_batches(list(fresh), ref[k:])
    finally:
        fresh.close()
    recs, _ = _break_some(tmp_path, data_root, records)
    bad_first = [r for r in recs if r.problem_id == "bad-garbage"] + records[:3]
    with pytest.raises(RecordError, match=r"problem_id 'bad-garbage'.*garbage.mp4"):
        _run(bad_first, DataConfig(**{**wcfg.__dict__, "shuffle": False, "num_workers": 1}),
             tokenizer, pre)


def test_default_shard_is_the_jax_process(records, tokenizer, pre, data_root):
    import jax
    assert default_shard() == (jax.process_index(), jax.process_count())
    with pytest.raises(ValueError, match="both"):
        make_iter_dataset(records, _cfg(data_root), tokenizer, pre, shard_index=0)
    it = iter(make_iter_dataset(records, _cfg(data_root, batch_size=1), tokenizer, pre))
    assert sorted(int(b["index"][0]) for b in it) == list(range(len(records)))
