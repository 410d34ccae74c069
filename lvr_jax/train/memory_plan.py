"""Memory plan of one GRPO step: does a config fit on N devices of a given size, per frame count?

Compiles (never runs, no weights allocated) the jitted functions `train.grpo.grpo_step` runs, on
the devices jax has (N virtual CPU devices from launch/plan_memory.py), for a config's model,
mesh and sharding rules (one `Layout`), and reads `compiled.memory_analysis()` per device:

  encode        models.vlm.encode_batch      frame-parallel SigLIP features of the batch
  prompts       models.vlm.make_prompts      projector + text slots -> the ring-laid-out prompt
  prefill       Sampler.compiled: prefill    ring prefill of the prompts -> shared prefix K/V
  decode        Sampler.compiled: decode     G samples x max_new_tokens against the prefix
  ref_logprobs  train.grpo.logprobs_under    reference model log-probs of the responses
  update        train.grpo.grpo_update       GRPO loss + grads + optimizer update

Model and optimizer: `nnx.eval_shape` as `train.state.setup` builds them, params placed by the
config's `sharding_rules` (as `hf.load_vlm`); settings from `train.settings`. Inputs are
ShapeDtypeStructs carrying the output shardings of the phase that produced them (features ->
prompts -> prefix -> decode state). The ring compiles with its position tie on, as on GPUs.

How memory is counted, per device (bytes of a device's shard):
  args, outputs, alias, temp   from memory_analysis() of the phase's executable (the read-only
                               phases are nnx.jit(graph_updates=False): no params written back;
                               the update donates model and optimizer: `alias`).
  held                         arrays that live through the whole step but are not arguments of
                               the phase (grpo_step keeps them referenced): optimizer state, the
                               frozen reference params, the policy params, the cached features,
                               the prompt embeddings (until the rollout ends); see HOLDS; and
                               `unread_args`: what the phase is passed but jit prunes, unread
                               (e.g. the reference's vision tower in ref_logprobs), still live.
  peak = args + outputs - alias + temp + held   (an upper estimate: XLA may free an argument or
                               a temp buffer before all outputs exist; alias = donated buffers
                               reused for outputs).
  adjusted = peak - host_offload - cpu_upcast  (only on rows the planner corrects)
    host_offload               with `model.remat_offload` the update's prompt checkpoints sit in
                               pinned host memory on a GPU, but XLA:CPU drops the placement
                               (`offloaded_checkpoints`)
    cpu_upcast                 XLA:CPU computes bf16 ops in float32 (slicing included); in a
                               layer loop (LOOPED phases) loop-invariant code motion hoists the
                               upcast of a whole stacked bf16 array (the update's checkpoints, a
                               chunked prefill's K/V cache) out of it: a float32 copy a GPU never
                               makes. Measured: the drop in temp with
                               `while-loop-invariant-code-motion` off (`upcast_copies`; bf16
                               programs only).
The step fits when the largest phase peak (adjusted where there is one) is within the budget.

Inputs are placed as `Run.device_batch` places them (rows over the `batch` axes, clips' frames
over `frames`); rollout outputs (responses, masks, log-probs, advantages) replicated.

Caveat: XLA:CPU compiles stand in for GPU ones: buffer assignment, fusion and collectives differ,
and XLA:CPU computes bf16 dots with float32 results, so bf16 activations count up to ~2x
(float32-by-design buffers the same): upper estimates for a GPU. `cpu_compile` turns XLA:CPU's
`all-reduce-promotion` off (it aborts on the update's bf16 all-reduces).

What-if stand-ins (`Plan.build(..., stand_ins=("ring", "prefix"))`) replace an attention piece
by an O(length) function of the same shapes, passed in the model config's `AttentionOptions`
(`prompt=ring_stand_in`, `prefix=prefix_stand_in`): the plan then measures everything else, i.e.
a lower bound for a tiled version of that piece.

Sequence per prompt: frames x tokens_per_frame (257) + data.pipeline.max_length - 1, as the ring
holds it (`Shapes.padded`). Responses: rl.max_new_tokens, G = rl.group_size; prompts per step:
data.pipeline.batch_size (global) or `batch`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lvr_jax.models.attention import local_rows
from lvr_jax.models.ring_prompt import prompt_length, ring_size
from lvr_jax.models.vlm import VLM, encode_batch, make_prompts, remat_setting, vlm_config_from
from lvr_jax.rollout.sampler import Sampler
from lvr_jax.train import settings
from lvr_jax.train.compiled import compiled_outputs, cpu_compile, memory, upcast_copies
from lvr_jax.train.collectives import collectives, summary
from lvr_jax.train.grpo import grpo_update, logprobs_under
from lvr_jax.train.state import BATCH_AXES, make_optimizer, trainable_filter
from sharding.mesh import DEFAULT_RULES, Layout, make_mesh, param_shardings, rules_to_strings
from sharding.multihost import batch_sharding
from sharding.sequence_parallel import padded_length

GIB = 2 ** 30
PHASES = ("encode", "prompts", "prefill", "decode", "ref_logprobs", "update")
LOOPED = ("prefill", "ref_logprobs", "update")   # bf16 stacks read in a layer loop (`cpu_upcast`)

# Arrays that outlive each phase without being its argument (names of `Plan.persistent`).
# The input clips are an argument of encode only: grpo_step drops them after encoding.
HOLDS = {
    "encode": ("opt_state", "ref_params"),
    "prompts": ("opt_state", "ref_params"),
    "prefill": ("opt_state", "ref_params", "feats", "non_llm_params"),
    "decode": ("opt_state", "ref_params", "feats", "non_llm_params", "prompt_embeds"),
    "ref_logprobs": ("policy_params", "opt_state"),
    "update": ("ref_params",),
}


def ring_stand_in(q, k, v, *_):
    """O(length) stand-in for the prompt's ring attention (untiled sub-blocks [B, KVH, G, L/2n,
    L/2n] float32 per device): q + (k + v) repeated over each KV head's query group (the last
    Lq keys: a chunked prefill's own chunk)."""
    return q + jnp.repeat((k + v)[:, k.shape[1] - q.shape[1]:], q.shape[2] // k.shape[2], axis=2)


def prefix_stand_in(q, k, v, valid, *, scale, axis=None, scatter=False):
    """O(length) stand-in for `prefix_stats`, the branches' attention to the seq-sharded prefix
    (scores [B, G, T, H, S_local] float32): softmax partials from the mean prefix key / value
    (psum over `axis`; this device's branches when `scatter`)."""
    km = jnp.mean(k.astype(jnp.float32), axis=1)                  # [B, KVH, D]
    vm = jnp.mean(v.astype(jnp.float32), axis=1)
    if axis is not None:
        km, vm = jax.lax.psum((km, vm), axis)
    s = jnp.einsum("bgtkhd,bkd->bgtkh", q.astype(jnp.float32), km) * scale
    m = jax.lax.stop_gradient(s)
    o = vm[:, None, None, :, None, :] * (s - m + 1.0)[..., None]
    out = m, jnp.ones_like(s), jnp.broadcast_to(o, q.shape)
    return tuple(local_rows(a, axis) for a in out) if scatter else out


# name -> (AttentionOptions field, stand-in)
STAND_INS = {"ring": ("prompt", ring_stand_in), "prefix": ("prefix", prefix_stand_in)}


def planned_config(cfg, stand_ins=()):
    """A VLMConfig whose LLM attention ties positions (as on GPUs) and uses the named
    stand-ins (see STAND_INS)."""
    unknown = [n for n in stand_ins if n not in STAND_INS]
    if unknown:
        raise ValueError(f"unknown stand-ins {unknown}; known: {tuple(STAND_INS)}")
    swaps = dict(STAND_INS[n] for n in stand_ins)
    attention = dataclasses.replace(cfg.llm.attention, tie_positions="on", **swaps)
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, attention=attention))


