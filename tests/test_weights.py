"""Checkpoint loading / saving: round trip, transformers compatibility, key and config forms,
sharded files, loading onto a mesh, and clear errors for bad folders."""

import copy
import json
import logging
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from lvr_jax.models import qwen2 as ours
from lvr_jax.models.layers import rope_cos_sin
from lvr_jax.weights import hf, io
from sharding.mesh import make_mesh
from tests import torch_reference as ref


TOL = 1e-4  # as the parity tests


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

    def extra(folder, key, like):
        def add(d):
            f = d / folder / "model.safetensors"
            t = load_file(str(f))
            t[key] = t[like]
            save_file(t, str(f))
        return add
    # weights the config does not account for are refused, never dropped: a projector tensor of
    # another kind, a layer past num_hidden_layers
    d = _break(vila_dir, tmp_path / "f", extra("mm_projector", "layers.9.weight", "layers.4.weight"))
    with pytest.raises(io.CheckpointError, match=r"mm_projector.*does not have: \['layers\.9\.weight'\]"):
        hf.load_vlm(d)
    d = _break(vila_dir, tmp_path / "g", extra("llm", "model.layers.5.mlp.up_proj.weight",
                                               "model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(io.CheckpointError, match=r"layers past the config's num_hidden_layers=2"):
        hf.load_vlm(d)
    # an unused buffer of a layer the config has (transformers 4.3x saved rotary inv_freq) loads
    d = _break(vila_dir, tmp_path / "i", extra("llm", "model.layers.1.self_attn.rotary_emb.inv_freq",
                                               "model.norm.weight"))
    hf.load_vlm(d)

    def no_field(d):
        p = d / "llm" / "config.json"
        p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items()
                                 if k != "intermediate_size"}))
    d = _break(vila_dir, tmp_path / "h", no_field)
    with pytest.raises(io.CheckpointError, match=r"llm/config.json: missing field 'intermediate_size'"):
        hf.load_vlm(d)


