"""Frame sampling, decoding (decord + PyAV fallback), error cases, SigLIP preprocessing."""

import json

import numpy as np
import pytest

from lvr_jax.data import synthetic, video
from lvr_jax.data.video import (Preprocessor, UnsupportedCodec, VideoCorrupt, VideoNotFound,
                                VideoTooShort, pil_resize, read_frames, sample_indices)

# Tolerances of the synthetic H.264 round trip (crf 12, yuv420p), in levels of 255; measured worst
# case over 60 seeds, limits ~2x that:
# * decoded vs the written frames passed through the same RGB -> yuv420p -> RGB conversion (what
#   the encoder is fed): the H.264 quantisation error, mean |err| per frame <= 1.9 (limit 3),
#   max <= 35 (limit 72);
# * decoded vs the written RGB frames: adds 2x2 chroma subsampling, which smears saturated colour
#   edges (single pixels up to ~235 off), mean |err| per frame <= 6.1 (limit 12).
# Frame identity is checked exactly: each frame carries its index as a barcode.
CODEC_MEAN_TOL, CODEC_MAX_TOL, RGB_MEAN_TOL = 3.0, 72, 12.0


def _yuv420_round_trip(frames):
    import av
    return np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
                     .to_ndarray(format="rgb24") for f in frames])


def _seed():
    return int(np.random.SeedSequence().entropy % (2 ** 31))


def _moving_video(rng, num_frames, size):
    """Distinct frames: two shapes moving along random straight lines, on a random background."""
    tracks = []
    for color in rng.choice(list(synthetic.COLORS), size=2, replace=False):
        a, b = rng.uniform(4, size - 4, size=(2, 2))
        t = np.linspace(0, 1, num_frames)[:, None]
        tracks.append(synthetic.Track(str(rng.choice(synthetic.SHAPES)), str(color), size / 6,
                                      (1 - t) * a + t * b))
    bg = tuple(int(v) for v in rng.integers(0, 60, size=3))
    frames = synthetic.render(tracks, num_frames, size, bg)
    frames[:, :4] = 0                     # a barcode of the frame index: 8 grey 4x4 blocks on top
    for t in range(num_frames):
        for bit in range(8):
            if t >> bit & 1:
                frames[t, :4, 4 * bit:4 * bit + 4] = 255
    return frames


def _barcode(frames):
    """The frame indices written by `_moving_video`, read back from the pixels."""
    blocks = frames[:, :4, :32].astype(np.float32).mean((1, 3)).reshape(len(frames), 8, 4).mean(-1)
    return ((blocks > 127) * (1 << np.arange(8))).sum(1)


def _write(tmp_path, rng, num_frames=40, size=32, name="v.mp4", fps=8):
    frames = _moving_video(rng, num_frames, size)
    path = tmp_path / name
    synthetic.write_video(path, frames, fps)
    return path, frames


# ---------------------------------------------------------------------------------------------
# Sampling


def test_sample_indices_is_reference_linspace():
    rng = np.random.default_rng(_seed())
    for _ in range(50):
        total, num = int(rng.integers(1, 5000)), int(rng.integers(1, 600))
        got = sample_indices(total, num)
        np.testing.assert_array_equal(got, np.linspace(0, total - 1, num).astype(int))
        assert got[0] == 0 and got[-1] == (total - 1 if num > 1 else 0)


def test_fps_cap_and_short_video_repeats():
    # 10 s at 8 fps; 0.5 fps cap -> 5 frames; no cap -> 32
    assert len(sample_indices(80, 32, fps=0.5, video_fps=8)) == 5
    assert len(sample_indices(80, 32, fps=0, video_fps=8)) == 32
    assert len(sample_indices(80, 4, fps=2.0, video_fps=8)) == 4   # the cap never adds frames
    assert len(sample_indices(3, 8, fps=0.1, video_fps=30)) == 1    # at least one frame
    idx = sample_indices(5, 12)                                     # fewer frames than asked
    assert len(idx) == 12 and len(set(idx.tolist())) == 5
    assert np.all(np.diff(idx) >= 0) and idx[0] == 0 and idx[-1] == 4
    with pytest.raises(ValueError):
        sample_indices(0, 4)


# ---------------------------------------------------------------------------------------------
# Decoding


