"""Checkpoint loading / saving: round trip, transformers compatibility, key and config forms,
sharded files, loading onto a mesh, and clear errors for bad folders."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import Qwen2ForCausalLM, SiglipVisionModel

from lvr_jax.weights import hf, io
from sharding.mesh import make_mesh
from tests import torch_reference as ref


def flat_params(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_roundtrip_identical_and_transformers_loads_it(vila_dir, vila_parts, tmp_path):
    model, tok, cfg = hf.load_vlm(vila_dir)
    out = hf.save_hf(model, tmp_path / "saved", tokenizer=tok)
    model2, tok2, cfg2 = hf.load_vlm(out)
    assert cfg2 == cfg and len(tok2) == len(tok)
    a, b = flat_params(model), flat_params(model2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    # transformers reads the written llm/ and vision_tower/ with no missing or unexpected keys
    torch_llm, torch_vis, _ = vila_parts
    llm, info = Qwen2ForCausalLM.from_pretrained(out / "llm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, cfg.llm.vocab_size, (1, 9))
    with torch.no_grad():
        assert ref.rel_err(llm(ids).logits, torch_llm(ids).logits) < 1e-6
    vis, info = SiglipVisionModel.from_pretrained(out / "vision_tower", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pix = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert ref.rel_err(vis(pix).last_hidden_state, torch_vis(pix).last_hidden_state) < 1e-6
    proj = load_file(str(out / "mm_projector" / "model.safetensors"))
    assert sorted(proj) == sorted(f"layers.{k}" for k in vila_parts[2].state_dict())


def test_save_refuses_to_clobber_and_failure_keeps_old(vila_dir, tmp_path):
    model, tok, _ = hf.load_vlm(vila_dir)
    target = hf.save_hf(model, tmp_path / "ck")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hf.save_hf(model, target)

    class Boom:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        hf.save_hf(model, target, tokenizer=Boom(), overwrite=True)
    assert (target / "llm" / "model.safetensors").is_file()  # old checkpoint intact
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]     # no temp folder left behind


def test_key_and_config_forms(vila_dir, tmp_path):
    """Vision keys with and without `vision_model.`, rope_theta vs rope_parameters, sharded
    safetensors with an index: all load to the same arrays."""
    base, _, _ = hf.load_vlm(vila_dir)
    alt = tmp_path / "alt"
    shutil.copytree(vila_dir, alt)
    vis = alt / "vision_tower" / "model.safetensors"
    tensors = load_file(str(vis))
    prefixed = any(k.startswith("vision_model.") for k in tensors)
    renamed = {(k.removeprefix("vision_model.") if prefixed else "vision_model." + k): v
               for k, v in tensors.items()}
    save_file(renamed, str(vis))
    cfg_path = alt / "llm" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    theta = cfg.pop("rope_parameters", None) or {}
    cfg.pop("rope_theta", None)
    if theta:
        cfg["rope_theta"] = theta["rope_theta"]
    else:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg_path.write_text(json.dumps(cfg))
    llm_file = alt / "llm" / "model.safetensors"
    llm = load_file(str(llm_file))
    llm_file.unlink()
    io.write_tensors(alt / "llm", sorted(llm.items()), max_shard_bytes=200_000)
    assert (alt / "llm" / io.INDEX_NAME).is_file()
    model, _, _ = hf.load_vlm(alt)
    a, b = flat_params(base), flat_params(model)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_load_onto_mesh_is_sharded_and_equal(vila_dir):
    mesh = make_mesh({"data": 1, "fsdp": 4, "seq": 1, "tensor": 2})
    model, _, _ = hf.load_vlm(vila_dir, mesh=mesh, param_dtype=jnp.bfloat16)
    base, _, _ = hf.load_vlm(vila_dir)
    q = model.llm.layers.q_kernel.get_value()           # [layers, embed, heads, head_dim]
    assert q.dtype == jnp.bfloat16
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 16, 2, 16)
    k = model.llm.layers.k_kernel.get_value()           # 2 KV heads over tensor=2 divide
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    want = base.llm.layers.q_kernel.get_value().astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(q, np.float32),
                                  np.asarray(want, np.float32))


def _break(src, tmp_path, fn):
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    fn(dst)
    return dst


def test_bad_checkpoints_give_clear_errors(vila_dir, tmp_path):
    d = _break(vila_dir, tmp_path / "a", lambda d: shutil.rmtree(d / "vision_tower"))
    with pytest.raises(FileNotFoundError, match="vision_tower/"):
        hf.load_vlm(d)

    def wrong_type(d):
        p = d / "mm_projector" / "config.json"
        p.write_text(json.dumps({"mm_projector_type": "mlp_downsample_4x4"}))
    d = _break(vila_dir, tmp_path / "b", wrong_type)
    with pytest.raises(io.CheckpointError, match=r"mm_projector/config.json.*mlp_downsample_4x4"):
        hf.load_vlm(d)

    def wrong_shape(d):
        f = d / "llm" / "model.safetensors"
        t = load_file(str(f))
        t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:, :5]
        save_file(t, str(f))
    d = _break(vila_dir, tmp_path / "c", wrong_shape)
    with pytest.raises(io.CheckpointError,
                       match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model.safetensors.*\(96, 5\)"):
        hf.load_vlm(d)

    def torch_pickle(d):
        f = d / "llm" / "model.safetensors"
        torch.save(load_file(str(f)), d / "llm" / "pytorch_model.bin")
        f.unlink()
    d = _break(vila_dir, tmp_path / "d", torch_pickle)
    with pytest.raises(io.CheckpointError, match=r"pytorch_model\.bin.*safetensors"):
        hf.load_vlm(d)

    def missing_key(d):
        f = d / "mm_projector" / "model.safetensors"
        t = load_file(str(f))
        del t["layers.4.bias"]
        save_file(t, str(f))
    d = _break(vila_dir, tmp_path / "e", missing_key)
    with pytest.raises(io.CheckpointError, match=r"layers\.4\.bias.*mm_projector"):
        hf.load_vlm(d)
