"""launch/generate.py (answer a question about a video: `lvr_jax.eval.generate`) and
launch/convert_checkpoint.py (VILA/HF <-> orbax: `lvr_jax.train.convert`): greedy answers equal a
full-forward recompute, G samples, bit-identical round trips, training checkpoints exported with
exactly their params, errors that name the input."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from configs import demo
from lvr_jax.data.prompts import template_corpus
from lvr_jax.data.prompts import rl_prompt_ids
from lvr_jax.data.video import Preprocessor, read_frames
from lvr_jax.eval import generate
from lvr_jax.rl.rewards import extract_answer
from lvr_jax.train.settings import reward_style
from lvr_jax.rollout.sampler import stop_ids
from lvr_jax.train import checkpoint as ckpt_lib
from lvr_jax.train import convert, settings
from lvr_jax.train.checkpoint import Checkpointer, CheckpointError
from lvr_jax.weights import hf
from sharding.mesh import make_mesh

ROOT = Path(__file__).resolve().parents[1]
NUM_FRAMES, MAX_NEW = 8, 12


def _add_noise(model, seed: int, scale: float = 0.05):
    """Fresh noise on every Param of `model`, in place (host-side: no compile), keeping each
    array's sharding; returns the model."""
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(
        lambda x: jax.device_put((np.asarray(x) + scale * rng.standard_normal(x.shape))
                                 .astype(x.dtype), x.sharding), nnx.state(model, nnx.Param))
    nnx.update(model, noisy)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two synthetic videos with questions, a random tiny VILA checkpoint (noise on every param,
    so norms and biases are not their init) and a second one with the same architecture and
    tokenizer but other weights."""
    from lvr_jax.data.synthetic import generate_split
    from lvr_jax.weights.tiny import make_random_checkpoint

    root = tmp_path_factory.mktemp("launch_tools")
    jsonl = generate_split(root / "data", "val", 2, num_frames=16, size=28)
    recs = [json.loads(x) for x in open(jsonl)]
    make_random_checkpoint(demo.get_config().model, root / "init",
                           corpus=[r["reasoning"] for r in recs] + template_corpus())
    model, tok, _ = hf.load_vlm(root / "init")
    hf.save_hf(_add_noise(model, 5), root / "ckpt", tokenizer=tok)
    hf.save_hf(_add_noise(model, 6), root / "other", tokenizer=tok)
    return {"root": root, "ckpt": root / "ckpt", "other": root / "other", "recs": recs,
            "video": root / "data" / recs[0]["videos"]}


@pytest.fixture(scope="module")
def gen(tiny):
    """The checkpoint on fsdp=2 x seq=2 (frame-parallel encoding, ring prefill, sharded params)."""
    mesh = make_mesh({"fsdp": 2, "seq": 2}, jax.devices()[:4])
    return generate.Generator(demo.get_config(), tiny["ckpt"], mesh=mesh)


# ---------------------------------------------------------------------------------------------
# generate.py


def test_greedy_answer_equals_full_forward_argmax(tiny, gen):
    rec = tiny["recs"][0]
    out = gen.answer(tiny["video"], rec["problem"], num_frames=NUM_FRAMES, max_new_tokens=MAX_NEW)
    assert out["frame_indices"] == np.linspace(0, 15, NUM_FRAMES).astype(int).tolist()
    (resp,) = out["responses"]
    toks = np.asarray(resp["token_ids"])
    assert 1 <= len(toks) <= MAX_NEW
    assert resp["text"] == gen.tokenizer.decode(toks.tolist(), skip_special_tokens=True)
    assert resp["answer"] == extract_answer(resp["text"], style=reward_style(gen.config))
    eos = stop_ids(gen.tokenizer)
    assert resp["finished"] == (toks[-1] in eos)
    if len(toks) < MAX_NEW:
        assert toks[-1] in eos
    assert not np.isin(toks[:-1], eos).any()

    # Independent: unsharded model, dense attention, one forward over prompt + response.
    model, tok, _ = hf.load_vlm(tiny["ckpt"])
    pixels = Preprocessor.from_pretrained(tiny["ckpt"] / "vision_tower")(
        read_frames(tiny["video"], NUM_FRAMES))
    ids = rl_prompt_ids(tok, rec["problem"],
                        template=demo.get_config().data.pipeline.prompt_template)
    assert out["prompt_tokens"] == len(ids)
    assert out["sequence_length"] == len(ids) - 1 + NUM_FRAMES * model.cfg.tokens_per_frame

    @nnx.jit
    def greedy_next(model, pixels, ids, resp):
        prompt = model.embed_prompt(ids, model.encode_video(pixels))
        x = jnp.concatenate([prompt, model.llm.embed_tokens(resp)])
        logits = model(x[None], jnp.arange(x.shape[0])[None])[0]
        n = prompt.shape[0]
        return jnp.argmax(logits[n - 1:n - 1 + resp.shape[0]], axis=-1)

    want = np.asarray(greedy_next(model, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(toks)))
    np.testing.assert_array_equal(toks, want)
    assert "answer: " in generate.format_result(out)


def test_num_samples_with_temperature(tiny, gen):
    q = tiny["recs"][1]["problem"]
    kw = dict(num_frames=NUM_FRAMES, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.95,
              num_samples=3)
    a = gen.answer(tiny["video"], q, seed=1, **kw)
    assert len(a["responses"]) == 3 and a["sampling"]["num_samples"] == 3
    for r in a["responses"]:
        assert 1 <= r["num_tokens"] <= MAX_NEW == a["sampling"]["max_new_tokens"]
        assert r["answer"] == extract_answer(r["text"], style=reward_style(gen.config))
    seqs = [tuple(r["token_ids"]) for r in a["responses"]]
    assert len(set(seqs)) > 1, "three samples at temperature 1 should not all be equal"
    again = gen.answer(tiny["video"], q, seed=1, **kw)
    assert [tuple(r["token_ids"]) for r in again["responses"]] == seqs
    other = gen.answer(tiny["video"], q, seed=2, **kw)
    assert [tuple(r["token_ids"]) for r in other["responses"]] != seqs


def test_generate_flags(tiny, tmp_path):
    """The CLI layer in process: config file + mesh override, comma-separated --options,
    --json_out (`python launch/generate.py ...` runs the same `run_flags`)."""
    from absl import flags

    out = tmp_path / "answer.json"
    argv = ["generate.py", f"--checkpoint={tiny['ckpt']}", f"--video={tiny['video']}",
            "--question=Which shape appears first?",
            "--options=a red circle,a blue square,a green star,none", "--num_frames=4",
            "--max_new_tokens=4", "--config.mesh.fsdp=4", "--config.mesh.seq=2",
            f"--json_out={out}"]
    fv = flags.FlagValues()
    holders = generate.define_flags(fv, argv)
    fv(argv)
    assert holders["config"].value.mesh.seq == 2
    result = generate.run_flags(holders)
    got = json.loads(out.read_text())
    assert got == result
    assert got["question"].endswith("C. a green star\nD. none")
    assert len(got["frame_indices"]) == 4 and len(got["responses"]) == 1
    assert got["sampling"]["max_new_tokens"] == 4

    argv = ["generate.py", f"--video={tiny['video']}", "--question=q"]
    fv2 = flags.FlagValues()
    holders = generate.define_flags(fv2, argv)
    fv2(argv)
    with pytest.raises(generate.InputError, match="--checkpoint is required"):
        generate.run_flags(holders)


def test_generate_input_errors(tiny, tmp_path):
    cfg = demo.get_config()
    IE = generate.InputError
    with pytest.raises(IE, match=r"--checkpoint .*nowhere.*no such folder"):
        generate.Generator(cfg, tmp_path / "nowhere")
    (tmp_path / "orbax" / "7").mkdir(parents=True)
    with pytest.raises(IE, match=r"--checkpoint .*orbax has no config.json.*convert_checkpoint"):
        generate.Generator(cfg, tmp_path / "orbax")

    g = generate.Generator(cfg, tiny["ckpt"])
    q = tiny["recs"][0]["problem"]
    missing = tmp_path / "missing.mp4"
    with pytest.raises(IE, match=rf"--video {missing}: file not found"):
        g.answer(missing, q)
    with pytest.raises(IE, match=r"--video .*: not a regular file"):
        g.answer(tmp_path, q)
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(b"\x00\x01 definitely not a video " * 64)
    with pytest.raises(IE, match=rf"--video {bad}: "):
        g.answer(bad, q)
    with pytest.raises(IE, match=r"--question is too long: the prompt is \d+ tokens.*more than 320"):
        g.answer(tiny["video"], "what happens " * 400)
    with pytest.raises(IE, match=r"--question is empty"):
        g.answer(tiny["video"], "  ")
    with pytest.raises(IE, match=r"--question already lists options"):
        g.answer(tiny["video"], q, ["x", "y"])
    with pytest.raises(IE, match=r"--options \['only one'\]"):
        g.answer(tiny["video"], "which?", ["only one"])
    with pytest.raises(IE, match=r"--num_frames=0"):
        g.answer(tiny["video"], q, num_frames=0)
    with pytest.raises(IE, match=r"--top_p=0"):
        g.answer(tiny["video"], q, top_p=0.0)
    assert g.model is None, "input errors must come before loading the weights"
    with pytest.raises(IE, match=r"--json_out .* is a folder"):
        generate.run(cfg, tiny["ckpt"], tiny["video"], q, json_out=str(tmp_path))
    assert generate.parse_options(["a, b ,c"]) == ["a", "b", "c"]
    assert generate.parse_options(["a, b", "c"]) == ["a, b", "c"]
    assert generate.parse_options([]) is None


def test_evaluate_inputs_and_skipped_items(tiny, tmp_path):
    """evaluate_checkpoint names bad inputs before loading weights (a --limit below 1 had written
    an accuracy over 0 items; a missing or empty split, a folder without a checkpoint had ended
    in tracebacks), and counts the items it could not score (a missing video had silently left
    the denominator)."""
    from lvr_jax.eval.video_qa import evaluate_checkpoint

    data = tiny["root"] / "data"
    cfg = demo.get_config()
    cfg.data.dir = str(data)
    cfg.eval.update(max_new_tokens=4, batch_size=2)
    IE = generate.InputError
    with pytest.raises(IE, match=r"--limit must be >= 1.*got 0"):
        evaluate_checkpoint(cfg, tiny["ckpt"], tmp_path, split="val", limit=0)
    with pytest.raises(IE, match=r"--checkpoint .*nowhere"):
        evaluate_checkpoint(cfg, tmp_path / "nowhere", tmp_path, split="val")
    with pytest.raises(IE, match=r"split 'tset': dataset file not found: .*tset.jsonl"):
        evaluate_checkpoint(cfg, tiny["ckpt"], tmp_path, split="tset")
    (data / "empty.jsonl").write_text("")
    with pytest.raises(IE, match=r"split 'empty': no records in .*empty.jsonl"):
        evaluate_checkpoint(cfg, tiny["ckpt"], tmp_path, split="empty")
    bad = dict(tiny["recs"][0], problem_id="gone", videos="nowhere.mp4")
    (data / "badval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*tiny["recs"], bad])
                                       + "{not a record\n")
    result = evaluate_checkpoint(cfg, tiny["ckpt"], tmp_path, split="badval")
    assert result["n"] == 2 and result["skipped"] == 2       # the missing video, the bad line
    assert "2 item(s) not scored" in (tmp_path / "eval.md").read_text()
    assert json.loads((tmp_path / "eval.json").read_text())["skipped"] == 2


# ---------------------------------------------------------------------------------------------
# convert_checkpoint.py


def _tensors(folder: Path) -> dict:
    out = {}
    for sub in ("llm", "vision_tower", "mm_projector"):
        for f in sorted((folder / sub).glob("*.safetensors")):
            out.update({f"{sub}/{k}": v for k, v in load_file(f).items()})
    return out


def _flat_params(model) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_hf_orbax_hf_round_trip_is_bit_identical(tiny, tmp_path):
    orb = convert.to_orbax(tiny["ckpt"], tmp_path / "orbax")
    assert (orb / "0" / "params").is_dir() and (orb / "0" / ckpt_lib.COMMIT_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orbax"]      # no temp folder left
    # --like has the same architecture but other weights: what comes back is from orbax.
    out, step = convert.to_hf(orb, tiny["other"], tmp_path / "back")
    assert step == 0
    want, got = _tensors(tiny["ckpt"]), _tensors(out)
    assert sorted(want) == sorted(got) and len(want) > 20
    differs = 0
    for key, a in want.items():
        assert got[key].dtype == a.dtype and got[key].shape == a.shape, key
        assert got[key].tobytes() == a.tobytes(), key
    for key, a in _tensors(tiny["other"]).items():
        differs += a.tobytes() != want[key].tobytes()
    assert differs > len(want) // 2, "the --like weights should differ from the source"
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (tiny["ckpt"] / "config.json").read_text())
    assert (out / "llm" / "tokenizer.json").is_file()
    # a params-only checkpoint cannot resume training
    model, _, _ = hf.load_vlm(tiny["ckpt"])
    params = nnx.state(model, nnx.Param)
    with Checkpointer(orb) as ck, pytest.raises(CheckpointError, match="params only"):
        ck.restore(0, params=params, opt_state={"count": jnp.zeros((), jnp.int32)})
    with pytest.raises(convert.ConvertError, match=r"--dst .*orbax exists; pass --overwrite"):
        convert.to_orbax(tiny["ckpt"], orb)
    # --dst = the checkpoint read (or a folder holding it) is refused even with --overwrite: it
    # had passed the check (made against --like) and replaced the training run
    for dst, flag in ((orb, "src"), (tmp_path, "src"), (tiny["other"], "like")):
        with pytest.raises(convert.ConvertError, match=rf"--dst .* is or holds the --{flag} folder"):
            convert.to_hf(orb, tiny["other"], dst, overwrite=True)
    assert (orb / "0" / ckpt_lib.COMMIT_FILE).is_file()


def test_training_checkpoint_to_hf_has_its_params(tiny, tmp_path):
    # params sharded over fsdp as in training (fsdp only: orbax slices params replicated over
    # `seq` eagerly, seconds of compiles on CPU); restored below onto one device
    mesh = make_mesh({"fsdp": 4}, jax.devices()[:4])
    model, _, _ = settings.load_model(demo.get_config(), tiny["ckpt"], mesh)
    init = _flat_params(model)
    work = tmp_path / "run"
    saved = {}
    with Checkpointer(work / "checkpoints", max_to_keep=3) as ck:
        for step, seed in ((3, 11), (7, 12)):      # as train.state.save writes them, sharded
            m = _add_noise(model, seed)
            params = nnx.state(m, nnx.Param)
            assert not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
            ck.save(step, params=params, opt_state=jax.jit(optax.adamw(1e-3).init)(params),
                    rng=jax.random.key(step), data_state={"step": step})
            saved[step] = _flat_params(m)
        ck.wait_until_finished()

    out, step = convert.to_hf(work, tiny["ckpt"], tmp_path / "latest")   # workdir -> checkpoints/
    assert step == 7
    out3, _ = convert.to_hf(work / "checkpoints", tiny["ckpt"], tmp_path / "s3", step=3)
    for path, want_step in ((out, 7), (out3, 3)):
        loaded, tok, _ = hf.load_vlm(path)
        assert tok is not None
        got = _flat_params(loaded)
        assert sorted(got) == sorted(saved[want_step])
        for k, v in saved[want_step].items():
            np.testing.assert_array_equal(got[k], v, err_msg=str(k))
            assert not np.array_equal(v, init[k]), k

    with pytest.raises(CheckpointError, match=r"no complete checkpoint for step 5 .*\[3, 7\]"):
        convert.to_hf(work, tiny["ckpt"], tmp_path / "s5", step=5)
    with pytest.raises(convert.ConvertError, match=r"--dst .*latest exists; pass --overwrite"):
        convert.to_hf(work, tiny["ckpt"], out)
    convert.to_hf(work, tiny["ckpt"], out, step=3, overwrite=True)
    assert _tensors(out).keys() == _tensors(out3).keys()
    assert all(a.tobytes() == _tensors(out3)[k].tobytes() for k, a in _tensors(out).items())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint to restore"):
        convert.to_hf(tmp_path / "empty", tiny["ckpt"], tmp_path / "x")
    with pytest.raises(convert.ConvertError, match=r"--src .*nothing: no such folder"):
        convert.to_hf(tmp_path / "nothing", tiny["ckpt"], tmp_path / "x")
    with pytest.raises(convert.ConvertError, match=r"--like .*run has no config.json"):
        convert.to_hf(work, work, tmp_path / "x")
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "x").exists()


def test_params_that_do_not_fit_like_are_named(tiny, tmp_path):
    """A checkpoint of a 1-layer LLM restored onto the 2-layer --like architecture."""
    model, _, _ = hf.load_vlm(tiny["ckpt"])
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    small = {k: v.replace(v.get_value()[:1]) if k[:2] == ("llm", "layers") else v
             for k, v in flat.items()}
    ckpt_lib.save_params(tmp_path / "orbax", nnx.from_flat_state(small), step=4)
    with pytest.raises(CheckpointError, match=r"'params' of checkpoint step 4 in .*orbax.*"
                       r"llm/layers/\w+: checkpoint \(1, .*, target \(2, "):
        convert.to_hf(tmp_path / "orbax", tiny["ckpt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_flags(tiny, tmp_path):
    from absl import flags

    def run(*argv):
        fv = flags.FlagValues()
        holders = convert.define_flags(fv)
        fv(["convert_checkpoint.py", *argv])
        return convert.run_flags(holders)

    orb = run("--to=orbax", f"--src={tiny['ckpt']}", f"--dst={tmp_path / 'o'}", "--step=2")
    out, step = run("--to=hf", f"--src={orb}", f"--like={tiny['other']}",
                    f"--dst={tmp_path / 'h'}", "--save_dtype=bfloat16")
    assert step == 2
    got = _tensors(out)
    assert all(v.dtype == np.dtype("bfloat16") or v.dtype.name == "bfloat16" for v in got.values())
    with pytest.raises(convert.ConvertError, match="--to is required"):
        run(f"--src={orb}")
    with pytest.raises(convert.ConvertError, match="--like is only used with --to=hf"):
        run("--to=orbax", f"--src={tiny['ckpt']}", f"--like={tiny['ckpt']}", "--dst=x")
    # a dtype flag of the other direction is refused, not ignored
    with pytest.raises(convert.ConvertError, match="--save_dtype is only used with --to=hf"):
        run("--to=orbax", f"--src={tiny['ckpt']}", "--save_dtype=bfloat16", "--dst=x")
    with pytest.raises(convert.ConvertError, match="--param_dtype is only used with --to=orbax"):
        run("--to=hf", f"--src={orb}", f"--like={tiny['other']}", "--param_dtype=bfloat16",
            "--dst=x")
    with pytest.raises(convert.ConvertError, match="--like is required"):
        run("--to=hf", f"--src={orb}", f"--dst={tmp_path / 'y'}")


def test_to_orbax_failure_leaves_dst_untouched(tiny, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    real_save = Checkpointer.save

    def failing_save(self, step, **kw):
        real_save(self, step, **kw)
        self.wait_until_finished()
        raise RuntimeError("disk full")

    monkeypatch.setattr(Checkpointer, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        convert.to_orbax(tiny["ckpt"], dst, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


# ---------------------------------------------------------------------------------------------
# plot_metrics.py


def test_plot_metrics_first_and_last_window_means(tmp_path):
    """The CLI's first/last-window means equal NumPy's over the logged values (rows without a
    metric, or with a non-number, are not counted)."""
    from lvr_jax.train.metrics import first_last, read_runs
    rng = np.random.default_rng()
    reward = rng.uniform(0.1, 1.0, 57)
    rows = [{"step": i + 1, "reward_mean": float(r), "kl": float(rng.uniform(0.01, 0.2))}
            for i, r in enumerate(reward)]
    rows.insert(10, {"step": 11, "note": "eval"})
    rows.insert(20, {"step": 21, "reward_mean": "nan?"})
    path = tmp_path / "grpo" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = first_last(read_runs([path])["grpo"], window=20)
    np.testing.assert_allclose(got["reward_mean"], (reward[:20].mean(), reward[-20:].mean()),
                               rtol=1e-12)
    kl = np.asarray([r["kl"] for r in rows if "kl" in r])
    np.testing.assert_allclose(got["kl"], (kl[:20].mean(), kl[-20:].mean()), rtol=1e-12)
    assert set(got) == {"reward_mean", "kl"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "plot_metrics.py"), str(path),
         f"--out={tmp_path / 'c.png'}", "--window=5"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"first 5: {reward[:5].mean():.4g}  last 5: {reward[-5:].mean():.4g}" in out.stdout
    assert (tmp_path / "c.png").stat().st_size > 0
