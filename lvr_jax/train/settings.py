"""The one place a config (configs/*.py, `ml_collections`) becomes the library's objects: layout,
model loading, data pipeline settings, sampling and GRPO settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from lvr_jax.data.dataset import DataConfig
from lvr_jax.models.vlm import attention_options, llm_chunks
from lvr_jax.rl.grpo import GRPOSettings
from lvr_jax.rollout.sampler import SamplingParams
from lvr_jax.weights import hf
from sharding.mesh import Layout, make_mesh, rules_from_strings


def from_fields(cls, section, **overrides):
    """`cls` (a dataclass) from the entries of a config section that name its fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in dict(section).items() if k in names}, **overrides})


def sharding_rules(config) -> dict | None:
    """The logical-axis rules of a config (`config.sharding_rules`, DEFAULT_RULES when absent)."""
    table = config.get("sharding_rules")
    return rules_from_strings(table) if table else None


def mesh_and_layout(config):
    """(mesh, Layout) of a config's `mesh` and `sharding_rules` on this process's devices."""
    mesh = make_mesh(dict(config.mesh))
    return mesh, Layout.of(mesh, sharding_rules(config))


def load_model(config, checkpoint, mesh, *, param_dtype=None, **kw):
    """`hf.load_vlm` of a VILA folder with the config's dtypes (`param_dtype` overrides the stored
    one), attention options and sharding rules; returns (model, tokenizer, VLMConfig)."""
    mc = config.model
    return hf.load_vlm(checkpoint, mesh=mesh, dtype=jnp.dtype(mc.dtype),
                       param_dtype=jnp.dtype(param_dtype or mc.param_dtype),
                       rules=sharding_rules(config),
                       attention=attention_options(mc.get("attention")),
                       vision_chunk=int(mc.get("vision_chunk", 0)),
                       llm_chunks=llm_chunks(mc), ring_prompt=bool(mc.get("ring_prompt", False)),
                       prefill_chunks=int(mc.get("prefill_chunks", 1)), **kw)


def data_files(config, split: str) -> str:
    """`data.<split>_files`, default `<data.dir>/<split>.jsonl`."""
    given = config.data.get(f"{split}_files", "")
    return given or str(Path(config.data.dir) / f"{split}.jsonl")


def data_config(config, **overrides) -> DataConfig:
    """The pipeline settings (`data.pipeline`); the dataset root defaults to `data.dir`."""
    fields = dict(config.data.pipeline)
    fields.pop("rollout_batch_size", None)
    fields["root"] = fields.get("root") or config.data.dir
    return DataConfig(**{**fields, **overrides})


def prompts_per_step(config, mode: str) -> int:
    """Global prompts per training step: `data.pipeline.batch_size`; for GRPO ("rl") the rollout
    batch `data.pipeline.rollout_batch_size` when set, which `rl.ppo_minibatches` must divide."""
    pipe = config.data.pipeline
    if mode != "rl" or not pipe.get("rollout_batch_size"):
        return int(pipe.batch_size)
    prompts, minibatches = int(pipe.rollout_batch_size), ppo_minibatches(config)
    if prompts % minibatches:
        raise ValueError(f"data.pipeline.rollout_batch_size={prompts} is not a multiple of "
                         f"rl.ppo_minibatches={minibatches}")
    return prompts


# (key, least value): counts the loop divides by or hands to orbax (keep 0 = keep none)
TRAIN_COUNTS = (("train.steps", 0), ("train.checkpoint_every", 1), ("train.log_every", 1),
                ("train.keep_checkpoints", 1), ("optim.grad_accum_steps", 1),
                ("optim.warmup_steps", 0))


def check_counts(config) -> None:
    """A ValueError naming the key when one of `TRAIN_COUNTS` is below its least value (or not
    an integer), before anything runs."""
    for key, least in TRAIN_COUNTS:
        section, name = key.split(".")
        value = config[section][name]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{key} must be an integer >= {least}, got {value!r}")


def ppo_minibatches(config) -> int:
    """Optimizer steps per GRPO rollout (`rl.ppo_minibatches`, >= 1)."""
    m = int(config.rl.get("ppo_minibatches", 1))
    if m < 1:
        raise ValueError(f"rl.ppo_minibatches must be >= 1, got {m}")
    return m


def update_calls(config, mode: str) -> int:
    """Update calls over the run (what the LR schedule counts, before accumulation): one per
    step for SFT, `rl.ppo_minibatches` per rollout step for GRPO."""
    per_step = ppo_minibatches(config) if mode == "rl" else 1
    return int(config.train.steps) * per_step


def sampling_params(config) -> SamplingParams:
    """The rollout's sampling: `rl` max_new_tokens, temperature, top_p, top_k; G = group_size."""
    return from_fields(SamplingParams, config.rl, num_samples=int(config.rl.group_size))


def eval_sampling(config) -> dict:
    """`evaluate`'s sampling from the `eval` section: temperature (0, the default: greedy), top_p
    and the seed of its first batch; checked as `SamplingParams` checks them."""
    kw = dict(temperature=float(config.eval.get("temperature", 0.0)),
              top_p=float(config.eval.get("top_p", 1.0)))
    SamplingParams(**kw)
    return {**kw, "seed": int(config.eval.get("seed", 0))}


def grpo_settings(config) -> GRPOSettings:
    """The GRPO loss settings of the `rl` section (`dual_clip` 0: off)."""
    return from_fields(GRPOSettings, config.rl, dual_clip=float(config.rl.get("dual_clip", 0.0))
                       or None)


STORAGE_DTYPES = ("float32", "bfloat16")


def storage_dtype(value, what: str):
    """A stored-array dtype setting: "" -> None (the default), else one of STORAGE_DTYPES;
    ValueError naming the setting `what`."""
    if not value:
        return None
    if str(value) not in STORAGE_DTYPES:
        raise ValueError(f"{what} must be one of {STORAGE_DTYPES} or \"\" (default), got {value!r}")
    return jnp.dtype(str(value))


def reference_dtype(config):
    """`rl.reference_dtype`, checked: the frozen reference's stored dtype (None: the model's)."""
    return storage_dtype(config.rl.get("reference_dtype", ""), "rl.reference_dtype")


def reward_style(config) -> str:
    """`rl.reward_style`, checked (a config error at start-up, never a silent 0 reward)."""
    from lvr_jax.rl.rewards import check_reward_style

    return check_reward_style(config.rl.get("reward_style", "longrl"))
