"""FLOPs by formula (2 per multiply-add, matmuls only): what the compiled programs execute, for
the benchmarks (`bench_step`, `bench_prefill`, `gpu_check`).

`compiled.cost_analysis()` counts the body of a loop once: the scanned layer stack (one layer of
N), the ring's steps and key tiles (`fori_loop`), the decode `while_loop` (one step). Totals
therefore come from these formulas; `unrolled_loops` makes scans and fori loops unroll while a
program is traced, so that `cost_analysis` of the unrolled program can check them
(tests/test_bench_grpo_step.py, within 5% at a size where matmuls dominate: the formulas leave
out elementwise work such as norms, softmax and the optimizer).

Attention is counted as executed: dense attention scores every (query, key) pair, masked or not;
the zigzag ring computes 2n + 1 of its 4n (query chunk, key chunk) sub-blocks per device (n = 1:
3 of 4, a causal one-device ring); branch attention (`attention.branch_attention`) scores each
response query against the whole padded prefix, the whole response cache and the T new keys.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax

from lvr_jax.models.projector import projector_dims
from sharding.sequence_parallel import padded_length

# backward / forward FLOP ratios (without remat): autodiff of two matmuls per pair is four more;
# the ring's custom VJP recomputes the scores first (five matmuls per pair)
DENSE_BWD, RING_BWD, MATMUL_BWD = 2.0, 2.5, 2.0
# elementwise FLOPs per trainable parameter of one optimizer update (global-norm clipping, the
# finiteness check, AdamW with weight decay): cost_analysis of train.state.make_optimizer's
# chain gave 25.3 per parameter at the test size; negligible at 7B scale
OPTIMIZER_PER_PARAM = 25.0


def qwen2_flops(cfg, tokens: int, *, causal: bool = True, logits: int = 1) -> float:
    """Forward FLOPs of a Qwen2 over one sequence of `tokens` (2 per multiply-add): the layer
    matmuls, attention (QK^T and PV; half under a causal mask) and `logits` rows of the head.
    Model FLOPs (useful work), as MFU counts them."""
    attention = 4.0 * tokens * tokens * cfg.num_heads * cfg.head_dim * (0.5 if causal else 1.0)
    return layer_flops(cfg, tokens) + cfg.num_layers * attention + head_flops(cfg, logits)


def layer_flops(cfg, tokens: int) -> float:
    """Matmuls of all decoder layers (q, k, v, o projections and the gated MLP) over `tokens`."""
    e, m, q = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * 2.0 * tokens * (e * q + 2 * e * kv + q * e + 3 * e * m)


def llm_params(cfg) -> int:
    """Parameters of a Qwen2 (embedding, untied head, norms, layers with q/k/v biases)."""
    e, m, q = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    layer = 2 * e + e * q + q + 2 * (e * kv + kv) + q * e + 3 * e * m
    return (1 if cfg.tie_word_embeddings else 2) * cfg.vocab_size * e + e + cfg.num_layers * layer


def attention_flops(cfg, pairs: float) -> float:
    """QK^T and PV over `pairs` (query, key) pairs, all heads and layers."""
    return cfg.num_layers * 4.0 * pairs * cfg.num_heads * cfg.head_dim


def head_flops(cfg, rows: int) -> float:
    return 2.0 * rows * cfg.hidden_size * cfg.vocab_size


def ring_pairs(length: int, n: int, key_tile: int) -> float:
    """(query, key) pairs the zigzag ring of n devices scores over a prompt of `length` tokens
    (padded to 2n): n (2n + 1) sub-blocks of c x c, c = padded / 2n, keys in tiles (the last
    tile shifted back, so each sub-block scores ceil(c / tile) * tile keys)."""
    c = padded_length(length, n) // (2 * n)
    tile = min(key_tile, c)
    return n * (2 * n + 1) * c * tile * math.ceil(c / tile)


def prompt_pairs(length: int, attention: tuple) -> float:
    """Pairs of the prompt attention `attention` = ("dense", 1) or ("ring", n, key_tile)."""
    if attention[0] == "dense":
        return float(length) * length
    return ring_pairs(length, attention[1], attention[2])


def branch_pairs(t: int, prefix: int, cache: int, chunk: int) -> float:
    """Pairs of `t` branch queries (padded to a multiple of `chunk` when longer) against a
    prefix of `prefix` keys, `cache` cached keys and the t new keys."""
    tq = t if t <= chunk else math.ceil(t / chunk) * chunk
    return tq * (prefix + cache + t)


def siglip_flops(vcfg, frames: int) -> float:
    """SigLIP over `frames` images: patch embedding and the `layers_run` encoder layers (q, k, v,
    o, MLP; attention over all patches)."""
    n, e, m = vcfg.grid * vcfg.grid, vcfg.hidden_size, vcfg.intermediate_size
    patch = 2.0 * n * vcfg.patch_size * vcfg.patch_size * 3 * e
    layer = 2.0 * n * (4 * e * e + 2 * e * m) + 4.0 * n * n * e
    return frames * (patch + vcfg.layers_run * layer)


def projector_flops(cfg, frames: int) -> float:
    """The projector's linears over `frames` frames of merged patches."""
    factor, layers = projector_dims(cfg.projector_type, cfg.vision.hidden_size,
                                    cfg.llm.hidden_size)
    side = -(-cfg.vision.grid // factor)
    return frames * side * side * sum(2.0 * din * dout for _, what, din, dout in layers
                                      if what == "linear")


def prefill_flops(cfg, rows: int, length: int, attention: tuple) -> float:
    """`Qwen2.prefill` of `rows` prompts of `length` (padded) tokens: layers, attention, the
    head at the last position."""
    return (layer_flops(cfg, rows * length) + attention_flops(cfg, rows * prompt_pairs(
        length, attention)) + head_flops(cfg, rows))


def decode_flops(cfg, rows: int, prefix: int, steps: int, chunk: int) -> float:
    """`steps` decode steps of `rows` branches against a prefix of `prefix` keys and a cache of
    `steps` entries (the whole cache is scored every step)."""
    per_step = (layer_flops(cfg, rows) + attention_flops(cfg, rows * branch_pairs(
        1, prefix, steps, chunk)) + head_flops(cfg, rows))
    return steps * per_step


def shared_forward(cfg, prompts: int, group: int, length: int, t: int, attention: tuple,
                   chunk: int) -> dict:
    """`rl.policy.response_logprobs`: prefill once per prompt, G branches of t - 1 tokens through
    `extend`, head on them. Returns {"matmul", "prompt_attn", "branch_attn", "head"}."""
    rows = prompts * group * (t - 1)
    return {"matmul": layer_flops(cfg, prompts * length + rows),
            "prompt_attn": attention_flops(cfg, prompts * prompt_pairs(length, attention)),
            "branch_attn": attention_flops(cfg, prompts * group * branch_pairs(t - 1, length, 0,
                                                                                chunk)),
            "head": head_flops(cfg, prompts + rows)}


def full_forward(cfg, sequences: int, length: int, t: int, attention: tuple) -> dict:
    """G full sequences (prompt + response, padded `length` tokens each) through
    `Qwen2.forward`, head on the t response positions."""
    return {"matmul": layer_flops(cfg, sequences * length),
            "prompt_attn": attention_flops(cfg, sequences * prompt_pairs(length, attention)),
            "branch_attn": 0.0, "head": head_flops(cfg, sequences * t)}


def backward_total(parts: dict, attention: tuple, remat: bool, chunked: bool) -> float:
    """Forward + backward FLOPs of a forward's parts: matmuls x (1 + 2, + 1 recomputed under
    remat), the prompt's attention x (1 + 2 autodiff, 2.5 for the ring's VJP, + 1 under remat),
    branch attention x (3, + 1 under remat, + 1 when its query chunks are rematerialised), the
    head x 3 (outside the remat)."""
    r = 1.0 if remat else 0.0
    prompt_bwd = DENSE_BWD if attention[0] == "dense" else RING_BWD
    return (parts["matmul"] * (1 + MATMUL_BWD + r) + parts["prompt_attn"] * (1 + prompt_bwd + r)
            + parts["branch_attn"] * (1 + DENSE_BWD + r + (1.0 if chunked else 0.0))
            + parts["head"] * (1 + MATMUL_BWD))


@contextlib.contextmanager
def unrolled_loops():
    """While tracing inside this context, `jax.lax.scan` and `jax.lax.fori_loop` unroll fully
    (layer stacks, ring steps, key tiles), so `cost_analysis()` counts every iteration. Jax's
    trace caches are cleared on entry and exit (no unrolled program is reused outside). Only
    for measuring; `while_loop` (the decode loop) still counts its body once."""
    scan, fori = jax.lax.scan, jax.lax.fori_loop
    jax.lax.scan = functools.partial(scan, unroll=True)
    jax.lax.fori_loop = functools.partial(fori, unroll=True)
    jax.clear_caches()
    try:
        yield
    finally:
        jax.lax.scan, jax.lax.fori_loop = scan, fori
        jax.clear_caches()


def cost_flops(compiled) -> float:
    """FLOPs `cost_analysis()` reports for a compiled program (per device)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def step_flops(cfg, mode: str, *, frames: int, prompts: int, group: int, new_tokens: int,
               text: int, seq: int) -> dict:
    """FLOPs per phase (all devices) of one GRPO step of `eval.bench_step`'s `mode` for a
    VLMConfig `cfg` on a ring of `seq` devices (mrsp modes), plus "step", the sum. Encode counts
    the tower (naive: B*G clips, 3 passes; mrsp: B clips, frames padded to the ring) and the
    rollout's projector; the reference pass and the update count their own projector runs; the
    update also the optimizer on the LLM's parameters (the towers are frozen in GRPO)."""
    llm, opts = cfg.llm, cfg.llm.attention
    naive, t, chunk = mode == "naive", new_tokens, opts.query_chunk
    n = 1 if naive else seq
    attention = ("ring", n, opts.key_tile) if naive or n > 1 else ("dense", 1)
    multiple = 2 if naive else (2 * n if n > 1 else 1)
    up = lambda x: -(-x // multiple) * multiple  # noqa: E731
    length = up(text - 1 + frames * cfg.tokens_per_frame)
    rows = prompts * group
    clips = rows if naive else prompts
    proj = projector_flops(cfg, clips * frames)
    out = {"encode": (3 if naive else 1) * siglip_flops(cfg.vision, clips * up_to(frames, n))
           + proj,
           "prefill": prefill_flops(llm, clips, length, attention),
           "decode": decode_flops(llm, rows, length, t, chunk), "reward": 0.0}
    if mode == "mrsp_shared":
        parts = shared_forward(llm, prompts, group, length, t, attention, chunk)
    else:
        parts = full_forward(llm, rows, up(length + t), t, attention)
    out["reference"] = proj + sum(parts.values())
    out["update"] = (proj + backward_total(parts, attention, bool(llm.remat),
                                           mode == "mrsp_shared" and t - 1 > chunk)
                     + OPTIMIZER_PER_PARAM * llm_params(llm))
    out["step"] = sum(out.values())
    return out


def up_to(frames: int, n: int) -> int:
    """Frames run by the tower after frame-parallel padding to a multiple of n."""
    return -(-frames // n) * n
