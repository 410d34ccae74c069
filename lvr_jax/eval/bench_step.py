"""One whole GRPO step with MR-SP against the naive path (launch/bench_grpo_step.py).

Three modes of the same step (same model, batch and seeds), phases encode, prefill, decode,
reward, reference, update:
  naive        no sequence parallelism (mesh seq = 1, rows and params over fsdp). Every sample
               is its own request: B x G clips, encoded data-parallel (their frames split evenly
               over the devices, `per_sample_features`) and again for every pass (rollout,
               reference, update); the prompt repeated G
               times in the rollout (G prefills, G prefix caches), the reference pass and the
               update (G full sequences through `Qwen2.forward`). Prompt attention: the ring's
               tiled kernel on a ring of one device (memory-efficient causal attention, the
               FlashAttention of the paper's baseline; dense attention would hold L x L scores).
  mrsp         the paper's MR-SP: frames encoded once, frame-parallel over `seq`
               (`models.vlm.encode_batch`) and reused; zigzag ring prefill over `seq`; the
               rollout shares the prompt's prefix among the G samples (the paper's rollout is
               vLLM, whose prefix caching shares it too); G full sequences (ring forward) in the
               reference pass and the update, as Long-RL does.
  mrsp_shared  this project's `train.grpo.grpo_step`: `mrsp` plus the shared prefix in the
               reference pass and the update (`train.grpo.logprobs_under`, `grpo_update`).
The reward is a host-side stand-in (random weights give no answers to grade; same cost in every
mode); no stop tokens, so every sample decodes `new_tokens` tokens.

Settings: "run" times steps of a small model (`run_setting`: median over steps after one
warm-up step, which also compiles and records memory); "compile" only compiles the phases on
abstract, sharded state (`compile_setting`, the 7B config; as `train.memory_plan`). FLOPs are
totals over all devices by formula (`step_flops`, `eval.flops`); peak bytes per device are, per
phase, `memory_analysis()` args + outputs - aliased + temp of each compiled phase function plus
the state that lives through it without being its argument (`Runner.held`), the step's peak the
largest phase.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from lvr_jax.eval import flops as F
from lvr_jax.models.vlm import encode_batch, init_vlm, make_prompts
from lvr_jax.rl.grpo import entropy as token_entropy
from lvr_jax.rl.grpo import group_advantages, grpo_loss, masked_mean, token_logprobs
from lvr_jax.rollout.sampler import Sampler, SamplingParams
from lvr_jax.train.grpo import grpo_update, logprobs_under, optimizer_step
from lvr_jax.train.compiled import compiled_outputs
from lvr_jax.train.memory_plan import place, sds, shard_bytes
from lvr_jax.train.state import BATCH_AXES, replicate_stray_arrays
from sharding.mesh import UNSHARDED, Layout, make_mesh, param_shardings
from sharding.frame_parallel import vision_features
from sharding.multihost import batch_sharding
from sharding.ring_attention import ring_attention_local

MODES = ("naive", "mrsp", "mrsp_shared")
PHASES = ("encode", "prefill", "decode", "reward", "reference", "update")
GIB, MIB = 2 ** 30, 2 ** 20


@dataclasses.dataclass(frozen=True)
class Shape:
    """One step: `prompts` prompts of `text` tokens (one video placeholder) + `frames` frames,
    G = `group` samples of `new_tokens` tokens each."""
    frames: int
    prompts: int = 2
    group: int = 8
    new_tokens: int = 32
    text: int = 64


# ------------------------------------------------------------------------------ the modes


def one_device_ring(mesh, rules, key_tile: int, tie: bool):
    """Prompt attention of the naive mode: the ring's tiled causal kernel on a ring of one device
    (mesh axis `seq` of size 1), rows sharded as the layout's `batch`."""
    layout = Layout.of(mesh, rules)
    local = functools.partial(ring_attention_local, axis_name="seq", key_tile=key_tile,
                              tie_positions=tie)

    def attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        if q_seg is None:
            q_seg = kv_seg = jnp.zeros(q.shape[:2], jnp.int32)
        rows = layout.spec(("batch",), q.shape[:1])[0]
        x, t = P(rows, None, None, None), P(rows, None)
        return jax.shard_map(local, mesh=mesh, in_specs=(x,) * 3 + (t,) * 4, out_specs=x)(
            q, k, v, q_pos, kv_pos, q_seg, kv_seg)

    return attend


