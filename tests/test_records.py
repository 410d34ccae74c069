"""Video QA records: both forms, answer forms, bad records named and skipped, duplicates, undecodable
lines, paths that leave the dataset root (`lvr_jax.data.records`)."""

import json
import logging

import pytest

from lvr_jax.data.records import RecordError, SkipLog, load_records, parse_record, resolve_video


def _reason_obj(pid="p1", **kw):
    obj = {"problem_id": pid, "videos": "v/a.mp4", "problem": "Q?\nA. x\nB. y\nC. z\nD. w",
           "problem_type": "temporal", "reasoning": "because", "answer": "<answer>C</answer>"}
    obj.update(kw)
    return obj


def test_parse_both_forms():
    r = parse_record(_reason_obj(), "f.jsonl:3")
    assert (r.problem_id, r.video, r.answer, r.letter, r.category, r.source) == (
        "p1", "v/a.mp4", "<answer>C</answer>", "C", "temporal", "f.jsonl:3")
    assert not r.open_ended and r.reply_answer == "C"
    b = parse_record({"question": "Which?", "options": ["red", "blue", "green"], "answer": 1,
                      "category": "spatial", "video": "x.mp4", "id": 7}, "g.jsonl:1")
    assert b.question == "Which?\nA. red\nB. blue\nC. green" and b.answer == b.letter == "B"
    assert (b.problem_id, b.category) == ("7", "spatial")


def test_answer_forms():
    """A benchmark answer given as an option's line ("B. red", "(B) red", "B: red") is that
    option's letter; a tagged "(B)" is B; an integer is an option index in the benchmark form
    only (the LongVideo-Reason form keeps answers as stored)."""
    bench = lambda answer: parse_record({"question": "Colour?", "options": ["red", "blue"],  # noqa: E731
                                         "answer": answer, "video": "a.mp4", "id": "b"}, "f:1")
    for answer in ("B. blue", "(B) blue", "B: blue", "B) blue", "B", 1):
        r = bench(answer)
        assert (r.answer, r.letter, r.open_ended) == ("B", "B", False), answer
    for answer in ("A cat", "E. red", "Blue. Dark"):          # no option's letter: open-ended
        r = bench(answer)
        assert (r.answer, r.letter, r.open_ended) == (answer, "", True), answer
    r = parse_record(_reason_obj(answer="<answer>(B)</answer>"), "f:2")
    assert (r.answer, r.letter, r.reply_answer) == ("<answer>(B)</answer>", "B", "B")
    r = parse_record(_reason_obj(answer=1), "f:3")
    assert (r.answer, r.letter, r.open_ended) == ("1", "", True)


@pytest.mark.parametrize("field", ["problem_id", "videos", "problem", "answer"])
def test_missing_field_names_the_record(tmp_path, field):
    good = [_reason_obj(f"p{i}") for i in range(3)]
    bad = _reason_obj("bad-one")
    del bad[field]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in good[:2] + [bad] + good[2:]) + "\n")
    with pytest.raises(RecordError, match=rf"d.jsonl:3\b.*{field}") as e:
        load_records(path)
    if field != "problem_id":
        assert "bad-one" in str(e.value)
    recs = load_records(path, on_error="skip", skips=(skips := SkipLog()))
    assert [r.problem_id for r in recs] == ["p0", "p1", "p2"] and skips.count == 1
    assert "d.jsonl:3" in skips.recent[0]


@pytest.mark.parametrize("line,msg", [
    ("{not json", "invalid JSON"), (json.dumps([1, 2]), "JSON object"),
    (json.dumps(_reason_obj(answer="<answer>F</answer>")), "not one of the options"),
    (json.dumps(_reason_obj(answer="<answer> </answer>")), "is empty"),
    (json.dumps(_reason_obj(answer=["B"])), "string or a number"),
    (json.dumps({"question": "Q?", "options": ["x", "y"], "answer": 7, "video": "a.mp4"}),
     "index 7 out of range"),
    (json.dumps(_reason_obj(answer=float("nan"))), "missing field 'answer' \\(it is nan\\)"),
    (json.dumps({"question": "Q?", "answer": float("nan"), "video": "a.mp4"}), "missing field 'answer'"),
    (json.dumps(_reason_obj(answer="3", reasoning="<think> x </think> <answer> 4 </answer>")), "answers '4'"),
    (json.dumps({"question": "Which?", "answer": "B", "video": "a.mp4"}), "lists no options"),
    (json.dumps(_reason_obj(reasoning="<think> x </think> <answer> A </answer>")), "answers 'A'"),
    (json.dumps({"question": "Q", "options": ["only one"], "answer": "A", "video": "a.mp4"}), "at least 2"),
])
def test_bad_records(tmp_path, line, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_reason_obj("ok")) + "\n\n" + line + "\n")
    with pytest.raises(RecordError, match=rf"bad.jsonl:3.*{msg}"):
        load_records(path, need_reasoning=True)
    if "<think>" in line:     # a reasoning RL and evaluation never read does not drop the record
        assert len(load_records(path)) == 2


