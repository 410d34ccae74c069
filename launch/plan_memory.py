"""Memory plan of one GRPO step: does a config fit on N devices of a given size, per frame count?

Compiles (never runs, no weights allocated) the compiled pieces of `trainer.grpo_step` on N
virtual CPU devices, for a config's model, mesh and sharding rules, and reads
`compiled.memory_analysis()` per device:

  encode        trainer.encode_batch     frame-parallel SigLIP features of the batch
  prompts       trainer.make_prompts     projector + splice + left pad -> prompt embeddings
  prefill       Sampler run_prefill      ring prefill of the prompts -> shared prefix K/V
  decode        Sampler run_decode       G samples x max_new_tokens against the prefix
  ref_logprobs  trainer.logprobs_under   reference model log-probs of the responses
  update        trainer.grpo_update      GRPO loss + grads + optimizer update

The model and optimizer are built with `nnx.eval_shape` (optimizer as `trainer.setup` builds it:
`trainer.make_optimizer`, `trainer.trainable_filter`), params placed by their logical names with
the config's `sharding_rules` (as `hf.load_vlm` places them); every input is a
`jax.ShapeDtypeStruct` with a NamedSharding. Each phase's inputs carry the output shardings the
compiler chose for the phase that produced them (features -> prompts -> prefix -> decode state).

How memory is counted, per device (bytes of a device's shard):
  args, outputs, alias, temp   from memory_analysis() of the phase's executable (the read-only
                               phases are nnx.jit(graph_updates=False): no params written back;
                               the update donates model and optimizer: `alias`).
  held                         arrays that live through the whole step but are not arguments of
                               the phase (trainer.grpo_step keeps them referenced): optimizer
                               state, the frozen reference params, the policy params, the input
                               frames (`b` lives all step), the cached features, the prompt
                               embeddings (`x` lives all step); see HOLDS.
  peak = args + outputs - alias + temp + held   (an upper estimate: XLA may free an argument or
                               a temp buffer before all outputs exist; alias = donated buffers
                               reused for outputs).
The step fits when the largest phase peak is within --budget_gib.

Inputs are placed as the trainer places them (`trainer.device_batch`): rows over the 'batch'
mesh axes, clips' frames over 'frames'; rollout outputs (responses, masks, log-probs,
advantages) replicated.

Caveat: these are XLA:CPU compiles standing in for GPU ones. Buffer assignment, fusion and
collectives differ per backend, and XLA:CPU computes bf16 dots with float32 results (a bf16
[4096, 1024] x [1024, 4096] MLP block needs 3.5x the temp bytes of its bf16 activations), so
bf16 activations count up to ~2x; float32-by-design buffers (attention scores, softmax state,
logits, optimizer state) count the same. Read the numbers as upper estimates for a GPU. The
XLA:CPU pass `all-reduce-promotion` is switched off: it aborts on the update's bf16 all-reduces.

--stand_in=ring,prefix replaces an attention piece by an O(length) stand-in (see `stand_ins`):
a what-if that measures everything else, i.e. a lower bound for a tiled version of that piece.

Sequence per prompt: frames x tokens_per_frame (257) + data.pipeline.max_length text tokens - 1
(the video placeholder), padded to a multiple of 2 x seq. Responses: rl.max_new_tokens, G =
rl.group_size, prompts per step: data.pipeline.batch_size (global) or --batch.

    python launch/plan_memory.py --out=runs/plan_memory [--config=configs/longvila_r1_7b.py:grpo]
        [--frames=512,1024,4096] [--batch=1] [--phases=prefill,update] [--budget_gib=80]
        [--stand_in=ring,prefix] [--config.mesh.fsdp=2 --config.mesh.seq=4]
        [--config.sharding_rules.embed=fsdp] [--config.rl.max_new_tokens=512]
Writes <out>/plan_memory.md (table + verdict) and plan_memory.json (bytes, per phase).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

GIB = 2 ** 30
PHASES = ("encode", "prompts", "prefill", "decode", "ref_logprobs", "update")

# Arrays that outlive each phase without being its argument (names of `Plan.persistent`).
# The input clips are an argument of encode only: trainer.grpo_step drops them after encoding.
HOLDS = {
    "encode": ("opt_state", "ref_params"),
    "prompts": ("opt_state", "ref_params"),
    "prefill": ("opt_state", "ref_params", "feats", "non_llm_params"),
    "decode": ("opt_state", "ref_params", "feats", "non_llm_params", "prompt_embeds"),
    "ref_logprobs": ("policy_params", "opt_state", "prompt_embeds"),
    "update": ("ref_params", "prompt_embeds"),
}


def _devices_from_argv(argv, default: int = 8) -> int:
    for i, a in enumerate(argv):
        if a.startswith("--devices="):
            return int(a.split("=", 1)[1])
        if a == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return default


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

    @property
    def peak(self) -> int:
        return self.args + self.outputs - self.alias + self.temp + self.held

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak": self.peak}


def shard_bytes(tree) -> int:
    """Bytes one device holds of a pytree of arrays / ShapeDtypeStructs (the largest shard)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = tuple(x.shape)
        sharding = getattr(x, "sharding", None)
        local = sharding.shard_shape(shape) if sharding is not None else shape
        dtype = x.dtype
        try:
            itemsize = np.dtype(dtype).itemsize
        except TypeError:            # typed PRNG keys
            itemsize = jax.random.key_data(jax.random.key(0)).nbytes
        total += math.prod(local) * itemsize
    return int(total)


