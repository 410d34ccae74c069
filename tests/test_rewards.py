"""Rule rewards: a table of cases, and hypothesis fuzzing that nothing raises and values stay in range."""

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvr_jax.rl.rewards import (
    accuracy_reward,
    batch_rewards,
    choice_letter,
    combined_reward,
    extract_answer,
    format_reward,
    parse_number,
)

FORMAT_CASES = [
    ("<think>look at frame 3</think> <answer>B</answer>", 1.0),
    ("  \n<think>\nreasoning\n</think>\n\n<answer> B </answer>\n", 1.0),
    ("<think></think><answer></answer>", 1.0),                       # empty contents are format-valid
    ("<think>a</think><answer>B</answer>", 1.0),
    ("<answer>B</answer>", 0.0),                                     # missing think
    ("<think>a</think>", 0.0),                                       # missing answer
    ("<answer>B</answer><think>a</think>", 0.0),                     # wrong order
    ("<think>a</think> so <answer>B</answer>", 0.0),                 # text between
    ("Sure! <think>a</think><answer>B</answer>", 0.0),               # text before
    ("<think>a</think><answer>B</answer> done", 0.0),                # text after
    ("<think>a<think>b</think></think><answer>B</answer>", 0.0),     # nested
    ("<think>a</think><answer>B</answer><answer>C</answer>", 0.0),   # repeated answer
    ("<think>a</think><answer>B<answer>C</answer>", 0.0),            # stray open tag
    ("<think>a</answer></think><answer>B</answer>", 0.0),
    ("<THINK>a</THINK><ANSWER>B</ANSWER>", 0.0),                     # tags are case-sensitive
    ("<think>a</think><answer>B</answer", 0.0),                      # broken closing tag
    ("", 0.0),
]


@pytest.mark.parametrize("text,want", FORMAT_CASES)
def test_format_reward(text, want):
    assert format_reward(text) == want


EXTRACT_CASES = [
    ("<answer>B</answer>", "B"),
    ("<answer> b </answer>", "B"),
    ("<answer>B.</answer>", "B"),
    ("<answer>(B)</answer>", "B"),
    ("<answer>[C]</answer>", "C"),
    ("<answer>B) The man leaves</answer>", "B"),
    ("<answer>D. red car</answer>", "D"),
    ("<answer>(A) a dog</answer>", "A"),
    ("<answer>Answer: C</answer>", "C"),
    ("<answer>The answer is (D).</answer>", "D"),
    ("<answer>Option A</answer>", "A"),
    ("<answer>**B**</answer>", "B"),
    ("<answer>42</answer>", "42"),
    ("<answer>  the red car </answer>", "the red car"),
    ("<answer>Because of the rain</answer>", "Because of the rain"),   # not a letter
    ("<answer>I think B</answer>", "I think B"),
    ("<think>maybe <answer>A</answer>?</think><answer>C</answer>", "C"),  # the last pair
    ("<answer>A</answer> then <answer>B", "A"),                          # last COMPLETE pair
    ("The answer is B", None),
    ("<answer>B", None),
    ("B</answer>", None),
    ("", None),
]


@pytest.mark.parametrize("text,want", EXTRACT_CASES)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


ACCURACY_CASES = [
    ("<think>x</think><answer>B</answer>", "<answer>B</answer>", 1.0),
    ("<think>x</think><answer>B</answer>", "B", 1.0),
    ("<answer>b</answer>", "B", 1.0),
    ("<answer>(B) the cat</answer>", "<answer> B </answer>", 1.0),
    ("<answer>Answer: B.</answer>", "b", 1.0),
    ("<answer>C</answer>", "B", 0.0),
    ("<answer>the answer is B</answer>", "B", 1.0),
    ("B", "B", 0.0),                                   # no answer tag, no credit
    ("<answer></answer>", "B", 0.0),
    ("<answer>B</answer>", "", 0.0),
    ("<answer>B</answer>", None, 0.0),
    ("<answer>3</answer>", "3.0", 1.0),
    ("<answer>3.0</answer>", "<answer>3</answer>", 1.0),
    ("<answer>three</answer>", "3", 1.0),
    ("<answer>1,234</answer>", "1234", 1.0),
    ("<answer>12 km</answer>", "12", 1.0),
    ("<answer>$5</answer>", "5", 1.0),
    ("<answer>50%</answer>", "50", 1.0),
    ("<answer>0.75</answer>", "3/4", 1.0),
    ("<answer>100000.5</answer>", "100000", 1.0),      # within relative tolerance 1e-4
    ("<answer>101</answer>", "100", 0.0),
    ("<answer>-2</answer>", "2", 0.0),
    ("<answer>3 apples and 4 pears</answer>", "3", 0.0),
    ("<answer>1/0</answer>", "0", 0.0),
    ("<answer>The Red Car.</answer>", "the red  car", 1.0),
    ("<answer>blue</answer>", "red", 0.0),
]


@pytest.mark.parametrize("text,answer,want", ACCURACY_CASES)
def test_accuracy_reward(text, answer, want):
    assert accuracy_reward(text, answer) == want


