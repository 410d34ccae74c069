"""The vision-feature cache (lvr_jax.data.feature_store, lvr_jax.train.features): the pipeline
returns cached features instead of frames, a GRPO step's features and loss are the same with and
without it, changed preprocessing / weights / sampling miss, corrupt entries are detected, logged
and recomputed, and launch/cache_features.py fills it."""

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import demo
from lvr_jax.data import feature_store as fs
from lvr_jax.data.dataset import make_iter_dataset
from lvr_jax.data.records import load_records
from lvr_jax.data.video import Preprocessor
from lvr_jax.models.vlm import encode_batch
from lvr_jax.rl.grpo import GRPOSettings
from lvr_jax.train import features, settings
from lvr_jax.train.grpo import grpo_update, logprobs_under
from lvr_jax.train.state import Run, replicate_stray_arrays, trainable_filter
from tests.conftest import launch_env, perturb, synthetic_run_inputs

ROOT = Path(__file__).resolve().parents[1]
FRAMES, BATCH = 4, 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """8 synthetic videos and a random tiny VILA checkpoint, loaded on the demo mesh (fsdp 2 x
    seq 4: frame-parallel encoding)."""
    root = synthetic_run_inputs(tmp_path_factory.mktemp("featcache"), num_train=8)
    c = config(root, "")
    mesh, layout = settings.mesh_and_layout(c)
    model, tok, _ = settings.load_model(c, c.init_checkpoint, mesh)
    return SimpleNamespace(root=root, config=c, layout=layout, model=model, tok=tok,
                           pre=Preprocessor.from_pretrained(root / "init" / "vision_tower"),
                           records=load_records(root / "data" / "train.jsonl"),
                           tower=features.tower_id(model.vision))


def config(root, cache):
    c = demo.get_config()
    c.data.dir, c.init_checkpoint = str(root / "data"), str(root / "init")
    c.data.pipeline.update(num_frames=FRAMES, batch_size=BATCH, feature_cache=str(cache))
    return c


def batches(t, cache="", tower=None, batch_size=BATCH, pre=None, **kw):
    """Every batch of one unshuffled epoch of the 8 records."""
    tower = t.tower if tower is None else tower
    cfg = settings.data_config(config(t.root, cache), mode="rl", num_epochs=1, shuffle=False,
                               batch_size=batch_size, feature_tower=tower.encode() if cache else "",
                               **kw)
    it = iter(make_iter_dataset(t.records, cfg, t.tok, pre or t.pre, shard_index=0, shard_count=1))
    try:
        return list(it)
    finally:
        it.close()


@dataclasses.dataclass
class FakeRun:
    """The fields of a `Run` that step_features and Run.device_batch read."""
    model: object
    layout: object
    global_batch: int
    config: object
    shard: tuple = (0, 1)

    @property
    def mesh(self):
        return self.layout.mesh


def step_features(t, batch, cache):
    run = FakeRun(t.model, t.layout, len(batch["index"]), config(t.root, cache))
    return features.step_features(run, batch, Run.device_batch(run, batch))


def reference(t, batch_size=BATCH):
    """Features encoded from the frames of the uncached pipeline (what grpo_step did before)."""
    out = []
    for b in batches(t, batch_size=batch_size):
        run = FakeRun(t.model, t.layout, batch_size, t.config)
        out.append(np.asarray(encode_batch(t.model, Run.device_batch(run, b)["frames"],
                                           layout=t.layout)))
    return out


def fill(t, cache):
    """Cache every record the way the trainer does: its first steps encode and write."""
    for b in batches(t, cache):
        step_features(t, b, cache)


def entries(cache) -> list[Path]:
    return sorted(Path(cache).glob("??/*.safetensors"))


