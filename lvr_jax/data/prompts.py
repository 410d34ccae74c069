"""Prompts: the user turn's template, Qwen chat template, the video placeholder, SFT masks.

The user turn is built from a template (`data.pipeline.prompt_template`, `resolve_template`):

* "longrl" (the default): Long-RL's exactly (NVlabs/Long-RL `verl/utils/dataset.py`,
  `QUESTION_TEMPLATE_VIDEO` and `_get_messages_vila`; VILA's `extract_media` puts the video token
  right before the text, `tokenize_conversation` strips the message):
  `(VIDEO_TOKEN + LONGRL_VIDEO_TEMPLATE.format(question=question)).strip()`, the question being
  the record's `problem` as stored (not stripped) less every "<video>" (Long-RL's `.replace`);
* "instruct": `<vila/video>` + "\\n" + question (stripped, with its lettered options) + "\\n" +
  `REASONING_INSTRUCTION` (this package's earlier wording, kept byte for byte);
* any other string: a custom template holding exactly one `{question}` field and no other
  format field (`{{` / `}}` for literal braces); it is filled like "longrl" (video token in front,
  nothing between, the whole turn stripped). `<vila/video>` may not appear in it.

The model (`VLM.embed_prompt`) replaces the single `<vila/video>` token by frames x
tokens_per_frame embeddings (`lvr_jax.models.vlm.expand_like_video` gives the matching
per-position masks).

* RL: `rl_prompt_ids` = the chat-templated prompt with the generation prompt
  (`<|im_start|>assistant\\n`), token ids only.
* SFT: `sft_ids_and_mask` = prompt + assistant reply (`<think> ... </think> <answer> X </answer>`,
  X the option letter or, for an open-ended question, the answer text) + `<|im_end|>`; the loss
  mask is 1 exactly on the reply tokens and its `<|im_end|>`.

Kept free of jax imports: this runs in the data-loading worker processes.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Sequence

import numpy as np

from lvr_jax.weights.tokens import VIDEO_TOKEN

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
REASONING_INSTRUCTION = (
    "Think about the question step by step, using everything that happens in the video, and write "
    "your reasoning between <think> and </think>. Then give only the letter of the correct option "
    "between <answer> and </answer>, for example <answer> B </answer>.")
# NVlabs/Long-RL verl/utils/dataset.py QUESTION_TEMPLATE_VIDEO, byte for byte (typos included)
LONGRL_VIDEO_TEMPLATE = (
    "You are a helpful assistant. The user asks a question, and then you solves it.\n\n"
    "Please first think deeply about the question based on the given video, and then provide the "
    "final answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> the letter of your choice (A, B, C, or D) </answer>.\n\n Question: {question}")
DEFAULT_TEMPLATE = "longrl"

_ANSWER_RE = re.compile(r"<answer>\s*\(?([A-Za-z])\)?\s*(?:[.)]|</answer>)", re.S)
_BARE_LETTER_RE = re.compile(r"^\s*\(?([A-Za-z])\)?\s*[.:)]?\s*$")
_ANSWER_SPAN_RE = re.compile(r"<answer>(.*?)</answer>", re.S)


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How a user turn is laid out: `video_sep` joins the video token and the filled `text`;
    `strip_question` strips the question before filling, `drop` is removed from it; the whole
    turn is stripped."""
    name: str
    text: str                   # a format string with one {question} field
    video_sep: str = ""
    strip_question: bool = False
    drop: str = ""

    def user_turn(self, question: str, *, with_video: bool = True) -> str:
        question = question.replace(self.drop, "") if self.drop else question
        body = self.text.format(question=question.strip() if self.strip_question else question)
        return ((VIDEO_TOKEN + self.video_sep if with_video else "") + body).strip()


TEMPLATES = {
    "longrl": PromptTemplate("longrl", LONGRL_VIDEO_TEMPLATE, drop="<video>"),   # as Long-RL
    "instruct": PromptTemplate("instruct", "{question}\n" + REASONING_INSTRUCTION, video_sep="\n",
                               strip_question=True),
}


def template_corpus() -> list[str]:
    """The wording of every registered template: text for a tokenizer trained from scratch (the
    tiny test / demo models), so the prompt costs a few tokens, not one per byte."""
    return [t.text for t in TEMPLATES.values()]


