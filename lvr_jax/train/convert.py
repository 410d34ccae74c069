"""Convert checkpoints between the VILA/HF layout and orbax (behind launch/convert_checkpoint.py,
whose flags are defined here).

    # VILA/HF folder -> params-only orbax checkpoint (<dst>/0/params + meta)
    python launch/convert_checkpoint.py --to=orbax --src=/ckpt/LongVILA-R1-7B --dst=/ckpt/r1_orbax
    # a training run's orbax checkpoint (or a params-only one) -> VILA/HF folder
    python launch/convert_checkpoint.py --to=hf --src=runs/grpo/checkpoints [--step=200] \\
        --like=runs/sft_model --dst=runs/grpo_step200_model

--to=orbax writes only the params (the nnx `Param` state of the VLM, the same tree the trainer
saves as its `params` item) with `lvr_jax.train.checkpoint.save_params`: no optimizer state, so
it cannot resume a run, but `--to=hf` (and `checkpoint.restore_params`) read it. It is built in a
hidden sibling folder and renamed into place; `--dst` is never left half-written.

--to=hf restores the params of step --step (default: the latest complete one) of --src onto the
model structure of --like (a VILA folder with the run's architecture and tokenizer, e.g. the
run's `init_checkpoint`) and writes the VILA layout with `lvr_jax.weights.hf.save_hf` (with the
tokenizer; atomic too). --src may be a training workdir holding `checkpoints/`. The --like
weights are loaded and then replaced (peak host/device memory: two copies of the params).

An existing --dst is an error unless --overwrite. Single process; no mesh is needed (params are
restored onto one device, resharded by orbax from however they were saved).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

SAVE_DTYPES = ("", "float32", "bfloat16", "float16")


class ConvertError(ValueError):
    """A bad conversion input; the message names the flag and the path."""


def _vila_folder(path, flag: str) -> Path:
    from lvr_jax.weights.hf import vila_folder_problem

    if not path:
        raise ConvertError(f"{flag} is required")
    path = Path(path)
    problem = vila_folder_problem(path)
    if problem:
        raise ConvertError(f"{flag} {path}{problem}")
    return path


def _check_dst(dst, overwrite: bool, **inputs: Path) -> Path:
    """`dst` as a Path; refused when it exists (without `overwrite`), or is or holds one of the
    `inputs` (flag name -> folder): replacing it would delete what is read."""
    if not dst:
        raise ConvertError("--dst is required")
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConvertError(f"--dst {dst} exists; pass --overwrite to replace it")
    out = dst.resolve()
    for flag, folder in inputs.items():
        folder = folder.resolve()
        if out == folder or out in folder.parents:
            raise ConvertError(f"--dst {dst} is or holds the --{flag} folder {folder}")
    return dst


def checkpoint_dir(src) -> Path:
    """The orbax directory of --src: the folder itself, or its `checkpoints/` (a workdir)."""
    if not src:
        raise ConvertError("--src is required")
    src = Path(src)
    if not src.is_dir():
        raise ConvertError(f"--src {src}: no such folder")
    has_steps = any(p.name.isdigit() and p.is_dir() for p in src.iterdir())
    if not has_steps and (src / "checkpoints").is_dir():
        return src / "checkpoints"
    return src


def to_orbax(src, dst, *, overwrite: bool = False, param_dtype: str = "float32",
             step: int = 0) -> Path:
    """VILA/HF folder `src` -> params-only orbax checkpoint `dst` (step `step`)."""
    import jax.numpy as jnp
    from flax import nnx

    from lvr_jax.train.checkpoint import save_params
    from lvr_jax.weights import hf

    src = _vila_folder(src, "--src")
    dst = _check_dst(dst, overwrite, src=src)
    model, _, _ = hf.load_vlm(src, param_dtype=jnp.dtype(param_dtype))
    out = save_params(dst, nnx.state(model, nnx.Param), step=step, overwrite=overwrite,
                      extra={"converted_from": str(src.absolute()), "params_only": True})
    print(f"[convert] {src} -> orbax params checkpoint {out} (step {step})", flush=True)
    return out


def to_hf(src, like, dst, *, step: int | None = None, overwrite: bool = False,
          save_dtype: str | None = None) -> tuple[Path, int]:
    """Params of orbax checkpoint `src` (step `step`, default latest) on the architecture of the
    VILA folder `like` -> VILA folder `dst` (with `like`'s tokenizer). Returns (dst, step)."""
    import jax.numpy as jnp
    from flax import nnx

    from lvr_jax.train.checkpoint import abstract_like, restore_params
    from lvr_jax.weights import hf

    like = _vila_folder(like, "--like")
    ckdir = checkpoint_dir(src)
    dst = _check_dst(dst, overwrite, src=Path(src), like=like)
    model, tok, _ = hf.load_vlm(like)
    if tok is None:
        log.warning("%s has no tokenizer in llm/; %s is written without one", like, dst)
    got = restore_params(ckdir, abstract_like(nnx.state(model, nnx.Param)), step=step)
    nnx.update(model, got.params)
    out = hf.save_hf(model, dst, tokenizer=tok, overwrite=overwrite,
                     save_dtype=jnp.dtype(save_dtype) if save_dtype else None)
    print(f"[convert] {ckdir} step {got.step} (architecture and tokenizer of {like}) -> "
          f"VILA checkpoint {out}", flush=True)
    return out, got.step


def define_flags(flag_values=None) -> dict:
    """The CLI flags (on absl's global FLAGS unless `flag_values`); returns their holders."""
    from absl import flags

    kw = {"flag_values": flags.FLAGS if flag_values is None else flag_values}
    return dict(
        to=flags.DEFINE_enum("to", None, ["orbax", "hf"], "target format", **kw),
        src=flags.DEFINE_string("src", None, "--to=orbax: VILA/HF folder; --to=hf: orbax "
                                "checkpoint directory (<workdir>/checkpoints, or the workdir)", **kw),
        dst=flags.DEFINE_string("dst", None, "output folder", **kw),
        like=flags.DEFINE_string("like", None, "--to=hf: VILA folder giving the architecture and "
                                 "the tokenizer (e.g. the run's init_checkpoint)", **kw),
        step=flags.DEFINE_integer("step", None, "--to=hf: checkpoint step (default: latest); "
                                  "--to=orbax: step number written (default 0)", **kw),
        overwrite=flags.DEFINE_bool("overwrite", False, "replace an existing --dst", **kw),
        param_dtype=flags.DEFINE_enum("param_dtype", "float32", list(SAVE_DTYPES[1:]),
                                      "--to=orbax: dtype of the stored params", **kw),
        save_dtype=flags.DEFINE_enum("save_dtype", "", list(SAVE_DTYPES), "--to=hf: dtype of the "
                                     "safetensors (default: as restored, float32 for our runs)",
                                     **kw),
    )


def run_flags(holders: dict):
    """Dispatch on --to with the parsed flag values; returns what to_orbax / to_hf return."""
    v = {k: h.value for k, h in holders.items()}
    if v["to"] is None:
        raise ConvertError("--to is required: orbax or hf")
    if v["to"] == "orbax":
        if v["like"] or v["save_dtype"]:
            raise ConvertError(f"--{'like' if v['like'] else 'save_dtype'} is only used with "
                               f"--to=hf")
        return to_orbax(v["src"], v["dst"], overwrite=v["overwrite"],
                        param_dtype=v["param_dtype"], step=v["step"] or 0)
    if holders["param_dtype"].present:
        raise ConvertError("--param_dtype is only used with --to=orbax (--to=hf: --save_dtype)")
    return to_hf(v["src"], v["like"], v["dst"], step=v["step"], overwrite=v["overwrite"],
                 save_dtype=v["save_dtype"] or None)