def test_launch_fills_cache_and_pipeline_returns_features(tiny, tmp_path):
    cache = tmp_path / "cache"
    env = launch_env()
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "cache_features.py"),
         f"--config={ROOT / 'configs' / 'demo.py'}", f"--checkpoint={tiny.root / 'init'}",
         f"--config.data.dir={tiny.root / 'data'}", f"--config.data.pipeline.feature_cache={cache}",
         f"--config.data.pipeline.num_frames={FRAMES}", f"--config.data.pipeline.batch_size={BATCH}",
         "--limit=4"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.split("[cache] done: ")[-1])
    assert (summary["items"], summary["hit"], summary["written"]) == (4, 0, 4), out.stdout
    assert summary["tower"] == tiny.tower.encode()     # the trainer's tower id: same keys
    assert len(entries(cache)) == 4
    from safetensors.numpy import load_file                  # a plain safetensors file
    assert set(load_file(entries(cache)[0])) == {"features", "frame_indices"}

    ref, plain = reference(tiny), batches(tiny)
    got = batches(tiny, cache, num_workers=1)               # features travel from a worker too
    assert "frames" not in got[0] and got[0]["cached"].all()          # the 4 cached records
    assert got[0]["features"].shape == (BATCH, FRAMES, 49, 32) and got[0]["features"].dtype == np.float32
    np.testing.assert_allclose(got[0]["features"], ref[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[0]["frame_indices"], plain[0]["frame_indices"])
    assert "features" not in got[1] and not got[1]["cached"].any()   # the 4 others: frames
    np.testing.assert_array_equal(got[1]["frames"], plain[1]["frames"])


def test_grpo_step_features_and_loss_equal_with_and_without_cache(tiny, tmp_path):
    cache = str(tmp_path / "cache")
    ref = reference(tiny, batch_size=8)[0]
    first = batches(tiny, cache)[0]                    # nothing cached: frames, encoded + written
    encoded = step_features(tiny, first, cache)
    np.testing.assert_allclose(np.asarray(encoded), ref[:BATCH], rtol=1e-6, atol=1e-6)
    assert len(entries(cache)) == BATCH
    mixed = batches(tiny, cache, batch_size=8)[0]      # 4 cached rows, 4 to encode
    assert mixed["cached"].tolist() == [True] * 4 + [False] * 4
    assert {"features", "frames"} <= set(mixed)
    np.testing.assert_allclose(np.asarray(step_features(tiny, mixed, cache)), ref, rtol=1e-6, atol=1e-6)
    assert len(entries(cache)) == 8
    cached = batches(tiny, cache, batch_size=8)[0]     # all cached: nothing decoded or encoded
    assert "frames" not in cached and cached["cached"].all()
    feats = step_features(tiny, cached, cache)
    np.testing.assert_allclose(np.asarray(feats), ref, rtol=1e-6, atol=1e-6)
    assert feats.sharding.spec == encoded.sharding.spec   # the steps after compile once for both

    # a shorter clip (fps cap): its padding frames give what encoding zero frames gives
    run = FakeRun(tiny.model, tiny.layout, 8, tiny.config)
    plain = batches(tiny, batch_size=8)[0]
    short = {**cached, "num_frames": np.asarray([2] + [FRAMES] * 7, np.int32),
             "features": cached["features"].copy()}
    short["features"][0, 2:] = 0
    frames = plain["frames"].copy()
    frames[0, 2:] = 0
    want = encode_batch(tiny.model, Run.device_batch(run, {"frames": frames})["frames"],
                        layout=tiny.layout)
    np.testing.assert_allclose(np.asarray(step_features(tiny, short, cache)), np.asarray(want),
                               rtol=1e-6, atol=1e-6)

    # the loss: reference log-probs and one GRPO update on the cached vs the encoded features
    dev = Run.device_batch(run, cached)
    enc = encode_batch(tiny.model, Run.device_batch(run, plain)["frames"], layout=tiny.layout)
    enc = jax.device_put(enc, feats.sharding)          # same values; one compilation for both
    rng = np.random.default_rng(0)
    g, n = 2, 6
    responses = rng.integers(10, 300, (8, g, n)).astype(np.int32)
    mask = rng.random((8 * g, n)) < 0.9
    adv = rng.normal(size=8 * g).astype(np.float32)
    lp = [np.asarray(logprobs_under(tiny.model, f, dev["input_ids"], dev["attention_mask"],
                                    responses, 1.0)) for f in (feats, enc)]
    np.testing.assert_allclose(lp[0], lp[1], rtol=1e-6, atol=1e-6)
    old = lp[1].reshape(-1, n)
    graphdef, state = nnx.split(tiny.model)
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))   # grpo_update donates it
    opt = nnx.Optimizer(model, optax.sgd(0.0), wrt=trainable_filter(True, True))  # params stay
    replicate_stray_arrays(opt, tiny.layout.mesh)      # as setup does: one compilation
    losses = []
    for f in (feats, enc):
        m = grpo_update(model, opt, f, dev["input_ids"], dev["attention_mask"], responses, mask,
                        old, old + 0.05, adv, GRPOSettings(beta=0.01))
        losses.append(float(m["loss"]))
    assert np.isfinite(losses[0]) and losses[0] != 0
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def test_changed_preprocessing_weights_or_sampling_miss(tiny, tmp_path):
    cache = str(tmp_path / "cache")
    fill(tiny, cache)
    assert all(b["cached"].all() and "frames" not in b for b in batches(tiny, cache))
    other_pre = dataclasses.replace(tiny.pre, image_mean=(0.4, 0.5, 0.5))
    graphdef, state = nnx.split(tiny.model)
    other = perturb(nnx.merge(graphdef, jax.tree.map(jnp.copy, state)), seed=1, scale=1e-3)
    other_tower = features.tower_id(other.vision)
    assert other_tower.digest != tiny.tower.digest and other_tower.tokens == tiny.tower.tokens
    for kw in (dict(pre=other_pre), dict(tower=other_tower), dict(num_frames=FRAMES - 1),
               dict(fps=2.0)):
        got = batches(tiny, cache, **kw)
        assert all("features" not in b and not b["cached"].any() for b in got), kw
    # the tower id is the weights', whatever the mesh they sit on (the launch script's may differ)
    c = config(tiny.root, cache)
    c.mesh = dict(data=8, fsdp=1, seq=1, tensor=1)
    model, _, _ = settings.load_model(c, c.init_checkpoint, settings.mesh_and_layout(c)[0])
    assert features.tower_id(model.vision) == tiny.tower
    # ... and whatever its memory settings (model.vision_chunk had made every entry miss),
    # not whatever layer the features come from
    vision = model.vision
    for field, value, same in (("frame_chunk", 1, True), ("remat", True, True),
                               ("feature_layer", -1, False)):
        old = vision.cfg
        vision.cfg = dataclasses.replace(old, **{field: value})
        assert (features.tower_id(vision) == tiny.tower) == same, field
        vision.cfg = old