def test_load_keeps_the_settings_the_weights_do_not_hold(vila_dir, tmp_path):
    """The vision feature layer written by save_hf comes back; the prompt layout settings reach
    the loaded config; bf16 weights are written with "torch_dtype": "bfloat16"."""
    import dataclasses

    model, tok, cfg = hf.load_vlm(vila_dir, ring_prompt=True, prefill_chunks=2)
    assert (cfg.ring_prompt, cfg.prefill_chunks) == (True, 2) and model.cfg == cfg
    model.cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, feature_layer=-1))
    out = hf.save_hf(model, tmp_path / "saved", tokenizer=tok, save_dtype=jnp.bfloat16)
    _, _, cfg2 = hf.load_vlm(out)
    assert cfg2.vision.feature_layer == -1 and (cfg2.ring_prompt, cfg2.prefill_chunks) == (False, 1)
    for part in ("llm", "vision_tower"):
        assert json.loads((out / part / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------
# Media tokens that do not fit the embedding: grown as VILA / transformers resize it


def _vila_with_vocab(folder, vila_parts, vocab, tie=False, seed=11):
    """A VILA folder whose tokenizer (the tiny BPE, no media tokens) has `n` tokens and whose
    LLM embedding has `vocab(n)` rows. Returns (folder, torch llm, n)."""
    from transformers import AutoTokenizer

    from lvr_jax.weights.tiny import make_tokenizer
    make_tokenizer(folder.parent / "tok")   # the tokenizer save_vila writes (same corpus)
    n = len(AutoTokenizer.from_pretrained(str(folder.parent / "tok")))
    torch_llm = ref.tiny_qwen2(seed=seed, tie=tie, vocab=vocab(n))
    ref.save_vila(folder, torch_llm, *vila_parts[1:], "mlp_downsample_2x2_fix")
    return folder, torch_llm, n


@pytest.mark.parametrize("tie", [False, True])
def test_media_tokens_grow_the_embedding(tmp_path, vila_parts, caplog, tie):
    folder, torch_llm, n = _vila_with_vocab(tmp_path / "vila", vila_parts, lambda n: n, tie=tie)
    with caplog.at_level(logging.INFO, logger="lvr_jax.weights.hf"):
        model, tok, cfg = hf.load_vlm(folder)
    assert len(tok) == n + 2 and cfg.llm.vocab_size == n + 2
    assert cfg.video_token_id == n + 1                  # <image> = n, <vila/video> = n + 1
    assert any(f"from {n} to {n + 2} rows" in r.getMessage() for r in caplog.records)
    # new rows: the mean of the old ones (embedding, and the untied lm_head)
    old = torch_llm.model.embed_tokens.weight.detach().numpy()
    embed = np.asarray(model.llm.embed.get_value())
    assert embed.shape == (n + 2, 64)
    np.testing.assert_array_equal(embed[:n], old)
    np.testing.assert_allclose(embed[n:], np.repeat(old.mean(0, keepdims=True), 2, 0), atol=1e-7)
    if not tie:
        old_head = torch_llm.lm_head.weight.detach().numpy()
        head = np.asarray(model.llm.lm_head.get_value()).T
        np.testing.assert_array_equal(head[:n], old_head)
        np.testing.assert_allclose(head[n:], np.repeat(old_head.mean(0, keepdims=True), 2, 0),
                                   atol=1e-7)
    # a prompt without media tokens: the old vocabulary's logits are unchanged, and all of them
    # match transformers' resize_token_embeddings (mean_resizing: the mean + ~1e-9-cov noise)
    ids = np.asarray(tok.encode("the video shows a red ball moving left"), np.int64)[None]
    got = model.llm(model.llm.embed_tokens(jnp.asarray(ids)), jnp.arange(ids.shape[1])[None])
    with torch.no_grad():
        want = torch_llm(torch.from_numpy(ids)).logits.numpy()
        resized = copy.deepcopy(torch_llm)
        resized.resize_token_embeddings(n + 2)
        want_resized = resized(torch.from_numpy(ids)).logits.numpy()
    assert got.shape == (1, ids.shape[1], n + 2)
    assert ref.rel_err(got[..., :n], want) < TOL
    assert ref.rel_err(got, want_resized) < TOL
    # load_llm on the llm/ folder grows the same way
    llm, llm_cfg = hf.load_llm(folder / "llm")
    assert llm_cfg.vocab_size == n + 2
    np.testing.assert_array_equal(np.asarray(llm.embed.get_value()), embed)
    # save_hf writes the grown size (config + tensors + tokenizer); it loads back without growing
    out = hf.save_hf(model, tmp_path / "saved", tokenizer=tok)
    assert json.loads((out / "llm" / "config.json").read_text())["vocab_size"] == n + 2
    assert json.loads((out / "config.json").read_text())["llm_cfg"]["vocab_size"] == n + 2
    saved = load_file(str(out / "llm" / "model.safetensors"))
    assert saved["model.embed_tokens.weight"].shape == (n + 2, 64)
    assert tie or saved["lm_head.weight"].shape == (n + 2, 64)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lvr_jax.weights.hf"):
        model2, tok2, cfg2 = hf.load_vlm(out)
    assert not any("rows for the" in r.getMessage() for r in caplog.records)
    assert cfg2 == cfg and len(tok2) == n + 2
    a, b = flat_params(model), flat_params(model2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    back, info = Qwen2ForCausalLM.from_pretrained(out / "llm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert back.config.vocab_size == n + 2


def test_tokenizer_longer_than_embedding_without_media_tokens_is_refused(tmp_path, vila_parts):
    folder, _, n = _vila_with_vocab(tmp_path / "vila", vila_parts, lambda n: n - 1)
    with pytest.raises(io.CheckpointError,
                       match=rf"{n} tokens before the 2 media tokens added.* {n - 1} rows"):
        hf.load_vlm(folder)
    with pytest.raises(io.CheckpointError, match=rf"{n - 1} rows"):
        hf.load_llm(folder / "llm")
    with pytest.raises(io.CheckpointError, match=rf"{n + 2} tokens .* only {n - 1} rows"):
        hf.load_tokenizer(folder / "llm", n - 1)   # fixed-size callers keep the strict check
    # media tokens already in the tokenizer and still too long: refused, not grown
    tok = hf.load_tokenizer(folder / "llm")
    tok.save_pretrained(str(folder / "llm"))
    with pytest.raises(io.CheckpointError, match=rf"{n + 2} tokens \(media tokens included\)"):
        hf.load_vlm(folder)


# ---------------------------------------------------------------------------------------------
# rope_scaling: linear and dynamic (NTK) as transformers computes them; other types refused


def _scaled_qwen2(rope, max_pos, seed=5, vocab=128):
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                      rms_norm_eps=1e-6, max_position_embeddings=max_pos, rope_scaling=rope,
                      attn_implementation="eager")
    return ref.randomize(Qwen2ForCausalLM(cfg), seed, std=0.08)


@pytest.mark.parametrize("kind,factor", [("linear", 4.0), ("dynamic", 2.0), ("dynamic", 8.0)])
@pytest.mark.parametrize("length", [40, 12])
def test_rope_tables_match_transformers(kind, factor, length):
    """cos/sin of `layers.rope_cos_sin` == transformers' Qwen2RotaryEmbedding (a fresh one per
    call: its dynamic inv_freq is stateful), past and within the original max (16)."""
    rope = {"rope_type": kind, "factor": factor}
    emb = Qwen2RotaryEmbedding(_scaled_qwen2(rope, 16).config)
    pos = np.stack([np.arange(length), np.maximum(np.arange(length) - 3, 0)])
    with torch.no_grad():
        cos, sin = emb(torch.zeros(1, dtype=torch.float32), torch.from_numpy(pos))
    got_cos, got_sin = rope_cos_sin(jnp.asarray(pos), 16, 10000.0, scaling=kind, factor=factor,
                                    original_max=16)
    np.testing.assert_allclose(got_cos, cos.numpy(), atol=2e-6)
    np.testing.assert_allclose(got_sin, sin.numpy(), atol=2e-6)
    plain_cos, _ = rope_cos_sin(jnp.asarray(pos), 16, 10000.0)
    scaled = kind == "linear" or length > 16
    assert (np.abs(np.asarray(plain_cos) - cos.numpy()).max() > 1e-3) == scaled
    jitted = jax.jit(lambda p: rope_cos_sin(p, 16, 10000.0, scaling=kind, factor=factor,
                                            original_max=16))(jnp.asarray(pos))
    np.testing.assert_allclose(jitted[0], cos.numpy(), atol=2e-6)
    pinned = rope_cos_sin(jnp.asarray(pos[:, -2:]), 16, 10000.0, scaling=kind, factor=factor,
                          original_max=16, seq_len=length)    # a slice at the whole length's scale
    np.testing.assert_allclose(pinned[1], sin.numpy()[:, -2:], atol=2e-6)


@pytest.mark.parametrize("kind,factor,form", [("linear", 4.0, "4.x"), ("linear", 4.0, "5.x"),
                                              ("dynamic", 2.0, "4.x"), ("dynamic", 2.0, "5.x")])
def test_rope_scaling_logits_match_transformers(tmp_path, kind, factor, form):
    """A Qwen2 folder with rope_scaling (4.x `rope_scaling: {type, factor}` or 5.x
    `rope_parameters: {rope_type, factor}`) loads with the scaling and gives transformers'
    logits on a sequence longer than max_position_embeddings (16)."""
    torch_llm = _scaled_qwen2({"rope_type": kind, "factor": factor}, 16)
    torch_llm.save_pretrained(tmp_path)
    if form == "4.x":
        path = tmp_path / "config.json"
        cfg = json.loads(path.read_text())
        cfg.pop("rope_parameters")
        cfg.update(rope_theta=10000.0, rope_scaling={"type": kind, "factor": factor})
        path.write_text(json.dumps(cfg))
    model, cfg = hf.load_llm(tmp_path)
    assert (cfg.rope_scaling_type, cfg.rope_scaling_factor) == (kind, factor)
    assert cfg.max_position_embeddings == 16
    for length in (40, 12):
        ids = np.random.default_rng(length).integers(0, 128, (2, length))
        with torch.no_grad():
            want = _scaled_qwen2({"rope_type": kind, "factor": factor}, 16)(
                torch.from_numpy(ids)).logits.numpy()      # fresh: dynamic inv_freq is stateful
        pos = jnp.broadcast_to(jnp.arange(length), (2, length))
        got = model(model.embed_tokens(jnp.asarray(ids)), pos)
        assert ref.rel_err(got, want) < TOL, length
        if kind == "dynamic" and length > 16:   # sequence parallel: the length of all shards
            mesh = make_mesh({"data": 1, "fsdp": 1, "seq": 4, "tensor": 2})
            sharded, _ = hf.load_llm(tmp_path, mesh=mesh)
            ring = sharded(sharded.embed_tokens(jnp.asarray(ids)), pos, mesh=mesh)
            assert ref.rel_err(ring, want) < TOL
    # written back in both forms; transformers and from_hf read the same scaling
    hf_cfg = cfg.to_hf()
    assert hf_cfg["rope_scaling"] == {"rope_type": kind, "type": kind, "factor": factor}
    back = Qwen2Config(**hf_cfg).rope_parameters
    assert (back["rope_type"], back["factor"], back["rope_theta"]) == (kind, factor, 10000.0)
    assert Qwen2Config(**{**hf_cfg, "rope_scaling": None}).rope_parameters["rope_type"] == kind
    assert ours.Qwen2Config.from_hf(hf_cfg, dtype=cfg.dtype, param_dtype=cfg.param_dtype) == cfg
    assert ours.Qwen2Config.from_hf({**hf_cfg, "rope_scaling": None}, dtype=cfg.dtype,
                                    param_dtype=cfg.param_dtype) == cfg


@pytest.mark.parametrize("field,rope", [
    ("rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    ("rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}),
    ("rope_scaling", {"type": "linear"}),
])
def test_unsupported_rope_scaling_is_refused(tmp_path, field, rope):
    ref.tiny_qwen2(seed=1).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = rope
    path.write_text(json.dumps(cfg))
    what = rope.get("type") or rope.get("rope_type")
    with pytest.raises(io.CheckpointError, match=rf"config\.json: {field}: RoPE type '{what}'"):
        hf.load_llm(tmp_path)
    with pytest.raises(ValueError, match="rope_scaling_type='yarn'"):
        ours.Qwen2Config(8, 8, 8, 1, 1, 1, rope_scaling_type="yarn")


@pytest.mark.parametrize("edit,message", [
    ({"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0},
     "sliding-window attention is not supported: use_sliding_window=True"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "sliding-window attention"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_attention_and_activation_it_does_not_run_are_refused(tmp_path, edit, message):
    """A checkpoint whose layers attend in a sliding window or use another activation is refused,
    naming the field (it had loaded and run full causal attention: 0.62 relative error); Qwen2.5's
    `use_sliding_window: false` with a window size set loads."""
    ref.tiny_qwen2(seed=1).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(io.CheckpointError, match=re.escape(message)):
        hf.load_llm(tmp_path)
    path.write_text(json.dumps({**cfg, "use_sliding_window": False, "sliding_window": 4,
                                "max_window_layers": 0}))
    hf.load_llm(tmp_path)


def test_atomic_write_gives_a_plain_files_permissions(tmp_path):
    """Not mkstemp's owner-only mode: what `open` gives under this process's umask."""
    from lvr_jax.weights.io import atomic_write

    atomic_write(tmp_path / "a.json", b"{}")
    (tmp_path / "b.json").write_bytes(b"{}")
    assert (tmp_path / "a.json").stat().st_mode == (tmp_path / "b.json").stat().st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]
