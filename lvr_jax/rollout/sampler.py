"""Jitted KV-cache sampler: one prefill per prompt, G branches decoding against a shared prefix.

The decode loop only; the layers run in the model (`Qwen2.prefill` / `Qwen2.extend`). Data flow
(DESIGN.md, MR-SP point 3):
  * prefill: the B prompts (left padded; positions from the mask; padding = segment -1) run once
    through the LLM, sequence-parallel (zigzag ring) under a layout with a ring axis. The
    per-layer K/V stay in the ring's order and sharding: the prefix cache, heads-first
    [layers, B, KVH, Lp, D] (what each decode step's einsum partials read in place).
  * decode: G branches per prompt (`Qwen2.extend` with one token): each step's attention merges
    the query against the prefix (combined over its shards) and the branch's own response cache
    [layers, B, G, T, KVH, D].
  * a `lax.while_loop` over steps with the state as a donated argument; per-step keys
    fold_in(fold_in(seed, row), step) with row = b * G + g, so sharing the prefix or repeating
    prompts draws the same samples.
Returned logprobs are log-softmax(logits / temperature) of the chosen tokens (the distribution
before top-k / top-p filtering, as verl computes old log-probs); 0 after a branch stopped.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from lvr_jax.models.qwen2 import Prefix, left_pad
from sharding.mesh import UNSHARDED, Layout
from sharding.multihost import host_array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0     # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0               # 0 = off
    num_samples: int = 1         # G branches per prompt

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got "
                             f"{self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


@struct.dataclass
class DecodeState:
    """Loop state (donated): response caches heads-first [layers, B, G, KVH, T, D] (what
    `Qwen2.extend` reads in place), tokens / logprobs
    [B, G, T], done flags and lengths [B, G], current step and next-token logits [B, G, V]."""
    step: jax.Array
    k: jax.Array
    v: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    done: jax.Array
    lengths: jax.Array
    logits: jax.Array


def decode_step(llm, prefix: Prefix, state: DecodeState, token, layout: Layout):
    """Feed `token` [B, G] at `state.step`; returns (next logits [B, G, V], new k, v caches)."""
    hidden, (k_new, v_new) = llm.extend(prefix, token[..., None], cache=(state.k, state.v),
                                        step=state.step, layout=layout)
    put = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        cache, new.astype(cache.dtype), state.step, 4)
    k, v = put(state.k, k_new), put(state.v, v_new)
    return llm.head(hidden[:, :, 0]), k, v


def filter_logits(logits, temperature: float, top_k: int, top_p: float):
    """Scaled logits with everything outside top-k / the top-p nucleus set to -inf."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:              # k >= the vocabulary keeps every token
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(order, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                    # mass of better tokens
        cutoff = jnp.min(jnp.where(before < top_p, order, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def first_argmax(x, top=None):
    """`jnp.argmax(x, axis=-1)` (the first maximum; a NaN counts as the maximum) as two plain
    reductions: XLA:CPU runs argmax's variadic (value, index) reduce several times slower (in a
    profile of the tiny model's decode step, its slowest single op). `top`: the row maxima
    [..., 1] when already at hand."""
    top = jnp.max(x, axis=-1, keepdims=True) if top is None else top   # NaN where a row has one
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where((x == top) | jnp.isnan(x), index, x.shape[-1]), axis=-1)


def categorical(keys, logits):
    """`jax.vmap(jax.random.categorical)(keys, logits)` for rows [N, V] (the same Gumbel-max
    draws), through `first_argmax`."""
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:], logits.dtype))(keys)
    return first_argmax(gumbel + logits)