def test_helpers_and_combined():
    assert choice_letter("(c).") == "C" and choice_letter("cat") is None
    assert parse_number("-3.5e2") == -350.0 and parse_number("1e999") is None
    assert parse_number("forty") == 40.0 and parse_number("abc") is None
    good = "<think>frame 12 shows it</think>\n<answer>A</answer>"
    assert combined_reward(good, "A") == pytest.approx(1.0)
    assert combined_reward(good, "B") == pytest.approx(0.1)
    assert combined_reward("<answer>A</answer>", "A") == pytest.approx(0.9)
    assert combined_reward(good, "B", accuracy_weight=1.0, format_weight=0.5) == pytest.approx(0.5)


def test_batch_rewards():
    texts = ["<think>a</think><answer>B</answer>", "<answer>B</answer>", "junk",
             "<think>a</think><answer>C</answer>"]
    out = batch_rewards(texts, ["B", "C"])               # one answer per group of 2
    np.testing.assert_array_equal(out["accuracy"], [1, 1, 0, 1])
    np.testing.assert_array_equal(out["format"], [1, 0, 0, 1])
    np.testing.assert_allclose(out["reward"], [1.0, 0.9, 0.0, 1.0], rtol=1e-6)
    assert all(v.dtype == np.float32 and v.shape == (4,) for v in out.values())
    np.testing.assert_array_equal(batch_rewards(texts, "B")["accuracy"], [1, 1, 0, 0])
    np.testing.assert_array_equal(batch_rewards(texts, ["B", "B", "B", "C"])["accuracy"], [1, 1, 0, 1])
    with pytest.raises(ValueError, match="answers"):
        batch_rewards(texts, ["B", "C", "D"])
    assert batch_rewards([], [])["reward"].shape == (0,)


# ---- fuzzing -----------------------------------------------------------------------------------
PIECES = ["<think>", "</think>", "<answer>", "</answer>", "<answer", "answer>", "<", ">", "/", " ", "\n",
          "A", "b", "(C)", "D.", "Answer:", "the answer is", "42", "-3.5e2", "1e999", "3/0", "1,234",
          "\\boxed{", "}", "**", "three", "%", "km", ".", "\x00", "\ud7ff", "é", "🙂"]
fuzz_text = st.one_of(
    st.text(),
    st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=30).map("".join),
)
fuzz_answer = st.one_of(fuzz_text, st.sampled_from(["B", "<answer>B</answer>", "42", "three", ""]),
                        st.none(), st.integers(), st.floats(), st.binary(max_size=20))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(text=fuzz_text, answer=fuzz_answer)
def test_fuzz_never_raises(text, answer):
    f = format_reward(text)
    a = accuracy_reward(text, answer)
    c = combined_reward(text, answer)
    assert f in (0.0, 1.0) and a in (0.0, 1.0)
    assert 0.0 <= c <= 1.0 and c == pytest.approx(0.9 * a + 0.1 * f)
    e = extract_answer(text)
    assert e is None or isinstance(e, str)
    assert choice_letter(text) in (None, *"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    n = parse_number(text)
    assert n is None or np.isfinite(n)
    # The parsing itself does not raise either (the never-raise wrapper is only a last line of defence).
    assert format_reward.__wrapped__(text) == f
    assert extract_answer.__wrapped__(text) == e
    assert accuracy_reward.__wrapped__(text, answer) == a


@FUZZ
@given(think=st.text().filter(lambda s: "<" not in s), letter=st.sampled_from("ABCDE"),
       ws=st.sampled_from(["", " ", "\n", "\n\n  "]))
def test_fuzz_well_formed_replies_score_full(think, letter, ws):
    text = f"{ws}<think>{think}</think>{ws}<answer>{ws}{letter}{ws}</answer>{ws}"
    assert format_reward(text) == 1.0
    assert accuracy_reward(text, f"<answer>{letter}</answer>") == 1.0
    assert accuracy_reward(text, letter.lower()) == 1.0


@pytest.mark.parametrize("value", [None, 3, 2.5, b"<answer>B</answer>", bytearray(b"\xff\xfe"), object(),
                                   ["<answer>B</answer>"]])
def test_non_string_inputs(value):
    assert format_reward(value) in (0.0, 1.0)
    assert accuracy_reward(value, value) in (0.0, 1.0)
    assert accuracy_reward("<answer>B</answer>", value) in (0.0, 1.0)
    assert extract_answer(value) in (None, "B")


def test_huge_strings_are_fast():
    pieces = ["<think>" * 200_000 + "x" * 1_000_000 + "</answer>" * 200_000,
              "<answer>" * 300_000 + "1" * 1_000_000,
              "<think>" + "a " * 2_000_000 + "</think><answer>" + "9" * 500_000 + "</answer>",
              "<think>r</think><answer>" + "(" * 1_000_000 + "B</answer>"]
    start = time.perf_counter()
    for text in pieces:
        assert format_reward(text) in (0.0, 1.0)
        assert accuracy_reward(text, "B") in (0.0, 1.0)
        assert accuracy_reward(text, "9") in (0.0, 1.0)
    assert format_reward(pieces[2]) == 1.0
    assert time.perf_counter() - start < 10.0
