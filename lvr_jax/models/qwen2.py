"""Qwen2 decoder (GQA, q/k/v bias, RMSNorm, split-half RoPE) with scanned, stacked layers.

The one place the layer stack runs (`Qwen2._stack`), behind three entry points:
  forward  `Qwen2.__call__` / `forward`: logits (or hidden states, K/V) of whole sequences;
           sequence-parallel (zigzag ring over the layout's `length` axis) when the layout has one
  prefill  prompts -> `Prefix`, the shared prompt cache (K/V kept in the ring's order and sharding)
  extend   G branches per prompt against a `Prefix` (and their own cache): the decode step and
           the GRPO training forward
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from lvr_jax.models.attention import AttentionOptions, branch_attention, prompt_attention
from lvr_jax.models.layers import (ROPE_SCALING_TYPES, apply_rope, check_remat, compute_weight,
                                   map_chunks, param, rms_norm, rope_cos_sin, scan_layers, values)
from lvr_jax.models.ring_prompt import RingPrompt, from_left_padded, ring_size
from sharding.mesh import UNSHARDED, Layout
from sharding.sequence_parallel import shard_sequence


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
    # RoPE scaling (transformers' rope_scaling / rope_parameters): None, "linear" (positions / factor)
    # or "dynamic" (NTK past max_position_embeddings); see `layers.rope_inv_freq`
    rope_scaling_type: str | None = None
    rope_scaling_factor: float = 1.0
    dtype: Any = jnp.float32        # compute dtype
    param_dtype: Any = jnp.float32
    remat: bool | str = False
    attention: AttentionOptions = AttentionOptions()
    logits_chunk: int = 0           # tokens per chunk of `Qwen2.head_map` (0: all at once)
    mlp_chunk: int = 0              # tokens per device per MLP piece (`mlp_pieces`; 0: one piece)

    def __post_init__(self):
        check_remat(self.remat)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.rope_scaling_type == "default":
            object.__setattr__(self, "rope_scaling_type", None)
        if self.rope_scaling_type not in (None, *ROPE_SCALING_TYPES):
            raise ValueError(f"rope_scaling_type={self.rope_scaling_type!r} is not supported "
                             f"(supported: {', '.join(ROPE_SCALING_TYPES)})")

    @classmethod
    def from_hf(cls, cfg: dict, **overrides) -> Qwen2Config:
        """From a transformers Qwen2 config dict (4.x `rope_theta` + `rope_scaling`, or 5.x
        `rope_parameters`; as in transformers, a non-empty `rope_scaling` wins). RoPE types other
        than default / linear / dynamic are refused with a ValueError naming the field."""
        theta = cfg.get("rope_theta")
        if theta is None:
            theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        field = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
        rope = cfg.get(field) or {}
        if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
            raise ValueError(f"{field}={rope!r}: expected one dict of RoPE parameters")
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind not in ("default", *ROPE_SCALING_TYPES):
            raise ValueError(f"{field}: RoPE type {kind!r} is not supported (supported: default, "
                             f"{', '.join(ROPE_SCALING_TYPES)}); {field}={rope!r}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{field}: partial_rotary_factor "
                             f"{rope['partial_rotary_factor']!r} is not supported")
        if kind != "default" and "factor" not in rope:
            raise ValueError(f"{field}: RoPE type {kind!r} needs a 'factor'; {field}={rope!r}")
        factor = float(rope["factor"]) if kind != "default" else 1.0
        _check_attention_fields(cfg)
        kw = dict(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim"), rope_theta=float(theta),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            rope_scaling_type=None if kind == "default" else kind, rope_scaling_factor=factor)
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        """transformers Qwen2Config dict (both rope forms written: 4.x `rope_theta` +
        `rope_scaling`, 5.x `rope_parameters`)."""
        kind = self.rope_scaling_type
        rope = {"rope_type": kind or "default", "rope_theta": self.rope_theta}
        scaling = None
        if kind is not None:
            rope["factor"] = self.rope_scaling_factor
            scaling = {"rope_type": kind, "type": kind, "factor": self.rope_scaling_factor}
        return {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rope_theta": self.rope_theta,
            "rope_parameters": rope, "rope_scaling": scaling,
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
            "attention_dropout": 0.0, "use_sliding_window": False, "torch_dtype": "float32",
        }


# Each layer param's logical axes (without the leading "layers" of the stacked weights).
LAYER_AXES = {
    "input_norm": ("embed",),
    "q_kernel": ("embed", "heads", "head_dim"), "q_bias": ("heads", "head_dim"),
    "k_kernel": ("embed", "kv_heads", "head_dim"), "k_bias": ("kv_heads", "head_dim"),
    "v_kernel": ("embed", "kv_heads", "head_dim"), "v_bias": ("kv_heads", "head_dim"),
    "o_kernel": ("heads", "head_dim", "embed"),
    "post_norm": ("embed",),
    "gate_kernel": ("embed", "mlp"), "up_kernel": ("embed", "mlp"), "down_kernel": ("mlp", "embed"),
}
LAYER_PARAMS = tuple(LAYER_AXES)


class Qwen2Layers(nnx.Module):
    """All decoder layers' weights, stacked on a leading 'layers' axis."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        n = cfg.num_layers
        size = dict(embed=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                    head_dim=cfg.head_dim, mlp=cfg.intermediate_size)
        init = dict(input_norm="ones", post_norm="ones", q_bias="zeros", k_bias="zeros",
                    v_bias="zeros")
        for name, axes in LAYER_AXES.items():
            setattr(self, name, param(rngs, (n, *(size[a] for a in axes)), ("layers", *axes),
                                      dtype=cfg.param_dtype, init=init.get(name, "normal")))


