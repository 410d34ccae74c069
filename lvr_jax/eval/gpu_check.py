"""The one-GPU check (launch/gpu_check.py): what the hot paths reach on the device at hand.

Sections (each timed after a warm-up call, median of `repeats`; compile time not counted; a
section that fails records its error and the others still run):
  device     backend, device kind, cuDNN version
  sub_block  one attention sub-block [B, L, H, KVH, D], causal: the ring's tiled einsum blocks
             (`sharding.ring_blocks`: forward fold, backward block), the ring's fused blocks
             (`sharding.fused_blocks`: cuDNN on a GPU, its XLA stand-in on CPU; segment dims
             added, global statistics in the backward) and plain
             `jax.nn.dot_product_attention`, forward and forward+backward, TFLOP/s (FLOPs by
             formula) and compiled temp bytes; the fused blocks' relative error to the einsum
             ones (output, dQ, dK, dV): the check that the cuDNN path computes what the CPU
             tests prove of its contract
  prefill    a Qwen2 prefill of one prompt (`Qwen2.prefill`, one device), MFU with the model
             FLOPs counted by formula (`qwen2_flops`), not by cost_analysis
  decode     ms per decode step for G branches against a prefix (`Sampler.compiled`; the prefix
             through the einsum partials, `AttentionOptions.prefix_kernel`), and the ratio to
             one read of the bf16 weights + prefix K/V from HBM
  grpo       the phases of one GRPO step of a VLM (encode, prompts, rollout, reference, update)
Peak device numbers come from `PEAKS` (bf16 dense TFLOP/s, HBM bytes/s) by device kind; unknown
devices get no MFU. `CPU_SMOKE` runs the same code at toy sizes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lvr_jax.eval.flops import qwen2_flops

# device kind (substring, lower case) -> (bf16 dense FLOP/s, HBM bytes/s), vendor figures
PEAKS = {"h200": (989e12, 4.8e12), "h100": (989e12, 3.35e12), "a100": (312e12, 2.0e12)}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each section runs at (GPU defaults: the issue's; see CPU_SMOKE)."""
    llm: str = "qwen2_1p5b"          # configs.common model dicts
    vision: str = "siglip_so400m_448"
    dtype: str = "bfloat16"
    block: tuple = (1, 8192, 28, 4, 128)   # B, L, H, KVH, D
    prefill_tokens: int = 32768
    decode_prefix: int = 16384
    decode_group: int = 8
    decode_steps: int = 64
    grpo_frames: int = 64
    grpo_group: int = 8
    grpo_new_tokens: int = 128
    repeats: int = 3


CPU_SMOKE = Sizes(llm="tiny_llm", vision="tiny_vision", dtype="float32", block=(1, 256, 4, 2, 16),
                  prefill_tokens=256, decode_prefix=128, decode_group=2, decode_steps=4,
                  grpo_frames=4, grpo_group=2, grpo_new_tokens=4, repeats=2)


def timed(fn, *args, repeats: int = 3) -> float:
    """Median seconds of `fn(*args)` after one warm-up call (which also compiles)."""
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def peaks() -> tuple[float | None, float | None]:
    kind = jax.devices()[0].device_kind.lower()
    return next((v for k, v in PEAKS.items() if k in kind), (None, None))


def device_info() -> dict:
    info = {"backend": jax.default_backend(), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "cudnn": None}
    if info["backend"] == "gpu":
        try:
            from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
            info["cudnn"] = check_cudnn_version()
        except Exception as e:  # noqa: BLE001 - a version we cannot read is reported as such
            info["cudnn"] = f"unknown ({type(e).__name__})"
    return info


