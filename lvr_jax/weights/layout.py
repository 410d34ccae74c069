"""HF key names and tensor layouts of our params (Qwen2, SigLIP, the NVILA projector): what
`lvr_jax.weights.hf` reads and writes."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lvr_jax.models.projector import projector_dims
from lvr_jax.models.qwen2 import Qwen2Config


@dataclasses.dataclass(frozen=True)
class Tensor:
    """How one of our params is stored in HF: key (with `{i}` for stacked layers) and layout.

    kind: 'same' (same shape), 'flat' (HF holds it flattened), 'linear' (HF [out, in] weight;
    our first `n_in` dims are the input), 'conv' (HF [E, C, p, p] conv; ours [p, p, C, E]).
    rows (loading only): the checkpoint holds just this many rows of HF axis 0 (the vocab of the
    embedding / lm_head); the missing rows are the mean of those (`grow_rows`).
    """
    key: str
    kind: str = "same"
    n_in: int = 1
    rows: int | None = None

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == "flat":
            return (math.prod(ours),)
        if self.kind == "linear":
            return (math.prod(ours[self.n_in:]), math.prod(ours[:self.n_in]))
        if self.kind == "conv":
            return (ours[3], ours[2], ours[0], ours[1])
        return ours

    def to_ours(self, a: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
        if self.kind == "linear":
            a = a.T
        elif self.kind == "conv":
            a = a.transpose(2, 3, 1, 0)
        return a.reshape(ours)

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return a.reshape(math.prod(a.shape[:self.n_in]), -1).T
        if self.kind == "conv":
            return a.transpose(3, 2, 0, 1)
        return a.reshape(self.hf_shape(a.shape))


def qwen2_tensors(cfg: Qwen2Config, prefix: str = "model.") -> dict[tuple, Tensor]:
    """Our Qwen2 param paths -> HF tensors."""
    lay = f"{prefix}layers.{{i}}."
    out = {("embed",): Tensor(f"{prefix}embed_tokens.weight"),
           ("final_norm",): Tensor(f"{prefix}norm.weight"),
           ("layers", "input_norm"): Tensor(lay + "input_layernorm.weight"),
           ("layers", "post_norm"): Tensor(lay + "post_attention_layernorm.weight"),
           ("layers", "o_kernel"): Tensor(lay + "self_attn.o_proj.weight", "linear", 2)}
    for n in "qkv":
        out[("layers", f"{n}_kernel")] = Tensor(lay + f"self_attn.{n}_proj.weight", "linear")
        out[("layers", f"{n}_bias")] = Tensor(lay + f"self_attn.{n}_proj.bias", "flat")
    for n in ("gate", "up", "down"):
        out[("layers", f"{n}_kernel")] = Tensor(lay + f"mlp.{n}_proj.weight", "linear")
    if not cfg.tie_word_embeddings:
        out[("lm_head",)] = Tensor("lm_head.weight", "linear")
    return out


def siglip_tensors(prefix: str = "vision_model.") -> dict[tuple, Tensor]:
    """Our SigLIP param paths -> HF tensors."""
    lay = f"{prefix}encoder.layers.{{i}}."
    out = {("patch_kernel",): Tensor(f"{prefix}embeddings.patch_embedding.weight", "conv"),
           ("patch_bias",): Tensor(f"{prefix}embeddings.patch_embedding.bias"),
           ("pos_embed",): Tensor(f"{prefix}embeddings.position_embedding.weight"),
           ("post_ln_scale",): Tensor(f"{prefix}post_layernorm.weight"),
           ("post_ln_bias",): Tensor(f"{prefix}post_layernorm.bias"),
           ("layers", "o_kernel"): Tensor(lay + "self_attn.out_proj.weight", "linear", 2),
           ("layers", "o_bias"): Tensor(lay + "self_attn.out_proj.bias")}
    for n in "qkv":
        out[("layers", f"{n}_kernel")] = Tensor(lay + f"self_attn.{n}_proj.weight", "linear")
        out[("layers", f"{n}_bias")] = Tensor(lay + f"self_attn.{n}_proj.bias", "flat")
    for i in "12":
        out[("layers", f"ln{i}_scale")] = Tensor(lay + f"layer_norm{i}.weight")
        out[("layers", f"ln{i}_bias")] = Tensor(lay + f"layer_norm{i}.bias")
        out[("layers", f"fc{i}_kernel")] = Tensor(lay + f"mlp.fc{i}.weight", "linear")
        out[("layers", f"fc{i}_bias")] = Tensor(lay + f"mlp.fc{i}.bias")
    return out


def projector_tensors(kind: str, prefix: str = "") -> dict[tuple, Tensor]:
    """Our projector param paths -> HF `layers.{i}.weight|bias` of the nn.Sequential."""
    _, layout = projector_dims(kind, 1, 1)
    out = {}
    for idx, what, _, _ in layout:
        w = "scale" if what == "ln" else "kernel"
        out[(f"layer{idx}_{w}",)] = Tensor(f"{prefix}layers.{idx}.weight",
                                           "same" if what == "ln" else "linear")
        out[(f"layer{idx}_bias",)] = Tensor(f"{prefix}layers.{idx}.bias")
    return out
