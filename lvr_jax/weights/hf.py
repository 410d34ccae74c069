"""HF / VILA checkpoints <-> nnx models: load straight into (sharded) arrays, save back as HF.

A VILA-layout folder holds `config.json` (model_type "vila") and the sub-folders `llm/` (Qwen2 +
tokenizer), `vision_tower/` (SigLIP) and `mm_projector/` (NVILA projector), each with its own
config.json and safetensors weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvr_jax.models.attention import AttentionOptions
from lvr_jax.models.projector import projector_dims
from lvr_jax.models.qwen2 import Qwen2, Qwen2Config
from lvr_jax.models.siglip import SiglipConfig, SiglipVision
from lvr_jax.models.vlm import VLM, VLMConfig
from lvr_jax.weights.io import CheckpointError, TensorDir, read_json, replace_dir, write_tensors
from lvr_jax.weights.layout import Tensor, projector_tensors, qwen2_tensors, siglip_tensors
from lvr_jax.weights.tokens import MEDIA_TOKENS, VIDEO_TOKEN
from sharding.mesh import logical_sharding
from sharding.multihost import host_array

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Loading


def _read_layer(src: TensorDir, spec: Tensor, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor, shape-checked and converted to our layout."""
    if key not in src:
        raise CheckpointError(f"tensor {key!r} missing in {src.folder}")
    want = spec.hf_shape(shape)
    full = want[0]
    if spec.rows is not None:
        want = (spec.rows, *want[1:])
    got = src.shape(key)
    if got != want:
        raise CheckpointError(f"shape mismatch for {key!r} in {src.file_of(key)}: checkpoint has "
                              f"{got}, the config expects {want}")
    a = src.get(key)
    if spec.rows is not None:
        a = grow_rows(a, full)
    return spec.to_ours(a, shape)


def grow_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """`a` [n, ...] with rows n..rows-1 appended, each the mean of the n rows (computed in float32,
    cast back), as transformers' `resize_token_embeddings` initialises added tokens: its default
    (`mean_resizing=True`) samples N(mean, 1e-9 * covariance), i.e. the mean up to noise of
    ~3e-5 of the rows' spread; we take the mean itself, so loading is deterministic."""
    extra = rows - a.shape[0]
    if extra <= 0:
        return a
    mean = np.mean(a.astype(np.float32), axis=0, keepdims=True).astype(a.dtype)
    return np.concatenate([a, np.repeat(mean, extra, axis=0)], axis=0)