def _temp_bytes(fn, *args) -> int:
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def sub_block(sizes: Sizes) -> dict:
    """Causal attention on one sub-block: the ring's tiled einsum vs the fused kernel."""
    from lvr_jax.models.attention import fused_implementation
    from sharding import fused_blocks
    from sharding.ring_blocks import KEY_TILE, bwd_block, fwd_block, group_heads

    b, length, h, kvh, d = sizes.block
    dtype = jnp.dtype(sizes.dtype)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, length, h, d)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((b, length, kvh, d)), dtype) for _ in range(2))
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    seg = jnp.zeros((b, length), jnp.int32)
    scale, g = d ** -0.5, h // kvh

    def einsum_fwd(q, k, v):
        init = (jnp.full((b, kvh, g, length), -jnp.inf, jnp.float32),
                jnp.zeros((b, kvh, g, length), jnp.float32),
                jnp.zeros((b, kvh, g, length, d), jnp.float32))
        return fwd_block(init, group_heads(q, kvh), k, v, pos, seg, pos, seg, True, scale,
                         KEY_TILE)

    def einsum_bwd(q, k, v, do, lse, delta):
        acc = (jnp.zeros((b, length, kvh, g, d), jnp.float32),
               jnp.zeros((b, length, kvh, d), jnp.float32), jnp.zeros((b, length, kvh, d),
                                                                       jnp.float32))
        return bwd_block(acc, group_heads(q, kvh), k, v, group_heads(do, kvh), lse, delta, pos,
                         seg, pos, seg, True, scale, KEY_TILE)

    impl = fused_implementation("auto", dtype)

    def fused_fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    def fused_grad(q, k, v):
        return jax.grad(lambda q, k, v: jnp.sum(fused_fwd(q, k, v).astype(jnp.float32)),
                        argnums=(0, 1, 2))(q, k, v)

    kernel = fused_blocks.kernel_for("auto", dtype)
    kernel = "xla" if kernel == "tiled" else kernel

    def ring_fwd(q, k, v):
        init = (jnp.full((b, kvh, g, length), -jnp.inf, jnp.float32),
                jnp.zeros((b, kvh, g, length), jnp.float32),
                jnp.zeros((b, kvh, g, length, d), jnp.float32))
        return fused_blocks.fwd_block(init, group_heads(q, kvh), k, v, seg, seg, kernel=kernel,
                                      scale=scale, diag=True)

    def ring_bwd(q, k, v, o, lse, do):
        acc = (jnp.zeros((b, length, kvh, g, d), jnp.float32),
               jnp.zeros((b, length, kvh, d), jnp.float32), jnp.zeros((b, length, kvh, d),
                                                                       jnp.float32))
        return fused_blocks.bwd_block(acc, group_heads(q, kvh), k, v, group_heads(o, kvh), lse,
                                      group_heads(do, kvh), seg, seg, kernel=kernel, scale=scale,
                                      diag=True)

    # real statistics for the backward runs, and the fused blocks' error against the einsum ones
    m, l_sum, acc = jax.jit(einsum_fwd)(q, k, v)
    o = (acc / l_sum[..., None]).transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(dtype)
    lse = m + jnp.log(l_sum)
    do = jnp.asarray(rng.standard_normal(q.shape), dtype)
    delta = jnp.einsum("bqhgd,bqhgd->bhgq", group_heads(do, kvh).astype(jnp.float32),
                       group_heads(o, kvh).astype(jnp.float32))
    _, fl, facc = jax.jit(ring_fwd)(q, k, v)
    grads = jax.jit(einsum_bwd)(q, k, v, do, lse, delta)
    fgrads = jax.jit(ring_bwd)(q, k, v, o, lse, do)
    errors = {"output": _rel(facc / fl[..., None], acc / l_sum[..., None])}
    errors.update({n: _rel(a, e) for n, a, e in zip(("dq", "dk", "dv"), fgrads, grads)})
    fwd_flops = 2.0 * b * h * length * length * d      # causal: half of 4 B H L^2 D
    out = {"shape": list(sizes.block), "dtype": sizes.dtype, "fused_implementation": impl,
           "ring_kernel": kernel, "ring_fused_rel_err": errors,
           "forward_gflop": fwd_flops / 1e9, "forward_backward_gflop": 3.5 * fwd_flops / 1e9}
    runs = {"einsum_forward": (jax.jit(einsum_fwd), (q, k, v)),
            "einsum_backward": (jax.jit(einsum_bwd), (q, k, v, do, lse, delta)),
            "ring_fused_forward": (jax.jit(ring_fwd), (q, k, v)),
            "ring_fused_backward": (jax.jit(ring_bwd), (q, k, v, o, lse, do)),
            "fused_forward": (jax.jit(fused_fwd), (q, k, v)),
            "fused_forward_backward": (jax.jit(fused_grad), (q, k, v))}
    for name, (fn, args) in runs.items():
        out[f"{name}_s"] = timed(fn, *args, repeats=sizes.repeats)
        out[f"{name}_temp_bytes"] = _temp_bytes(fn, *args)
    for kind in ("einsum", "ring_fused"):
        out[f"{kind}_forward_backward_s"] = out[f"{kind}_forward_s"] + out[f"{kind}_backward_s"]
    for kind in ("einsum", "ring_fused", "fused"):
        out[f"{kind}_forward_tflops"] = fwd_flops / out[f"{kind}_forward_s"] / 1e12
        out[f"{kind}_forward_backward_tflops"] = (3.5 * fwd_flops
                                                  / out[f"{kind}_forward_backward_s"] / 1e12)
    out["fused_speedup_forward_backward"] = (out["einsum_forward_backward_s"]
                                             / out["fused_forward_backward_s"])
    out["ring_fused_speedup_forward_backward"] = (out["einsum_forward_backward_s"]
                                                  / out["ring_fused_forward_backward_s"])
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _llm(sizes: Sizes):
    from configs import common
    from lvr_jax.models.qwen2 import Qwen2, Qwen2Config
    from flax import nnx

    dtype = jnp.dtype(sizes.dtype)
    cfg = Qwen2Config(**getattr(common, sizes.llm)(), dtype=dtype, param_dtype=dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda s: 0.02 * jax.random.normal(jax.random.key(0), s.shape, s.dtype),
                         state)
    return cfg, nnx.merge(graphdef, state)


