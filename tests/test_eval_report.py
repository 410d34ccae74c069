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


def fake_evaluate(monkeypatch, **kw):
    """`evaluate` over two batches of 8 with the model faked: every reply answers B in 4 tokens.
    Returns (result, the sampler's calls (rows, params, seed), on_batch's item counts)."""
    import numpy as np

    from lvr_jax.eval import accuracy

    monkeypatch.setattr(accuracy, "encode_batch", lambda model, frames, layout=None: frames)
    monkeypatch.setattr(accuracy, "make_prompts", lambda model, feats, ids, mask, layout, nf: ids)
    calls = []

    class Sampler:
        def generate_padded(self, prompt, mask, params, seed=0):
            calls.append((prompt.shape[0], params, seed))
            return np.zeros((prompt.shape[0], 4), np.int32), None, np.full(prompt.shape[0], 4)

    class Tokenizer:
        def batch_decode(self, rows, skip_special_tokens=True):
            return ["<think>x</think> <answer>B</answer>"] * len(rows)

    def batch(start):
        return {"frames": np.zeros((8, 1)), "input_ids": np.zeros((8, 3), np.int32),
                "attention_mask": np.ones((8, 3), np.int32), "answer": ["B", "C"] * 4,
                "category": ["c"] * 8, "problem_id": [str(i) for i in range(start, start + 8)]}

    done = []
    got = accuracy.evaluate(None, Tokenizer(), [batch(0), batch(8)], sampler=Sampler(),
                            on_batch=lambda n, correct: done.append(n), **kw)
    return got, calls, done


@pytest.mark.parametrize("limit,want", [(3, 3), (0, 0), (11, 11), (None, 16), (40, 16)])
def test_evaluate_scores_at_most_limit_items(monkeypatch, limit, want):
    """`limit` is a number of items, not of batches: batches of 8 with limit 3 score 3 items."""
    got, calls, done = fake_evaluate(monkeypatch, limit=limit)
    assert got["n"] == want and [i["problem_id"] for i in got["items"]] == [str(i) for i in range(want)]
    assert len(calls) == -(-want // 8) and done == [min(want, 8 * (k + 1)) for k in range(len(calls))]
    assert all(p.temperature == 0 for _, p, _ in calls)          # greedy by default


def test_evaluate_samples_as_the_eval_section_says(monkeypatch):
    """`eval.temperature` / `top_p` / `seed` (Long-RL validates at temperature 0.5) reach the
    sampler, batch i drawn with seed + i, and the result and its report say how replies were
    drawn; bad values are refused when read."""
    import ml_collections

    from lvr_jax.eval.video_qa import report_markdown
    from lvr_jax.train import settings

    config = ml_collections.ConfigDict({"eval": dict(temperature=0.5, top_p=0.99, seed=7)})
    got, calls, _ = fake_evaluate(monkeypatch, **settings.eval_sampling(config))
    assert [(p.temperature, p.top_p, seed) for _, p, seed in calls] == [(0.5, 0.99, 7), (0.5, 0.99, 8)]
    assert got["sampling"] == {"temperature": 0.5, "top_p": 0.99, "seed": 7}
    assert "one sample per prompt, temperature 0.5, top_p 0.99, seed 7" in report_markdown(got)
    config.eval.temperature = -1.0
    with pytest.raises(ValueError, match="temperature must be"):
        settings.eval_sampling(config)
