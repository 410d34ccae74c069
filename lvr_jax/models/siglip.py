"""SigLIP vision tower (patch embedding + pre-norm ViT), features from hidden_states[feature_layer]."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lvr_jax.models.attention import fused_implementation
from lvr_jax.models.layers import layer_norm, map_chunks, param, scan_layers, values


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    feature_layer: int = -2   # index into HF hidden_states: -2 = output of the second-last layer
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False
    attention_impl: str = "auto"   # jax.nn.dot_product_attention's ("auto": cuDNN on GPUs)
    frame_chunk: int = 0           # images per micro-batch (0: all at once; layers.map_chunks)

    def __post_init__(self):
        if not -(self.num_layers + 1) <= self.feature_layer <= self.num_layers:
            raise ValueError(f"feature_layer={self.feature_layer} out of range for "
                             f"{self.num_layers} layers")

    @property
    def grid(self) -> int:
        """Patches per side: the image's last image_size % patch_size rows and columns are left
        out, as transformers' stride-patch convolution leaves them."""
        return self.image_size // self.patch_size

    @property
    def layers_run(self) -> int:
        """How many encoder layers produce hidden_states[feature_layer]."""
        return self.feature_layer % (self.num_layers + 1)

    @classmethod
    def from_hf(cls, cfg: dict, **overrides) -> SiglipConfig:
        """From a SiglipVisionConfig dict, or a SiglipConfig dict holding `vision_config`."""
        cfg = cfg.get("vision_config", cfg)
        kw = dict(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                  num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                  image_size=cfg["image_size"], patch_size=cfg["patch_size"],
                  num_channels=cfg.get("num_channels", 3),
                  layer_norm_eps=cfg.get("layer_norm_eps", 1e-6))
        act = cfg.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise ValueError(f"unsupported SigLIP hidden_act {act!r}; expected gelu_pytorch_tanh")
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        return {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "image_size": self.image_size, "patch_size": self.patch_size,
                "num_channels": self.num_channels, "layer_norm_eps": self.layer_norm_eps,
                "hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.0,
                "vision_use_head": False, "torch_dtype": "float32"}


LAYER_PARAMS = ("ln1_scale", "ln1_bias", "q_kernel", "q_bias", "k_kernel", "k_bias", "v_kernel",
                "v_bias", "o_kernel", "o_bias", "ln2_scale", "ln2_bias", "fc1_kernel", "fc1_bias",
                "fc2_kernel", "fc2_bias")


class SiglipLayers(nnx.Module):
    """All encoder layers' weights, stacked on a leading 'layers' axis."""

    def __init__(self, cfg: SiglipConfig, rngs: nnx.Rngs):
        n, e, h, m = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size
        d = e // h
        p = lambda shape, names, **kw: param(rngs, (n, *shape), ("layers", *names),
                                             dtype=cfg.param_dtype, **kw)
        self.ln1_scale, self.ln1_bias = p((e,), ("embed",), init="ones"), p((e,), ("embed",), init="zeros")
        for name in "qkv":
            setattr(self, f"{name}_kernel", p((e, h, d), ("embed", "heads", "head_dim")))
            setattr(self, f"{name}_bias", p((h, d), ("heads", "head_dim"), init="zeros"))
        self.o_kernel = p((h, d, e), ("heads", "head_dim", "embed"))
        self.o_bias = p((e,), ("embed",), init="zeros")
        self.ln2_scale, self.ln2_bias = p((e,), ("embed",), init="ones"), p((e,), ("embed",), init="zeros")
        self.fc1_kernel, self.fc1_bias = p((e, m), ("embed", "mlp")), p((m,), ("mlp",), init="zeros")
        self.fc2_kernel, self.fc2_bias = p((m, e), ("mlp", "embed")), p((e,), ("embed",), init="zeros")


