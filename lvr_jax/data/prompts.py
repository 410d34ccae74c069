"""Prompts: Qwen chat template, the LongVILA-R1 reasoning prompt, the video placeholder, SFT masks.

A user turn is `<vila/video>` + "\\n" + question (with its lettered options) + "\\n" + the reasoning
instruction. The model (`VLM.embed_prompt`) replaces the single `<vila/video>` token by
frames x tokens_per_frame embeddings (`lvr_jax.models.vlm.expand_like_video` gives the matching
per-position masks).

* RL: `rl_prompt_ids` = the chat-templated prompt with the generation prompt
  (`<|im_start|>assistant\\n`), token ids only.
* SFT: `sft_ids_and_mask` = prompt + assistant reply (`<think> ... </think> <answer> X </answer>`)
  + `<|im_end|>`; the loss mask is 1 exactly on the reply tokens and its `<|im_end|>`.

Kept free of jax imports: this runs in the data-loading worker processes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from lvr_jax.weights.tokens import VIDEO_TOKEN

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
REASONING_INSTRUCTION = (
    "Think about the question step by step, using everything that happens in the video, and write "
    "your reasoning between <think> and </think>. Then give only the letter of the correct option "
    "between <answer> and </answer>, for example <answer> B </answer>.")

_ANSWER_RE = re.compile(r"<answer>\s*([A-Za-z])\s*(?:[.)]|</answer>)", re.S)
_BARE_LETTER_RE = re.compile(r"^\s*\(?([A-Za-z])\)?\s*[.:)]?\s*$")


def format_options(options: Sequence[str]) -> str:
    """["red", "blue"] -> "A. red\\nB. blue" (options already starting with "A." are kept)."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"need 2..{len(LETTERS)} options, got {len(options)}")
    lines = []
    for letter, opt in zip(LETTERS, options):
        opt = str(opt).strip()
        lines.append(opt if re.match(rf"^\(?{letter}[.):]\s", opt + " ") else f"{letter}. {opt}")
    return "\n".join(lines)


def format_question(question: str, options: Sequence[str] | None = None) -> str:
    """Question text with its options on the following lines (no options: the text as is)."""
    question = question.strip()
    return question if not options else f"{question}\n{format_options(options)}"


def user_message(question_text: str, *, with_video: bool = True,
                 instruction: str = REASONING_INSTRUCTION) -> str:
    """The user turn: video placeholder first, then the question, then the reasoning instruction."""
    if VIDEO_TOKEN in question_text:
        raise ValueError(f"question text already contains {VIDEO_TOKEN!r}")
    parts = ([VIDEO_TOKEN] if with_video else []) + [question_text.strip()]
    if instruction:
        parts.append(instruction)
    return "\n".join(parts)


def answer_letter(answer: str) -> str:
    """'<answer>B</answer>', '<answer> B </answer>', 'B', '(B)', 'B.' -> 'B'; ValueError otherwise."""
    m = _ANSWER_RE.search(answer) or _BARE_LETTER_RE.match(answer)
    if not m:
        raise ValueError(f"cannot read an option letter from answer {answer!r}")
    return m.group(1).upper()


def reasoning_response(reasoning: str, letter: str) -> str:
    """The assistant reply in the reasoning format: `<think> ... </think> <answer> X </answer>`.

    A `reasoning` that already holds the tags (as the synthetic set writes it) is kept as is,
    after checking that its answer is `letter`.
    """
    reasoning = reasoning.strip()
    if "<think>" in reasoning or "<answer>" in reasoning:
        if answer_letter(reasoning) != letter:
            raise ValueError(f"reasoning answers {answer_letter(reasoning)!r} but the answer is "
                             f"{letter!r}")
        return reasoning
    return f"<think> {reasoning} </think> <answer> {letter} </answer>"


def chat_messages(question_text: str, response: str | None = None, *, system: str | None = None,
                  with_video: bool = True) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": user_message(question_text, with_video=with_video)})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_placeholder(tokenizer, ids: Sequence[int], with_video: bool) -> None:
    vid = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    count = sum(1 for i in ids if i == vid)
    want = 1 if with_video else 0
    if count != want:
        raise ValueError(f"prompt holds {count} {VIDEO_TOKEN!r} tokens, expected {want} (is "
                         f"{VIDEO_TOKEN!r} a single token of this tokenizer? "
                         f"use lvr_jax.weights.hf.load_tokenizer)")


def rl_prompt_ids(tokenizer, question_text: str, *, system: str | None = None,
                  with_video: bool = True) -> np.ndarray:
    """Token ids (int32) of the templated prompt ending in the generation prompt."""
    text = tokenizer.apply_chat_template(chat_messages(question_text, system=system,
                                                       with_video=with_video),
                                         tokenize=False, add_generation_prompt=True)
    ids = _encode(tokenizer, text)
    _check_placeholder(tokenizer, ids, with_video)
    return np.asarray(ids, np.int32)


def sft_ids_and_mask(tokenizer, question_text: str, response: str, *, system: str | None = None,
                     with_video: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32 [L], loss mask int32 [L]) of prompt + reply; mask = 1 on the reply and
    its end-of-turn token only (not on the template's trailing newline)."""
    prompt = rl_prompt_ids(tokenizer, question_text, system=system, with_video=with_video)
    text = tokenizer.apply_chat_template(chat_messages(question_text, response, system=system,
                                                       with_video=with_video), tokenize=False)
    ids = np.asarray(_encode(tokenizer, text), np.int32)
    n = len(prompt)
    if len(ids) <= n or not np.array_equal(ids[:n], prompt):
        raise ValueError("the templated conversation does not start with the templated prompt; "
                         "cannot locate the assistant reply")
    end_id = _end_of_turn_id(tokenizer)
    ends = np.nonzero(ids[n:] == end_id)[0]
    if len(ends) == 0:
        raise ValueError(f"no end-of-turn token (id {end_id}) after the assistant reply")
    stop = n + int(ends[-1]) + 1
    mask = np.zeros(len(ids), np.int32)
    mask[n:stop] = 1
    return ids, mask


def _end_of_turn_id(tokenizer) -> int:
    tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if tid is None or tid == tokenizer.unk_token_id:
        tid = tokenizer.eos_token_id
    if tid is None:
        raise ValueError("tokenizer has neither <|im_end|> nor an eos token")
    return int(tid)


def expanded_length(num_tokens: int, num_frames: int, tokens_per_frame: int) -> int:
    """Sequence length after the placeholder is replaced by the video's embeddings."""
    return num_tokens - 1 + num_frames * tokens_per_frame
