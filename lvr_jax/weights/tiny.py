"""Tiny self-made checkpoints (no downloads): a byte-level BPE tokenizer with Qwen's special
tokens and chat template, and a randomly initialised VILA-layout model folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

from lvr_jax.models.vlm import VLMConfig, init_vlm, vlm_config_from
from lvr_jax.weights.hf import load_tokenizer, newline_id, save_hf
from lvr_jax.weights.tokens import VIDEO_TOKEN

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DEFAULT_CORPUS = [
    "the video shows a red ball moving left then right and a blue cube that stays",
    "question: what happened first? options: A. B. C. D. answer the letter",
    "<think> the ball moves before the cube, so the order is </think> <answer> B </answer>",
    "count how many times the green square appears in the video 0 1 2 3 4 5 6 7 8 9",
]


def make_tokenizer(folder: str | Path, corpus=DEFAULT_CORPUS, vocab_size: int = 400):
    """Train a small byte-level BPE on `corpus`, save it in `folder` as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 8, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = QWEN_CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def make_random_checkpoint(model_cfg, folder: str | Path, *, seed: int = 0, corpus=None,
                           overwrite: bool = False) -> Path:
    """Write a random VLM of config section `model_cfg` plus a small BPE tokenizer trained on
    `corpus` (default: a few sentences) as a VILA folder."""
    vocab = min(model_cfg.llm["vocab_size"] - len(QWEN_SPECIALS) - 2, 1024)
    with tempfile.TemporaryDirectory() as tmp:
        make_tokenizer(tmp, corpus or DEFAULT_CORPUS, vocab_size=vocab)
        tok = load_tokenizer(tmp, model_cfg.llm["vocab_size"])
    base = vlm_config_from(model_cfg)
    cfg = VLMConfig(base.llm, base.vision, base.projector_type,
                    video_token_id=tok.convert_tokens_to_ids(VIDEO_TOKEN),
                    newline_token_id=newline_id(tok))
    model = init_vlm(cfg, seed)
    return save_hf(model, folder, tokenizer=tok, overwrite=overwrite)
