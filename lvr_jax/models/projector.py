"""NVILA multimodal projectors: mlp_downsample_2x2_fix and mlp_downsample_3x3_fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lvr_jax.models.layers import layer_norm, param

SUPPORTED_PROJECTORS = ("mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix")


def merge_patches(x: jax.Array, factor: int) -> jax.Array:
    """[B, N, C] square grid -> zero-pad to a multiple of `factor`, merge each factor x factor
    block row-major into factor^2 * C channels: [B, N', factor^2 * C]."""
    b, n, c = x.shape
    s = int(round(n ** 0.5))
    if s * s != n:
        raise ValueError(f"projector input has {n} tokens, not a square grid")
    x = x.reshape(b, s, s, c)
    pad = (-s) % factor
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, pad), (0, 0)))
    t = (s + pad) // factor
    x = x.reshape(b, t, factor, t, factor, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, t * t, factor * factor * c)


def projector_dims(kind: str, c: int, h: int) -> tuple[int, list[tuple[int, str, int, int]]]:
    """Merge factor and (nn.Sequential index, 'ln' | 'linear', in, out) of each layer with
    weights, for vision width `c` and LLM width `h`; GELU follows every linear but the last."""
    if kind == "mlp_downsample_2x2_fix":
        return 2, [(1, "ln", 4 * c, 4 * c), (2, "linear", 4 * c, h), (4, "linear", h, h)]
    if kind == "mlp_downsample_3x3_fix":
        return 3, [(1, "ln", 9 * c, 9 * c), (2, "linear", 9 * c, 3 * c), (4, "ln", 3 * c, 3 * c),
                   (5, "linear", 3 * c, h), (7, "linear", h, h)]
    raise ValueError(f"unsupported mm_projector_type {kind!r}; supported: {SUPPORTED_PROJECTORS}")


class Projector(nnx.Module):
    """Patch merge + MLP mapping vision features [B, N, C] to LLM embeddings [B, N', H]."""

    def __init__(self, kind: str, vision_dim: int, llm_dim: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.kind, self.dtype = kind, dtype
        self.factor, self.layout = projector_dims(kind, vision_dim, llm_dim)
        for idx, what, din, dout in self.layout:
            if what == "ln":
                setattr(self, f"layer{idx}_scale", param(rngs, (din,), (None,), init="ones",
                                                         dtype=param_dtype))
                setattr(self, f"layer{idx}_bias", param(rngs, (din,), (None,), init="zeros",
                                                        dtype=param_dtype))
            else:
                setattr(self, f"layer{idx}_kernel", param(rngs, (din, dout), (None, "embed"),
                                                          dtype=param_dtype))
                setattr(self, f"layer{idx}_bias", param(rngs, (dout,), ("embed",), init="zeros",
                                                        dtype=param_dtype))

    def __call__(self, features: jax.Array) -> jax.Array:
        x = merge_patches(features.astype(self.dtype), self.factor)
        linears = [idx for idx, what, _, _ in self.layout if what == "linear"]
        for idx, what, _, _ in self.layout:
            bias = getattr(self, f"layer{idx}_bias").get_value()
            if what == "ln":
                x = layer_norm(x, getattr(self, f"layer{idx}_scale").get_value(), bias, 1e-5)
            else:
                kernel = getattr(self, f"layer{idx}_kernel").get_value()
                x = x @ kernel.astype(self.dtype) + bias.astype(self.dtype)
                if idx != linears[-1]:
                    x = jax.nn.gelu(x, approximate=False)
        return x
