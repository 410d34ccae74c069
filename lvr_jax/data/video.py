"""Video reading and SigLIP preprocessing.

* `sample_indices`: the reference sampling, `np.linspace(0, total - 1, num).astype(int)`, with an
  optional fps cap (fewer frames for short videos).
* `read_frames`: decode the sampled frames with decord (one batched `get_batch`), falling back to
  PyAV when decord cannot read the file. Errors name the file and say what is wrong
  (`VideoNotFound`, `VideoCorrupt`, `UnsupportedCodec`, `VideoTooShort`).
* `Preprocessor`: resize + rescale + normalise exactly as transformers' SigLIP image processor
  with its PIL backend (the processor NVILA / LongVILA used), channels last: float32 [T, S, S, 3].

Videos shorter than the frames asked for: like the reference (Long-RL's `_load_video` reads every
frame once when the video has fewer than `num_frames`), each frame once, T = the video's frames
(`short="all"`, the default). `short="repeat"` keeps the `linspace` indices, which then repeat
frames so every video yields `num_frames`; `short="error"` raises `VideoTooShort`.

Resampling: Pillow itself (`PIL.Image.resize` on each uint8 frame, `pil_resize`), as in
SiglipImageProcessor's PIL backend, so the resized frames are bit-identical to the reference.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

SHORT_POLICIES = ("all", "repeat", "error")


# ---------------------------------------------------------------------------------------------
# Errors


class VideoError(Exception):
    """A video that cannot be used; the message names the file."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep the fields when the error crosses a process boundary
        return type(self), (self.path, self.reason)


class VideoNotFound(VideoError):
    """The file does not exist (or is not a regular file)."""


class VideoCorrupt(VideoError):
    """Empty, truncated or otherwise undecodable file."""


class UnsupportedCodec(VideoError):
    """No video stream, or one whose codec neither decord nor PyAV can decode."""


class VideoTooShort(VideoError):
    """Fewer frames than asked for, with `short="error"`."""


# ---------------------------------------------------------------------------------------------
# Frame sampling


