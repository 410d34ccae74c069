"""Jitted KV-cache sampler: one prefill per prompt, G branches decoding against a shared prefix.

Data flow (DESIGN.md, MR-SP point 3):
  * prefill: the B prompts (left padded; positions from the mask; padding = segment -1) run once
    through the LLM, under `seq` sharding with the zigzag ring when the mesh has seq > 1. The
    per-layer K/V of the prompts stay as they are, in zigzag order and sharded over `seq`: the
    prefix cache [layers, B, Lp, KVH, D].
  * decode: G branches per prompt. Each step's attention merges by log-sum-exp (a) the query
    against the local prefix shard, combined over `seq` with pmax / psum of (max, sum, weighted
    values) and (b) the query against the branch's own response cache [layers, B, G, T, KVH, D].
  * a `lax.while_loop` over steps with the state as a donated argument; per-step keys
    fold_in(fold_in(seed, row), step) with row = b * G + g, so sharing the prefix or repeating
    prompts draws the same samples.
Returned logprobs are log-softmax(logits / temperature) of the chosen tokens (the distribution
before top-k / top-p filtering, as verl computes old log-probs); 0 after a branch stopped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvr_jax.models.attention import dense_attention
from lvr_jax.rollout.branches import branch_forward
from sharding.multihost import host_array
from sharding.ring_attention import ring_attention_fn
from sharding.sequence_parallel import shard_sequence


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0     # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0               # 0 = off
    num_samples: int = 1         # G branches per prompt


class Prefix(NamedTuple):
    """The shared prompt cache: K/V [layers, B, Lp, KVH, D] (zigzag order under seq sharding),
    validity [B, Lp], real prompt lengths [B], and the last prompt position's logits [B, V]."""
    k: jax.Array
    v: jax.Array
    valid: jax.Array
    lengths: jax.Array
    logits: jax.Array


class DecodeState(NamedTuple):
    """Loop state (donated): response caches [layers, B, G, T, KVH, D], tokens / logprobs
    [B, G, T], done flags and lengths [B, G], current step and next-token logits [B, G, V]."""
    step: jax.Array
    k: jax.Array
    v: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    done: jax.Array
    lengths: jax.Array
    logits: jax.Array


