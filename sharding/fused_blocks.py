"""Fused-kernel sub-blocks of the ring (`sharding.ring_attention`): one (query chunk, key chunk)
pair through a flash-attention kernel that returns its output and float32 log-sum-exp, merged
across ring steps in float32, and a backward that hands the kernel the GLOBAL output and
log-sum-exp (the ring-flash identity: a sub-block's dQ/dK/dV are the kernel's backward with the
merged statistics in place of the sub-block's own).

Kernels, one contract (`fwd(q, k, v, diag) -> (o [B,C,H,D'] q.dtype, lse [B,H,C] float32)`,
`bwd(q, k, v, o, lse, do, diag) -> (dq, dk, dv)`):

  cudnn  cuDNN's fused flash attention (GPU, bf16 / fp16), through jax's own cuDNN primitives:
         `jax.nn.dot_product_attention` returns the log-sum-exp cast to the compute dtype and its
         backward takes no statistics from outside, which a ring merge needs (a bf16 LSE costs
         ~1% per merge weight).
  xla    `jax.nn.dot_product_attention(implementation="xla")` in float32 forward and the same
         formula backward: the CPU path of the contract (it writes the [C, C] scores out; tests).

Masks without a [C, C] mask array: a diagonal sub-block (query and key chunk of one device at
ring step 0) is causal by index (the kernel's causal mask; the ring's zigzag schedule already
needs positions that grow with the index), every other computed sub-block is fully visible, and
segments become extra head dimensions: q gets a one-hot of its segment id, k gets 0 in its own
segment's slot and -2^15 elsewhere (all slots for padding), so q.k gains exactly 0 within a
segment and -2^15 (times the scale) across. No term cancels, so the real dot product keeps its
precision. Head dim D -> D + SLOTS rounded up to a multiple of 8 (cuDNN); values padded with 0.
Segment ids must lie in [-1, SLOTS); rows of a device that holds others come out NaN (loud, not
silently wrong). Query rows with segment < 0 are zeroed by the caller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sharding.ring_blocks import bwd_tile, match_vma

F32 = jnp.float32
SLOTS = 8          # segment ids 0..7 (and -1 = padding) are encoded exactly
MASKED = 2.0 ** 15  # a masked pair's q.k before scaling (exact in bf16 and fp16)
KERNELS = ("tiled", "xla", "cudnn")


def kernel_for(choice: str, dtype) -> str:
    """The ring's sub-block kernel for a choice ("auto", or one of `KERNELS`) and compute dtype:
    "auto" = cuDNN on a GPU backend for bf16 / fp16 (what cuDNN takes), else the tiled einsum
    blocks (`sharding.ring_blocks`, which never hold more than a key tile of scores)."""
    if choice == "auto":
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if jax.default_backend() == "gpu" and half else "tiled"
    if choice not in KERNELS:
        raise ValueError(f"ring kernel must be 'auto' or one of {KERNELS}, got {choice!r}")
    return choice


def padded_dim(d: int) -> int:
    return -(-(d + SLOTS) // 8) * 8


def _pad(x, width, value=None):
    """x [..., D] -> [..., width]: `value` (broadcast) in the next SLOTS entries, zeros after."""
    d = x.shape[-1]
    parts = [x] if value is None else [x, value.astype(x.dtype)]
    used = d + (0 if value is None else value.shape[-1])
    if width > used:
        parts.append(jnp.zeros(x.shape[:-1] + (width - used,), x.dtype))
    return jnp.concatenate(parts, axis=-1)


def encode(q, k, v, q_seg, kv_seg):
    """q [B,Cq,H,D], k/v [B,Ck,KVH,D], segments [B,C] -> q', k', v' with head dim `padded_dim(D)`
    (see the module docstring)."""
    width = padded_dim(q.shape[-1])
    hot = lambda s: jax.nn.one_hot(s, SLOTS, dtype=F32)  # noqa: E731  (-1 -> all zeros)
    qx = jnp.broadcast_to(hot(q_seg)[:, :, None], q.shape[:3] + (SLOTS,))
    kx = jnp.broadcast_to(((hot(kv_seg) - 1.0) * MASKED)[:, :, None], k.shape[:3] + (SLOTS,))
    return _pad(q, width, qx), _pad(k, width, kx), _pad(v, width)


def segments_ok(*segs):
    """False when a segment id falls outside what `encode` represents."""
    return jnp.all(jnp.stack([jnp.all((s >= -1) & (s < SLOTS)) for s in segs]))


# ----------------------------------------------------------------------------- the kernels


def _xla_fwd(q, k, v, *, scale, diag):
    o, lse = jax.nn.dot_product_attention(
        q.astype(F32), k.astype(F32), v.astype(F32), scale=scale, is_causal=diag,
        implementation="xla", return_residual=True)
    return o.astype(q.dtype), lse.transpose(0, 2, 1)


def _xla_bwd(q, k, v, o, lse, do, *, scale, diag):
    """The flash backward with given statistics (`ring_blocks.bwd_tile`, one tile of all keys):
    P = exp(S - lse), dS = P (dP - rowsum(dO o))."""
    b, cq, h, d = q.shape
    ck, kvh = k.shape[1], k.shape[2]
    grp = lambda x: x.astype(F32).reshape(b, cq, kvh, h // kvh, d)  # noqa: E731
    dog = grp(do)
    delta = jnp.einsum("bqhgd,bqhgd->bhgq", dog, grp(o))
    mask = jnp.tril(jnp.ones((cq, ck), bool)) if diag else jnp.ones((cq, ck), bool)
    zeros = (jnp.zeros(dog.shape, F32), jnp.zeros(k.shape, F32), jnp.zeros(k.shape, F32))
    dq, dk, dv = bwd_tile(zeros, grp(q), k.astype(F32), v.astype(F32), dog,
                          lse.reshape(b, kvh, h // kvh, cq), delta, mask, scale)
    return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _cudnn():
    from jax._src.cudnn import fused_attention_stablehlo as fa  # jax's own cuDNN primitives
    return fa


def _cudnn_args(q, diag):
    fa = _cudnn()
    unused = jnp.zeros(0, q.dtype)
    mask = fa.MaskType.CAUSAL if diag else fa.MaskType.NO_MASK
    kw = dict(seed=0, dropout_rate=0.0, variadic_args=(False, False), mask_type=mask,
              layout=fa.AttentionLayout.BTNH.value, sliding_window_length=None)
    return fa, (unused,) * 7, kw


def _cudnn_fwd(q, k, v, *, scale, diag):
    fa, unused, kw = _cudnn_args(q, diag)
    o, lse = fa._dot_product_attention_fwd_p_wrapper.bind(q, k, v, *unused, scale=scale,
                                                          is_training=True, **kw)
    return o, lse


def _cudnn_bwd(q, k, v, o, lse, do, *, scale, diag):
    fa, unused, kw = _cudnn_args(q, diag)
    dq, dk, dv = fa._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, *unused, lse, o.astype(q.dtype), do.astype(q.dtype), scale=scale, **kw)
    return dq, dk, dv


_FWD = {"xla": _xla_fwd, "cudnn": _cudnn_fwd}
_BWD = {"xla": _xla_bwd, "cudnn": _cudnn_bwd}


# ----------------------------------------------------------------------------- attention


def _run_fwd(q, k, v, q_seg, kv_seg, kernel, scale, diag):
    q = match_vma(q, k, v, q_seg, kv_seg)
    qe, ke, ve = encode(q, k, v, q_seg, kv_seg)
    return _FWD[kernel](qe, ke, ve, scale=scale, diag=diag)


def attention(q, k, v, q_seg, kv_seg, *, kernel, scale, diag=False):
    """Differentiable fused attention with its statistics: q [B, Cq, H, D], k, v [B, Ck, KVH, D],
    segments [B, C] -> (o [B, Cq, H, D] float32, lse [B, H, Cq] float32). Every query row gets a
    finite lse (masked keys score -2^15 * scale); rows with segment < 0 are the caller's to drop.
    Its backward takes a cotangent for lse too (through rowsum(dO o), see `_attention_bwd`)."""
    # inside a shard_map, q first varies as k does (the pcast's transpose sums dq back)
    return _attention(match_vma(q, k, v, q_seg, kv_seg), k, v, q_seg, kv_seg, kernel,
                      float(scale), bool(diag))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, q_seg, kv_seg, kernel, scale, diag):
    return _attention_fwd(q, k, v, q_seg, kv_seg, kernel, scale, diag)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, kernel, scale, diag):
    o, lse = _run_fwd(q, k, v, q_seg, kv_seg, kernel, scale, diag)
    out = (o[..., :q.shape[-1]].astype(F32), lse.astype(F32))
    return out, (q, k, v, q_seg, kv_seg, o, lse)


def _attention_bwd(kernel, scale, diag, res, cts):
    """dS = P (dP - rowsum(dO o) + dlse): the kernel computes rowsum(dO o) itself, so dlse rides
    in a value dimension that is 0 in v' (dO there 1, o there -dlse; dP is unchanged)."""
    q, k, v, q_seg, kv_seg, o, lse = res
    do, dlse = cts
    d = q.shape[-1]
    qe, ke, ve = encode(q, k, v, q_seg, kv_seg)
    o_in = o.at[..., d].set((-dlse).transpose(0, 2, 1).astype(o.dtype))
    do_in = _pad(do.astype(o.dtype), qe.shape[-1]).at[..., d].set(1)
    dq, dk, dv = _BWD[kernel](qe, ke, ve, o_in, lse, do_in, scale=scale, diag=diag)
    return dq[..., :d].astype(q.dtype), dk[..., :d].astype(k.dtype), dv[..., :d].astype(v.dtype), \
        None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------- ring sub-blocks