def num_sampled_frames(total_frames: int, num_frames: int, *, fps: float = 0,
                       video_fps: float | None = None) -> int:
    """How many frames to take: `num_frames`, or fewer when `fps > 0` caps the sampling rate.

    With the cap, a video of `total_frames / video_fps` seconds gives at most `floor(seconds *
    fps)` frames (at least 1). Without a known `video_fps` the cap cannot apply.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if fps and fps > 0 and video_fps and video_fps > 0:
        seconds = total_frames / float(video_fps)
        return max(1, min(num_frames, int(math.floor(seconds * fps + 1e-9))))
    return num_frames


def sample_indices(total_frames: int, num_frames: int, *, fps: float = 0,
                   video_fps: float | None = None) -> np.ndarray:
    """Uniform frame indices `np.linspace(0, total - 1, n).astype(int)` (int64).

    n = `num_sampled_frames(...)`. When the video has fewer than n frames the indices repeat;
    `read_frames` then reads every frame once by default (`short="all"`, the reference's way).
    """
    if total_frames < 1:
        raise ValueError(f"a video needs at least one frame, got total_frames={total_frames}")
    n = num_sampled_frames(total_frames, num_frames, fps=fps, video_fps=video_fps)
    return np.linspace(0, total_frames - 1, n).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about the first video stream."""
    num_frames: int     # 0 when the container does not say
    fps: float          # average frame rate, 0 when unknown
    width: int
    height: int
    codec: str          # decoder name, "" when FFmpeg has none for it


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoNotFound(path, "file not found")
    if not path.is_file():
        raise VideoNotFound(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoCorrupt(path, "empty file (0 bytes)")


def probe(path) -> VideoInfo:
    """Read the header with PyAV; raise a `VideoError` naming the file when it is unusable."""
    import av

    path = Path(path)
    _check_file(path)
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise VideoCorrupt(path, f"cannot open as a video container ({e})") from e
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise UnsupportedCodec(path, f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None:
            tag = _codec_tag(path)
            raise UnsupportedCodec(path, "no decoder for the video codec"
                                   + (f" (fourcc {tag!r})" if tag else ""))
        rate = stream.average_rate or stream.guessed_rate or 0
        return VideoInfo(num_frames=int(stream.frames or 0), fps=float(rate), width=ctx.width,
                         height=ctx.height, codec=ctx.name)


def _codec_tag(path: Path) -> str:
    """The sample-entry fourcc of an mp4/mov video track ('' if not found): for error messages."""
    try:
        with path.open("rb") as f:
            head = f.read(1 << 20)
    except OSError:
        return ""
    at = head.find(b"stsd")
    if at < 0 or len(head) < at + 20:
        return ""
    tag = head[at + 16:at + 20]
    return tag.decode("latin-1") if all(32 <= b < 127 for b in tag) else ""


def _read_decord(path: Path, num_frames: int, fps: float, short: str, threads: int):
    import decord

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads)
    total = len(vr)
    if total < 1:
        raise VideoCorrupt(path, "no decodable frames")
    idx = _indices(path, total, num_frames, fps, vr.get_avg_fps(), short)
    return vr.get_batch(idx.tolist()).asnumpy(), idx


def _read_pyav(path: Path, num_frames: int, fps: float, short: str):
    """Sequential decode keeping only the sampled frames (memory: the sampled frames only)."""
    import av

    info = probe(path)
    total = info.num_frames or _count_packets(path)
    if total < 1:
        raise VideoCorrupt(path, "no frames")
    idx = _indices(path, total, num_frames, fps, info.fps, short)
    wanted = {int(i) for i in idx}
    got: dict[int, np.ndarray] = {}
    last = int(idx.max())
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    missing = sorted(wanted - got.keys())
    if missing:
        raise VideoCorrupt(path, f"the container says {total} frames but frame {missing[0]} "
                                 f"could not be decoded (truncated file?)")
    return np.stack([got[int(i)] for i in idx]), idx


def _count_packets(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for p in container.demux(stream) if p.size)


def _indices(path, total, num_frames, fps, video_fps, short) -> np.ndarray:
    n = num_sampled_frames(total, num_frames, fps=fps, video_fps=video_fps)
    if total < n:
        if short == "error":
            raise VideoTooShort(path, f"has {total} frames, {n} asked for")
        log.debug("%s: %d frames < %d asked for; %s", path, total, n,
                  "every frame once" if short == "all" else "repeating frames")
        if short == "all":
            return np.arange(total, dtype=np.int64)
    return sample_indices(total, num_frames, fps=fps, video_fps=video_fps)


def read_frames(path, num_frames: int, fps: float = 0, *, short: str = "all",
                threads: int = 1, return_indices: bool = False):
    """Decode `num_frames` uniformly sampled frames -> uint8 [T, H, W, 3] (RGB).

    decord first (batched `get_batch`), PyAV when decord fails. `fps > 0` caps the sampling rate
    (T may then be < num_frames). A video with fewer frames than that, `short`: "all" (the
    reference: each frame once, T < num_frames), "repeat" (the linspace indices, repeating
    frames) or "error" (`VideoTooShort`). Raises a `VideoError` subclass naming
    the file: `VideoNotFound`, `VideoCorrupt` (empty / truncated / garbage), `UnsupportedCodec`.
    With `return_indices`, returns (frames, indices).
    """
    if short not in SHORT_POLICIES:
        raise ValueError(f"short must be one of {SHORT_POLICIES}, got {short!r}")
    path = Path(path)
    _check_file(path)
    try:
        frames, idx = _read_decord(path, num_frames, fps, short, threads)
    except VideoError:
        raise
    except Exception as first:  # decord raises RuntimeError / DECORDError with little detail
        log.info("decord could not read %s (%s); trying PyAV", path, str(first).strip()[-200:])
        try:
            frames, idx = _read_pyav(path, num_frames, fps, short)
        except VideoError:
            raise
        except Exception as second:
            raise VideoCorrupt(path, f"cannot decode: decord: {_short_msg(first)}; "
                                     f"PyAV: {_short_msg(second)}") from second
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != len(idx):
        raise VideoCorrupt(path, f"decoded frames have shape {frames.shape}")
    return (frames, idx) if return_indices else frames


def _short_msg(e: Exception) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[-300:]


# ---------------------------------------------------------------------------------------------
# Resize (Pillow)

# PIL resampling codes this Pillow knows (PIL.Image.Resampling): NEAREST 0, LANCZOS 1, BILINEAR 2,
# BICUBIC 3, BOX 4, HAMMING 5; Pillow 13 also has MKS2013 6 and MKS2021 7.
RESAMPLING = {int(r): r.name for r in Image.Resampling}


def pil_resize(frames: np.ndarray, height: int, width: int, resample: int = 3) -> np.ndarray:
    """uint8 [..., H, W, C] -> uint8 [..., height, width, C]: `PIL.Image.resize((width, height),
    resample)` on each image (mode RGB for C = 3, L for C = 1), as SiglipImageProcessor's PIL
    backend does. `resample` is a PIL resampling code (`RESAMPLING`; BICUBIC = 3 is SigLIP's).
    Images already `height` x `width` are copied unchanged (Pillow would copy them too).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(f"pil_resize takes uint8 frames, got {frames.dtype}")
    if frames.ndim < 3 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"pil_resize takes [..., H, W, C] frames with C = 1 or 3, got shape "
                         f"{frames.shape}")
    if (isinstance(resample, bool) or not isinstance(resample, (int, np.integer))
            or int(resample) not in RESAMPLING):
        codes = ", ".join(f"{name} ({code})" for code, name in sorted(RESAMPLING.items()))
        raise ValueError(f"resample must be a PIL resampling code: {codes}; got {resample!r}")
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"the target size must be positive, got {height}x{width}")
    height, width, resample = int(height), int(width), int(resample)
    lead = frames.shape[:-3]
    flat = frames.reshape((-1,) + frames.shape[-3:])
    out = np.empty((flat.shape[0], height, width, flat.shape[-1]), np.uint8)
    for i, img in enumerate(flat):
        if img.shape[:2] == (height, width):
            out[i] = img
        else:
            pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            out[i] = np.asarray(pil.resize((width, height), resample=resample)).reshape(out[i].shape)
    return out.reshape(lead + out.shape[1:])


# ---------------------------------------------------------------------------------------------
# SigLIP preprocessing


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """Resize + rescale + normalise like SiglipImageProcessor; uint8 [T,H,W,3] -> float32
    [T, height, width, 3] (channels last, what `VLM.encode_video` takes)."""
    height: int
    width: int
    resample: int = 3                          # PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, cfg: dict) -> Preprocessor:
        """From a preprocessor_config.json dict (SiglipImageProcessor fields)."""
        size = cfg.get("size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if "height" not in size or "width" not in size:
            raise ValueError(f"preprocessor size {size} is not supported: SigLIP resizes to a fixed "
                             f"{{'height', 'width'}}")
        mean = cfg.get("image_mean", (0.5, 0.5, 0.5))
        std = cfg.get("image_std", (0.5, 0.5, 0.5))
        mean = (mean,) * 3 if isinstance(mean, (int, float)) else tuple(mean)
        std = (std,) * 3 if isinstance(std, (int, float)) else tuple(std)
        return cls(height=int(size["height"]), width=int(size["width"]),
                   resample=int(cfg.get("resample", 3)), do_resize=bool(cfg.get("do_resize", True)),
                   do_rescale=bool(cfg.get("do_rescale", True)),
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                   do_normalize=bool(cfg.get("do_normalize", True)),
                   image_mean=tuple(float(m) for m in mean), image_std=tuple(float(s) for s in std))

    @classmethod
    def from_pretrained(cls, folder) -> Preprocessor:
        """From `folder/preprocessor_config.json`; `folder` may be a vision_tower folder or a
        VILA checkpoint folder holding `vision_tower/`."""
        folder = Path(folder)
        for cand in (folder / "preprocessor_config.json",
                     folder / "vision_tower" / "preprocessor_config.json"):
            if cand.is_file():
                try:
                    return cls.from_dict(json.loads(cand.read_text()))
                except (json.JSONDecodeError, ValueError) as e:
                    raise ValueError(f"{cand}: {e}") from e
        raise FileNotFoundError(f"no preprocessor_config.json in {folder} or {folder / 'vision_tower'}")

    @classmethod
    def for_image_size(cls, image_size: int) -> Preprocessor:
        """NVILA's settings for a tower of `image_size` px (`lvr_jax.weights.hf.preprocessor_config`)."""
        from lvr_jax.weights.hf import preprocessor_config
        return cls.from_dict(preprocessor_config(image_size))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
        if frames.dtype != np.uint8:
            raise TypeError(f"frames must be uint8, got {frames.dtype}")
        x = frames
        if self.do_resize:
            x = pil_resize(x, self.height, self.width, self.resample)
        if self.do_rescale:   # transformers: float64 multiply, then float32
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.do_normalize:  # transformers: float32 (x - mean) / std
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(x, dtype=np.float32)

