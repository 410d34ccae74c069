"""rl.reward_fn: the guard (a failing reward costs only its replies, counted, each record logged
once), start-up errors for a bad `module:function`, the built-in styles through the interface,
ROUGE-L on free-text answers against hand-computed values, the record dicts of a batch,
`local_rewards`, and the judge's plumbing with a tiny random judge on a sharded mesh."""
import logging
import math
import re
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

from lvr_jax.rl import reward_fns
from lvr_jax.rl.reward_fns import RewardSettings, batch_records, load_reward_fn
from lvr_jax.rl.rewards import REWARD_STYLES, batch_rewards, format_reward

LOGGER = "lvr_jax.rl.reward_fns"
GOOD = "<think> the ball moves first </think> <answer>B</answer>"
PIDS = ["p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3"]         # 4 prompts x G = 2, prompt-major


def records_of(pids=PIDS, answer="<answer>B</answer>"):
    return [dict(problem_id=p, answer=answer, letter="B", category="c", index=i, question="q?",
                 sample=i % 2) for i, p in enumerate(pids)]


# reward functions named by the tests' rl.reward_fn strings ("tests.test_reward_fns:...")
def raising_reward(replies, records):
    raise RuntimeError("boom")


def bad_values_reward(replies, records):
    return [1.0, math.nan, 0.5, math.inf, "x", None, True, np.float32(0.25)][:len(replies)]


def edge_values_reward(replies, records):
    """Real numbers float32 cannot hold or float() cannot take, and 0-d bfloat16 / float16."""
    return [1e39, -1e39, 10 ** 400, Fraction(10 ** 400, 3), jnp.asarray(0.5, jnp.bfloat16),
            np.asarray(0.25, np.float16), np.asarray(3e38), np.asarray(1e39)][:len(replies)]


def dict_reward(replies, records):
    return {"reward": [0.5] * len(replies), "accuracy": [1.0, -math.inf] + [0.0] * (len(replies) - 2),
            "extra": "ignored"}


def short_reward(replies, records):
    return [1.0] * (len(replies) - 1)


def logged_ids(caplog):
    return [m for r in caplog.records if r.name == LOGGER
            for m in re.findall(r"for record '([^']+)'", r.getMessage())]


def test_raising_reward_costs_the_batch_counted_and_logged_once_per_record(caplog):
    fn = load_reward_fn("tests.test_reward_fns:raising_reward")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            out = fn([GOOD] * 8, records_of())
            assert set(out) == {"reward", "accuracy", "format", "error"}
            for k in ("reward", "accuracy", "format"):
                np.testing.assert_array_equal(out[k], np.zeros(8))
            assert out["error"].sum() == 8 and out["reward"].dtype == np.float32
    assert sorted(logged_ids(caplog)) == ["p0", "p1", "p2", "p3"]        # once each over 2 calls
    assert any("boom" in r.getMessage() for r in caplog.records)


def test_nan_inf_and_non_numbers_cost_only_those_replies(caplog):
    fn = load_reward_fn("tests.test_reward_fns:bad_values_reward")
    replies = [GOOD, GOOD, "no format", GOOD, GOOD, GOOD, "no format", GOOD]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            out = fn(replies, records_of())
            np.testing.assert_array_equal(out["error"], [0, 1, 0, 1, 1, 1, 0, 0])
            np.testing.assert_allclose(out["reward"], [1.0, 0, 0.5, 0, 0, 0, 1.0, 0.25])
            np.testing.assert_allclose(out["accuracy"], out["reward"])          # defaults to the reward
            want_fmt = [0.0 if e else format_reward(t, "longrl") for t, e in zip(replies, out["error"])]
            np.testing.assert_array_equal(out["format"], want_fmt)              # the style's rule
    assert sorted(logged_ids(caplog)) == ["p0", "p1", "p2"]   # p3's replies were fine


def test_values_float32_cannot_hold_score_zero_and_bf16_counts():
    """A finite float64 past float32's range would be an infinity in the float32 scores (its
    group's advantages NaN); 10**400 made float() raise out of the guard. Both are errors now,
    and a 0-d bfloat16 (dtype kind 'V') is a number."""
    out = load_reward_fn("tests.test_reward_fns:edge_values_reward")([GOOD] * 8, records_of())
    np.testing.assert_array_equal(out["error"], [1, 1, 1, 1, 0, 0, 0, 1])
    np.testing.assert_allclose(out["reward"], [0, 0, 0, 0, 0.5, 0.25, 3e38, 0], rtol=1e-6)
    assert np.isfinite(out["reward"]).all()