def left_pad(prompts, multiple: int = 1, pad_value=0):
    """Left-pad a list of [L_i, ...] arrays to a common length (a multiple of `multiple`).
    Returns (padded [B, Lp, ...], mask [B, Lp])."""
    longest = max(int(p.shape[0]) for p in prompts)
    lp = -(-longest // multiple) * multiple
    out, mask = [], np.zeros((len(prompts), lp), bool)
    for i, p in enumerate(prompts):
        p = jnp.asarray(p)
        pad = [(lp - p.shape[0], 0)] + [(0, 0)] * (p.ndim - 1)
        out.append(jnp.pad(p, pad, constant_values=pad_value))
        mask[i, lp - p.shape[0]:] = True
    return jnp.stack(out), jnp.asarray(mask)


def prefill(llm, embeds, mask, *, mesh=None, axis: str = "seq") -> Prefix:
    """Run the prompts [B, Lp, E] (left padded, mask [B, Lp]) once; keep their K/V as the prefix."""
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    seg = jnp.where(mask, 0, -1).astype(jnp.int32)
    if mesh is not None and mesh.shape.get(axis, 1) > 1:
        x, pos, seg, where = shard_sequence(mesh, axis, embeds, positions, seg)
        attention_fn = ring_attention_fn(mesh, axis)
        last = int(where[-1])
    else:
        x, pos, attention_fn, last = embeds, positions, dense_attention, embeds.shape[1] - 1
    hidden, (k, v) = llm(x, pos, segment_ids=seg, attention_fn=attention_fn, return_hidden=True,
                         return_kv=True)
    logits = llm.head(hidden[:, last:last + 1])[:, 0]
    return Prefix(k, v, seg >= 0, jnp.sum(mask, axis=1).astype(jnp.int32), logits)


def decode_step(llm, prefix: Prefix, state: DecodeState, token, *, mesh=None, axis="seq"):
    """Feed `token` [B, G] at `state.step`; returns (next logits [B, G, V], new k, v caches)."""
    hidden, (k_new, v_new) = branch_forward(
        llm, prefix.k, prefix.v, prefix.valid, prefix.lengths, token[..., None],
        cache=(state.k, state.v), step=state.step, mesh=mesh, axis=axis)
    k = jax.lax.dynamic_update_slice_in_dim(state.k, k_new.astype(state.k.dtype), state.step, 3)
    v = jax.lax.dynamic_update_slice_in_dim(state.v, v_new.astype(state.v.dtype), state.step, 3)
    return llm.head(hidden[:, :, 0]), k, v


def filter_logits(logits, temperature: float, top_k: int, top_p: float):
    """Scaled logits with everything outside top-k / the top-p nucleus set to -inf."""
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(order, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                    # mass of better tokens
        cutoff = jnp.min(jnp.where(before < top_p, order, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def choose(logits, keys, params: SamplingParams):
    """Sample (or argmax) one token per row; returns (tokens, logprobs of the scaled dist)."""
    if params.temperature == 0:
        tok = jnp.argmax(logits, axis=-1)
        lp = jax.nn.log_softmax(logits, axis=-1)
    else:
        filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p)
        tok = jax.vmap(jax.random.categorical)(keys, filtered.reshape(-1, logits.shape[-1]))
        tok = tok.reshape(logits.shape[:-1])
        lp = jax.nn.log_softmax(logits / params.temperature, axis=-1)
    return tok.astype(jnp.int32), jnp.take_along_axis(lp, tok[..., None], axis=-1)[..., 0]


def _stopped(tokens, step, stop_seqs):
    """[B, G] bool: does the response end (at `step`) with one of the stop token sequences?"""
    hit = jnp.zeros(tokens.shape[:2], bool)
    for seq in stop_seqs:
        n = len(seq)
        idx = step - n + 1 + jnp.arange(n)
        got = jnp.take(tokens, jnp.clip(idx, 0, tokens.shape[2] - 1), axis=2)
        hit |= (step + 1 >= n) & jnp.all(got == jnp.asarray(seq), axis=-1)
    return hit


def decode(llm, prefix: Prefix, state: DecodeState, row_keys, params: SamplingParams, eos_ids,
           stop_seqs, pad_id: int, *, mesh=None, axis="seq") -> DecodeState:
    """While-loop decode until every branch stopped or max_new_tokens."""
    eos = jnp.asarray(eos_ids, jnp.int32)

    def cond(s):
        return (s.step < params.max_new_tokens) & ~jnp.all(s.done)

    def body(s):
        keys = jax.vmap(lambda k: jax.random.fold_in(k, s.step))(row_keys)
        tok, lp = choose(s.logits, keys, params)
        tok = jnp.where(s.done, pad_id, tok)
        lp = jnp.where(s.done, 0.0, lp)
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[..., None], s.step, axis=2)
        logprobs = jax.lax.dynamic_update_slice_in_dim(s.logprobs, lp[..., None], s.step, axis=2)
        lengths = s.lengths + (~s.done).astype(jnp.int32)
        done = s.done | jnp.isin(tok, eos) | _stopped(tokens, s.step, stop_seqs)
        logits, k, v = decode_step(llm, prefix, s, tok, mesh=mesh, axis=axis)
        return DecodeState(s.step + 1, k, v, tokens, logprobs, done, lengths, logits)

    return jax.lax.while_loop(cond, body, state)


def init_state(prefix: Prefix, params: SamplingParams, cache_dtype) -> DecodeState:
    layers, b, _, kvh, d = prefix.k.shape
    g, t = params.num_samples, params.max_new_tokens
    cache = jnp.zeros((layers, b, g, t, kvh, d), cache_dtype)
    logits = jnp.broadcast_to(prefix.logits[:, None], (b, g, prefix.logits.shape[-1]))
    return DecodeState(jnp.zeros((), jnp.int32), cache, cache, jnp.zeros((b, g, t), jnp.int32),
                       jnp.zeros((b, g, t), jnp.float32), jnp.zeros((b, g), bool),
                       jnp.zeros((b, g), jnp.int32), logits)


class Sampler:
    """Generate G responses per prompt from a Qwen2 (or a VLM's `.llm`) with a shared prefix.

    `mesh`: with seq > 1, the prefill is the zigzag ring and the prefix cache stays sharded over
    `seq`. `share_prefix=False` repeats every prompt G times instead (the baseline).
    """

    def __init__(self, model, mesh=None, *, eos_ids=(), stop_token_seqs=(), pad_id: int = 0,
                 axis: str = "seq", share_prefix: bool = True):
        self.llm = getattr(model, "llm", model)
        self.mesh, self.axis, self.share_prefix = mesh, axis, share_prefix
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.stop_seqs = tuple(tuple(int(t) for t in s) for s in stop_token_seqs)
        self.pad_id = pad_id
        self._fns = {}

    def _compiled(self, params: SamplingParams):
        if params not in self._fns:
            graphdef, _ = nnx.split(self.llm)
            mesh, axis = self.mesh, self.axis

            def run_prefill(state, embeds, mask):
                return prefill(nnx.merge(graphdef, state), embeds, mask, mesh=mesh, axis=axis)

            def run_decode(state, prefix, dstate, row_keys):
                return decode(nnx.merge(graphdef, state), prefix, dstate, row_keys, params,
                              self.eos_ids, self.stop_seqs, self.pad_id, mesh=mesh, axis=axis)

            self._fns[params] = (jax.jit(run_prefill),
                                 jax.jit(functools.partial(init_state, params=params,
                                                           cache_dtype=self.llm.cfg.dtype)),
                                 jax.jit(run_decode, donate_argnums=(2,)))
        return self._fns[params]

    def generate(self, prompts, *, num_samples: int = 1, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0):
        """prompts: list of token-id arrays [L_i] or embedding arrays [L_i, E] (video spliced).

        Returns numpy (tokens [B*G, T], logprobs [B*G, T], lengths [B*G]); row b*G + g is
        sample g of prompt b; positions past a row's length hold pad_id / 0.
        """
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        embeds = [self.llm.embed_tokens(jnp.asarray(p)) if jnp.asarray(p).ndim == 1 else
                  jnp.asarray(p) for p in prompts]
        g = num_samples
        if not self.share_prefix:
            embeds = [e for e in embeds for _ in range(g)]
        params = SamplingParams(max_new_tokens, float(temperature), float(top_p), int(top_k),
                                g if self.share_prefix else 1)
        x, mask = left_pad(embeds, multiple=self.pad_multiple)
        return self.generate_padded(x, mask, params, seed=seed, rows=len(prompts) * g)

    @property
    def pad_multiple(self) -> int:
        """Prompt lengths must be multiples of this (2 x the seq axis) for the ring prefill."""
        n = self.mesh.shape.get(self.axis, 1) if self.mesh is not None else 1
        return 2 * n if n > 1 else 1

    def generate_padded(self, x, mask, params: SamplingParams, *, seed: int = 0, rows=None):
        """Like `generate` for prompts already left padded: x [B, Lp, E], mask [B, Lp] (Lp a
        multiple of `pad_multiple`). Returns numpy (tokens, logprobs, lengths) of B*G rows, the
        whole batch on every process. Profiler traces name the phases prefill and decode."""
        if x.shape[1] % self.pad_multiple:
            raise ValueError(f"padded prompt length {x.shape[1]} is not a multiple of "
                             f"{self.pad_multiple} (2 x the '{self.axis}' axis)")
        rows = x.shape[0] * params.num_samples if rows is None else rows
        run_prefill, run_init, run_decode = self._compiled(params)
        state = nnx.state(self.llm)
        with jax.profiler.TraceAnnotation("prefill"):
            prefix = run_prefill(state, x, mask)
        base = jax.random.key(seed)
        row_keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.arange(rows))
        with jax.profiler.TraceAnnotation("decode"):
            out = run_decode(state, prefix, run_init(prefix), row_keys)
            t = params.max_new_tokens
            return (host_array(out.tokens).reshape(rows, t),
                    host_array(out.logprobs).reshape(rows, t), host_array(out.lengths).reshape(rows))