def test_decoded_frames_match_written(tmp_path):
    rng = np.random.default_rng(_seed())
    num_frames = int(rng.integers(24, 64))
    path, written = _write(tmp_path, rng, num_frames)
    k = int(rng.integers(5, 17))
    frames, idx = read_frames(path, k, return_indices=True)
    np.testing.assert_array_equal(idx, sample_indices(num_frames, k))
    assert frames.shape == (k, 32, 32, 3) and frames.dtype == np.uint8
    codec_err = np.abs(frames.astype(np.int16) - _yuv420_round_trip(written[idx]).astype(np.int16))
    assert codec_err.reshape(k, -1).mean(1).max() <= CODEC_MEAN_TOL
    assert codec_err.max() <= CODEC_MAX_TOL
    rgb_err = np.abs(frames.astype(np.int16) - written[idx].astype(np.int16))
    assert rgb_err.reshape(k, -1).mean(1).max() <= RGB_MEAN_TOL
    np.testing.assert_array_equal(_barcode(written), np.arange(num_frames))
    np.testing.assert_array_equal(_barcode(frames), idx)     # the frames are the sampled ones


def test_pyav_fallback_equals_decord(tmp_path):
    rng = np.random.default_rng(_seed())
    path, _ = _write(tmp_path, rng, int(rng.integers(20, 50)))
    k = int(rng.integers(3, 12))
    a, ia = video._read_decord(path, k, 0, "repeat", 1)
    b, ib = video._read_pyav(path, k, 0, "repeat")
    np.testing.assert_array_equal(ia, ib)
    # both use FFmpeg's H.264 decoder and yuv420p -> rgb24 conversion
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_fps_cap_when_reading(tmp_path):
    rng = np.random.default_rng(_seed())
    path, _ = _write(tmp_path, rng, 48, fps=8)          # 6 s
    assert read_frames(path, 32, fps=1).shape[0] == 6
    assert read_frames(path, 32).shape[0] == 32


def test_short_video_all_repeat_or_error(tmp_path):
    """A 6-frame video asked for 10: by default every frame once, in order (Long-RL's
    `_load_video` when the video has fewer frames than asked); "repeat": the linspace indices;
    "error": VideoTooShort."""
    rng = np.random.default_rng(_seed())
    path, written = _write(tmp_path, rng, 6)
    frames, idx = read_frames(path, 10, return_indices=True)
    np.testing.assert_array_equal(idx, np.arange(6))
    np.testing.assert_array_equal(_barcode(frames), np.arange(6))
    frames, idx = read_frames(path, 10, short="repeat", return_indices=True)
    np.testing.assert_array_equal(idx, sample_indices(6, 10))
    assert frames.shape[0] == 10
    for i, j in zip(range(9), range(1, 10)):
        if idx[i] == idx[j]:
            np.testing.assert_array_equal(frames[i], frames[j])
    with pytest.raises(VideoTooShort, match=str(path)):
        read_frames(path, 10, short="error")


def test_missing_empty_corrupt_files(tmp_path):
    rng = np.random.default_rng(_seed())
    with pytest.raises(VideoNotFound, match="nope.mp4.*not found"):
        read_frames(tmp_path / "nope.mp4", 4)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoCorrupt, match="empty.mp4.*empty"):
        read_frames(empty, 4)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoCorrupt, match="garbage.mp4"):
        read_frames(garbage, 4)
    good, _ = _write(tmp_path, rng, 40)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoCorrupt, match="truncated.mp4"):
        read_frames(truncated, 8)
    # header first (faststart), frame data cut: opens, then fails in decord and in PyAV
    import av
    fs = tmp_path / "faststart.mp4"
    with av.open(str(fs), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for f in rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8):
            for p in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    data = fs.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")
    cut = tmp_path / "cut_data.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoCorrupt, match=r"cut_data.mp4: .*(truncated|cannot decode)"):
        read_frames(cut, 8)


def test_unsupported_codec(tmp_path):
    rng = np.random.default_rng(_seed())
    good, _ = _write(tmp_path, rng, 20)
    data = good.read_bytes()
    assert data.count(b"avc1") >= 1
    bad = tmp_path / "weird_codec.mp4"
    bad.write_bytes(data.replace(b"avc1", b"zzzz"))   # a sample entry FFmpeg has no decoder for
    with pytest.raises(UnsupportedCodec, match=r"weird_codec.mp4.*codec.*zzzz"):
        read_frames(bad, 4)


def test_no_video_stream(tmp_path):
    import av
    path = tmp_path / "audio_only.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = 16000
        for p in list(stream.encode(frame)) + list(stream.encode()):
            out.mux(p)
    with pytest.raises(UnsupportedCodec, match="audio_only.mp4.*no video stream"):
        read_frames(path, 4)


# ---------------------------------------------------------------------------------------------
# Preprocessing


def _siglip_reference(cfg):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    return SiglipImageProcessorPil(**{k: v for k, v in cfg.items() if k != "image_processor_type"})