def test_dict_results_and_wrong_shapes(caplog):
    out = load_reward_fn("tests.test_reward_fns:dict_reward")(["a", GOOD, "c"], records_of(PIDS[:3]))
    np.testing.assert_array_equal(out["error"], [0, 1, 0])
    np.testing.assert_allclose(out["reward"], [0.5, 0, 0.5])
    np.testing.assert_allclose(out["accuracy"], [1.0, 0, 0.0])
    out = load_reward_fn("tests.test_reward_fns:short_reward")([GOOD] * 4, records_of(PIDS[:4]))
    assert out["error"].sum() == 4 and out["reward"].sum() == 0


@pytest.mark.parametrize("spec, words", [
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("lvr_jax.rl.reward_fns:nope", "has no attribute 'nope'"),
    ("lvr_jax.rl.reward_fns", "expected 'package.module:function'"),
    ("lvr_jax.rl.reward_fns:", "expected 'package.module:function'"),
    ("math:pi", "not a function"),
    ("math:sqrt", "cannot be called as fn(replies, records)"),
])
def test_bad_reward_fn_is_a_config_error_naming_the_string(spec, words):
    from configs import demo
    from lvr_jax.train.judge import check_reward_fn

    config = demo.get_config()
    config.rl.reward_fn = spec
    for check in (lambda: check_reward_fn(config), lambda: load_reward_fn(spec)):
        with pytest.raises(ValueError) as e:
            check()
        assert f"rl.reward_fn={spec!r}" in str(e.value) and words in str(e.value)


def test_start_up_checks_style_and_judge_checkpoint():
    from configs import demo
    from lvr_jax.train.judge import JUDGE_FN, check_reward_fn

    config = demo.get_config()
    assert check_reward_fn(config) == reward_fns.DEFAULT_REWARD_FN
    config.rl.reward_fn = "lvr_jax.rl.reward_fns:free_text"
    assert check_reward_fn(config) == config.rl.reward_fn
    config.rl.reward_fn = JUDGE_FN
    with pytest.raises(ValueError, match="rl.judge_checkpoint"):
        check_reward_fn(config)
    config.rl.reward_fn, config.rl.reward_style = "", "strict"
    with pytest.raises(ValueError, match="unknown reward style"):
        check_reward_fn(config)


REPLIES = [GOOD, "<think>x</think><answer>(B)</answer>", "<answer>B</answer>", " " + GOOD,
           "<think>a</think>\n<answer>12</answer>", "<think>a</think> <answer>12.0</answer>",
           "<think>a</think><answer>3/4</answer>", "<think>a</think><answer>0.75</answer>"]
ANSWERS = ["<answer>B</answer>", "B", "<answer>12</answer>", "<answer>0.75</answer>"]