def mode_config(cfg, mode: str, mesh, rules=None):
    """The VLMConfig a mode runs: the naive one attends with `one_device_ring`."""
    if mode != "naive":
        return cfg
    a = cfg.llm.attention
    a = dataclasses.replace(a, prompt=one_device_ring(mesh, rules, a.key_tile, a.tie()))
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, attention=a))


@functools.partial(nnx.jit, static_argnames=("multiple",), graph_updates=False)
def left_padded_prompts(model, feats, ids, attn, multiple: int):
    """The naive mode's prompts: spliced and left padded whole (`VLM.rollout_prompts`), not laid
    out for the ring (`make_prompts`)."""
    return model.rollout_prompts(feats, ids, attn, multiple)


def full_logits(model, feats, ids, attn, responses, *, layout=UNSHARDED, multiple: int = 1):
    """G full sequences: logits [R*G, T] predicting responses [R, G, T] after each of the R
    prompts (repeated G times), one `Qwen2.forward` over prompt + response (+ padding to a
    multiple of `multiple`); the head only on the response positions."""
    llm = model.llm
    x, mask = model.rollout_prompts(feats, ids, attn, multiple)
    r, g, t = responses.shape
    lp, tok = x.shape[1], responses.reshape(r * g, t)
    pad = (-(lp + t)) % multiple
    x = jnp.concatenate([jnp.repeat(x, g, axis=0), llm.embed_tokens(tok).astype(x.dtype),
                         jnp.zeros((r * g, pad, x.shape[-1]), x.dtype)], axis=1)
    valid = jnp.concatenate([jnp.repeat(mask, g, axis=0), jnp.ones((r * g, t), bool),
                             jnp.zeros((r * g, pad), bool)], axis=1)
    pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    seg = jnp.where(valid, 0, -1).astype(jnp.int32)
    hidden = llm.forward(x, pos, segment_ids=seg, layout=layout, return_hidden=True)
    return llm.head(hidden[:, lp - 1:lp - 1 + t], layout), tok


@functools.partial(nnx.jit, static_argnames=("temperature", "layout", "multiple"),
                   graph_updates=False)
def full_reference(model, feats, ids, attn, responses, temperature, layout=UNSHARDED,
                   multiple=1):
    """log p [R*G, T] of the responses on G full sequences."""
    logits, tok = full_logits(model, feats, ids, attn, responses, layout=layout, multiple=multiple)
    return token_logprobs(logits.astype(jnp.float32) / temperature, tok)


@functools.partial(nnx.jit, static_argnames=("settings", "layout", "multiple"),
                   donate_argnames=("model", "optimizer"))
def full_update(model, optimizer, feats, ids, attn, responses, resp_mask, old_lp, ref_lp, adv,
                settings, layout=UNSHARDED, multiple=1):
    """`train.grpo.grpo_update` on G full sequences instead of the shared prefix."""
    def loss_fn(model):
        logits, tok = full_logits(model, feats, ids, attn, responses, layout=layout,
                                  multiple=multiple)
        logits = logits.astype(jnp.float32) / settings.temperature
        loss, metrics = grpo_loss(token_logprobs(logits, tok), old_lp, ref_lp, adv, resp_mask,
                                  clip_low=settings.clip_low, clip_high=settings.clip_high,
                                  beta=settings.beta, loss_agg=settings.loss_agg,
                                  dual_clip=settings.dual_clip)
        metrics["entropy"] = masked_mean(token_entropy(logits), resp_mask)
        return loss, metrics

    return optimizer_step(model, optimizer, loss_fn)


@functools.partial(nnx.jit, static_argnames=("layout",), graph_updates=False)
def per_sample_features(model, frames, layout: Layout):
    """Naive encoding: features [R, T, N, C] of clips [R, T, H, W, 3], data-parallel: the R x T
    frames split evenly over the batch's mesh axis (each device encodes its own rows' frames with
    the gathered tower, as a data-parallel trainer would), nothing shared between rows."""
    r, t = frames.shape[:2]
    flat = frames.reshape(r * t, *frames.shape[2:])
    axis = layout.axis("batch")
    feats = (model.vision(flat) if axis is None else
             vision_features(model.vision, flat, mesh=layout.mesh, axis=axis))
    return feats.reshape(r, t, *feats.shape[1:])