def prefill(sizes: Sizes) -> dict:
    from flax import nnx

    cfg, llm = _llm(sizes)
    t = sizes.prefill_tokens
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, t, cfg.hidden_size)) * 0.02,
                    cfg.dtype)
    mask = jnp.ones((1, t), bool)
    graphdef, state = nnx.split(llm)
    fn = jax.jit(lambda s, x, m: nnx.merge(graphdef, s).prefill(x, m).logits)
    seconds = timed(fn, state, x, mask, repeats=sizes.repeats)
    flops = qwen2_flops(cfg, t)
    peak, _ = peaks()
    return {"tokens": t, "seconds": seconds, "model_tflop": flops / 1e12,
            "tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak if peak else None,
            "temp_bytes": int(fn.lower(state, x, mask).compile().memory_analysis()
                              .temp_size_in_bytes)}


def decode(sizes: Sizes) -> dict:
    from flax import nnx

    from lvr_jax.rollout.sampler import Sampler, SamplingParams

    cfg, llm = _llm(sizes)
    s, g, steps = sizes.decode_prefix, sizes.decode_group, sizes.decode_steps
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, s, cfg.hidden_size)) * 0.02,
                    cfg.dtype)
    mask = jnp.ones((1, s), bool)
    sampler = Sampler(llm)            # no stop ids: every branch decodes all the steps
    run_prefill, run_init, run_decode = sampler.compiled(SamplingParams(
        max_new_tokens=steps, temperature=1.0, num_samples=g))
    state = nnx.state(llm)
    prefix = jax.block_until_ready(run_prefill(state, x, mask))
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(0), r))(jnp.arange(g))
    seconds = timed(lambda: run_decode(state, prefix, run_init(prefix), keys),
                    repeats=sizes.repeats)
    hlo = run_decode.lower(state, prefix, jax.eval_shape(run_init, prefix), keys).compile().as_text()
    layer_kv = (1, cfg.num_kv_heads, s, cfg.head_dim)          # one layer's prefix K or V
    param_bytes = sum(2 * x.size for x in jax.tree.leaves(state))          # bf16 weights
    kv_bytes = 2 * 2 * cfg.num_layers * s * cfg.num_kv_heads * cfg.head_dim  # bf16 K and V
    _, hbm = peaks()
    ideal = (param_bytes + kv_bytes) / hbm if hbm else None
    per_step = seconds / steps
    return {"prefix": s, "group": g, "steps": steps, "ms_per_step": 1e3 * per_step,
            "hbm_read_ms": 1e3 * ideal if ideal else None,
            "vs_hbm_read": per_step / ideal if ideal else None,
            "prefix_copies_in_loop": loop_writes(hlo, prefix.k.dtype, layer_kv)}


FREE_OPS = ("parameter", "get-tuple-element", "bitcast", "tuple", "constant")