def resolve_template(template: str | PromptTemplate | None = None) -> PromptTemplate:
    """A registered name ("longrl", "instruct"), a custom string holding `{question}`, or a
    `PromptTemplate` -> `PromptTemplate`; ValueError (saying what is wrong) otherwise."""
    if template is None:
        return TEMPLATES[DEFAULT_TEMPLATE]
    if isinstance(template, PromptTemplate):
        return template
    if not isinstance(template, str):
        raise ValueError(f"prompt_template must be a string, got {type(template).__name__}")
    if template in TEMPLATES:
        return TEMPLATES[template]
    help_ = (f"prompt_template must be one of {sorted(TEMPLATES)} or a custom string holding "
             f"'{{question}}' once (and no other '{{...}}' field; '{{{{' / '}}}}' for literal braces)")
    if "{" not in template and "}" not in template:
        raise ValueError(f"unknown prompt_template {template!r}: {help_}")
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template)
                  if f is not None]
    except ValueError as e:
        raise ValueError(f"prompt_template {template!r} is not a valid format string ({e}): "
                         f"{help_}") from e
    names = [f for f, _, _ in fields]
    if names != ["question"]:
        raise ValueError(f"prompt_template {template!r} has fields {names}: {help_}")
    if fields[0][1] or fields[0][2]:
        raise ValueError(f"prompt_template {template!r}: write '{{question}}' without a conversion "
                         f"or format spec: {help_}")
    if VIDEO_TOKEN in template:
        raise ValueError(f"prompt_template {template!r} holds {VIDEO_TOKEN!r}; the video token is "
                         f"put in front of the filled template")
    return PromptTemplate("custom", template)


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


def user_message(question_text: str, *, template: str | PromptTemplate | None = None,
                 with_video: bool = True) -> str:
    """The user turn of `question_text` in `template` (default "longrl"; see the module doc)."""
    if VIDEO_TOKEN in question_text:
        raise ValueError(f"question text already contains {VIDEO_TOKEN!r}")
    return resolve_template(template).user_turn(question_text, with_video=with_video)


def answer_letter(answer: str) -> str:
    """'<answer>B</answer>', '<answer> B </answer>', '<answer>(B)</answer>', 'B', '(B)', 'B.' -> 'B';
    ValueError otherwise."""
    m = _ANSWER_RE.search(answer) or _BARE_LETTER_RE.match(answer)
    if not m:
        raise ValueError(f"cannot read an option letter from answer {answer!r}")
    return m.group(1).upper()


def answer_text(answer: str) -> str:
    """The answer's text: the first `<answer>...</answer>` span's content, else the whole string,
    stripped ('<answer> 3 </answer>' -> '3', 'a red ball' -> 'a red ball')."""
    m = _ANSWER_SPAN_RE.search(answer)
    return (m.group(1) if m else answer).strip()


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def reasoning_response(reasoning: str, answer: str, *, open_ended: bool = False) -> str:
    """The assistant reply in the reasoning format: `<think> ... </think> <answer> X </answer>`,
    X = `answer`: the option letter, or with `open_ended` the answer text.

    A `reasoning` that already holds the tags (as the synthetic set writes it) is kept as is,
    after checking that its answer is `answer` (open-ended: same text up to case and spacing).
    """
    reasoning = reasoning.strip()
    if open_ended:
        answer = answer.strip()
        if not answer:
            raise ValueError("empty answer")
        if "<think>" in reasoning or "<answer>" in reasoning:
            m = _ANSWER_SPAN_RE.search(reasoning)
            if not m or not _same_text(m.group(1), answer):
                got = m.group(1).strip() if m else None
                raise ValueError(f"reasoning answers {got!r} but the answer is {answer!r}")
            return reasoning
        return f"<think> {reasoning} </think> <answer> {answer} </answer>"
    if "<think>" in reasoning or "<answer>" in reasoning:
        if answer_letter(reasoning) != answer:
            raise ValueError(f"reasoning answers {answer_letter(reasoning)!r} but the answer is "
                             f"{answer!r}")
        return reasoning
    return f"<think> {reasoning} </think> <answer> {answer} </answer>"


def chat_messages(question_text: str, response: str | None = None, *, system: str | None = None,
                  with_video: bool = True, template: str | PromptTemplate | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": user_message(question_text, template=template,
                                                         with_video=with_video)})
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
                  with_video: bool = True, template: str | PromptTemplate | None = None) -> np.ndarray:
    """Token ids (int32) of the templated prompt ending in the generation prompt; `template`:
    the user turn's (`resolve_template`, default "longrl")."""
    text = tokenizer.apply_chat_template(chat_messages(question_text, system=system,
                                                       with_video=with_video, template=template),
                                         tokenize=False, add_generation_prompt=True)
    ids = _encode(tokenizer, text)
    _check_placeholder(tokenizer, ids, with_video)
    return np.asarray(ids, np.int32)


def sft_ids_and_mask(tokenizer, question_text: str, response: str, *, system: str | None = None,
                     with_video: bool = True, template: str | PromptTemplate | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32 [L], loss mask int32 [L]) of prompt + reply; mask = 1 on the reply and
    its end-of-turn token only (not on the template's trailing newline)."""
    prompt = rl_prompt_ids(tokenizer, question_text, system=system, with_video=with_video,
                           template=template)
    text = tokenizer.apply_chat_template(chat_messages(question_text, response, system=system,
                                                       with_video=with_video, template=template),
                                         tokenize=False)
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