def _fill(abstract: nnx.Module, parts: list[tuple[tuple, TensorDir, dict]], mesh, rules,
          dtype) -> nnx.Module:
    """Materialise an abstract module's Params from checkpoint tensors, straight onto devices.

    Each device shard is cut from one param's tensors (read once per param, one layer at a time),
    so no full host copy of the model is made and no device gets more than its shard.
    """
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    device = jax.devices()[0]
    used: set[tuple] = set()
    for root, src, specs in parts:
        for sub, spec in specs.items():
            path = (*root, *sub)
            if path not in flat:
                raise KeyError(f"model has no param {path}")
            var = flat[path]
            names = var.get_metadata().get("out_sharding")
            stacked = bool(names) and names[0] == "layers"
            if stacked:
                layers = [_read_layer(src, spec, spec.key.format(i=i), var.shape[1:])
                          for i in range(var.shape[0])]
                host = np.stack(layers)
            else:
                host = _read_layer(src, spec, spec.key, var.shape)
            host = host.astype(dtype)
            sharding = (logical_sharding(names, var.shape, mesh, rules) if mesh is not None
                        else jax.sharding.SingleDeviceSharding(device))
            arr = jax.make_array_from_callback(var.shape, sharding, lambda idx, h=host: h[idx])
            flat[path] = var.replace(arr)
            used.add(path)
    missing = [p for p in flat if p not in used and isinstance(flat[p], nnx.Param)]
    if missing:
        raise CheckpointError(f"no checkpoint tensor for params {missing}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _unused(src: TensorDir, specs: dict, layers: int) -> list[str]:
    expected = {s.key.format(i=i) for s in specs.values() for i in range(max(layers, 1))}
    return sorted(k for k in src.keys() if k not in expected)


def _llm_parts(folder: Path, cfg: Qwen2Config, stored_vocab: int | None = None):
    """The LLM's tensors; `stored_vocab` < cfg.vocab_size: the checkpoint's embedding / lm_head
    rows, grown to the config's (`fit_vocab`)."""
    src = TensorDir(folder)
    prefix = src.find_prefix("embed_tokens.weight")
    specs = qwen2_tensors(cfg, prefix)
    if stored_vocab is not None and stored_vocab != cfg.vocab_size:
        for path in (("embed",), ("lm_head",)):
            if path in specs:
                specs[path] = dataclasses.replace(specs[path], rows=stored_vocab)
    skip = [k for k in _unused(src, specs, cfg.num_layers) if k != "lm_head.weight"]
    extra = [k for k in skip if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", k))
             and int(m.group(1)) >= cfg.num_layers]    # (not e.g. old rotary_emb.inv_freq)
    if extra:   # layers past num_hidden_layers: the config and the weights disagree
        raise CheckpointError(f"{folder}: {len(extra)} tensors of layers past the config's "
                              f"num_hidden_layers={cfg.num_layers}, e.g. {extra[:3]}")
    if skip:
        log.warning("%s: ignoring %d unused tensors, e.g. %s", folder, len(skip), skip[:3])
    return src, specs


def _vision_parts(folder: Path, cfg: SiglipConfig):
    src = TensorDir(folder)
    prefix = src.find_prefix("embeddings.patch_embedding.weight")
    specs = siglip_tensors(prefix)
    skip = _unused(src, specs, cfg.num_layers)
    if skip:
        log.info("%s: not loading %d tensors (e.g. the unused head): %s", folder, len(skip),
                 skip[:3])
    return src, specs


def _projector_parts(folder: Path, kind: str):
    src = TensorDir(folder)
    specs = projector_tensors(kind, src.find_prefix("layers.1.weight"))
    extra = _unused(src, specs, 0)
    if extra:   # another projector than `kind` (every tensor of it is a weight we would drop)
        raise CheckpointError(f"{folder}: {len(extra)} tensors the {kind!r} projector does not "
                              f"have: {extra[:5]}")
    return src, specs


def _dtypes(dtype, param_dtype):
    return dict(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype or jnp.float32))