# ------------------------------------------------------------------------------------ state


@dataclasses.dataclass
class PhaseMemory:
    """Per-device bytes of one compiled phase (see the module docstring)."""
    phase: str
    frames: int
    args: int
    outputs: int
    alias: int
    temp: int
    held: int
    held_items: dict
    compile_s: float
    host_offload: int = 0     # bytes the CPU compile counts on the device that a GPU offloads
    cpu_upcast: int = 0       # temp bytes of XLA:CPU's hoisted float32 copies of bf16 arrays
    collectives: list = dataclasses.field(default_factory=list)   # `collectives.summary`

    @property
    def peak(self) -> int:
        return self.args + self.outputs - self.alias + self.temp + self.held

    @property
    def adjusted(self) -> int | None:
        """The peak less what a GPU keeps in host memory (`host_offload`) and less XLA:CPU's
        hoisted float32 copies of bf16 arrays (`cpu_upcast`); None: no correction."""
        fix = self.host_offload + self.cpu_upcast
        return self.peak - fix if fix else None

    @property
    def judged(self) -> int:
        """The figure the verdict uses: `adjusted` where there is one, else `peak`."""
        return self.peak if self.adjusted is None else self.adjusted

    def as_dict(self) -> dict:
        out = {**dataclasses.asdict(self), "peak": self.peak}
        return out if self.adjusted is None else {**out, "adjusted": self.adjusted}