def place(module, mesh, rules):
    """Give every (abstract) Variable of `module` a ShapeDtypeStruct with the NamedSharding of its
    logical names (`sharding.mesh.param_shardings`, as `hf.load_vlm` places loaded params)."""
    import jax
    from flax import nnx

    from sharding.mesh import param_shardings

    state = nnx.state(module)
    placed = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                          state, param_shardings(state, mesh, rules),
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(module, placed)
    return module


def sds(shape, dtype, mesh, spec=None):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.ShapeDtypeStruct(tuple(shape), dtype,
                                sharding=NamedSharding(mesh, spec or PartitionSpec()))


@dataclasses.dataclass
class Plan:
    """The abstract training state of a config on a mesh: policy VLM, optimizer, reference VLM."""
    config: object
    mesh: object
    rules: dict
    model: object
    optimizer: object
    ref: object

    @classmethod
    def build(cls, config, mesh=None) -> Plan:
        from flax import nnx

        from lvr_jax.models.vlm import VLM, vlm_config_from
        from lvr_jax.train import trainer
        from sharding.mesh import make_mesh

        mesh = mesh if mesh is not None else make_mesh(dict(config.mesh))
        rules = trainer.sharding_rules(config)
        cfg = vlm_config_from(config.model)
        tx = trainer.make_optimizer(config.optim, int(config.train.steps))
        wrt = trainer.trainable_filter(bool(config.train.freeze_vision))

        def policy():
            model = VLM(cfg, rngs=nnx.Rngs(0))
            return model, nnx.Optimizer(model, tx, wrt=wrt)

        model, optimizer = nnx.eval_shape(policy)
        # trainer.train_grpo loads the reference with load_model(...) (remat off, same dtypes)
        ref_cfg = vlm_config_from({**dict(config.model), "remat": False})
        ref = nnx.eval_shape(lambda: VLM(ref_cfg, rngs=nnx.Rngs(0)))
        for m in (model, optimizer, ref):
            place(m, mesh, rules)
        return cls(config, mesh, rules, model, optimizer, ref)

    def persistent(self) -> dict:
        """Per-device bytes of the state that lives through the whole step."""
        from flax import nnx

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
    multiple: int

    @property
    def prompt_tokens(self) -> int:
        return self.frames * self.tokens_per_frame + self.text - 1

    @property
    def padded_tokens(self) -> int:
        return -(-self.prompt_tokens // self.multiple) * self.multiple


def step_shapes(config, mesh, frames: int, batch: int | None = None) -> Shapes:
    from lvr_jax.models.vlm import vlm_config_from

    seq = mesh.shape.get("seq", 1)
    p = config.data.pipeline
    return Shapes(batch=int(batch or p.batch_size), frames=int(frames), text=int(p.max_length),
                  group=int(config.rl.group_size), new_tokens=int(config.rl.max_new_tokens),
                  tokens_per_frame=vlm_config_from(config.model).tokens_per_frame,
                  multiple=2 * seq if seq > 1 else 1)


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    return dict(args=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
                alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes))


def _out(compiled):
    """Output ShapeDtypeStructs (with shardings) of a compiled function: the result part of an
    nnx.jit one, whose outputs are (args_state, kwargs_state, result), or (result, updates)
    with graph_updates=False."""
    if not hasattr(compiled, "compiled"):
        return compiled.out_info
    out = compiled.compiled.out_info
    return out[0] if type(compiled).__name__ == "SimpleCompiled" else out[2]