def _config(folder: Path, from_hf, **fields):
    """`from_hf` of `folder`/config.json; a missing field or an unsupported setting is an error
    naming the file."""
    try:
        return from_hf(read_json(folder / "config.json"), **fields)
    except KeyError as e:
        raise CheckpointError(f"{folder / 'config.json'}: missing field {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None


def _llm_config(folder: Path, **fields) -> Qwen2Config:
    """Qwen2Config of `folder`/config.json (`_config`)."""
    return _config(folder, Qwen2Config.from_hf, **fields)


def load_llm(path, *, mesh=None, dtype=jnp.float32, param_dtype=None, rules=None, remat=False,
             attention: AttentionOptions | None = None):
    """Load a plain HF Qwen2 folder -> (Qwen2, Qwen2Config).

    With a tokenizer in the folder, the embedding (and an untied lm_head) grows to fit it with
    the media tokens as `load_vlm` does (`fit_vocab`); `load_tokenizer(path)` then gives the same
    token ids."""
    path = Path(path)
    dt = _dtypes(dtype, param_dtype)
    cfg = _llm_config(path, remat=remat, attention=attention or AttentionOptions(), **dt)
    stored = cfg.vocab_size
    if has_tokenizer(path):
        cfg = fit_vocab(cfg, *_tokenizer_with_media(path), path)
    model = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    return _fill(model, [((), *_llm_parts(path, cfg, stored))], mesh, rules, dt["param_dtype"]), cfg


def load_vision_tower(path, *, mesh=None, dtype=jnp.float32, param_dtype=None, rules=None,
                      remat=False):
    """Load a plain HF SigLIP vision folder -> (SiglipVision, SiglipConfig)."""
    path = Path(path)
    dt = _dtypes(dtype, param_dtype)
    cfg = SiglipConfig.from_hf(read_json(path / "config.json"), remat=remat, **dt)
    model = nnx.eval_shape(lambda: SiglipVision(cfg, rngs=nnx.Rngs(0)))
    return _fill(model, [((), *_vision_parts(path, cfg))], mesh, rules, dt["param_dtype"]), cfg


def _subfolder(path: Path, name: str) -> Path:
    sub = path / name
    if not sub.is_dir():
        raise FileNotFoundError(f"VILA checkpoint {path} has no '{name}/' sub-folder (expected "
                                f"llm/, vision_tower/ and mm_projector/)")
    return sub


def vila_folder_problem(path, *, tokenizer: bool = False) -> str | None:
    """What keeps `path` from being a VILA-layout checkpoint folder (config.json, llm/,
    vision_tower/, mm_projector/; with `tokenizer`, a tokenizer in llm/), as the end of a
    sentence naming it (": no such folder", " has no ..."); None when nothing does."""
    path = Path(path)
    if not path.is_dir():
        return ": no such folder"
    if not (path / "config.json").is_file():
        hint = ""
        if (path / "checkpoints").is_dir() or any(p.name.isdigit() for p in path.iterdir()):
            hint = (" It looks like orbax training checkpoints: convert them with "
                    "`python launch/convert_checkpoint.py --to=hf --src=... --like=... --dst=...`.")
        return (" has no config.json; expected a VILA-layout folder (config.json, llm/, "
                f"vision_tower/, mm_projector/).{hint}")
    for sub in ("llm", "vision_tower", "mm_projector"):
        if not (path / sub).is_dir():
            return (f" has no '{sub}/' sub-folder (expected llm/, vision_tower/ and "
                    f"mm_projector/)")
    if tokenizer and not has_tokenizer(path / "llm"):
        return f": no tokenizer in {path / 'llm'}"
    return None


def projector_type(path: Path) -> str:
    """The mm_projector_type from mm_projector/config.json or the top-level mm_projector_cfg."""
    sub = path / "mm_projector" / "config.json"
    cfg = read_json(sub) if sub.is_file() else {}
    top = read_json(path / "config.json").get("mm_projector_cfg") or {}
    kind = cfg.get("mm_projector_type") or (top.get("mm_projector_type")
                                            if isinstance(top, dict) else None)
    if kind is None:
        raise CheckpointError(f"{sub}: no mm_projector_type")
    try:
        projector_dims(kind, 1, 1)
    except ValueError as e:
        raise CheckpointError(f"{sub}: {e}") from None
    return kind


def has_tokenizer(folder) -> bool:
    """Whether `folder` holds a HF tokenizer (tokenizer.json or tokenizer_config.json)."""
    return any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def _tokenizer_with_media(folder):
    """(AutoTokenizer of `folder` with the missing media tokens added, how many were added)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    missing = [t for t in MEDIA_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    return tok, len(missing)


def fit_vocab(cfg: Qwen2Config, tok, added: int, folder) -> Qwen2Config:
    """`cfg` with vocab_size grown to len(tok) when only the `added` media tokens make `tok`
    longer than the checkpoint's embedding (VILA resizes the embedding for them; the rows load
    as `grow_rows` makes them; logged); else `cfg`. A tokenizer longer than the embedding by
    itself is the wrong tokenizer: an error naming the sizes, rather than growing silently."""
    n, vocab = len(tok), cfg.vocab_size
    if n <= vocab:
        return cfg
    if n - added > vocab:
        has = (f"{n - added} tokens before the {added} media tokens added" if added
               else f"{n} tokens (media tokens included)")
        raise CheckpointError(f"tokenizer in {folder} has {has}, more than the {vocab} rows of "
                              f"the LLM embedding: not this model's tokenizer?")
    log.warning("%s: growing the embedding%s from %d to %d rows for the %d media token(s) the "
                "tokenizer lacked (new rows: the mean of the old ones)", folder,
                "" if cfg.tie_word_embeddings else " and lm_head", vocab, n, added)
    return dataclasses.replace(cfg, vocab_size=n)


def load_tokenizer(folder, vocab_size: int | None = None):
    """AutoTokenizer from `folder`, with the media tokens added when missing.

    With `vocab_size` (the rows of an embedding that will not be grown): an error when the
    tokenizer, media tokens included, is longer. `load_vlm` / `load_llm` grow the embedding for
    missing media tokens instead (`fit_vocab`)."""
    tok, _ = _tokenizer_with_media(folder)
    if vocab_size is not None and len(tok) > vocab_size:
        raise CheckpointError(f"tokenizer in {folder} has {len(tok)} tokens (with media tokens) "
                              f"but the LLM embedding has only {vocab_size} rows")
    return tok


def newline_id(tokenizer) -> int:
    ids = tokenizer.encode("\n", add_special_tokens=False)
    if len(ids) != 1:
        raise CheckpointError(f"'\\n' is not a single token for this tokenizer: {ids}")
    return ids[0]


def load_vlm(path, *, mesh=None, dtype=jnp.float32, param_dtype=None, rules=None, remat=False,
             attention: AttentionOptions | None = None, vision_chunk: int = 0,
             llm_chunks: dict | None = None, ring_prompt: bool = False, prefill_chunks: int = 1):
    """Load a VILA-layout checkpoint folder -> (VLM, tokenizer, VLMConfig).

    `dtype` is the compute dtype, `param_dtype` the stored one (default float32). With a mesh,
    every param is placed by its logical axis names (rules: `sharding.mesh.DEFAULT_RULES`).
    `attention`: the LLM's attention options (compiled-program knobs; default the defaults).
    `vision_chunk`: images per SigLIP micro-batch (0: all at once; `SiglipConfig.frame_chunk`).
    `llm_chunks`: the LLM's memory knobs (`Qwen2Config.logits_chunk`, `mlp_chunk`; default 0).
    Media tokens missing from the tokenizer are added; when they do not fit the LLM embedding,
    it (and an untied lm_head) grows to len(tokenizer), new rows the mean of the old ones, and
    the returned config's vocab_size follows (`fit_vocab`; `save_hf` writes the grown size).
    `rope_scaling` linear / dynamic is read into the LLM config; other types are refused.
    `ring_prompt`, `prefill_chunks`: how prompts are built and prefilled (`VLMConfig`).
    The vision features' layer is the top config's `mm_vision_select_layer` (default -2).
    """
    path = Path(path)
    top = read_json(path / "config.json")
    if top.get("model_type") not in ("vila", "llava_llama", None):
        raise CheckpointError(f"{path / 'config.json'}: model_type {top.get('model_type')!r} is "
                              f"not a VILA checkpoint")
    llm_dir, vis_dir, proj_dir = (_subfolder(path, n) for n in ("llm", "vision_tower",
                                                                 "mm_projector"))
    dt = _dtypes(dtype, param_dtype)
    attention = attention or AttentionOptions()
    llm_cfg = _llm_config(llm_dir, remat=remat, attention=attention, **(llm_chunks or {}), **dt)
    stored_vocab = llm_cfg.vocab_size
    vis_cfg = _config(vis_dir, SiglipConfig.from_hf, remat=remat,
                      attention_impl=attention.implementation, frame_chunk=vision_chunk,
                      feature_layer=int(top.get("mm_vision_select_layer", -2)), **dt)
    kind = projector_type(path)
    tok = None
    if has_tokenizer(llm_dir):
        tok, added = _tokenizer_with_media(llm_dir)
        llm_cfg = fit_vocab(llm_cfg, tok, added, llm_dir)
    else:
        log.warning("%s has no tokenizer; using token ids from config.json", llm_dir)
    video_id = tok.convert_tokens_to_ids(VIDEO_TOKEN) if tok else top.get("video_token_id", -1)
    nl_id = newline_id(tok) if tok else top.get("newline_token_id", 198)
    cfg = VLMConfig(llm_cfg, vis_cfg, kind, video_token_id=int(video_id), newline_token_id=nl_id,
                    ring_prompt=ring_prompt, prefill_chunks=prefill_chunks)
    model = nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0)))
    parts = [(("llm",), *_llm_parts(llm_dir, llm_cfg, stored_vocab)),
             (("vision",), *_vision_parts(vis_dir, vis_cfg)),
             (("projector",), *_projector_parts(proj_dir, kind))]
    return _fill(model, parts, mesh, rules, dt["param_dtype"]), tok, cfg


# ---------------------------------------------------------------------------------------------
# Saving


def _hf_tensors(module: nnx.Module, specs: dict, num_layers: int, save_dtype):
    """(HF key, array) pairs for one component, in HF layout."""
    flat = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    for path, spec in specs.items():
        arr = host_array(flat[path].get_value())
        if save_dtype is not None:
            arr = arr.astype(save_dtype)
        if "{i}" in spec.key:
            for i in range(num_layers):
                yield spec.key.format(i=i), spec.to_hf(arr[i])
        else:
            yield spec.key, spec.to_hf(arr)


def preprocessor_config(image_size: int) -> dict:
    """SiglipImageProcessor settings of NVILA: resize to the tower's size, mean = std = 0.5."""
    return {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
            "size": {"height": image_size, "width": image_size}, "resample": 3,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def save_hf(model: VLM, path, *, tokenizer=None, overwrite: bool = False, save_dtype=None):
    """Write `model` as a VILA-layout checkpoint folder (safetensors, HF key names and configs).

    The folder is built aside and moved into place at the end, so a failure never leaves a
    half-written checkpoint. In multi-process runs every process must call it; process 0 writes.
    """
    cfg: VLMConfig = model.cfg
    llm_hf, vis_hf = cfg.llm.to_hf(), cfg.vision.to_hf()
    for hf_cfg, part in ((llm_hf, cfg.llm), (vis_hf, cfg.vision)):   # the dtype written
        hf_cfg["torch_dtype"] = jnp.dtype(save_dtype or part.param_dtype).name
    proj_hf = {"model_type": "v2l_projector", "architectures": ["MultimodalProjector"],
               "mm_projector_type": cfg.projector_type}
    top = {"model_type": "vila", "architectures": ["LlavaLlamaModel"], "llm_cfg": llm_hf,
           "vision_tower_cfg": vis_hf, "mm_projector_cfg": proj_hf,
           "hidden_size": cfg.llm.hidden_size, "mm_hidden_size": cfg.vision.hidden_size,
           "video_token_id": cfg.video_token_id, "newline_token_id": cfg.newline_token_id,
           "mm_vision_select_layer": cfg.vision.feature_layer}
    components = [
        ("llm", llm_hf, _hf_tensors(model.llm, qwen2_tensors(cfg.llm), cfg.llm.num_layers,
                                    save_dtype)),
        ("vision_tower", vis_hf, _hf_tensors(model.vision, siglip_tensors(),
                                             cfg.vision.num_layers, save_dtype)),
        ("mm_projector", proj_hf, _hf_tensors(model.projector,
                                              projector_tensors(cfg.projector_type), 0,
                                              save_dtype)),
    ]
    tensors = [(name, hf, list(items)) for name, hf, items in components]  # all processes gather
    if jax.process_index() != 0:
        return Path(path)

    def build(tmp: Path):
        (tmp / "config.json").write_text(json.dumps(top, indent=2))
        for name, hf, items in tensors:
            sub = tmp / name
            sub.mkdir()
            (sub / "config.json").write_text(json.dumps(hf, indent=2))
            write_tensors(sub, items)
        (tmp / "vision_tower" / "preprocessor_config.json").write_text(
            json.dumps(preprocessor_config(cfg.vision.image_size), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "llm"))

    return replace_dir(build, path, overwrite=overwrite)