def toy_reward(tokens: np.ndarray, lengths: np.ndarray, group: int):
    """Host-side stand-in reward (share of tokens divisible by 7), group advantages, mask."""
    reward = (tokens % 7 == 0).mean(axis=1).astype(np.float32)
    adv = np.asarray(group_advantages(reward, group))
    return np.arange(tokens.shape[1])[None] < lengths[:, None], adv


# ------------------------------------------------------------------------------ one step


class Executor:
    """Runs a step's phase calls: timed (`times`, seconds per phase), and with `memory` each
    call also lowered and compiled for its peak bytes per device (`peaks`) and its
    `cost_analysis()` FLOPs per device (`flops`: loop bodies once, unless traced under
    `flops.unrolled_loops`); `compile_only` returns the compiled outputs' shapes instead."""

    def __init__(self, memory: bool = False, compile_only: bool = False):
        self.memory, self.compile_only = memory or compile_only, compile_only
        self.times, self.peaks, self.flops = defaultdict(float), {}, defaultdict(float)
        self.compile_s = defaultdict(float)

    def __call__(self, phase, fn, *args, held: int = 0, **kw):
        if self.memory:
            t0 = time.perf_counter()
            compiled = fn.lower(*args, **kw).compile()
            self.compile_s[phase] += time.perf_counter() - t0
            m = compiled.memory_analysis()
            peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                    + m.temp_size_in_bytes + held)
            self.peaks[phase] = max(self.peaks.get(phase, 0), int(peak))
            self.flops[phase] += F.cost_flops(compiled)
            if self.compile_only:
                return compiled_outputs(compiled)
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kw))
        self.times[phase] += time.perf_counter() - t0
        return out

    def host(self, phase, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.times[phase] += time.perf_counter() - t0
        return out


class Runner:
    """A mode's model, reference, optimizer and sampler on its mesh (concrete, or abstract for
    compile-only), and `step`, the GRPO step of that mode."""

    def __init__(self, mode, cfg, mesh, shape: Shape, *, tx, wrt, settings, rules=None, seed=0,
                 abstract=False):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes: {MODES}")
        self.mode, self.shape, self.settings = mode, shape, settings
        self.layout = Layout.of(mesh, rules)
        self.multiple = 2 if mode == "naive" else self.layout.pad_multiple
        cfg = mode_config(cfg, mode, mesh, self.layout.table)
        ref_cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, remat=False))
        if abstract:
            def policy():
                from lvr_jax.models.vlm import VLM
                model = VLM(cfg, rngs=nnx.Rngs(seed))
                return model, nnx.Optimizer(model, tx, wrt=wrt), VLM(ref_cfg, rngs=nnx.Rngs(seed))
            self.model, self.opt, self.ref = nnx.eval_shape(policy)
            for m in (self.model, self.opt, self.ref):
                place(m, mesh, self.layout.table)
        else:
            self.model, self.ref = (self._put(init_vlm(c, seed)) for c in (cfg, ref_cfg))
            self.opt = nnx.Optimizer(self.model, tx, wrt=wrt)
            replicate_stray_arrays(self.opt, mesh)     # as train.state.setup: no recompile
        g = 1 if mode == "naive" else shape.group
        self.sampling = SamplingParams(max_new_tokens=shape.new_tokens,
                                       temperature=settings.temperature, num_samples=g)
        self.fns = Sampler(self.model, mesh, rules=self.layout.table).compiled(self.sampling)
        self.bytes = {"policy": shard_bytes(nnx.state(self.model, nnx.Param)),
                      "llm": shard_bytes(nnx.state(self.model.llm, nnx.Param)),
                      "opt": shard_bytes(nnx.state(self.opt)),
                      "ref": shard_bytes(nnx.state(self.ref, nnx.Param))}
        self.bytes["non_llm"] = self.bytes["policy"] - self.bytes["llm"]

    def _put(self, model):
        state = nnx.state(model)
        placed = jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s)), state,
                              param_shardings(state, self.layout.mesh, self.layout.table),
                              is_leaf=lambda x: isinstance(x, nnx.Variable))
        nnx.update(model, placed)
        return model

    def held(self, *names, extra: int = 0) -> int:
        """Bytes per device of persistent state a phase does not take as an argument."""
        return sum(self.bytes[n] for n in names) + extra

    def rows(self) -> int:
        """Rows of this mode's batch: B*G samples (naive) or B prompts."""
        return self.shape.prompts * (self.shape.group if self.mode == "naive" else 1)

    def batch(self, seed: int = 0, abstract: bool = False):
        """(frames [R, T, H, W, 3], ids [R, text], attn) of this mode's rows, placed as the trainer
        places them; the naive rows are each prompt's G copies (same data in every mode)."""
        s, cfg = self.shape, self.model.cfg
        px, r = cfg.vision.image_size, self.rows()
        shapes = {"frames": ((r, s.frames, px, px, 3), jnp.float32),
                  "input_ids": ((r, s.text), jnp.int32), "attention_mask": ((r, s.text), jnp.int32)}
        put = lambda k, x: jax.device_put(x, batch_sharding(  # noqa: E731
            self.layout.mesh, x.shape, self.layout.table, BATCH_AXES[k]))
        if abstract:
            return tuple(jax.ShapeDtypeStruct(shp, dt, sharding=batch_sharding(
                self.layout.mesh, shp, self.layout.table, BATCH_AXES[k]))
                for k, (shp, dt) in shapes.items())
        rng = np.random.default_rng(seed)
        frames = rng.uniform(-1, 1, (s.prompts, s.frames, px, px, 3)).astype(np.float32)
        ids = rng.integers(10, cfg.llm.vocab_size, (s.prompts, s.text)).astype(np.int32)
        ids[:, 5] = cfg.video_token_id
        rep = r // s.prompts
        out = [np.repeat(a, rep, axis=0) for a in (frames, ids, np.ones_like(ids))]
        return tuple(put(k, a) for k, a in zip(shapes, out))

    def features(self, ex, model, frames, held):
        if self.mode == "naive":
            return ex("encode", per_sample_features, model, frames, layout=self.layout, held=held)
        return ex("encode", encode_batch, model, frames, layout=self.layout, held=held)

    def rollout(self, ex, feats, ids, attn, seed: int):
        """Prompts, prefill, decode: (tokens [B*G, T], old log-probs, lengths)."""
        naive = self.mode == "naive"
        held = self.held("opt", "ref")
        x, mask = (ex("encode", left_padded_prompts, self.model, feats, ids, attn, self.multiple,
                      held=held) if naive else
                   (ex("encode", make_prompts, self.model, feats, ids, attn, self.layout,
                       held=held), None))
        run_prefill, run_init, run_decode = self.fns
        llm = nnx.state(self.model.llm)
        held = self.held("opt", "ref", "non_llm", extra=0 if naive else shard_bytes(feats))
        prefix = ex("prefill", run_prefill, llm, x, mask, held=held)
        dstate = ex("decode", run_init, prefix, held=held)
        n, t = self.shape.prompts * self.shape.group, self.shape.new_tokens
        if ex.compile_only:
            keys = sds((n,), jax.random.key(0).dtype, self.layout.mesh)
        else:
            keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(jnp.arange(n))
        out = ex("decode", run_decode, llm, prefix, dstate, keys, held=held + shard_bytes(x))
        if ex.compile_only:
            return (sds((n, t), jnp.int32, self.layout.mesh), sds((n, t), jnp.float32,
                    self.layout.mesh), None)
        return (np.asarray(out.tokens).reshape(n, t), np.asarray(out.logprobs).reshape(n, t),
                np.asarray(out.lengths).reshape(n))

    def learn(self, ex, feats, frames, ids, attn, responses, resp_mask, old_lp, adv):
        """Reference log-probs and the update (naive: features encoded again for each)."""
        g, s, lay = self.shape.group, self.settings, self.layout
        rows = self.shape.prompts * g
        if self.mode == "naive":
            responses = (sds((rows, 1, responses.shape[-1]), jnp.int32, lay.mesh)
                         if ex.compile_only else responses.reshape(rows, 1, -1))
            feats = self.features(ex, self.ref, frames, self.held("policy", "opt"))
        if self.mode == "mrsp_shared":
            ref_lp = ex("reference", logprobs_under, self.ref, feats, ids, attn, responses,
                        s.temperature, layout=lay, held=self.held("policy", "opt"))
        else:
            ref_lp = ex("reference", full_reference, self.ref, feats, ids, attn, responses,
                        s.temperature, layout=lay, multiple=self.multiple,
                        held=self.held("policy", "opt"))
        ref_lp = (sds((rows, responses.shape[-1]), jnp.float32, lay.mesh) if ex.compile_only
                  else ref_lp.reshape(rows, -1))
        if self.mode == "naive":
            feats = self.features(ex, self.model, frames, self.held("opt", "ref"))
        update, kw = ((grpo_update, {}) if self.mode == "mrsp_shared" else
                      (full_update, {"multiple": self.multiple}))
        metrics = ex("update", update, self.model, self.opt, feats, ids, attn, responses,
                     resp_mask, old_lp, ref_lp, adv, s, layout=lay, held=self.held("ref"), **kw)
        return ref_lp, metrics

    def step(self, ex: Executor, batch, seed: int = 0):
        """One GRPO step: encode, rollout, reward, reference, update. Returns the update's
        metrics (None when compiling only)."""
        frames, ids, attn = batch
        feats = self.features(ex, self.model, frames, self.held("opt", "ref"))
        tokens, old_lp, lengths = self.rollout(ex, feats, ids, attn, seed)
        g, t = self.shape.group, self.shape.new_tokens
        mesh = self.layout.mesh
        if ex.compile_only:
            n = self.shape.prompts * g
            resp_mask, adv = sds((n, t), jnp.bool_, mesh), sds((n,), jnp.float32, mesh)
            responses = sds((self.shape.prompts, g, t), jnp.int32, mesh)
        else:
            resp_mask, adv = map(jnp.asarray, ex.host("reward", toy_reward, tokens, lengths, g))
            responses, old_lp = jnp.asarray(tokens.reshape(-1, g, t)), jnp.asarray(old_lp)
        _, metrics = self.learn(ex, feats, frames, ids, attn, responses, resp_mask, old_lp, adv)
        return None if ex.compile_only else {k: float(metrics[k]) for k in ("loss", "grad_norm")}