def test_corrupt_entries_are_detected_logged_and_recomputed(tiny, tmp_path, caplog):
    cache = str(tmp_path / "cache")
    fill(tiny, cache)
    before = batches(tiny, cache)
    paths = {str(k): fs.FeatureStore(cache).path(str(k)) for b in before for k in b["cache_key"]}
    bad = list(paths.values())[:5]
    data = bad[0].read_bytes()
    bad[0].write_bytes(data[:len(data) // 2])                              # truncated
    raw = bytearray(bad[1].read_bytes())
    raw[-7] ^= 0x10                                                        # one bit flipped
    bad[1].write_bytes(bytes(raw))
    tensors, meta = fs.parse_safetensors(bad[2].read_bytes())              # other key fields
    fields = json.loads(meta["fields"])
    fields["sampling"]["num_frames"] += 1
    bad[2].write_bytes(fs.safetensors_bytes(tensors, {**meta, "fields": fs.canonical(fields)}))
    tensors, meta = fs.parse_safetensors(bad[3].read_bytes())              # wrong dtype
    tensors = {**tensors, "features": tensors["features"].astype(np.float16)}
    bad[3].write_bytes(fs.safetensors_bytes(tensors, {**meta, "crc32": fs.checksum(tensors)}))
    tensors, meta = fs.parse_safetensors(bad[4].read_bytes())              # wrong shape
    tensors = {**tensors, "features": np.ascontiguousarray(tensors["features"][:, :48])}
    bad[4].write_bytes(fs.safetensors_bytes(tensors, {**meta, "crc32": fs.checksum(tensors)}))
    with caplog.at_level(logging.WARNING, logger="lvr_jax.data.feature_store"):
        after = batches(tiny, cache)
    warned = [r.getMessage() for r in caplog.records if "stale or corrupt" in r.getMessage()]
    for p, why in zip(bad, ("truncated", "checksum", "other key fields", "dtype float16",
                            "shape (4, 48, 32)")):
        assert any(str(p) in w and why in w for w in warned), (p, why, warned)
    hit = np.concatenate([b["cached"] for b in after])
    assert hit.sum() == 8 - len(bad)
    for b in after:                                    # the trainer recomputes and rewrites them
        step_features(tiny, b, cache)
    again = batches(tiny, cache)
    for x, y in zip(before, again):
        assert y["cached"].all()
        np.testing.assert_array_equal(x["features"], y["features"])


def test_store_keys_format_and_file_hashes(tmp_path):
    video = tmp_path / "v.bin"
    video.write_bytes(b"not really a video")
    hashes = fs.FileHashes(tmp_path / "hashes")
    digest = hashes(video)
    assert len(list((tmp_path / "hashes").rglob("*"))) == 2                # remembered on disk
    video.unlink()
    video.write_bytes(b"not really a video")     # same bytes, new mtime: hashed again, same digest
    assert fs.FileHashes(tmp_path / "hashes")(video) == digest
    tower = fs.TowerId("ab" * 32, 4, 3, "bfloat16")
    assert fs.TowerId.decode(tower.encode()) == tower
    keys = fs.EntryKeys(tower, num_frames=2, fps=0, short="repeat",
                        preprocessor=Preprocessor(height=8, width=8), hashes=hashes)
    fields = keys.fields(video)
    key = keys.key(fields)
    store = fs.FeatureStore(tmp_path / "cache")
    feats = np.arange(24, dtype=np.float32).reshape(2, 4, 3).astype(fs.np_dtype("bfloat16"))
    path = store.write(key, fields, feats, [0, 5])
    assert path == tmp_path / "cache" / key[:2] / f"{key}.safetensors"
    got = store.read(key, fields)
    assert got.features.dtype == feats.dtype and got.frame_indices.tolist() == [0, 5]
    np.testing.assert_array_equal(got.features.astype(np.float32), feats.astype(np.float32))
    assert not list(path.parent.glob(".*.tmp"))                           # no temp file left
    with pytest.raises(ValueError, match="dtype"):
        store.write(key, fields, feats.astype(np.float32), [0, 5])
    assert store.read(keys.key({**fields, "video_sha256": "0" * 64}),
                      {**fields, "video_sha256": "0" * 64}) is None       # absent: no warning


def test_grpo_runs_fill_then_read_the_cache_with_the_same_losses(tiny, tmp_path):
    """launch/train_grpo.py with an empty cache encodes and writes every clip it sees; a second
    run from the filled cache decodes and encodes nothing and logs the same rewards and losses."""
    cache = tmp_path / "cache"

    def train(name):
        cmd = [sys.executable, str(ROOT / "launch" / "train_grpo.py"),
               f"--config={ROOT / 'configs' / 'demo.py'}", f"--workdir={tmp_path / name}",
               f"--config.init_checkpoint={tiny.root / 'init'}",
               f"--config.data.dir={tiny.root / 'data'}", "--config.train.steps=2",
               "--config.train.checkpoint_every=100", "--config.data.pipeline.shuffle=False",
               f"--config.data.pipeline.batch_size={BATCH}",
               f"--config.data.pipeline.num_frames={FRAMES}", f"--config.data.pipeline.feature_cache={cache}",
               "--config.rl.group_size=2", "--config.rl.max_new_tokens=8",
               "--config.mesh.fsdp=8", "--config.mesh.seq=1"]
        out = subprocess.run(cmd, env=launch_env(tmp_path / "jit_cache"), timeout=600,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")]

    first = train("fill")
    assert len(entries(cache)) == 8                      # 2 steps x 4 clips, each written once
    stamps = {p: p.stat().st_mtime_ns for p in entries(cache)}
    second = train("read")
    assert {p: p.stat().st_mtime_ns for p in entries(cache)} == stamps   # nothing rewritten
    for a, b in zip(first, second, strict=True):
        assert a["reward_mean"] == b["reward_mean"] and a["response_length"] == b["response_length"]
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6, atol=1e-9)
        assert a["reward_errors"] == b["reward_errors"] == 0