@contextlib.contextmanager
def gpu_ring():
    """The ring attention as it compiles for GPUs (positions tied to the queries, see
    `sharding.ring_attention.TIE_POSITIONS`, which is off on the CPU backend)."""
    from sharding import ring_attention

    old, ring_attention.TIE_POSITIONS = ring_attention.TIE_POSITIONS, True
    try:
        yield
    finally:
        ring_attention.TIE_POSITIONS = old


def plan_step(plan: Plan, frames: int, *, batch: int | None = None, phases=PHASES, log=print):
    """Compile the phases of one GRPO step at `frames` frames; returns [PhaseMemory] of the
    phases asked for (the ones before them are compiled too: their outputs' shardings are the
    next phase's inputs)."""
    with gpu_ring():
        return _plan_step(plan, frames, batch=batch, phases=phases, log=log)


def _plan_step(plan: Plan, frames: int, *, batch, phases, log):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lvr_jax.rollout.sampler import Sampler, SamplingParams
    from lvr_jax.train import trainer
    from sharding.multihost import batch_sharding

    config, mesh = plan.config, plan.mesh
    s = step_shapes(config, mesh, frames, batch)
    cfg = plan.model.cfg
    rl = config.rl
    px = cfg.vision.image_size
    held_bytes = plan.persistent()
    frames_shape = (s.batch, s.frames, px, px, 3)
    # as trainer.device_batch puts them (trainer.BATCH_AXES)
    frames_in = jax.ShapeDtypeStruct(frames_shape, jnp.float32, sharding=batch_sharding(
        mesh, frames_shape, plan.rules, trainer.BATCH_AXES["frames"]))
    text_sharding = batch_sharding(mesh, (s.batch, s.text), plan.rules,
                                   trainer.BATCH_AXES["input_ids"])
    ids = jax.ShapeDtypeStruct((s.batch, s.text), jnp.int32, sharding=text_sharding)
    attn = jax.ShapeDtypeStruct((s.batch, s.text), jnp.int32, sharding=text_sharding)
    want = set(phases)
    results = []

    def record(name, lowered, t0):
        compiled = lowered.compile()
        mem = _memory(compiled)
        dt = time.perf_counter() - t0
        items = {k: held_bytes[k] for k in HOLDS[name]}
        if name in want:
            results.append(PhaseMemory(name, s.frames, held=sum(items.values()),
                                       held_items=items, compile_s=round(dt, 1), **mem))
            r = results[-1]
            log(f"[plan_memory] {s.frames} frames {name:<12} args {r.args / GIB:7.2f} "
                f"out {r.outputs / GIB:7.2f} alias {r.alias / GIB:6.2f} temp {r.temp / GIB:8.2f} "
                f"held {r.held / GIB:6.2f} -> peak {r.peak / GIB:8.2f} GiB  ({dt:.0f}s)")
        return compiled

    # Later phases need the shardings of earlier outputs, so the early ones always compile.
    last = max(PHASES.index(p) for p in want)

    t0 = time.perf_counter()
    c = record("encode", trainer.encode_batch.lower(plan.model, frames_in, mesh=mesh), t0)
    feats = _out(c)
    held_bytes["feats"] = shard_bytes(feats)
    if last < 1:
        return results

    t0 = time.perf_counter()
    c = record("prompts", trainer.make_prompts.lower(plan.model, feats, ids, attn,
                                                     multiple=s.multiple), t0)
    x, mask = _out(c)
    held_bytes["prompt_embeds"] = shard_bytes((x, mask))
    assert x.shape[1] == s.padded_tokens, (x.shape, s)

    g, t = s.group, s.new_tokens
    if want & {"prefill", "decode"}:
        sampler = Sampler(plan.model, mesh)
        params = SamplingParams(t, float(rl.temperature), float(rl.top_p), int(rl.top_k), g)
        run_prefill, run_init, run_decode = sampler._compiled(params)
        llm_state = nnx.state(plan.model.llm)
        t0 = time.perf_counter()
        c = record("prefill", run_prefill.lower(llm_state, x, mask), t0)
        prefix = _out(c)
        if "decode" in want:
            dstate = _out(run_init.lower(prefix).compile())
            keys = sds((s.batch * g,), jax.random.key(0).dtype, mesh)
            t0 = time.perf_counter()
            record("decode", run_decode.lower(llm_state, prefix, dstate, keys), t0)

    responses = sds((s.batch, g, t), jnp.int32, mesh)
    settings = trainer.RLSettings(float(rl.temperature), float(rl.clip_low), float(rl.clip_high),
                                  float(rl.beta), str(rl.loss_agg))
    if "ref_logprobs" in want:
        t0 = time.perf_counter()
        record("ref_logprobs", trainer.logprobs_under.lower(
            plan.ref, feats, ids, attn, responses, temperature=settings.temperature,
            multiple=s.multiple, mesh=mesh), t0)
    if "update" in want:
        rows = (s.batch * g, t)
        t0 = time.perf_counter()
        record("update", trainer.grpo_update.lower(
            plan.model, plan.optimizer, feats, ids, attn, responses, sds(rows, jnp.bool_, mesh),
            sds(rows, jnp.float32, mesh), sds(rows, jnp.float32, mesh),
            sds((s.batch * g,), jnp.float32, mesh), rl=settings, multiple=s.multiple,
            mesh=mesh), t0)
    return results