# ------------------------------------------------------------------------------ settings


def model_setup(config, planned: bool = False):
    """(VLMConfig, optax tx, trainable filter, GRPOSettings, sharding rules) of a config; a
    video token id set when the config leaves it to the tokenizer; `planned`: the ring ties
    positions as on GPUs (`train.memory_plan.planned_config`)."""
    from lvr_jax.models.vlm import vlm_config_from
    from lvr_jax.train import settings
    from lvr_jax.train.memory_plan import planned_config
    from lvr_jax.train.state import make_optimizer, trainable_filter

    cfg = vlm_config_from(config.model)
    if cfg.video_token_id < 0:
        cfg = dataclasses.replace(cfg, video_token_id=3, newline_token_id=4)
    cfg = planned_config(cfg) if planned else cfg
    wrt = trainable_filter(config.train.freeze_vision, config.train.get("freeze_projector", False))
    return (cfg, make_optimizer(config.optim, 1000), wrt, settings.grpo_settings(config),
            settings.sharding_rules(config))


def mode_mesh(config, mode: str, devices=None):
    """The config's mesh (mrsp modes) or all devices on fsdp with seq = 1 (naive)."""
    return make_mesh({"fsdp": -1, "seq": 1} if mode == "naive" else dict(config.mesh), devices)