def choose(logits, keys, params: SamplingParams):
    """Sample (or argmax) one token per row; returns (tokens, logprobs of the scaled dist)."""
    if params.temperature == 0:     # the max's log-prob: -log sum exp(logits - max), no gather
        top = jnp.max(logits, axis=-1, keepdims=True)
        lse = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
        return first_argmax(logits, top).astype(jnp.int32), -lse
    filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p)
    tok = categorical(keys, filtered.reshape(-1, logits.shape[-1])).reshape(logits.shape[:-1])
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
           stop_seqs, pad_id: int, layout: Layout = UNSHARDED) -> DecodeState:
    """While-loop decode until every branch stopped or max_new_tokens. The last token is chosen
    after the loop: no layer runs for the logits that would follow it."""
    eos = jnp.asarray(eos_ids, jnp.int32)

    def record(s):
        """Choose the token at `s.step` from `s.logits` and write it down."""
        keys = jax.vmap(lambda k: jax.random.fold_in(k, s.step))(row_keys)
        tok, lp = choose(s.logits, keys, params)
        tok = jnp.where(s.done, pad_id, tok)
        lp = jnp.where(s.done, 0.0, lp)
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[..., None], s.step, axis=2)
        logprobs = jax.lax.dynamic_update_slice_in_dim(s.logprobs, lp[..., None], s.step, axis=2)
        lengths = s.lengths + (~s.done).astype(jnp.int32)
        done = s.done | jnp.isin(tok, eos) | _stopped(tokens, s.step, stop_seqs)
        return s.replace(tokens=tokens, logprobs=logprobs, done=done, lengths=lengths), tok

    def cond(s):
        return (s.step < params.max_new_tokens - 1) & ~jnp.all(s.done)

    def body(s):
        s, tok = record(s)
        logits, k, v = decode_step(llm, prefix, s, tok, layout)
        return s.replace(step=s.step + 1, k=k, v=v, logits=logits)

    # once every branch stopped, the last record writes what the tokens already hold (pad, 0)
    s, _ = record(jax.lax.while_loop(cond, body, state))
    return s.replace(step=s.step + 1)


def init_state(prefix: Prefix, params: SamplingParams, cache_dtype,
               layout: Layout = UNSHARDED, pad_id: int = 0) -> DecodeState:
    """The decode loop's start: empty response caches, their branches split as `extend` splits
    them (the layout's `branches`), the prefix's first-token logits for every branch, and tokens
    all `pad_id` (what the steps a loop that stops early never runs must hold)."""
    layers, b, d = prefix.k.shape[0], prefix.k.shape[1], prefix.k.shape[-1]
    g, t = params.num_samples, params.max_new_tokens
    cache = layout.constrain(jnp.zeros((layers, b, g, prefix.kv_heads, t, d), cache_dtype),
                             (None, "batch", "branches", None, None, None))
    logits = jnp.broadcast_to(prefix.logits[:, None], (b, g, prefix.logits.shape[-1]))
    return DecodeState(step=jnp.zeros((), jnp.int32), k=cache, v=cache,
                       tokens=jnp.full((b, g, t), pad_id, jnp.int32),
                       logprobs=jnp.zeros((b, g, t), jnp.float32), done=jnp.zeros((b, g), bool),
                       lengths=jnp.zeros((b, g), jnp.int32), logits=logits)


@functools.partial(jax.jit, static_argnums=1)
def _row_keys(base, rows: int):
    """fold_in(base, row) for rows 0..rows-1 (one compiled call, not a trace per call)."""
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.arange(rows))


