"""Qwen2 decoder (GQA, q/k/v bias, RMSNorm, split-half RoPE) with scanned, stacked layers."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lvr_jax.models.attention import (
    apply_rope,
    dense_attention,
    param,
    rms_norm,
    rope_cos_sin,
    scan_layers,
    values,
)


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    dtype: Any = jnp.float32        # compute dtype
    param_dtype: Any = jnp.float32
    remat: bool | str = False

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_hf(cls, cfg: dict, **overrides) -> Qwen2Config:
        """From a transformers Qwen2 config dict (4.x `rope_theta` or 5.x `rope_parameters`)."""
        theta = cfg.get("rope_theta")
        if theta is None:
            theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        kw = dict(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim"), rope_theta=float(theta),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768))
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        """transformers Qwen2Config dict (both rope forms written)."""
        return {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
            "attention_dropout": 0.0, "use_sliding_window": False, "torch_dtype": "float32",
        }


LAYER_PARAMS = ("input_norm", "q_kernel", "q_bias", "k_kernel", "k_bias", "v_kernel", "v_bias",
                "o_kernel", "post_norm", "gate_kernel", "up_kernel", "down_kernel")


class Qwen2Layers(nnx.Module):
    """All decoder layers' weights, stacked on a leading 'layers' axis."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        n, e, h, kv, d, m = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                             cfg.head_dim, cfg.intermediate_size)
        p = lambda shape, names, **kw: param(rngs, (n, *shape), ("layers", *names),
                                             dtype=cfg.param_dtype, **kw)
        self.input_norm = p((e,), ("embed",), init="ones")
        self.q_kernel = p((e, h, d), ("embed", "heads", "head_dim"))
        self.q_bias = p((h, d), ("heads", "head_dim"), init="zeros")
        self.k_kernel = p((e, kv, d), ("embed", "kv_heads", "head_dim"))
        self.k_bias = p((kv, d), ("kv_heads", "head_dim"), init="zeros")
        self.v_kernel = p((e, kv, d), ("embed", "kv_heads", "head_dim"))
        self.v_bias = p((kv, d), ("kv_heads", "head_dim"), init="zeros")
        self.o_kernel = p((h, d, e), ("heads", "head_dim", "embed"))
        self.post_norm = p((e,), ("embed",), init="ones")
        self.gate_kernel = p((e, m), ("embed", "mlp"))
        self.up_kernel = p((e, m), ("embed", "mlp"))
        self.down_kernel = p((m, e), ("mlp", "embed"))


def decoder_layer(cfg: Qwen2Config, p: dict, x, cos, sin, attend):
    """One pre-norm decoder layer; returns the new residual stream and this layer's (k, v)."""
    c = lambda name: p[name].astype(cfg.dtype)
    h = rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
    q = jnp.einsum("ble,ehd->blhd", h, c("q_kernel")) + c("q_bias")
    k = jnp.einsum("ble,ehd->blhd", h, c("k_kernel")) + c("k_bias")
    v = jnp.einsum("ble,ehd->blhd", h, c("v_kernel")) + c("v_bias")
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = attend(q, k, v)
    x = x + jnp.einsum("blhd,hde->ble", o, c("o_kernel"))
    h = rms_norm(x, p["post_norm"], cfg.rms_norm_eps)
    mlp = jax.nn.silu(h @ c("gate_kernel")) * (h @ c("up_kernel"))
    return x + mlp @ c("down_kernel"), (k, v)


class Qwen2(nnx.Module):
    """Qwen2 causal LM over input embeddings; tied or untied output head."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                           dtype=cfg.param_dtype)
        self.layers = Qwen2Layers(cfg, rngs)
        self.final_norm = param(rngs, (cfg.hidden_size,), ("embed",), init="ones",
                                dtype=cfg.param_dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                              dtype=cfg.param_dtype))

    def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
        """Token embeddings in the compute dtype."""
        return jnp.take(self.embed.get_value(), token_ids, axis=0).astype(self.cfg.dtype)

    def head(self, hidden: jax.Array) -> jax.Array:
        """Final norm + output projection; logits in float32."""
        h = rms_norm(hidden, self.final_norm.get_value(), self.cfg.rms_norm_eps)
        w = (self.embed.get_value().T if self.lm_head is None else self.lm_head.get_value())
        return jnp.einsum("ble,ev->blv", h, w.astype(self.cfg.dtype),
                          preferred_element_type=jnp.float32)

    def __call__(self, input_embeds: jax.Array, positions: jax.Array, *,
                 segment_ids: jax.Array | None = None, attention_fn=None, mesh=None,
                 seq_axis: str = "seq", return_hidden: bool = False, return_kv: bool = False):
        """Logits [B, L, V] for input embeddings [B, L, E] at integer positions [B, L].

        `segment_ids` [B, L]: tokens attend within equal ids; ids < 0 are padding.
        `mesh` with `seq_axis` > 1: sequence-parallel prefill (pad, zigzag, shard over the axis,
        ring attention, restore); the result equals the unsharded forward.
        `attention_fn(q, k, v, q_pos, kv_pos, q_seg, kv_seg)` replaces dense attention.
        With `return_kv`, also returns per-layer (k, v), each [layers, B, L, KVH, D]; with
        `return_hidden`, the final hidden states instead of logits.
        """
        if mesh is not None and mesh.shape.get(seq_axis, 1) > 1:
            from sharding.sequence_parallel import sequence_parallel_call
            return sequence_parallel_call(self, input_embeds, positions, segment_ids, mesh,
                                          seq_axis, return_hidden=return_hidden,
                                          return_kv=return_kv)
        cfg = self.cfg
        attention_fn = attention_fn or dense_attention
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        seg = segment_ids

        def attend(q, k, v):
            return attention_fn(q, k, v, positions, positions, seg, seg)

        def layer(p, x):
            return decoder_layer(cfg, p, x, cos, sin, attend)

        stacked = values(self.layers, LAYER_PARAMS)
        x, kv = scan_layers(layer, stacked, input_embeds.astype(cfg.dtype), remat=cfg.remat)
        out = x if return_hidden else self.head(x)
        return (out, kv) if return_kv else out
