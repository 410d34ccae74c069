"""Shared-prefix branches: G responses per prompt attend to one prompt cache (sharded over `seq`)
plus their own tokens. Used by the sampler's decode step (one token, with a response cache) and by
the GRPO training forward (all response tokens at once, gradients through the prefix).

Attention of a branch query = log-sum-exp merge of
  (a) the query against the prefix K/V: each `seq` device scores its local prefix shard; the max,
      the sum and the weighted values are combined with pmax / psum (the cache never moves), and
  (b) the query against the branch's cached tokens (< `step`) and its new tokens (causal).
This equals attention over the full sequence prompt + response.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lvr_jax.models.attention import rope_cos_sin, scan_layers, values
from lvr_jax.models.qwen2 import LAYER_PARAMS, decoder_layer


def prefix_stats(q, k, v, valid, *, scale, axis=None):
    """Softmax partials of q [B, G, T, KVH, Hg, D] against the prefix (shard) k, v [B, S, KVH, D],
    valid [B, S]; summed over `axis` when given. Returns float32 (max, sum, weighted values)."""
    s = jnp.einsum("bgtkhd,bskd->bgtkhs", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(valid[:, None, None, None, None, :], s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1))   # any shift is exact; keeps pmax out of AD
    if axis is not None:
        m = jax.lax.pmax(m, axis)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m[..., None])
    l_sum = jnp.sum(p, axis=-1)
    o = jnp.einsum("bgtkhs,bskd->bgtkhd", p, v.astype(jnp.float32))
    if axis is not None:
        l_sum, o = jax.lax.psum((l_sum, o), axis)
    return m, l_sum, o


# Training runs all T response tokens of a branch at once; their scores against a device's prefix
# shard are [B, G, T, H, S_local] float32 (14 GiB for the 7B at 512 frames, T = 1023, seq = 8).
# Longer responses go through in chunks of this many queries, each chunk rematerialised in the
# backward pass, so one chunk's scores are alive at a time. Decode (T = 1) never chunks.
QUERY_CHUNK = 256


def branch_attention(q, k_new, v_new, prefix_k, prefix_v, prefix_valid, cache_k, cache_v, step,
                     *, mesh=None, axis="seq", query_chunk: int | None = None):
    """q [B, G, T, H, D]; k_new, v_new [B, G, T, KVH, D]; prefix [B, S, KVH, D] (sharded over
    `axis`); cache [B, G, C, KVH, D] of which entries < `step` are valid. -> [B, G, T, H, D].
    Queries run in chunks of `query_chunk` (default QUERY_CHUNK) when T is longer (same result,
    less memory)."""
    query_chunk = query_chunk or QUERY_CHUNK
    b, g, t, h, d = q.shape
    kvh = k_new.shape[-2]
    qg = q.reshape(b, g, t, kvh, h // kvh, d)
    scale = d ** -0.5
    if mesh is not None and mesh.shape.get(axis, 1) > 1:
        stats = jax.shard_map(functools.partial(prefix_stats, scale=scale, axis=axis), mesh=mesh,
                              in_specs=(P(), P(None, axis), P(None, axis), P(None, axis)),
                              out_specs=P(), axis_names={axis})
    else:
        stats = functools.partial(prefix_stats, scale=scale)
    c = cache_k.shape[2]
    keys = jnp.concatenate([cache_k.astype(k_new.dtype), k_new], axis=2)   # [B, G, C+T, KVH, D]
    vals = jnp.concatenate([cache_v.astype(v_new.dtype), v_new], axis=2)

    def attend(qc, first):
        """Queries qc [B, G, Tc, KVH, Hg, D] at response positions first, first + 1, ..."""
        m1, l1, o1 = stats(qc, prefix_k, prefix_v, prefix_valid)
        j, i = jnp.arange(c + t)[None, :], first + jnp.arange(qc.shape[2])[:, None]
        own = jnp.where(j < c, j < step, j - c <= i)                         # [Tc, C+T]
        s2 = jnp.einsum("bgtkhd,bgjkd->bgtkhj", qc, keys,
                        preferred_element_type=jnp.float32) * scale
        s2 = jnp.where(own[:, None, None, :], s2, -jnp.inf)
        m = jnp.maximum(m1, jax.lax.stop_gradient(jnp.max(s2, axis=-1)))
        w1 = jnp.exp(m1 - m)
        p2 = jnp.exp(s2 - m[..., None])
        denom = l1 * w1 + jnp.sum(p2, axis=-1)
        num = o1 * w1[..., None] + jnp.einsum("bgtkhj,bgjkd->bgtkhd", p2,
                                              vals.astype(jnp.float32))
        return (num / denom[..., None]).astype(q.dtype)

    if t <= query_chunk:
        out = attend(qg, 0)
    else:
        n = -(-t // query_chunk)
        padded = jnp.pad(qg, [(0, 0), (0, 0), (0, n * query_chunk - t)] + [(0, 0)] * 3)
        chunks = jnp.moveaxis(padded.reshape(b, g, n, query_chunk, *qg.shape[3:]), 2, 0)
        out = jax.lax.map(jax.checkpoint(lambda a: attend(*a)),
                          (chunks, jnp.arange(n) * query_chunk))
        out = jnp.moveaxis(out, 0, 2).reshape(b, g, n * query_chunk, *qg.shape[3:])[:, :, :t]
    return out.reshape(b, g, t, h, d)


def branch_forward(llm, prefix_k, prefix_v, prefix_valid, prefix_lengths, tokens, *,
                   cache=None, step=0, mesh=None, axis="seq"):
    """Run response tokens [B, G, T] of G branches per prompt through the LLM against the prefix
    K/V [layers, B, S, KVH, D] (and an optional response cache [layers, B, G, C, KVH, D] with
    `step` valid entries). Returns (hidden [B, G, T, E], new K/V [layers, B, G, T, KVH, D])."""
    cfg = llm.cfg
    b, g, t = tokens.shape
    x = llm.embed_tokens(tokens.reshape(b * g, t))
    pos = prefix_lengths[:, None, None] + step + jnp.arange(t)[None, None, :]
    cos, sin = rope_cos_sin(jnp.broadcast_to(pos, (b, g, t)).reshape(b * g, t), cfg.head_dim,
                            cfg.rope_theta)
    if cache is None:
        empty = jnp.zeros((cfg.num_layers, b, g, 0, cfg.num_kv_heads, cfg.head_dim), cfg.dtype)
        cache = (empty, empty)

    def layer(x, xs):
        p, pk, pv, ck, cv = xs

        def attend(q, k, v):
            split = lambda a: a.reshape(b, g, t, *a.shape[2:])  # noqa: E731
            o = branch_attention(split(q), split(k), split(v), pk, pv, prefix_valid, ck, cv,
                                 step, mesh=mesh, axis=axis)
            return o.reshape(b * g, t, *o.shape[3:])

        x, (k, v) = decoder_layer(cfg, p, x, cos, sin, attend)
        return x, (k.reshape(b, g, t, *k.shape[2:]), v.reshape(b, g, t, *v.shape[2:]))

    # remat as in the prompt's forward (cfg.remat): without it the backward keeps every layer's
    # branch-vs-prefix scores [B, G, T, H, S_local] (float32) at once
    stacked = values(llm.layers, LAYER_PARAMS)
    x, new_kv = scan_layers(lambda xs, x: layer(x, xs), (stacked, prefix_k, prefix_v, *cache), x,
                            remat=cfg.remat)
    return x.reshape(b, g, t, -1), new_kv