def loop_writes(hlo: str, dtype, shape) -> int:
    """Instructions in the while-loop bodies of compiled HLO text (outside fusion bodies) whose
    result is a `dtype` array of `shape` (size-1 dims ignored): in the decode loop, each a layer's
    prefix K or V written out every step (the layer scan's slice of the stacked prefix) rather
    than read where it is; 0 where the consumers read the slice in place."""
    name = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}[jnp.dtype(dtype).name]
    want = [d for d in shape if d != 1]
    bodies = set(re.findall(r"body=(%[\w.\-]+)", hlo))
    count, inside = 0, False
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?(%[\w.\-]+) .*\{$", line)
        if head:
            inside = head.group(1) in bodies
            continue
        op = re.match(r"\s+(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\](?:\{[^}]*\})? ([\w-]+)\(", line)
        if inside and op and op.group(1) == name and op.group(3) not in FREE_OPS:
            count += [int(d) for d in op.group(2).split(",") if d and int(d) != 1] == want
    return count


def grpo(sizes: Sizes) -> dict:
    """Phases of one GRPO step (the trainer's compiled functions) on random weights and data."""
    from flax import nnx
    import optax

    from configs import common
    from lvr_jax.models.vlm import encode_batch, init_vlm, make_prompts, vlm_config_from
    from lvr_jax.rl.grpo import GRPOSettings
    from lvr_jax.rollout.sampler import Sampler, SamplingParams
    from lvr_jax.train.grpo import grpo_update, logprobs_under

    model_cfg = common.model_config(getattr(common, sizes.llm)(), getattr(common, sizes.vision)(),
                                    dtype=sizes.dtype, param_dtype="float32", remat=True)
    cfg = vlm_config_from(model_cfg)
    cfg = dataclasses.replace(cfg, video_token_id=3, newline_token_id=4)
    model = init_vlm(cfg, 0)
    opt = nnx.Optimizer(model, optax.adamw(1e-6), wrt=nnx.Param)
    px, f, g, t = cfg.vision.image_size, sizes.grpo_frames, sizes.grpo_group, sizes.grpo_new_tokens
    rng = np.random.default_rng(3)
    frames = jnp.asarray(rng.uniform(-1, 1, (1, f, px, px, 3)), jnp.float32)
    ids = rng.integers(10, 1000, (1, 64)).astype(np.int32)
    ids[0, 5] = 3
    ids, attn = jnp.asarray(ids), jnp.ones((1, 64), jnp.int32)
    out, times = {"frames": f, "group": g, "new_tokens": t}, {}

    def phase(name, fn, *args):
        t0 = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        times[name] = time.perf_counter() - t0
        return result

    sampler = Sampler(model)
    params = SamplingParams(max_new_tokens=t, temperature=1.0, num_samples=g)
    settings = GRPOSettings(dual_clip=3.0)
    for run in ("warm-up", "timed"):
        feats = phase("encode", encode_batch, model, frames)
        prompt = phase("prompts", make_prompts, model, feats, ids, attn)
        tokens, old, _ = phase("rollout", sampler.generate_padded, prompt, None, params)
        responses = jnp.asarray(tokens.reshape(1, g, t))
        ref = phase("reference", logprobs_under, model, feats, ids, attn, responses, 1.0)
        adv = jnp.asarray(rng.standard_normal(g), jnp.float32)
        resp_mask = jnp.ones((g, t), bool)
        phase("update", grpo_update, model, opt, feats, ids, attn, responses, resp_mask,
              jnp.asarray(old), ref.reshape(g, t), adv, settings)
        out[run] = dict(times)
    out["step_s"] = sum(out["timed"].values())
    return out


SECTIONS = {"sub_block": sub_block, "prefill": prefill, "decode": decode, "grpo": grpo}


def run_checks(sizes: Sizes, out: str | Path, sections=tuple(SECTIONS), log=print) -> dict:
    """Every section asked for; `<out>/gpu_check.json` holds the results (errors included) and
    `<out>/gpu_check.md` their report, both rewritten after each section (a run cut short keeps
    what it measured)."""
    from lvr_jax.eval.gpu_check_report import table

    result = {"device": device_info(), "sizes": dataclasses.asdict(sizes)}
    log(f"[gpu_check] {result['device']}")
    Path(out).mkdir(parents=True, exist_ok=True)
    for name in sections:
        t0 = time.perf_counter()
        try:
            result[name] = SECTIONS[name](sizes)
        except Exception as e:  # noqa: BLE001 - one failing section must not cost the others
            result[name] = {"error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc()[-2000:]}
        result[name]["section_s"] = time.perf_counter() - t0   # compiles included
        log(f"[gpu_check] {name} ({result[name]['section_s']:.0f}s): "
            f"{json.dumps({k: v for k, v in result[name].items() if k != 'traceback'})}")
        (Path(out) / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
        (Path(out) / "gpu_check.md").write_text(table(result))
    return result