def row(mode, setting, shape: Shape, cfg, seq, ex: Executor, step_s=None, phases=None, **extra):
    fl = F.step_flops(cfg, mode, seq=seq, **dataclasses.asdict(shape))
    return dict(mode=mode, setting=setting, frames=shape.frames, step_s=step_s, phases_s=phases,
                flops=fl.pop("step"), flops_by_phase=fl,
                peak_bytes_per_device=max(ex.peaks.values()) if ex.peaks else None,
                peak_bytes_by_phase=dict(ex.peaks),
                prompt_tokens=shape.text - 1 + shape.frames * cfg.tokens_per_frame,
                shape=dataclasses.asdict(shape), **extra)


def fixed_inputs(shape: Shape, vocab: int, seed: int = 0):
    """The same rollout for every mode: responses [B, G, T], mask, old log-probs, advantages."""
    rng = np.random.default_rng(seed)
    n, t = shape.prompts * shape.group, shape.new_tokens
    return (jnp.asarray(rng.integers(10, vocab, (shape.prompts, shape.group, t)), jnp.int32),
            jnp.asarray(rng.random((n, t)) < 0.9), jnp.asarray(rng.normal(-6, 0.3, (n, t)),
                                                               jnp.float32),
            jnp.asarray(rng.normal(size=n), jnp.float32))