@pytest.mark.parametrize("style", REWARD_STYLES)
def test_built_in_styles_through_the_interface_equal_batch_rewards(style):
    records = [dict(problem_id=f"p{i // 2}", answer=ANSWERS[i // 2]) for i in range(8)]
    want = batch_rewards(REPLIES, ANSWERS, style=style, accuracy_weight=0.7, format_weight=0.3)
    for spec in ("", "lvr_jax.rl.reward_fns:style"):
        got = load_reward_fn(spec, RewardSettings(style=style, accuracy_weight=0.7, format_weight=0.3))(
            REPLIES, records)
        for k in ("reward", "accuracy", "format"):
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-7)
        assert got["error"].sum() == 0


def think(answer: str) -> str:
    return f"<think> looking </think> <answer>{answer}</answer>"


# (reply, stored answer, hand-computed accuracy); ROUGE-L F1 = 2PR / (P + R) over lower-cased
# alphanumeric words, words of more than 3 letters Porter-stemmed ("rolls" -> "roll")
FREE_TEXT = [
    # cand [a red ball roll left], ref [the red ball roll to the left]: LCS red ball roll left = 4,
    # P 4/5, R 4/7, F = 2 * 16/35 / (48/35) = 2/3
    (think("A red ball rolls left"), "the red ball rolls to the left", 2 / 3),
    (think("A red ball."), "<answer>a RED ball</answer>", 1.0),          # case, punctuation, tags
    (think("ball red"), "red ball", 0.5),                                 # LCS 1: P = R = 1/2
    # cand [it stay still], ref [the cube stay]: LCS stay = 1, P 1/3, R 1/3
    (think("It stays still"), "the cube stays", 1 / 3),
    (think("blue cube"), "red ball", 0.0),
    ("<think> no answer tags </think> a red ball", "a red ball", 0.0),    # no span: 0
    (think("B"), "<answer>B</answer>", 1.0),                              # letter: style rule
    (think("12.0"), "<answer>12</answer>", 1.0),                          # number: style (mathruler)
    (think("thirteen"), "12", 0.0),
]


def test_free_text_rouge_l_against_hand_computed_values():
    replies = [r for r, _, _ in FREE_TEXT]
    records = [dict(problem_id=f"p{i}", answer=a, letter=reward_fns.answer_letter(a))
               for i, (_, a, _) in enumerate(FREE_TEXT)]
    want_acc = np.array([w for _, _, w in FREE_TEXT])
    fmt = np.array([format_reward(r, "longrl") for r in replies])
    out = load_reward_fn("lvr_jax.rl.reward_fns:free_text", RewardSettings())(replies, records)
    np.testing.assert_allclose(out["accuracy"], want_acc, atol=1e-6)
    np.testing.assert_array_equal(out["format"], fmt)
    np.testing.assert_allclose(out["reward"], 0.9 * want_acc + 0.1 * fmt, atol=1e-6)
    assert out["error"].sum() == 0
    # the factory called directly scores with the default settings
    np.testing.assert_allclose(reward_fns.free_text(replies, records)["accuracy"], want_acc, atol=1e-6)
    assert reward_fns.rouge_l("the red ball rolls to the left", "a red ball rolls left") == \
        pytest.approx(2 / 3)


def test_batch_records_contract():
    batch = dict(problem_id=np.asarray(["a", "b"]), answer=np.asarray(["<answer>C</answer>", "a red ball"]),
                 category=np.asarray(["order", "count"]), index=np.asarray([5, 9], np.int64),
                 question=np.asarray(["Which? A. x B. y C. z", "What moves?"]))
    recs = batch_records(batch, 3)
    assert [tuple(r) for r in recs] == [reward_fns.RECORD_FIELDS] * 6
    assert recs[0] == dict(problem_id="a", answer="<answer>C</answer>", letter="C", category="order",
                           index=5, question="Which? A. x B. y C. z", sample=0)
    assert recs[5] == dict(problem_id="b", answer="a red ball", letter="", category="count", index=9,
                           question="What moves?", sample=2)
    assert all(type(r["problem_id"]) is str and type(r["index"]) is int for r in recs)


# ---- the judge (tiny random checkpoint, its verdicts are noise: the plumbing is tested) -----------

@pytest.fixture(scope="module")
def judge_setup(tmp_path_factory):
    from configs import demo
    from lvr_jax.train.judge import JUDGE_FN, JUDGE_PROMPT, reward_settings
    from lvr_jax.weights.tiny import make_random_checkpoint
    from sharding.mesh import make_mesh

    config = demo.get_config()
    config.mesh = dict(data=-1, fsdp=1, seq=2, tensor=1)     # 8 devices: 4 x a ring of 2
    folder = tmp_path_factory.mktemp("judge") / "vila"
    make_random_checkpoint(config.model, folder, corpus=[JUDGE_PROMPT, "yes no a red ball rolls left"])
    config.rl.update(reward_fn=JUDGE_FN, judge_checkpoint=str(folder), judge_max_new_tokens=4)
    mesh = make_mesh(dict(config.mesh))
    fn = load_reward_fn(config.rl.reward_fn, reward_settings(config, mesh))
    return config, mesh, fn, fn.fn.judge


JUDGE_ROWS = [  # (reply, answer, question)
    (think("a red ball"), "a red ball", "What moves?"),
    (think("a blue cube"), "a red ball", "What moves?"),
    (think("B"), "<answer>B</answer>", "Which? A. x B. y"),
    ("<think> x </think> nothing", "<answer>the cube stays</answer>", "What stays?"),
    (think("it stays"), "<answer>the cube stays</answer>", "What stays?"),
]


def judge_inputs():
    replies = [r for r, _, _ in JUDGE_ROWS]
    records = [dict(problem_id=f"p{i}", answer=a, letter=reward_fns.answer_letter(a), question=q)
               for i, (_, a, q) in enumerate(JUDGE_ROWS)]
    return replies, records


def test_judge_prompt_and_verdicts_through_the_sampler_on_the_mesh(judge_setup, monkeypatch):
    import jax.numpy as jnp

    from lvr_jax.rollout.sampler import Sampler
    from lvr_jax.train.judge import JUDGE_PROMPT

    config, mesh, fn, judge = judge_setup
    assert isinstance(judge.sampler, Sampler) and judge.sampler.layout.mesh is mesh
    assert mesh.devices.size == 8 and judge.sampler.layout.seq_axis == "seq"
    assert judge.params.temperature == 0 and judge.params.max_new_tokens == 4
    calls = []
    real = judge.sampler.generate_padded

    def spy(x, mask, params, **kw):
        out = real(x, mask, params, **kw)
        calls.append((np.asarray(x), np.asarray(mask), out))
        return out

    monkeypatch.setattr(judge.sampler, "generate_padded", spy)
    replies, records = judge_inputs()
    out = fn(replies, records)
    assert len(calls) == 1
    x, mask, (tokens, _, lengths) = calls[0]
    judged = [(0, "a red ball"), (1, "a blue cube"), (4, "it stays")]      # free text with a span
    assert x.shape[0] == 4 and x.shape[1] % 64 == 0 and mask[3].sum() == mask[0].sum()   # padded
    # what the judge model receives: read the tokens back from the embeddings, as text
    table = np.asarray(judge.sampler.llm.embed_tokens(jnp.arange(judge.sampler.llm.cfg.vocab_size)))
    for row, (i, cand) in enumerate(judged):
        ids = [int(np.argmin(((table - e) ** 2).sum(-1))) for e in x[row][mask[row]]]
        reference = "a red ball" if i < 2 else "the cube stays"           # <answer> tags dropped
        want = ("<|im_start|>user\n" + JUDGE_PROMPT.format(question=records[i]["question"],
                                                           reference=reference, candidate=cand)
                + "<|im_end|>\n<|im_start|>assistant\n")
        assert judge.tokenizer.decode(ids, skip_special_tokens=False) == want
        assert "Reference answer: " + reference + "\nCandidate answer: " + cand + "\n" in want
    # verdicts: the first yes / no of each judge reply, read independently here
    texts = judge.tokenizer.batch_decode([t[:k] for t, k in zip(tokens[:3], lengths[:3])],
                                         skip_special_tokens=True)
    assert texts == judge.last_replies
    verdicts = [re.search(r"\b(yes|no)\b", t, re.I) for t in texts]
    for (i, _), v in zip(judged, verdicts):
        assert out["error"][i] == (v is None)
        assert out["accuracy"][i] == (0.0 if v is None else float(v.group(1).lower() == "yes"))
    assert out["error"][[2, 3]].sum() == 0 and out["accuracy"][3] == 0.0     # no span: 0, not judged
    assert out["accuracy"][2] == 1.0                                           # letter: style rule
    assert ((out["reward"] >= 0) & (out["reward"] <= 1)).all()


def test_judge_verdict_mapping_unparseable_scores_zero_and_counts(judge_setup, monkeypatch, caplog):
    from lvr_jax.train.judge import parse_verdict

    _, _, fn, judge = judge_setup
    said = ["Yes, they match.", "no", "I cannot tell"]

    def fake(x, mask, params, **kw):
        ids = [judge.tokenizer(s, add_special_tokens=False)["input_ids"] for s in said]
        ids += [ids[0]] * (x.shape[0] - len(ids))
        tok = np.zeros((len(ids), params.max_new_tokens + 8), np.int32)
        for r, row in enumerate(ids):
            tok[r, :len(row)] = row
        return tok, np.zeros(tok.shape, np.float32), np.asarray([len(r) for r in ids], np.int32)

    monkeypatch.setattr(judge.sampler, "generate_padded", fake)
    fn = reward_fns.SafeReward(fn.fn, name="judge")          # a fresh once-per-record log
    replies, records = judge_inputs()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = fn(replies, records)
        fn(replies, records)
    np.testing.assert_array_equal(out["accuracy"], [1.0, 0.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(out["error"], [0, 0, 0, 0, 1])
    fmt = [format_reward(r, "longrl") for r in replies]
    np.testing.assert_allclose(out["reward"], [0.9 + 0.1 * fmt[0], 0.1 * fmt[1], 0.9 + 0.1 * fmt[2],
                                               0.1 * fmt[3], 0.0], atol=1e-6)
    assert logged_ids(caplog) == ["p4"]
    assert [parse_verdict(s) for s in ("YES", "No.", "the answer is yes", "nonsense", "yesterday", "")
            ][:3] == [1.0, 0.0, 1.0]
    assert all(math.isnan(parse_verdict(s)) for s in ("nonsense", "yesterday", "", None))


def test_judge_failure_costs_only_open_ended_replies(judge_setup, monkeypatch):
    _, _, fn, judge = judge_setup

    def broken(*a, **k):
        raise RuntimeError("judge out of memory")

    monkeypatch.setattr(judge.sampler, "generate_padded", broken)
    replies, records = judge_inputs()
    out = reward_fns.SafeReward(fn.fn, name="judge")(replies, records)
    np.testing.assert_array_equal(out["error"], [1, 1, 0, 0, 1])
    assert out["accuracy"][2] == 1.0


# ---- local_rewards ---------------------------------------------------------------------------------

class FakeRun:
    def __init__(self, config, tokenizer):
        self.config, self.tokenizer, self.shard, self.mesh = config, tokenizer, (0, 1), None


def test_local_rewards_uses_the_configured_function(judge_setup):
    from configs import demo
    from lvr_jax.data.prompts import rl_prompt_ids
    from lvr_jax.train.rollouts import local_rewards
    from lvr_jax.train.judge import run_reward_fn

    tok = judge_setup[3].tokenizer
    config = demo.get_config()
    questions = ["Which moves first? A. ball B. cube", "What moves?"]
    prompt_ids = [rl_prompt_ids(tok, q) for q in questions]
    width = max(len(p) for p in prompt_ids)
    ids = np.zeros((2, width), np.int32)
    for i, p in enumerate(prompt_ids):
        ids[i, :len(p)] = p
    batch = dict(problem_id=np.asarray(["a", "b"]), answer=np.asarray(["<answer>B</answer>", "a red ball"]),
                 category=np.asarray(["x", "y"]), index=np.asarray([0, 1]), input_ids=ids,
                 length=np.asarray([len(p) for p in prompt_ids], np.int32))
    replies = [GOOD, think("A"), think("a red ball"), think("a ball")]
    enc = [tok(r, add_special_tokens=False)["input_ids"] for r in replies]
    tokens = np.zeros((4, max(map(len, enc)) + 3), np.int32)
    for i, e in enumerate(enc):
        tokens[i, :len(e)] = e
    lengths = np.asarray([len(e) for e in enc], np.int32)
    texts = tok.batch_decode([t[:n] for t, n in zip(tokens, lengths)], skip_special_tokens=True)
    run = FakeRun(config, tok)
    out = local_rewards(run, batch, tokens, lengths)
    want = batch_rewards(texts, list(batch["answer"]), style="longrl")
    assert set(out) == {"reward", "accuracy", "format", "error"}
    for k in ("reward", "accuracy", "format"):
        np.testing.assert_allclose(out[k], want[k], atol=1e-7)
    assert out["error"].sum() == 0 and run_reward_fn(run) is run_reward_fn(run)
    # the records: questions read back from the prompt tokens (template wording cut off)
    recs = batch_records(batch, 2, tokenizer=tok, template=config.data.pipeline.prompt_template)
    assert [r["question"] for r in recs] == [questions[0]] * 2 + [questions[1]] * 2
    config.rl.reward_fn = "lvr_jax.rl.reward_fns:free_text"
    out = local_rewards(FakeRun(config, tok), batch, tokens, lengths)
    np.testing.assert_allclose(out["accuracy"], [1, 0, 1, 0.8], atol=1e-6)   # [a ball] vs [a red ball]