def fwd_block(state, q, k, v, q_seg, kv_seg, *, kernel, scale, diag):
    """Fold one sub-block into the ring's online-softmax state ``(m, l, acc)`` (m, l
    [B, KVH, G, Cq], acc [B, KVH, G, Cq, D], float32); q grouped [B, Cq, KVH, G, D]."""
    b, cq, kvh, g, d = q.shape
    o, lse = _run_fwd(q.reshape(b, cq, kvh * g, d), k, v, q_seg, kv_seg, kernel, scale, diag)
    o = o[..., :d].astype(F32).reshape(b, cq, kvh, g, d).transpose(0, 2, 3, 1, 4)
    lse = lse.astype(F32).reshape(b, kvh, g, cq)
    m, l, acc = state
    m_new = jnp.maximum(m, lse)           # lse is finite: masked pairs score -2^15 * scale
    old, new = jnp.exp(m - m_new), jnp.exp(lse - m_new)
    return m_new, old * l + new, acc * old[..., None] + o * new[..., None]


def bwd_block(acc, q, k, v, o, lse, do, q_seg, kv_seg, *, kernel, scale, diag):
    """Add one sub-block's gradients to ``acc = (dq [B,Cq,KVH,G,D], dk, dv [B,Ck,KVH,D])``
    (float32). q, o, do grouped [B, Cq, KVH, G, D]; o / lse the ring's merged output and
    log-sum-exp ([B, KVH, G, Cq]), do zero on padding rows."""
    b, cq, kvh, g, d = q.shape
    flat = lambda x: x.reshape(b, cq, kvh * g, d)  # noqa: E731
    qe, ke, ve = encode(flat(q), k, v, q_seg, kv_seg)
    width = qe.shape[-1]
    dq, dk, dv = _BWD[kernel](qe, ke, ve, _pad(flat(o), width), lse.reshape(b, kvh * g, cq),
                              _pad(flat(do), width), scale=scale, diag=diag)
    dq_a, dk_a, dv_a = acc
    return (dq_a + dq[..., :d].astype(F32).reshape(q.shape), dk_a + dk[..., :d].astype(F32),
            dv_a + dv[..., :d].astype(F32))