def test_preprocessor_equals_siglip_image_processor():
    from lvr_jax.weights.hf import preprocessor_config
    rng = np.random.default_rng(_seed())
    for image_size, mean, std in [(int(rng.integers(14, 60)), None, None),
                                  (int(rng.integers(14, 60)), [0.485, 0.456, 0.406],
                                   [0.229, 0.224, 0.225])]:
        cfg = preprocessor_config(image_size)
        if mean is not None:
            cfg.update(image_mean=mean, image_std=std)
        ref_proc = _siglip_reference(cfg)
        pre = Preprocessor.from_dict(cfg)
        for h, w in [rng.integers(8, 120, size=2), (image_size, image_size)]:
            frames = rng.integers(0, 256, size=(3, int(h), int(w), 3), dtype=np.uint8)
            ref = ref_proc(list(frames), return_tensors="np")["pixel_values"]
            got = pre(frames)
            assert got.dtype == np.float32 and got.shape == (3, image_size, image_size, 3)
            # exact: same uint8 resize, same float64 rescale, same float32 normalisation
            np.testing.assert_array_equal(got, ref.transpose(0, 2, 3, 1))


def test_pil_resize_equals_pillow_per_image_all_filters():
    """Batching and shapes: every image of a [..., H, W, C] batch equals `PIL.Image.resize`."""
    from PIL import Image
    rng = np.random.default_rng(_seed())
    for trial, mode in enumerate(sorted(video.RESAMPLING) * 3):
        lead = tuple(int(v) for v in rng.integers(1, 4, size=int(rng.integers(0, 3))))
        h, w = (int(v) for v in rng.integers(1, 70, size=2))
        oh, ow = (h, w) if trial % 4 == 3 else (int(v) for v in rng.integers(1, 70, size=2))
        c = 1 if trial % 5 == 4 else 3
        imgs = rng.integers(0, 256, lead + (h, w, c), dtype=np.uint8)
        if trial % 2:   # smooth content too
            imgs = np.clip(np.cumsum(rng.integers(-12, 13, imgs.shape), -2) + 128, 0, 255).astype(np.uint8)
        got = pil_resize(imgs, oh, ow, mode)
        assert got.dtype == np.uint8 and got.shape == lead + (oh, ow, c)
        for i in np.ndindex(*lead):
            img = imgs[i] if c == 3 else imgs[i][..., 0]
            ref = np.asarray(Image.fromarray(img).resize((ow, oh), resample=mode)).reshape(oh, ow, c)
            np.testing.assert_array_equal(got[i], ref, err_msg=f"{(h, w)} -> {(oh, ow)} mode {mode}")
        if (oh, ow) == (h, w):      # equal size: an unchanged copy
            np.testing.assert_array_equal(got, imgs)
            assert not np.shares_memory(got, imgs)


def test_pil_resize_bad_resample_or_dtype_is_a_clear_error():
    frames = np.zeros((2, 10, 12, 3), np.uint8)
    for bad in (-1, max(video.RESAMPLING) + 1, 2.5, "bicubic", None, True):
        with pytest.raises(ValueError, match=r"resample must be a PIL resampling code: .*BICUBIC \(3\)"):
            pil_resize(frames, 5, 6, bad)
        with pytest.raises(ValueError, match="resample"):   # also when no resizing is needed
            pil_resize(frames, 10, 12, bad)
    with pytest.raises(ValueError, match="resample must be a PIL resampling code"):
        Preprocessor(height=8, width=8, resample=99)(frames)
    for dtype in (np.float32, np.int64, np.uint16):
        with pytest.raises(TypeError, match=f"uint8.*{np.dtype(dtype)}"):
            pil_resize(frames.astype(dtype), 5, 6)
        with pytest.raises(TypeError, match=f"uint8.*{np.dtype(dtype)}"):
            Preprocessor(height=8, width=8)(frames.astype(dtype))
    with pytest.raises(ValueError, match=r"C = 1 or 3.*\(10, 12\)"):
        pil_resize(frames[0, ..., 0], 5, 6)
    with pytest.raises(ValueError, match="positive"):
        pil_resize(frames, 0, 6)


def test_preprocessor_from_pretrained(tmp_path):
    from lvr_jax.weights.hf import preprocessor_config
    size = int(np.random.default_rng(_seed()).integers(14, 500))
    tower = tmp_path / "ckpt" / "vision_tower"
    tower.mkdir(parents=True)
    (tower / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(size)))
    a = Preprocessor.from_pretrained(tower)
    assert a == Preprocessor.from_pretrained(tmp_path / "ckpt") == Preprocessor.for_image_size(size)
    assert (a.height, a.width, a.resample) == (size, size, 3)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Preprocessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="shortest_edge"):
        Preprocessor.from_dict({"size": {"shortest_edge": 224}})