def encoder_layer(cfg: SiglipConfig, p: dict, x):
    """One pre-norm ViT layer (bidirectional attention, tanh-GELU MLP)."""
    c = lambda name: p[name].astype(cfg.dtype)
    h = layer_norm(x, p["ln1_scale"], p["ln1_bias"], cfg.layer_norm_eps)
    q = jnp.einsum("ble,ehd->blhd", h, c("q_kernel")) + c("q_bias")
    k = jnp.einsum("ble,ehd->blhd", h, c("k_kernel")) + c("k_bias")
    v = jnp.einsum("ble,ehd->blhd", h, c("v_kernel")) + c("v_bias")
    o = jax.nn.dot_product_attention(q, k, v, implementation=fused_implementation(
        cfg.attention_impl, cfg.dtype))
    x = x + jnp.einsum("blhd,hde->ble", o, c("o_kernel")) + c("o_bias")
    h = layer_norm(x, p["ln2_scale"], p["ln2_bias"], cfg.layer_norm_eps)
    h = jax.nn.gelu(h @ c("fc1_kernel") + c("fc1_bias"), approximate=True)
    return x + h @ c("fc2_kernel") + c("fc2_bias"), None


class SiglipVision(nnx.Module):
    """SigLIP vision transformer; `__call__` returns the features at `cfg.feature_layer`."""

    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p, c, e = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        self.patch_kernel = param(rngs, (p, p, c, e), (None, None, None, "embed"),
                                  dtype=cfg.param_dtype)
        self.patch_bias = param(rngs, (e,), ("embed",), init="zeros", dtype=cfg.param_dtype)
        self.pos_embed = param(rngs, (cfg.grid ** 2, e), (None, "embed"), dtype=cfg.param_dtype)
        self.layers = SiglipLayers(cfg, rngs)
        # Kept for checkpoint round trips; the VLM features come from before it.
        self.post_ln_scale = param(rngs, (e,), ("embed",), init="ones", dtype=cfg.param_dtype)
        self.post_ln_bias = param(rngs, (e,), ("embed",), init="zeros", dtype=cfg.param_dtype)

    def embed_patches(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] (already normalised) -> patch tokens + positions [B, N, E]."""
        cfg = self.cfg
        b, hgt, wid, ch = images.shape
        if (hgt, wid, ch) != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"expected images of shape [B, {cfg.image_size}, {cfg.image_size}, "
                             f"{cfg.num_channels}], got {tuple(images.shape)}")
        g, p = cfg.grid, cfg.patch_size
        x = images[:, :g * p, :g * p].astype(cfg.dtype)            # as the conv's stride drops
        x = x.reshape(b, g, p, g, p, ch).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, g * g, p * p * ch)
        kernel = self.patch_kernel.get_value().reshape(p * p * ch, -1).astype(cfg.dtype)
        x = x @ kernel + self.patch_bias.get_value().astype(cfg.dtype)
        return x + self.pos_embed.get_value().astype(cfg.dtype)

    def __call__(self, images: jax.Array, *, post_norm: bool = False) -> jax.Array:
        """Features [B, N, E] = HF hidden_states[feature_layer] (or last_hidden_state if post_norm),
        `cfg.frame_chunk` images at a time when set (the same values, one chunk's activations)."""
        return map_chunks(lambda x: self._features(x, post_norm), images, self.cfg.frame_chunk)

    def _features(self, images: jax.Array, post_norm: bool) -> jax.Array:
        cfg = self.cfg
        x = self.embed_patches(images)
        n = cfg.num_layers if post_norm else cfg.layers_run
        if n:
            x, _ = scan_layers(lambda p, h: encoder_layer(cfg, p, h),
                               values(self.layers, LAYER_PARAMS), x, remat=cfg.remat, num_layers=n)
        if post_norm:
            x = layer_norm(x, self.post_ln_scale.get_value(), self.post_ln_bias.get_value(),
                           cfg.layer_norm_eps)
        return x
