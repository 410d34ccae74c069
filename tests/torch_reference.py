"""Independent references for the parity tests: tiny random transformers models (PyTorch) saved
with save_pretrained, a PyTorch NVILA projector written after VILA's nn.Sequential, and a VILA
checkpoint folder assembled from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from lvr_jax.weights.tiny import make_tokenizer

torch.manual_seed(0)


def randomize(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter (biases and norms too) fresh random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 2 * noise if is_norm else noise)
    return module.eval()


def tiny_qwen2(seed=0, tie=False, heads=4, kv_heads=2, layers=2, vocab=512) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=tie, max_position_embeddings=4096,
                      attn_implementation="eager")
    return randomize(Qwen2ForCausalLM(cfg), seed, std=0.08)


def tiny_siglip(seed=1, image_size=28, patch_size=4, layers=3) -> SiglipVisionModel:
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                             num_attention_heads=4, image_size=image_size,
                             patch_size=patch_size, attn_implementation="eager")
    return randomize(SiglipVisionModel(cfg), seed, std=0.08)


class FlatSquare(torch.nn.Module):
    """VILA's DownSampleBlock / DownSample3x3BlockFix, as view/permute steps on [n, w, h, c]."""

    def __init__(self, f: int):
        super().__init__()
        self.f = f

    def forward(self, x):
        n, t, c = x.shape
        s = int(t ** 0.5)
        x = x.reshape(n, s, s, c)
        f = self.f
        n, w, h, c = x.shape
        if w % f:
            x = torch.cat([x, x.new_zeros(n, f - w % f, h, c)], dim=1)
            n, w, h, c = x.shape
        if h % f:
            x = torch.cat([x, x.new_zeros(n, w, f - h % f, c)], dim=2)
            n, w, h, c = x.shape
        x = x.reshape(n, w, h // f, c * f).permute(0, 2, 1, 3)
        x = x.reshape(n, h // f, w // f, c * f * f).permute(0, 2, 1, 3)
        return x.reshape(n, -1, x.shape[-1])


def torch_projector(kind: str, c: int, h: int, seed=2) -> torch.nn.Sequential:
    nn = torch.nn
    if kind == "mlp_downsample_2x2_fix":
        seq = nn.Sequential(FlatSquare(2), nn.LayerNorm(4 * c), nn.Linear(4 * c, h), nn.GELU(),
                            nn.Linear(h, h))
    else:
        seq = nn.Sequential(FlatSquare(3), nn.LayerNorm(9 * c), nn.Linear(9 * c, 3 * c),
                            nn.GELU(), nn.LayerNorm(3 * c), nn.Linear(3 * c, h), nn.GELU(),
                            nn.Linear(h, h))
    return randomize(seq, seed, std=0.1)


def save_vila(folder: Path, llm, vision, projector, kind: str):
    """Assemble a VILA-layout checkpoint folder from the torch parts."""
    folder.mkdir(parents=True, exist_ok=True)
    llm.save_pretrained(folder / "llm")
    make_tokenizer(folder / "llm")
    vision.save_pretrained(folder / "vision_tower")
    (folder / "mm_projector").mkdir(exist_ok=True)
    sd = {f"layers.{k}": v.contiguous() for k, v in projector.state_dict().items()}
    save_file(sd, str(folder / "mm_projector" / "model.safetensors"))
    proj_cfg = {"model_type": "v2l_projector", "mm_projector_type": kind}
    (folder / "mm_projector" / "config.json").write_text(json.dumps(proj_cfg))
    top = {"model_type": "vila", "architectures": ["LlavaLlamaModel"],
           "llm_cfg": llm.config.to_dict(), "vision_tower_cfg": vision.config.to_dict(),
           "mm_projector_cfg": proj_cfg}
    (folder / "config.json").write_text(json.dumps(top, default=str))


@torch.no_grad()
def torch_vlm_logits(llm, vision, projector, frames: np.ndarray, token_ids: np.ndarray,
                     video_id: int, newline_id: int) -> np.ndarray:
    """Reference VLM forward: hidden_states[-2] -> projector -> + '\\n' -> splice -> Qwen2."""
    pix = torch.from_numpy(frames).permute(0, 3, 1, 2)
    feats = vision(pixel_values=pix, output_hidden_states=True).hidden_states[-2]
    tokens = projector(feats)
    embed = llm.get_input_embeddings()
    nl = embed(torch.tensor([newline_id]))[None].expand(tokens.shape[0], 1, -1)
    video = torch.cat([tokens, nl], dim=1).reshape(-1, tokens.shape[-1])
    ids = torch.from_numpy(token_ids)
    at = int((ids == video_id).nonzero()[0, 0])
    txt = embed(ids)
    seq = torch.cat([txt[:at], video, txt[at + 1:]], dim=0)[None]
    return llm(inputs_embeds=seq).logits[0].numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