def shard_bytes(tree) -> int:
    """Bytes one device holds of a pytree of arrays / ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        local = sharding.shard_shape(tuple(x.shape)) if sharding is not None else x.shape
        try:
            itemsize = np.dtype(x.dtype).itemsize
        except TypeError:            # typed PRNG keys
            itemsize = jax.random.key_data(jax.random.key(0)).nbytes
        total += math.prod(local) * itemsize
    return int(total)


def place(module, mesh, rules):
    """Give every abstract Variable of `module` a ShapeDtypeStruct with the NamedSharding of its
    logical names (`param_shardings`, as `hf.load_vlm` places loaded params)."""
    state = nnx.state(module)
    placed = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                          state, param_shardings(state, mesh, rules),
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(module, placed)
    return module


def sds(shape, dtype, mesh, spec=None):
    return jax.ShapeDtypeStruct(tuple(shape), dtype,
                                sharding=NamedSharding(mesh, spec or PartitionSpec()))


@dataclasses.dataclass
class Plan:
    """The abstract training state of a config on a layout: policy VLM, optimizer, reference."""
    config: object
    layout: Layout
    model: object
    optimizer: object
    ref: object
    stand_ins: tuple = ()

    @property
    def mesh(self):
        return self.layout.mesh

    @property
    def rules(self) -> dict:
        return self.layout.table

    @classmethod
    def build(cls, config, mesh=None, *, stand_ins=()) -> Plan:
        """Abstract state of `config` on `mesh` (default: the config's mesh on all devices),
        attention with the named what-if `stand_ins` (see STAND_INS)."""
        mesh = mesh if mesh is not None else make_mesh(dict(config.mesh))
        layout = Layout.of(mesh, settings.sharding_rules(config))
        cfg = planned_config(vlm_config_from(config.model), stand_ins)
        tx = make_optimizer(config.optim, settings.update_calls(config, "rl"))
        wrt = trainable_filter(config.train.freeze_vision,
                               config.train.get("freeze_projector", False))

        def policy():
            model = VLM(cfg, rngs=nnx.Rngs(0))
            return model, nnx.Optimizer(model, tx, wrt=wrt)

        model, optimizer = nnx.eval_shape(policy)
        # the trainer loads the reference with settings.load_model (remat off, stored in
        # rl.reference_dtype)
        ref_dtype = settings.reference_dtype(config) or config.model.param_dtype
        ref_cfg = planned_config(vlm_config_from({**dict(config.model), "remat": False,
                                                  "remat_offload": False,
                                                  "param_dtype": str(ref_dtype)}), stand_ins)
        ref = nnx.eval_shape(lambda: VLM(ref_cfg, rngs=nnx.Rngs(0)))
        for m in (model, optimizer, ref):
            place(m, mesh, layout.table)
        return cls(config, layout, model, optimizer, ref, tuple(stand_ins))

    def persistent(self) -> dict:
        """Per-device bytes of the state that lives through the whole step."""
        params = shard_bytes(nnx.state(self.model, nnx.Param))
        llm = shard_bytes(nnx.state(self.model.llm, nnx.Param))
        return {"policy_params": params, "non_llm_params": params - llm,
                "opt_state": shard_bytes(nnx.state(self.optimizer)),
                "ref_params": shard_bytes(nnx.state(self.ref, nnx.Param))}


@dataclasses.dataclass
class Shapes:
    batch: int
    frames: int
    text: int
    group: int
    new_tokens: int
    tokens_per_frame: int
    shards: int             # the ring's devices
    multiple: int           # the layout's `pad_multiple`
    ring_prompt: bool       # `model.ring_prompt`
    chunks: int = 1         # `model.prefill_chunks` (the forward-only prompts)

    @property
    def prompt_tokens(self) -> int:
        return self.frames * self.tokens_per_frame + self.text - 1

    def padded(self, chunks: int = 1) -> int:
        """The prompt as the ring holds it, in `chunks` prefill chunks: with `model.ring_prompt`
        its layout's slots and padding frames, else padded to 2 x ring x chunks."""
        if self.ring_prompt:
            return prompt_length(self.text, self.frames, self.tokens_per_frame, self.shards, chunks)
        if chunks > 1:                  # `shard_sequence` pads to 2 x ring x chunks
            return padded_length(self.prompt_tokens, self.shards * chunks)
        return -(-self.prompt_tokens // self.multiple) * self.multiple


def offloaded_checkpoints(config, layout: Layout, s: Shapes) -> int:
    """Per-device bytes of the prompt's per-layer checkpoints under `model.remat_offload` (each
    layer's input, [B, padded tokens / ring size, hidden] in the compute dtype, kept in pinned
    host memory on a GPU; XLA:CPU drops the placement and counts them on the device). The
    responses' checkpoints are offloaded too but not subtracted (an upper estimate). 0 when off.
    Rows: one PPO minibatch's prompts, split over the `batch` axes where they divide."""
    if remat_setting(config.model) != "offload":
        return 0
    llm = vlm_config_from(config.model).llm
    local = s.padded() // layout.size("length")           # the update's prompt: one chunk
    rows = s.batch // settings.ppo_minibatches(config)
    rows //= layout.size("batch") if rows % layout.size("batch") == 0 else 1
    return llm.num_layers * rows * local * llm.hidden_size * jnp.dtype(llm.dtype).itemsize


def step_shapes(config, mesh, frames: int, batch: int | None = None) -> Shapes:
    """Sizes of one step at `frames` frames (prompts laid out for the layout's ring):
    `batch` prompts per rollout (default: the config's, `settings.prompts_per_step`)."""
    p = config.data.pipeline
    layout = Layout.of(mesh, settings.sharding_rules(config))
    return Shapes(batch=int(batch or settings.prompts_per_step(config, "rl")), frames=int(frames),
                  text=int(p.max_length),
                  group=int(config.rl.group_size), new_tokens=int(config.rl.max_new_tokens),
                  tokens_per_frame=vlm_config_from(config.model).tokens_per_frame,
                  shards=ring_size(layout), multiple=layout.pad_multiple,
                  ring_prompt=bool(config.model.get("ring_prompt", False)),
                  chunks=vlm_config_from(config.model).prefill_chunks)


# ------------------------------------------------------------------------------------ compile


def plan_step(plan: Plan, frames: int, *, batch: int | None = None, phases=PHASES, log=print):
    """Compile the phases of one GRPO step at `frames` frames; returns [PhaseMemory] of the
    phases asked for (the ones before them are compiled too: their outputs' shardings are the
    next phase's inputs)."""
    config, mesh, layout = plan.config, plan.mesh, plan.layout
    s = step_shapes(config, mesh, frames, batch)
    if "update" in phases and s.batch % (m := settings.ppo_minibatches(config)):  # before compiling
        raise ValueError(f"{s.batch} prompts per rollout do not split into rl.ppo_minibatches={m}")
    px = plan.model.cfg.vision.image_size
    held_bytes = plan.persistent()
    placed = lambda shape, dtype, field: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=batch_sharding(mesh, shape, layout.table, BATCH_AXES[field]))
    frames_in = placed((s.batch, s.frames, px, px, 3), jnp.float32, "frames")
    ids = placed((s.batch, s.text), jnp.int32, "input_ids")
    attn = placed((s.batch, s.text), jnp.int32, "attention_mask")
    want = set(phases)
    results = []

    def record(name, lower, *passed):
        """Compile phase `name`; `passed`: everything its call is given (jit drops the unread)."""
        t0 = time.perf_counter()
        lowered = lower()
        compiled = cpu_compile(lowered)
        dt = time.perf_counter() - t0
        items = {k: held_bytes[k] for k in HOLDS[name]}
        if name in want:
            offload = offloaded_checkpoints(config, layout, s) if name == "update" else 0
            mem = memory(compiled)
            items["unread_args"] = max(0, shard_bytes(passed) - mem["args"])
            bf16 = jnp.dtype(config.model.dtype).itemsize < 4     # a float32 program has none
            upcast = upcast_copies(lowered, mem["temp"]) if bf16 and name in LOOPED else 0
            r = PhaseMemory(name, s.frames, held=sum(items.values()), held_items=items,
                            compile_s=round(time.perf_counter() - t0, 1), host_offload=offload,
                            cpu_upcast=upcast, collectives=summary(collectives(compiled.as_text())),
                            **mem)
            results.append(r)
            why = ", ".join(w for w, b in (("offload", offload), ("CPU upcast", upcast)) if b)
            adj = "" if r.adjusted is None else f" (adjusted {r.adjusted / GIB:.2f}: {why})"
            log(f"[plan_memory] {s.frames} frames {name:<12} args {r.args / GIB:7.2f} "
                f"out {r.outputs / GIB:7.2f} alias {r.alias / GIB:6.2f} temp {r.temp / GIB:8.2f} "
                f"held {r.held / GIB:6.2f} -> peak {r.peak / GIB:8.2f} GiB{adj}  ({dt:.0f}s)")
        return compiled

    policy = nnx.state(plan.model)
    feats = compiled_outputs(record("encode", lambda: encode_batch.lower(plan.model, frames_in,
                                                                         layout=layout),
                                    policy, frames_in))
    held_bytes["feats"] = shard_bytes(feats)
    # Later phases need the shardings of earlier outputs, so the early ones always compile.
    if max(PHASES.index(p) for p in want) < 1:
        return results
    prompt = compiled_outputs(record("prompts", lambda: make_prompts.lower(plan.model, feats, ids,
                                                                           attn, layout),
                                     policy, feats, ids, attn))
    held_bytes["prompt_embeds"] = shard_bytes(prompt)
    assert prompt.x.shape[1] == s.padded(s.chunks), (prompt.x.shape, s)

    g, t = s.group, s.new_tokens
    if want & {"prefill", "decode"}:
        params = settings.sampling_params(config)
        run_prefill, run_init, run_decode = Sampler(plan.model, mesh, rules=layout.table).compiled(params)
        llm_state = nnx.state(plan.model.llm)
        prefix = compiled_outputs(record("prefill", lambda: run_prefill.lower(llm_state, prompt, None),
                                         llm_state, prompt))
        if "decode" in want:
            dstate = compiled_outputs(cpu_compile(run_init.lower(prefix)))
            keys = sds((s.batch * g,), jax.random.key(0).dtype, mesh)
            record("decode", lambda: run_decode.lower(llm_state, prefix, dstate, keys),
                   llm_state, prefix, dstate, keys)

    responses = sds((s.batch, g, t), jnp.int32, mesh)
    loss = settings.grpo_settings(config)
    if "ref_logprobs" in want:
        record("ref_logprobs", lambda: logprobs_under.lower(
            plan.ref, feats, ids, attn, responses, loss.temperature, layout=layout),
            nnx.state(plan.ref), feats, ids, attn, responses)
    if "update" in want:
        rows = (s.batch * g, t)
        m = settings.ppo_minibatches(config)      # one minibatch's update (all of it for m = 1)
        minibatch = None if m == 1 else sds((s.batch // m,), jnp.int32, mesh)
        rest = (responses, sds(rows, jnp.bool_, mesh), sds(rows, jnp.float32, mesh),
                sds(rows, jnp.float32, mesh), sds((s.batch * g,), jnp.float32, mesh))
        record("update", lambda: grpo_update.lower(plan.model, plan.optimizer, feats, ids, attn,
                                                   *rest, loss, layout=layout, rows=minibatch),
               policy, nnx.state(plan.optimizer), feats, ids, attn, rest, minibatch)
    return results


# ------------------------------------------------------------------------------------- report


def verdict(rows, budget: int) -> dict:
    """{frames: (largest phase, its peak, fits)}."""
    out = {}
    for f in sorted({r.frames for r in rows}):
        worst = max((r for r in rows if r.frames == f), key=lambda r: r.judged)
        out[f] = (worst.phase, worst.judged, worst.judged <= budget)
    return out


def markdown(rows, plan_info: dict, budget: int) -> str:
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    what_if = plan_info.get("stand_ins")
    lines = [f"Per-device GiB (compiled on {plan_info['devices']} virtual CPU devices, mesh "
             f"{plan_info['mesh']}, rules {plan_info['rules_changed'] or 'default'}, "
             f"{plan_info['batch']} prompts x G={plan_info['group']}, "
             f"{plan_info['new_tokens']} new tokens, {plan_info['text']} text tokens"
             + (f"; WHAT-IF stand-ins for {', '.join(what_if)}" if what_if else "") + ").",
             "", "Persistent state per device: " + ", ".join(
                 f"{k} {g(v)}" for k, v in plan_info["persistent"].items()) + " GiB.", "",
             "| frames | prompt tokens | phase | args | outputs | alias | temp | held | peak | "
             "compile s |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        parts = [f"{w} {g(b)}" for w, b in (("offload", r.host_offload),
                                             ("CPU upcast", r.cpu_upcast)) if b]
        adj = "" if r.adjusted is None else f" (adjusted {g(r.adjusted)}: less {', '.join(parts)})"
        lines.append(f"| {r.frames} | {plan_info['tokens'][r.frames]} | {r.phase} | {g(r.args)} | "
                     f"{g(r.outputs)} | {g(r.alias)} | {g(r.temp)} | {g(r.held)} | "
                     f"**{g(r.peak)}**{adj} | {r.compile_s:.0f} |")
    if any(r.adjusted is not None for r in rows):
        lines += ["", "adjusted: the peak less the prompt's per-layer checkpoints that "
                  "`model.remat_offload` keeps in pinned host memory on a GPU (offload; XLA:CPU "
                  "counts them on the device; `memory_plan.offloaded_checkpoints`) and less the "
                  "float32 copies of bf16 arrays that XLA:CPU hoists out of the backward loop "
                  "(CPU upcast: the temp that a compile without loop-invariant code motion does "
                  "not spend; `memory_plan.upcast_copies`)."]
    lines += ["", f"Verdict against {budget / GIB:.0f} GiB per device:", ""]
    for f, (phase, peak, fits) in verdict(rows, budget).items():
        lines.append(f"- {f} frames: {'FITS' if fits else 'DOES NOT FIT'} (largest: {phase}, "
                     f"{g(peak)} GiB)")
    return "\n".join(lines) + "\n"


def run_plan(config, out, *, name: str = "plan_memory", frames=(512, 1024, 4096),
             batch: int | None = None, phases=PHASES, budget_gib: float = 80.0, stand_ins=(),
             source: dict | None = None, log=print) -> dict:
    """Plan one GRPO step of `config` per frame count; writes <out>/<name>.md (table + verdict)
    and <out>/<name>.json (bytes per phase) and returns the JSON's dict. `source`: extra JSON
    entries (the config file and overrides)."""
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ValueError(f"unknown phases {unknown}; known: {PHASES}")
    t_all = time.perf_counter()
    plan = Plan.build(config, stand_ins=tuple(stand_ins))
    mesh = plan.mesh
    rules = rules_to_strings(settings.sharding_rules(config) or DEFAULT_RULES)
    changed = {k: v for k, v in rules.items() if rules_to_strings(DEFAULT_RULES).get(k) != v}
    persistent = plan.persistent()
    log(f"[plan_memory] mesh {dict(mesh.shape)} on {jax.device_count()} devices; persistent "
        "GiB/device: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in persistent.items()))
    rows, tokens = [], {}
    for f in frames:
        s = step_shapes(config, mesh, f, batch)
        tokens[s.frames] = s.prompt_tokens
        log(f"[plan_memory] {s.frames} frames: {s.batch} prompts x {s.prompt_tokens} tokens "
            f"(padded {s.padded(s.chunks)}), G={s.group}, {s.new_tokens} new tokens")
        rows += plan_step(plan, s.frames, batch=batch, phases=phases, log=log)
    budget = int(budget_gib * GIB)
    info = dict(devices=jax.device_count(), mesh=dict(mesh.shape), rules_changed=changed,
                batch=s.batch, group=s.group, new_tokens=s.new_tokens, text=s.text,
                tokens=tokens, persistent=persistent, budget_bytes=budget,
                stand_ins=tuple(stand_ins), **(source or {}))
    table = markdown(rows, info, budget)
    log(table)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table)
    report = {**info, "rows": [r.as_dict() for r in rows],
              "verdict": {str(k): dict(phase=p, peak=v, fits=ok)
                          for k, (p, v, ok) in verdict(rows, budget).items()},
              "total_s": round(time.perf_counter() - t_all, 1)}
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    log(f"[plan_memory] wrote {out}/{name}.md and .json in {time.perf_counter() - t_all:.0f}s")
    return report
