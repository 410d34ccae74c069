"""The real-size configs instantiate abstractly with the parameter counts of the HF models."""

import importlib

import pytest
import torch
from flax import nnx
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from lvr_jax.models.vlm import VLM, vlm_config_from


def count(tree) -> int:
    return sum(v.size for _, v in nnx.to_flat_state(tree))


def torch_count(cls, cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cls(cfg).parameters())


@pytest.mark.parametrize("name", ["longvila_r1_7b", "longvila_r1_1p5b"])
def test_real_config_param_counts(name):
    mc = importlib.import_module(f"configs.{name}").get_config().model
    cfg = vlm_config_from(mc)
    model = nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0)))
    llm, vis = dict(mc.llm), dict(mc.vision)
    want_llm = torch_count(Qwen2ForCausalLM, Qwen2Config(
        vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"], num_hidden_layers=llm["num_layers"],
        num_attention_heads=llm["num_heads"], num_key_value_heads=llm["num_kv_heads"],
        tie_word_embeddings=llm["tie_word_embeddings"]))
    want_vis = torch_count(SiglipVisionModel, SiglipVisionConfig(
        hidden_size=vis["hidden_size"], intermediate_size=vis["intermediate_size"],
        num_hidden_layers=vis["num_layers"], num_attention_heads=vis["num_heads"],
        image_size=vis["image_size"], patch_size=vis["patch_size"], vision_use_head=False))
    c, h = vis["hidden_size"], llm["hidden_size"]
    want_proj = 2 * 4 * c + (4 * c * h + h) + (h * h + h)
    assert count(nnx.state(model.llm, nnx.Param)) == want_llm
    assert count(nnx.state(model.vision, nnx.Param)) == want_vis
    assert count(nnx.state(model.projector, nnx.Param)) == want_proj
    if name == "longvila_r1_7b":
        assert want_llm == 7_615_616_512          # Qwen2.5-7B as published
        assert cfg.tokens_per_frame == 257        # 32x32 patches -> 16x16 + newline