# ------------------------------------------------------------------------------------ what-if

STAND_INS = ("ring", "prefix")


@contextlib.contextmanager
def stand_ins(names):
    """What-if measurements, not models of the network: replace an attention piece by an
    O(length) stand-in of the same shapes, differentiable in the same inputs, so the plan shows
    what everything else needs, i.e. a lower bound for a tiled (flash-style) version of it:

      ring    the prompt's ring attention (untiled sub-blocks [B, KVH, G, L/2n, L/2n] float32 per
              device): out = q + (k + v) repeated over each KV head's query group;
      prefix  the branches' attention to the seq-sharded prefix (scores [B, G, T, H, S_local]
              float32): softmax partials from the mean prefix key / value (psum over seq).

    Patches `lvr_jax.rollout.sampler.ring_attention_fn` / `lvr_jax.rollout.branches.prefix_stats`
    while active. Functions traced under a stand-in stay in the jit caches of this process."""
    import jax
    import jax.numpy as jnp

    from lvr_jax.rollout import branches, sampler

    unknown = [n for n in names if n not in STAND_INS]
    if unknown:
        raise ValueError(f"unknown stand-ins {unknown}; known: {STAND_INS}")
    saved = (sampler.ring_attention_fn, branches.prefix_stats)

    def ring_fn(mesh, axis="seq", *, causal=True):
        def attend(q, k, v, *_):
            return q + jnp.repeat(k + v, q.shape[2] // k.shape[2], axis=2)
        return attend

    def prefix_stats(q, k, v, valid, *, scale, axis=None):
        km = jnp.mean(k.astype(jnp.float32), axis=1)                  # [B, KVH, D]
        vm = jnp.mean(v.astype(jnp.float32), axis=1)
        if axis is not None:
            km, vm = jax.lax.psum((km, vm), axis)
        s = jnp.einsum("bgtkhd,bkd->bgtkh", q.astype(jnp.float32), km) * scale
        m = jax.lax.stop_gradient(s)
        o = vm[:, None, None, :, None, :] * (s - m + 1.0)[..., None]
        return m, jnp.ones_like(s), jnp.broadcast_to(o, q.shape)

    try:
        if "ring" in names:
            sampler.ring_attention_fn = ring_fn
        if "prefix" in names:
            branches.prefix_stats = prefix_stats
        yield
    finally:
        sampler.ring_attention_fn, branches.prefix_stats = saved


# ------------------------------------------------------------------------------------- report


def verdict(rows, budget: int) -> dict:
    """{frames: (largest phase, its peak, fits)}."""
    out = {}
    for f in sorted({r.frames for r in rows}):
        worst = max((r for r in rows if r.frames == f), key=lambda r: r.peak)
        out[f] = (worst.phase, worst.peak, worst.peak <= budget)
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
        lines.append(f"| {r.frames} | {plan_info['tokens'][r.frames]} | {r.phase} | {g(r.args)} | "
                     f"{g(r.outputs)} | {g(r.alias)} | {g(r.temp)} | {g(r.held)} | "
                     f"**{g(r.peak)}** | {r.compile_s:.0f} |")
    lines += ["", f"Verdict against {budget / GIB:.0f} GiB per device:", ""]
    for f, (phase, peak, fits) in verdict(rows, budget).items():
        lines.append(f"- {f} frames: {'FITS' if fits else 'DOES NOT FIT'} (largest: {phase}, "
                     f"{g(peak)} GiB)")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    import jax

    from ml_collections import config_flags

    from lvr_jax.train import trainer
    from sharding.mesh import DEFAULT_RULES, make_mesh, rules_to_strings

    config = CONFIG.value
    os.makedirs(FLAGS.out, exist_ok=True)
    mesh = make_mesh(dict(config.mesh))
    t_all = time.perf_counter()
    plan = Plan.build(config, mesh)
    frame_list = [int(f) for f in FLAGS.frames.split(",") if f]
    phases = tuple(p for p in FLAGS.phases.split(",") if p)
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise SystemExit(f"unknown phases {unknown}; known: {PHASES}")
    stand = tuple(n for n in FLAGS.stand_in.split(",") if n)
    rules = rules_to_strings(trainer.sharding_rules(config) or DEFAULT_RULES)
    changed = {k: v for k, v in rules.items() if rules_to_strings(DEFAULT_RULES).get(k) != v}
    persistent = plan.persistent()
    print(f"[plan_memory] mesh {dict(mesh.shape)} on {jax.device_count()} devices; persistent "
          "GiB/device: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in persistent.items()),
          flush=True)
    rows, tokens = [], {}
    for frames in frame_list:
        s = step_shapes(config, mesh, frames, FLAGS.batch or None)
        tokens[frames] = s.prompt_tokens
        print(f"[plan_memory] {frames} frames: {s.batch} prompts x {s.prompt_tokens} tokens "
              f"(padded {s.padded_tokens}), G={s.group}, {s.new_tokens} new tokens", flush=True)
        with stand_ins(stand):
            rows += plan_step(plan, frames, batch=FLAGS.batch or None, phases=phases,
                              log=lambda m: print(m, flush=True))
    budget = int(FLAGS.budget_gib * GIB)
    info = dict(devices=jax.device_count(), mesh=dict(mesh.shape), rules_changed=changed,
                batch=s.batch, group=s.group, new_tokens=s.new_tokens, text=s.text,
                tokens=tokens, persistent=persistent, budget_bytes=budget, stand_ins=stand,
                config=config_flags.get_config_filename(FLAGS["config"]),
                overrides=config_flags.get_override_values(FLAGS["config"]))
    table = markdown(rows, info, budget)
    print(table, flush=True)
    name = FLAGS.name or "plan_memory"
    with open(os.path.join(FLAGS.out, f"{name}.md"), "w") as f:
        f.write(table)
    with open(os.path.join(FLAGS.out, f"{name}.json"), "w") as f:
        json.dump({**info, "rows": [r.as_dict() for r in rows],
                   "verdict": {str(k): dict(phase=p, peak=v, fits=ok)
                               for k, (p, v, ok) in verdict(rows, budget).items()},
                   "total_s": round(time.perf_counter() - t_all, 1)}, f, indent=1)
    print(f"[plan_memory] wrote {FLAGS.out}/{name}.md and .json in "
          f"{time.perf_counter() - t_all:.0f}s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # XLA:CPU aborts in AllReducePromotion on the update's bf16 all-reduces ("Invalid binary
    # instruction opcode copy"); the pass only widens CPU all-reduce dtypes, so skip it.
    if "all-reduce-promotion" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_disable_hlo_passes=all-reduce-promotion").strip()
    import common

    common.cpu_devices(_devices_from_argv(sys.argv))
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    CONFIG = config_flags.DEFINE_config_file(
        "config", os.path.join(ROOT, "configs/longvila_r1_7b.py:grpo"), "training config")
    flags.DEFINE_string("out", "runs/plan_memory", "folder for the Markdown and JSON reports")
    flags.DEFINE_string("name", "", "report file name (default plan_memory)")
    flags.DEFINE_string("frames", "512,1024,4096", "comma-separated frame counts")
    flags.DEFINE_integer("batch", 0, "prompts per step, global (0: data.pipeline.batch_size)")
    flags.DEFINE_string("phases", ",".join(PHASES), f"phases to report, of {PHASES}")
    flags.DEFINE_float("budget_gib", 80.0, "device memory budget, GiB")
    flags.DEFINE_integer("devices", 8, "virtual CPU devices (read before jax starts)")
    flags.DEFINE_string("stand_in", "", f"what-if: O(length) stand-ins for {STAND_INS} "
                        "(lower bounds for tiled versions; see stand_ins)")
    app.run(main)