def test_reasoning_errors_name_the_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_reason_obj("p", reasoning="<think> only </think>")) + "\n")
    with pytest.raises(RecordError, match=r"d.jsonl:1.*field 'reasoning': cannot read"):
        load_records(path, need_reasoning=True)
    assert [r.reasoning for r in load_records(path)] == ["<think> only </think>"]


def test_duplicates_warn_and_stay_distinct(tmp_path, caplog):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n\n".join(json.dumps(_reason_obj("same", answer=x)) for x in "AC"))
    b.write_text("\n".join(json.dumps(_reason_obj(i)) for i in ("same", f"same@{a}:3")))
    with caplog.at_level(logging.WARNING, logger="lvr_jax.data.records"):
        recs = load_records([a, b], on_error="raise")       # b:2 takes a renamed id: renamed too
    assert [(r.problem_id, r.letter, r.index) for r in recs] == [
        ("same", "A", 0), (f"same@{a}:3", "C", 1), (f"same@{b}:1", "C", 2), (f"same@{a}:3@{b}:2", "C", 3)]
    for dup, first in [(f"'same' at {a}:3", f"{a}:1"), (f"'same' at {b}:1", f"{a}:1"),
                       (f"'same@{a}:3' at {b}:2", f"{a}:3")]:
        assert f"duplicate problem_id {dup} (first at {first})" in caplog.text


def test_undecodable_line_is_one_bad_record(tmp_path):
    path, lines = tmp_path / "d.jsonl", [json.dumps(_reason_obj(f"p{i}", reasoning="caf\u00e9"),
                                                    ensure_ascii=False).encode() for i in range(4)]
    lines[2] = lines[2].replace("\u00e9".encode(), b"\xe9")            # Latin-1: not UTF-8
    path.write_bytes(b"\xef\xbb\xbf" + lines[0] + b"\n" + lines[1] + b"\r\n" + lines[2] + b"\n\n" + lines[3])
    recs = load_records(path, on_error="skip", skips=(skips := SkipLog()))   # a BOM, CRLF: fine
    assert [(r.problem_id, r.reasoning, r.source.removeprefix(f"{path}:")) for r in recs] == [
        ("p0", "caf\u00e9", "1"), ("p1", "caf\u00e9", "2"), ("p3", "caf\u00e9", "5")]
    assert skips.count == 1 and f"{path}:3: not valid UTF-8 (byte 0xe9 at byte " in skips.recent[0]
    with pytest.raises(RecordError, match=r"d.jsonl:3: not valid UTF-8 \(byte 0xe9 at byte \d+ of"):
        load_records(path, on_error="raise")


@pytest.mark.parametrize("rel", ["/etc/passwd", "../outside.mp4", "a/../../b.mp4", "C:\\x.mp4",
                                 "~/x.mp4", ""])
def test_paths_escaping_the_root_are_rejected(tmp_path, rel):
    (path := tmp_path / "d.jsonl").write_text(json.dumps(_reason_obj("esc", videos=rel)) + "\n")
    with pytest.raises(RecordError, match=r"d.jsonl:1 \(problem_id 'esc'\)"):
        load_records(path)


def test_symlink_out_of_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "v.mp4").write_bytes(b"x")
    (root / "link").symlink_to(outside)
    (root / "ok").mkdir()
    assert resolve_video(root, "ok/v.mp4") == (root / "ok" / "v.mp4").resolve()
    with pytest.raises(RecordError, match="outside the dataset root"):
        resolve_video(root, "link/v.mp4", "d.jsonl:4", "sym")