def mlp_pieces(cfg: Qwen2Config, local_tokens: int) -> int:
    """How many pieces `decoder_layer` splits each device's `local_tokens` into for the MLP: the
    fewest that divide them with at most `cfg.mlp_chunk` tokens each (1 when off or enough)."""
    if cfg.mlp_chunk <= 0 or local_tokens <= cfg.mlp_chunk:
        return 1
    n = -(-local_tokens // cfg.mlp_chunk)
    while local_tokens % n:
        n += 1
    return n


def weights(cfg: Qwen2Config, p: dict, layout: Layout):
    """`w(name)`: layer param `name` of `p` in the compute dtype, gathered for use
    (`layers.compute_weight`: the all-gather moves compute-dtype bytes)."""
    return lambda name: compute_weight(p[name], LAYER_AXES[name], cfg.dtype, layout)


def mlp(cfg: Qwen2Config, p: dict, x, pieces: int = 1, layout: Layout = UNSHARDED):
    """The post-attention norm + SwiGLU MLP of x [N, L, E]. With `pieces` > 1 the tokens run in
    that many strided pieces (token i in piece i % pieces: each piece holds 1 / pieces of every
    device's tokens when L is sharded in equal blocks), one at a time and recomputed piece by piece
    in the backward, so the [N, L, intermediate] activations never exist at once."""
    w = weights(cfg, p, layout)
    gate, up, down = w("gate_kernel"), w("up_kernel"), w("down_kernel")   # gathered once

    def run(h):
        h = rms_norm(h, p["post_norm"], cfg.rms_norm_eps)
        return (jax.nn.silu(h @ gate) * (h @ up)) @ down

    if pieces <= 1:
        return run(x)
    n, length, e = x.shape
    strided = jnp.moveaxis(x.reshape(n, length // pieces, pieces, e), 2, 0)
    out = jax.lax.map(jax.checkpoint(run), strided)
    return jnp.moveaxis(out, 0, 2).reshape(n, length, e)


def decoder_layer(cfg: Qwen2Config, p: dict, x, cos, sin, attend, pieces: int = 1,
                  layout: Layout = UNSHARDED):
    """One pre-norm decoder layer; returns the new residual stream and this layer's (k, v).
    `pieces`: the MLP's token pieces (`mlp`); `layout`: where the weights are gathered."""
    c = weights(cfg, p, layout)
    h = rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
    q = jnp.einsum("ble,ehd->blhd", h, c("q_kernel")) + c("q_bias")
    k = jnp.einsum("ble,ehd->blhd", h, c("k_kernel")) + c("k_bias")
    v = jnp.einsum("ble,ehd->blhd", h, c("v_kernel")) + c("v_bias")
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = attend(q, k, v)
    x = x + jnp.einsum("blhd,hde->ble", o, c("o_kernel"))
    return x + mlp(cfg, p, x, pieces, layout), (k, v)


@struct.dataclass
class Prefix:
    """The shared prompt cache (`Qwen2.prefill`): K/V [layers, B, KVH, Lp, D] (`heads_first`,
    what decode reads without a copy; [layers, B, Lp, KVH, D] only under the memory planner's
    prefix stand-in, `AttentionOptions.heads_first`) in the layout's order (zigzag + padding
    under the ring, sharded over it), validity [B, Lp], real prompt lengths [B], and the logits
    [B, V] predicting the first response token."""
    k: jax.Array
    v: jax.Array
    valid: jax.Array
    lengths: jax.Array
    logits: jax.Array
    heads_first: bool = struct.field(pytree_node=False, default=False)

    @property
    def kv_heads(self) -> int:
        return self.k.shape[2 if self.heads_first else 3]

    def by_token(self) -> tuple[jax.Array, jax.Array]:
        """(k, v) as [layers, B, Lp, KVH, D], whichever layout they are kept in."""
        return (jnp.swapaxes(self.k, 2, 3), jnp.swapaxes(self.v, 2, 3)) if self.heads_first \
            else (self.k, self.v)


def _check_attention_fields(cfg: dict) -> None:
    """ValueError naming the field for what this model does not run: an activation other than
    SiLU, sliding-window attention on any layer (Qwen2.5 has `use_sliding_window: false`)."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported (only 'silu')")
    n, keys = cfg["num_hidden_layers"], ("use_sliding_window", "sliding_window", "max_window_layers")
    if "sliding_attention" in (cfg.get("layer_types") or []) or (
            cfg.get(keys[0]) and cfg.get(keys[1]) and cfg.get(keys[2], n) < n):
        raise ValueError("sliding-window attention is not supported: " + ", ".join(
            f"{k}={cfg.get(k)!r}" for k in (*keys, "layer_types")))


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

    def head(self, hidden: jax.Array, layout: Layout = UNSHARDED) -> jax.Array:
        """Final norm + output projection; logits in float32. Under a `layout` the output weight
        is gathered in the compute dtype (`layers.compute_weight`; for many rows), else cast
        where it is stored."""
        h = rms_norm(hidden, self.final_norm.get_value(), self.cfg.rms_norm_eps)
        dtype = self.cfg.dtype
        if self.lm_head is None:
            w = compute_weight(self.embed.get_value(), ("vocab", "embed"), dtype, layout).T
        else:
            w = compute_weight(self.lm_head.get_value(), ("embed", "vocab"), dtype, layout)
        return jnp.einsum("...e,ev->...v", h, w, preferred_element_type=jnp.float32)

    def head_map(self, fn, hidden: jax.Array, *per_token: jax.Array, layout: Layout = UNSHARDED):
        """`fn(logits [..., Tc, V], *per_token chunks [..., Tc])` -> per-token arrays [..., Tc],
        over the head's logits of hidden [..., T, E], `cfg.logits_chunk` tokens at a time and
        recomputed chunk by chunk in the backward, so the [..., T, V] logits (and their gradient)
        never exist at once; 0: one call. Returns fn's outputs reassembled to [..., T]."""
        chunk, t = self.cfg.logits_chunk, hidden.shape[-2]
        if chunk <= 0 or t <= chunk:
            return fn(self.head(hidden, layout), *per_token)

        def piece(xs):
            h, *rest = xs
            out = fn(self.head(jnp.moveaxis(h, 0, -2), layout),
                     *(jnp.moveaxis(a, 0, -1) for a in rest))
            return jax.tree.map(lambda a: jnp.moveaxis(a, -1, 0), out)

        xs = (jnp.moveaxis(hidden, -2, 0), *(jnp.moveaxis(a, -1, 0) for a in per_token))
        return jax.tree.map(lambda a: jnp.moveaxis(a, 0, -1),
                            map_chunks(piece, xs, chunk, remat=True))

    def _stack(self, x, positions, attend, per_layer=(), layout: Layout = UNSHARDED,
               devices: int = 1, heads_first: bool = False, seq_len=None):
        """The one layer stack: `decoder_layer` scanned over the stacked params (remat per config).
        x [N, L, E] at positions [N, L], L split over `devices` in equal blocks (the MLP pieces
        count a device's tokens); `attend(q, k, v, *per_layer_i)` gets this layer's slice of
        every `per_layer` array (leading axis: layers); weights are gathered for the `layout`
        (`layers.compute_weight`; UNSHARDED: cast where they are, XLA places the rest).
        Returns (x, per-layer (k, v)), each [layers, N, L, KVH, D] ([layers, N, KVH, L, D] with
        `heads_first`: written so by each layer, no copy after the scan)."""
        cfg = self.cfg
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta,
                                scaling=cfg.rope_scaling_type, factor=cfg.rope_scaling_factor,
                                original_max=cfg.max_position_embeddings, seq_len=seq_len)

        pieces = mlp_pieces(cfg, x.shape[1] // devices)

        def layer(xs, x):
            p, extra = xs
            x, (k, v) = decoder_layer(cfg, p, x, cos, sin,
                                      lambda q, k, v: attend(q, k, v, *extra), pieces, layout)
            return x, ((jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)) if heads_first else (k, v))

        stacked = (values(self.layers, LAYER_PARAMS), tuple(per_layer))
        return scan_layers(layer, stacked, x.astype(cfg.dtype), remat=cfg.remat)

    def _prompt(self, x, positions, segment_ids, layout: Layout, laid_out: bool = False,
                heads_first: bool = False):
        """Prompts [B, L, E] through the stack, laid out for the layout: under a ring axis padded
        and zigzag-ordered, sharded over it (`laid_out`: already so, a `RingPrompt`). Returns
        (hidden, (k, v), seg, where): everything in that order, and `where[i]` = the index of
        original token i (None: not permuted)."""
        seg = segment_ids
        where = None
        if laid_out:
            x = layout.constrain(x, ("batch", "length", None))
        elif layout.seq_axis is not None:
            x, positions, seg, where = shard_sequence(layout, x, positions, seg)
        attend = prompt_attention(layout, self.cfg.attention)
        hidden, kv = self._stack(x, positions,
                                 lambda q, k, v: attend(q, k, v, positions, positions, seg, seg),
                                 layout=layout, devices=layout.size("length"),
                                 heads_first=heads_first)
        return hidden, kv, seg, where

    def __call__(self, input_embeds: jax.Array, positions: jax.Array, *,
                 segment_ids: jax.Array | None = None, mesh=None, rules=None,
                 return_hidden: bool = False, return_kv: bool = False):
        """Logits [B, L, V] for input embeddings [B, L, E] at integer positions [B, L].

        `segment_ids` [B, L]: tokens attend within equal ids; ids < 0 are padding.
        `mesh` (+ logical-axis `rules`, default `sharding.mesh.DEFAULT_RULES`): with a ring axis
        (rule 'length', `seq` by default, of size > 1) the forward is sequence parallel (pad,
        zigzag, shard, ring attention, restore); the result equals the unsharded forward.
        With `return_kv`, also returns per-layer (k, v), each [layers, B, L, KVH, D]; with
        `return_hidden`, the final hidden states instead of logits.
        """
        return self.forward(input_embeds, positions, segment_ids=segment_ids,
                            layout=Layout.of(mesh, rules), return_hidden=return_hidden,
                            return_kv=return_kv)

    def forward(self, input_embeds, positions, *, segment_ids=None, layout: Layout = UNSHARDED,
                return_hidden: bool = False, return_kv: bool = False):
        """`__call__` with a `Layout`; outputs in the original token order."""
        hidden, (k, v), _, where = self._prompt(input_embeds, positions, segment_ids, layout)
        if where is not None:
            hidden, k, v = hidden[:, where], k[:, :, where], v[:, :, where]
        out = hidden if return_hidden else self.head(hidden, layout)
        return (out, (k, v)) if return_kv else out

    def prefill(self, embeds, mask=None, *, layout: Layout = UNSHARDED) -> Prefix:
        """Run prompts once; keep their K/V as the prefix. A `RingPrompt` (mask None) already
        laid out for the layout's ring (in `chunks` > 1: `_prefill_chunks`), or left-padded
        prompts [B, Lp, E] with mask [B, Lp], laid out here (`ring_prompt.from_left_padded`)."""
        prompt = embeds if isinstance(embeds, RingPrompt) else from_left_padded(embeds, mask,
                                                                               layout)
        if prompt.shards != ring_size(layout):
            raise ValueError(f"RingPrompt laid out for a ring of {prompt.shards}, the layout's "
                             f"is {ring_size(layout)}")
        if prompt.chunks > 1:
            return self._prefill_chunks(prompt, layout, self.cfg.attention.heads_first())
        positions, seg = prompt.positions, prompt.segments
        heads_first = self.cfg.attention.heads_first()
        hidden, (k, v), seg, _ = self._prompt(prompt.x, positions, seg, layout, laid_out=True,
                                              heads_first=heads_first)
        lengths = jnp.sum(seg >= 0, axis=1).astype(jnp.int32)
        h = last_hidden(hidden, positions, seg, lengths)
        return Prefix(k, v, seg >= 0, lengths, self.head(h), heads_first)

    def _prefill_chunks(self, prompt: RingPrompt, layout: Layout, heads_first: bool = False
                        ) -> Prefix:
        """`prefill` of a prompt laid out in S = `prompt.chunks` chunks, one chunk at a time
        through the whole stack (forward only): chunk s attends to the K/V of chunks < s, kept
        in a cache [layers, B, n, S, w, KVH, D] (w: a device's tokens of a chunk; with
        `heads_first` [layers, B, KVH, n, S, w, D], the prefix's layout, so none is copied at
        the end), and to its own tokens, in one masked ring (the keys being longer than the
        queries, the ring takes all its 4n sub-blocks; the part of the own chunk a causal mask
        hides, 1 / S of the attention, is computed and masked). No activation is longer than a
        chunk's share; the K/V come out in the prompt's order, so `Prefix.valid` is its mask."""
        cfg, n, chunks = self.cfg, prompt.shards, prompt.chunks
        b, lp = prompt.x.shape[:2]
        w = lp // (n * chunks)
        kvh, d = cfg.num_kv_heads, cfg.head_dim
        names = ("batch", "length") + (None,) * 4

        def split(a):          # [B, Lp, ...] -> [B, n, S, w, ...]: each device's own block
            a = a.reshape(b, n, chunks, w, *a.shape[2:])
            return layout.constrain(a, names[:a.ndim])

        x, pos, seg = split(prompt.x), split(prompt.positions), split(prompt.segments)
        flat = lambda a: a.reshape(b, -1, *a.shape[4:])  # noqa: E731
        shape, cache_names = (((b, kvh, n, chunks, w, d), ("batch", None, "length", None, None, None))
                              if heads_first else ((b, n, chunks, w, kvh, d), names))
        slot = 3 if heads_first else 2           # a layer's cache: the chunk axis, after n
        piece = shape[:slot] + shape[slot + 1:]  # one chunk's K/V of a layer
        cache = jnp.zeros((cfg.num_layers, *shape), cfg.dtype)
        cache = (layout.constrain(cache, (None, *cache_names)),) * 2
        attend = prompt_attention(layout, cfg.attention)
        lengths = jnp.sum(prompt.segments >= 0, axis=1).astype(jnp.int32)
        h = jnp.zeros((b, cfg.hidden_size), cfg.dtype)
        seq_len = jnp.max(prompt.positions) + 1   # dynamic RoPE: the whole prompt's, per chunk
        for s in range(chunks):
            q_pos, q_seg = flat(pos[:, :, s:s + 1]), flat(seg[:, :, s:s + 1])
            k_pos, k_seg = flat(pos[:, :, :s + 1]), flat(seg[:, :, :s + 1])

            def own(new, old, s=s):
                """Chunks < s of a layer's cache, then this chunk's own K/V: by token, flat."""
                old = jax.lax.slice_in_dim(old, 0, s, axis=slot)
                old = jnp.moveaxis(old, 1, -2) if heads_first else old
                return flat(jnp.concatenate([old, new.reshape(b, n, 1, w, kvh, d)], axis=2))

            def att(q, k, v, ck, cv, q_pos=q_pos, q_seg=q_seg, k_pos=k_pos, k_seg=k_seg):
                return attend(q, own(k, ck), own(v, cv), q_pos, k_pos, q_seg, k_seg)

            hidden, kv = self._stack(flat(x[:, :, s:s + 1]), q_pos, att, per_layer=cache,
                                     layout=layout, devices=n, heads_first=heads_first,
                                     seq_len=seq_len)
            at = (slice(None),) * (slot + 1) + (s,)     # [layers, ...] into the chunk's slot
            cache = tuple(c.at[at].set(a.reshape(-1, *piece)) for c, a in zip(cache, kv))
            h = h + last_hidden(hidden, q_pos, q_seg, lengths)
        # (n, S, w) -> Lp, in the prompt's order
        k, v = (c.reshape(cfg.num_layers, *shape[:slot - 1], lp, *shape[slot + 2:]) for c in cache)
        return Prefix(k, v, prompt.segments >= 0, lengths, self.head(h), heads_first)

    def extend(self, prefix: Prefix, tokens, *, cache=None, step=0, layout: Layout = UNSHARDED):
        """Run response tokens [B, G, T] of G branches per prompt against `prefix` (and a
        response cache (k, v), each heads-first [layers, B, G, KVH, C, D], of which `step`
        entries are valid). Returns (hidden [B, G, T, E], new K/V in the cache's layout, each
        [layers, B, G, KVH, T, D]).
        Gradients reach the prompt through the prefix K/V of every branch. The branches are split
        over the layout's `branches` axis: each device runs the layers for its share of them."""
        cfg = self.cfg
        b, g, t = tokens.shape

        def rows(a, lead: int = 0):
            """`a` [..lead.., B, G, ...] with its branches split over the layout's `branches`."""
            return layout.constrain(a, (None,) * lead + ("batch", "branches")
                                    + (None,) * (a.ndim - lead - 2))

        x = rows(self.embed_tokens(tokens)).reshape(b * g, t, -1)
        pos = prefix.lengths[:, None, None] + step + jnp.arange(t)[None, None, :]
        pos = jnp.broadcast_to(pos, (b, g, t)).reshape(b * g, t)
        if cache is None:
            empty = jnp.zeros((cfg.num_layers, b, g, cfg.num_kv_heads, 0, cfg.head_dim), cfg.dtype)
            cache = (empty, empty)
        split = lambda a: a.reshape(b, g, t, *a.shape[2:])  # noqa: E731

        def attend(q, k, v, pk, pv, ck, cv):
            o = branch_attention(split(q), split(k), split(v), pk, pv, prefix.valid, ck, cv, step,
                                 layout=layout, options=cfg.attention,
                                 prefix_heads_first=prefix.heads_first)
            return o.reshape(b * g, t, *o.shape[3:])

        # a decode step's few rows: XLA reduces their partial activations instead of gathering
        # every weight per token; longer extends (the training forward) gather the weights
        x, (k, v) = self._stack(x, pos, attend, per_layer=(prefix.k, prefix.v, *cache),
                                layout=layout if t > 1 else UNSHARDED, heads_first=True)
        per_layer = lambda a: rows(a.reshape(-1, b, g, *a.shape[2:]), lead=1)  # noqa: E731
        return rows(x.reshape(b, g, t, -1)), (per_layer(k), per_layer(v))


def last_hidden(hidden, positions, segments, lengths):
    """[B, E]: each row's hidden state at its last real token (position `lengths` - 1), wherever
    the layout put it (zero when this block has none): a one-hot sum over the sharded length, a
    [B, E] reduction, where indexing would gather the whole hidden state."""
    last = (positions == lengths[:, None] - 1) & (segments >= 0)
    return jnp.einsum("bl,ble->be", last.astype(hidden.dtype), hidden)


def to_left_padded(x, valid, multiple: int = 1):
    """Right-padded [B, L, ...] (mask `valid` [B, L]; masked gaps, e.g. a short clip's padded
    frames, stay) -> each row's last valid token at the end, length rounded up to a multiple of
    `multiple`; returns (x, valid). The layout `prefill` takes."""
    length = x.shape[1]
    target = -(-length // multiple) * multiple
    if target != length:
        x = jnp.pad(x, [(0, 0), (0, target - length)] + [(0, 0)] * (x.ndim - 2))
        valid = jnp.pad(valid, [(0, 0), (0, target - length)])
    shift = target - jnp.max(jnp.where(valid, jnp.arange(target) + 1, 0), axis=1)
    roll = jax.vmap(lambda a, s: jnp.roll(a, s, axis=0))
    return roll(x, shift), roll(valid, shift)


def left_pad(prompts, multiple: int = 1):
    """A list of [L_i, ...] arrays -> (left-padded [B, Lp, ...], mask [B, Lp]); Lp the longest
    length rounded up to a multiple of `multiple`."""
    longest = max(int(p.shape[0]) for p in prompts)
    valid = np.zeros((len(prompts), longest), bool)
    rows = []
    for i, p in enumerate(prompts):
        p = jnp.asarray(p)
        rows.append(jnp.pad(p, [(0, longest - p.shape[0])] + [(0, 0)] * (p.ndim - 1)))
        valid[i, :p.shape[0]] = True
    return to_left_padded(jnp.stack(rows), jnp.asarray(valid), multiple)