def run_setting(config, frame_list, *, modes=MODES, steps: int = 3, log=print, **shape_kw):
    """Setting "run": per frame count and mode a fresh model (same seed), one warm-up step
    (compiles; memory per phase), then `steps` timed steps (medians). Before the warm-up, the
    reference pass and the update run once on `fixed_inputs` (row field "fixed": loss, gradient
    norm, mean reference log-prob; equal in every mode up to float error)."""
    cfg, tx, wrt, settings, rules = model_setup(config)
    seq = int(dict(config.mesh).get("seq", 1))
    rows = []
    for frames in frame_list:
        shape = Shape(frames=frames, **shape_kw)
        for mode in modes:
            t0 = time.perf_counter()
            runner = Runner(mode, cfg, mode_mesh(config, mode), shape, tx=tx, wrt=wrt,
                            settings=settings, rules=rules)
            batch = runner.batch(seed=0)
            responses, mask, old, adv = fixed_inputs(shape, cfg.llm.vocab_size)
            ex = Executor()
            feats = runner.features(ex, runner.model, batch[0], 0)
            ref_lp, m = runner.learn(ex, feats, *batch, responses, mask, old, adv)
            fixed = dict(loss=float(m["loss"]), grad_norm=float(m["grad_norm"]),
                         ref_logprob_mean=float(jnp.mean(ref_lp)))
            warm = Executor(memory=True)
            runner.step(warm, batch, seed=0)
            warm_s = time.perf_counter() - t0
            timed = []
            for i in range(steps):
                ex = Executor()
                metrics = runner.step(ex, batch, seed=i + 1)
                timed.append(dict(ex.times))
            phases = {p: statistics.median(t.get(p, 0.0) for t in timed) for p in PHASES}
            step_s = statistics.median(sum(t.values()) for t in timed)
            rows.append(row(mode, "run", shape, cfg, seq, warm, step_s, phases, fixed=fixed,
                            last_metrics=metrics, warmup_s=warm_s))
            log(f"[bench_grpo_step] run {mode:<11} {frames:>4} frames: {step_s:.3f} s/step "
                f"({', '.join(f'{p} {v:.3f}' for p, v in phases.items())}), "
                f"{rows[-1]['flops'] / 1e9:.2f} GFLOP, peak "
                f"{rows[-1]['peak_bytes_per_device'] / MIB:.1f} MiB/device, fixed {fixed} "
                f"[warm-up {warm_s:.0f}s]")
    return rows


def compile_setting(config, frame_list, *, modes=MODES, log=print, devices=None,
                    count_flops: bool = False, **shape_kw):
    """Setting "compile": abstract state of `config` per mode, every phase compiled (never run)
    at each frame count; `count_flops` also records `cost_analysis` FLOPs per phase (use it
    under `flops.unrolled_loops` on one device to check `flops.step_flops`). Shape fields
    default to the config's (prompts per step, G, new tokens, text length)."""
    from lvr_jax.train import settings as S

    cfg, tx, wrt, settings, rules = model_setup(config, planned=True)
    kw = dict(prompts=S.prompts_per_step(config, "rl"), group=int(config.rl.group_size),
              new_tokens=int(config.rl.max_new_tokens),
              text=int(config.data.pipeline.max_length))
    kw.update(shape_kw)
    rows = []
    for mode in modes:
        mesh = mode_mesh(config, mode, devices)
        for frames in frame_list:
            t0 = time.perf_counter()
            shape = Shape(frames=frames, **kw)
            runner = Runner(mode, cfg, mesh, shape, tx=tx, wrt=wrt, settings=settings,
                            rules=rules, abstract=True)
            ex = Executor(compile_only=True)
            runner.step(ex, runner.batch(abstract=True))
            extra = {"cost_flops_by_phase": dict(ex.flops)} if count_flops else {}
            rows.append(row(mode, "compile", shape, cfg, mesh.shape["seq"], ex,
                            compile_s=time.perf_counter() - t0, **extra))
            log(f"[bench_grpo_step] compile {mode:<11} {frames:>4} frames: "
                f"{rows[-1]['flops'] / 1e12:.1f} TFLOP, peak "
                f"{rows[-1]['peak_bytes_per_device'] / GIB:.1f} GiB/device ("
                + ", ".join(f"{p} {v / GIB:.1f}" for p, v in ex.peaks.items())
                + f") [{time.perf_counter() - t0:.0f}s]")
    return rows
