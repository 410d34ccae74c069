"""Building blocks shared by the towers: annotated params, norms, RoPE and the layer scan."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name


def param(rngs: nnx.Rngs | None, shape: Sequence[int], names: Sequence[str | None], *,
          init: str = "normal", std: float = 0.02, dtype=jnp.float32) -> nnx.Param:
    """A Param annotated with logical axis names (`out_sharding`); init normal / zeros / ones.

    Eager sharding is off: placement on a mesh is done by `sharding.mesh` from these names, so a
    dim that a mesh axis does not divide is replicated instead of failing.
    """
    shape = tuple(int(s) for s in shape)
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def values(module: nnx.Module, names: Sequence[str]) -> dict[str, jax.Array]:
    """The raw arrays of the named Params of `module`."""
    return {n: getattr(module, n).get_value() for n in names}


def compute_weight(w: jax.Array, names: Sequence[str | None], dtype, layout) -> jax.Array:
    """Weight `w` (stored with logical `names`) for use in the compute `dtype`: cast first, then
    gathered over its FSDP storage axes (`Layout.gathered`), so the all-gather moves compute-dtype
    bytes; its gradient is cast back to `w`'s dtype, then reduced to `w`'s sharding (XLA:CPU
    compiles that as an all-reduce and a slice)."""
    if layout.mesh is None:
        return w.astype(dtype)
    return _gather(w, jnp.dtype(dtype), jnp.dtype(w.dtype), layout.gathered(names, w.shape),
                   layout.sharding(names, w.shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _gather(w, dtype, stored_dtype, gathered, stored):
    cast = jax.lax.with_sharding_constraint(w.astype(dtype), stored)   # cast where it is stored
    return jax.lax.with_sharding_constraint(cast, gathered)


def _gather_fwd(w, dtype, stored_dtype, gathered, stored):
    return _gather(w, dtype, stored_dtype, gathered, stored), None


def _gather_bwd(dtype, stored_dtype, gathered, stored, _, g):
    return (jax.lax.with_sharding_constraint(g.astype(stored_dtype), stored),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


ROPE_SCALING_TYPES = ("linear", "dynamic")


def rope_inv_freq(head_dim: int, theta: float, *, scaling: str | None = None, factor: float = 1.0,
                  original_max: int | None = None, seq_len=None) -> jax.Array:
    """RoPE inverse frequencies [head_dim // 2], float32, as transformers computes them.

    `scaling` None / "default": theta^(-2i/d). "linear": divided by `factor` (= positions divided
    by it). "dynamic" (NTK, transformers' `_compute_dynamic_ntk_parameters`): the base becomes
    theta * (factor * s / m - (factor - 1)) ^ (d / (d - 2)) with m = `original_max` (the config's
    max_position_embeddings) and s = max(`seq_len`, m); `seq_len` may be traced.
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    if scaling in (None, "default"):
        return 1.0 / (theta ** exponents)
    if scaling == "linear":
        return 1.0 / (theta ** exponents) / factor
    if scaling == "dynamic":
        if original_max is None or seq_len is None:
            raise ValueError("dynamic RoPE scaling needs original_max and seq_len")
        s = jnp.maximum(jnp.asarray(seq_len, jnp.float32), float(original_max))
        base = theta * (factor * s / original_max - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** exponents)
    raise ValueError(f"RoPE scaling type {scaling!r} is not supported (supported: "
                     f"{', '.join(ROPE_SCALING_TYPES)})")


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, *, scaling: str | None = None,
                 factor: float = 1.0, original_max: int | None = None, seq_len=None
                 ) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [..., head_dim] for split-half RoPE at integer `positions`.

    `scaling` / `factor` / `original_max`: RoPE scaling (see `rope_inv_freq`). For "dynamic" the
    sequence length is `seq_len`, by default max(positions) + 1 over the whole array, as
    transformers takes it from the position ids of one forward: a traced value, so nothing
    recompiles when it changes. A forward over whole sequences then matches transformers; as in
    transformers' generate, a cache keeps the rotation its keys got (a prefix at the prompt's
    length, each decode step at its own), so past `original_max` a cached prefix + extend is not
    the full forward, and G branches scored in one `extend` differ from step-by-step decoding.
    Pass one `seq_len` (e.g. the longest prompt + response) to every call to make them agree.
    """
    if scaling == "dynamic" and seq_len is None:
        seq_len = jnp.max(positions) + 1
    inv_freq = rope_inv_freq(head_dim, theta, scaling=scaling, factor=factor,
                             original_max=original_max, seq_len=seq_len)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, L, heads, D] by split-half RoPE; cos/sin are [B, L, D]."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def map_chunks(fn, x, chunk: int, *, remat: bool = False):
    """`fn(x)` for a `fn` that treats the rows of x (axis 0; x an array or a pytree of arrays with
    the same rows) independently, computed `chunk` rows at a time (`jax.lax.map`), so its
    activations are those of one chunk; x is padded with copies of its last row to a multiple of
    `chunk`, the padding dropped. `remat`: the backward recomputes each chunk (`jax.checkpoint`)
    instead of keeping every chunk's activations. `chunk` <= 0 or >= the rows: one call."""
    t = jax.tree.leaves(x)[0].shape[0]
    if chunk <= 0 or t <= chunk:
        return fn(x)
    n = -(-t // chunk)
    if n * chunk > t:
        x = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], n * chunk - t, axis=0)]),
                         x)
    y = jax.lax.map(jax.checkpoint(fn) if remat else fn,
                    jax.tree.map(lambda a: a.reshape(n, chunk, *a.shape[1:]), x))
    return jax.tree.map(lambda a: a.reshape(n * chunk, *a.shape[2:])[:t], y)


REMAT = (False, True, "dots", "offload")
LAYER_INPUT = "layer_input"     # checkpoint_name of each layer's input (remat="offload")


def check_remat(remat) -> None:
    """ValueError unless `remat` is one of REMAT."""
    if remat not in REMAT:
        raise ValueError(f"remat must be one of {REMAT}, got {remat!r}")


def remat_policy(remat):
    """The jax.checkpoint policy of a `remat` setting (None: no remat)."""
    check_remat(remat)
    cp = jax.checkpoint_policies
    if remat == "offload":     # each layer's input to pinned host memory, recompute the rest
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
            offload_src="device", offload_dst="pinned_host")
    return {False: None, True: cp.nothing_saveable,
            "dots": cp.dots_with_no_batch_dims_saveable}[remat]


def scan_layers(layer_fn, stacked, x, *, remat: bool | str = False, num_layers=None):
    """Run `layer_fn(params_i, x) -> (x, y)` over stacked params with one compiled body.

    `stacked`: a pytree whose leaves all have the layers as their leading axis (the params, and
    any per-layer inputs such as a K/V cache). `remat`: False, True (save only each layer's input,
    recompute the rest), 'dots' (also save matmul outputs without batch dims) or 'offload' (each
    layer's input kept in pinned host memory instead of the device's: on GPUs the per-layer
    checkpoints of a long prompt leave HBM; XLA:CPU compiles it and counts it as device memory).
    `num_layers` runs only the first layers (e.g. SigLIP features from hidden_states[-2]).
    """
    if num_layers is not None:
        stacked = jax.tree.map(lambda a: a[:num_layers], stacked)
    fn = layer_fn
    policy = remat_policy(remat)
    if policy is not None:
        if remat == "offload":
            fn = lambda p, x: layer_fn(p, checkpoint_name(x, LAYER_INPUT))  # noqa: E731
        fn = jax.checkpoint(fn, policy=policy)
    return jax.lax.scan(lambda carry, p: fn(p, carry), x, stacked)
