"""Eval scoring and report without a model: accuracy under both reward styles, overall and per
category, with the headline style's numbers under the unstyled keys."""

import json

import pytest

from lvr_jax.eval.video_qa import report_markdown, score_replies, write_report

T = "<think>x</think>"
# (reply, stored answer, category): longrl / lenient accuracy, longrl / lenient format
ROWS = [
    (T + "<answer>B</answer>", "B", "action"),                        # 1 1   1 1
    (T + "<answer>B.</answer>", "B", "action"),                       # 0 1   1 1
    ("B", "<answer>B</answer>", "action"),                            # 1 0   0 0
    (" " + T + "<answer>C</answer>", "C", "count"),                   # 1 1   0 1
    (T + "<answer>A</answer> <answer>C</answer>", "C", "count"),      # 0 1   1 0
]


def test_scores_both_styles_with_a_headline():
    texts, answers, cats = zip(*ROWS)
    res = score_replies(texts, answers, cats, problem_ids=[f"p{i}" for i in range(5)])
    assert res["reward_style"] == "longrl" and res["n"] == 5
    assert res["accuracy_by_style"] == pytest.approx({"longrl": 3 / 5, "lenient": 4 / 5})
    assert res["accuracy"] == pytest.approx(3 / 5)
    assert res["format_rate"] == pytest.approx(3 / 5)
    assert res["format_rate_by_style"] == pytest.approx({"longrl": 3 / 5, "lenient": 3 / 5})
    assert list(res["per_category"]) == ["action", "count"]
    action, count = res["per_category"]["action"], res["per_category"]["count"]
    assert action["n"] == 3 and count["n"] == 2
    assert action["accuracy_by_style"] == pytest.approx({"longrl": 2 / 3, "lenient": 2 / 3})
    assert count["accuracy_by_style"] == pytest.approx({"longrl": 1 / 2, "lenient": 1.0})
    assert action["accuracy"] == pytest.approx(2 / 3) and count["accuracy"] == pytest.approx(1 / 2)
    assert action["format_rate_by_style"] == pytest.approx({"longrl": 2 / 3, "lenient": 2 / 3})
    assert count["format_rate_by_style"] == pytest.approx({"longrl": 1 / 2, "lenient": 1 / 2})
    assert action["format_rate"] == pytest.approx(2 / 3)
    items = res["items"]
    assert [i["correct"] for i in items] == [True, False, True, True, False]
    assert [i["correct_by_style"]["lenient"] for i in items] == [True, True, False, True, True]
    assert [i["format"] for i in items] == [True, True, False, False, True]
    assert items[1]["predicted"] == "B." and items[4]["predicted"] == "A"   # what longrl graded
    assert items[0]["problem_id"] == "p0" and items[3]["category"] == "count"
    json.dumps(res)                                                          # the report is JSON

    lenient = score_replies(texts, answers, cats, reward_style="lenient")
    assert lenient["reward_style"] == "lenient" and lenient["accuracy"] == pytest.approx(4 / 5)
    assert lenient["accuracy_by_style"] == res["accuracy_by_style"]
    assert lenient["per_category"]["count"]["accuracy"] == pytest.approx(1.0)
    assert lenient["format_rate"] == pytest.approx(3 / 5)
    assert [i["predicted"] for i in lenient["items"]][1:] == ["B", None, "C", "C"]


def test_report_markdown_names_the_headline(tmp_path):
    texts, answers, cats = zip(*ROWS)
    res = score_replies(texts, answers, cats)
    json_path, md_path = write_report(res, tmp_path, "val")
    md = md_path.read_text()
    assert md == report_markdown(res)
    assert json.loads(json_path.read_text())["accuracy_by_style"] == res["accuracy_by_style"]
    assert "Headline reward style: **longrl**" in md
    assert "| category | n | accuracy: longrl (headline) | accuracy: lenient |" in md
    assert "| action | 3 | 0.667 | 0.667 |" in md
    assert "| count | 2 | 0.500 | 1.000 |" in md
    assert "| **all** | 5 | 0.600 | 0.800 |" in md
    assert "format rate (longrl): 0.600" in md and "format rate (lenient): 0.600" in md

    md = report_markdown(score_replies(texts, answers, cats, reward_style="lenient"))
    assert "Headline reward style: **lenient**" in md
    assert "| category | n | accuracy: lenient (headline) | accuracy: longrl |" in md
    assert "| **all** | 5 | 0.800 | 0.600 |" in md


def test_empty_and_bad_style():
    res = score_replies([], [], [])
    assert res["n"] == 0 and res["accuracy"] == 0.0 and res["per_category"] == {}
    assert "| **all** | 0 | 0.000 | 0.000 |" in report_markdown(res)
    with pytest.raises(ValueError, match="valid styles"):
        score_replies(["B"], ["B"], ["x"], reward_style="strict")