def left_pad_ids(prompts, multiple: int = 1):
    """Token-id prompts [L_i] -> numpy (ids [B, Lp] left padded with 0, mask [B, Lp]); Lp the
    longest length rounded up to `multiple` (what `left_pad` does, on the host)."""
    prompts = [np.asarray(p) for p in prompts]
    if any(p.size == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = -(-max(p.shape[0] for p in prompts) // multiple) * multiple
    ids = np.zeros((len(prompts), longest), np.int32)
    mask = np.zeros((len(prompts), longest), bool)
    for i, p in enumerate(prompts):
        ids[i, longest - p.shape[0]:] = p
        mask[i, longest - p.shape[0]:] = True
    return ids, mask


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: eos, <|im_end|>, <|endoftext|> when present."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
           tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    return sorted(i for i in ids if isinstance(i, int) and 0 <= i != tokenizer.unk_token_id)


class Sampler:
    """Generate G responses per prompt from a Qwen2 (or a VLM's `.llm`) with a shared prefix.

    `mesh` + `rules` (logical-axis rules, default `sharding.mesh.DEFAULT_RULES`): with a ring
    axis the prefill is the zigzag ring and the prefix cache stays sharded. `share_prefix=False`
    repeats every prompt G times instead (the baseline).
    """

    def __init__(self, model, mesh=None, *, rules=None, eos_ids=(), stop_token_seqs=(),
                 pad_id: int = 0, share_prefix: bool = True):
        self.llm = getattr(model, "llm", model)
        self.layout = Layout.of(mesh, rules)
        self.share_prefix = share_prefix
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.stop_seqs = tuple(tuple(int(t) for t in s) for s in stop_token_seqs)
        self.pad_id = pad_id
        self._fns = {}

    @classmethod
    def for_tokenizer(cls, model, mesh, tokenizer, **kw) -> Sampler:
        """A sampler that stops at the tokenizer's `stop_ids` and pads finished rows with its pad
        id (else the first stop id)."""
        eos = stop_ids(tokenizer)
        pad = tokenizer.pad_token_id
        pad = pad if pad is not None else (eos[0] if eos else 0)
        return cls(model, mesh, eos_ids=eos, pad_id=int(pad), **kw)

    def compiled(self, params: SamplingParams):
        """(prefill, init_state, decode) jitted for `params`: prefill(llm_state, x, mask) ->
        Prefix; init_state(prefix) -> DecodeState; decode(llm_state, prefix, state, row_keys)
        -> DecodeState (the state donated)."""
        if params not in self._fns:
            graphdef, _ = nnx.split(self.llm)
            layout = self.layout

            def run_prefill(state, embeds, mask):
                return nnx.merge(graphdef, state).prefill(embeds, mask, layout=layout)

            def run_decode(state, prefix, dstate, row_keys):
                return decode(nnx.merge(graphdef, state), prefix, dstate, row_keys, params,
                              self.eos_ids, self.stop_seqs, self.pad_id, layout)

            self._fns[params] = (jax.jit(run_prefill),
                                 jax.jit(functools.partial(init_state, params=params,
                                                           cache_dtype=self.llm.cfg.dtype,
                                                           layout=layout, pad_id=self.pad_id)),
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
        g = num_samples
        if not self.share_prefix:
            prompts = [p for p in prompts for _ in range(g)]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=float(temperature),
                                top_p=float(top_p), top_k=int(top_k),
                                num_samples=g if self.share_prefix else 1)
        multiple = self.layout.pad_multiple
        if all(np.ndim(p) == 1 for p in prompts):   # token ids: padded here, embedded in one call
            ids, mask = left_pad_ids(prompts, multiple)
            x, mask = self.llm.embed_tokens(jnp.asarray(ids)), jnp.asarray(mask)
        else:
            x, mask = left_pad([self.llm.embed_tokens(jnp.asarray(p)) if np.ndim(p) == 1 else
                                jnp.asarray(p) for p in prompts], multiple=multiple)
        return self.generate_padded(x, mask, params, seed=seed,
                                    rows=len(prompts) * params.num_samples)

    def generate_padded(self, x, mask, params: SamplingParams, *, seed: int = 0, rows=None):
        """Like `generate` for prompts already left padded: x [B, Lp, E], mask [B, Lp] (Lp a
        multiple of the layout's `pad_multiple`). Returns numpy (tokens, logprobs, lengths) of
        B*G rows, the whole batch on every process. Profiler traces name the phases prefill and
        decode."""
        multiple = self.layout.pad_multiple
        if x.shape[1] % multiple:
            raise ValueError(f"padded prompt length {x.shape[1]} is not a multiple of {multiple} "
                             f"(2 x the '{self.layout.seq_axis}' axis)")
        rows = x.shape[0] * params.num_samples if rows is None else rows
        run_prefill, run_init, run_decode = self.compiled(params)
        state = nnx.state(self.llm)
        with jax.profiler.TraceAnnotation("prefill"):
            prefix = run_prefill(state, x, mask)
        row_keys = _row_keys(jax.random.key(seed), rows)
        with jax.profiler.TraceAnnotation("decode"):
            out = run_decode(state, prefix, run_init(prefix), row_keys)
            t = params.max_new_tokens
            return (host_array(out.tokens).reshape(rows, t),
                    host_array(out.logprobs).reshape(rows, t), host_array(out.lengths).reshape(rows))
