"""The video-language model: SigLIP -> NVILA projector -> Qwen2, frames spliced at a placeholder.

Per GRPO step (MR-SP stage 1): `encode_batch` computes the vision features of a batch of clips
once, frame-parallel over the layout's `frames` axis; `make_prompts` projects them and lays the
prompts out for the ring (`models.ring_prompt`) for `Qwen2.prefill` / `extend`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvr_jax.models.attention import AttentionOptions
from lvr_jax.models.projector import Projector, projector_dims
from lvr_jax.models.qwen2 import Qwen2, Qwen2Config, to_left_padded
from lvr_jax.models.ring_prompt import RingPrompt, from_left_padded, ring_prompts
from lvr_jax.models.siglip import SiglipConfig, SiglipVision
from sharding.frame_parallel import vision_features
from sharding.mesh import UNSHARDED, Layout


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    llm: Qwen2Config
    vision: SiglipConfig
    projector_type: str = "mlp_downsample_2x2_fix"
    video_token_id: int = -1      # id of the `<vila/video>` placeholder in the prompt
    newline_token_id: int = 198   # "\n" in the Qwen2 vocabulary, appended after every frame
    ring_prompt: bool = False     # `VLM.prompts`: built in the ring's layout, or spliced whole
    prefill_chunks: int = 1       # forward-only prefills run the prompt in this many chunks

    def __post_init__(self):
        if self.prefill_chunks < 1:
            raise ValueError(f"model.prefill_chunks must be >= 1, got {self.prefill_chunks}")

    @property
    def tokens_per_frame(self) -> int:
        """Projected tokens per frame plus the trailing newline embedding."""
        factor, _ = projector_dims(self.projector_type, 1, 1)
        side = -(-self.vision.grid // factor)
        return side * side + 1


class VLM(nnx.Module):
    """Vision tower + projector + LLM. See `encode_video`, `embed_prompt`, `__call__`."""

    def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = SiglipVision(cfg.vision, rngs=rngs)
        self.projector = Projector(cfg.projector_type, cfg.vision.hidden_size,
                                   cfg.llm.hidden_size, rngs=rngs, dtype=cfg.llm.dtype,
                                   param_dtype=cfg.llm.param_dtype)
        self.llm = Qwen2(cfg.llm, rngs=rngs)

    def encode_frames(self, frames: jax.Array) -> jax.Array:
        """frames [T, H, W, 3] (preprocessed) -> per-frame embeddings [T, tokens_per_frame, D]."""
        return self.project_frames(self.vision(frames))

    def project_frames(self, features: jax.Array) -> jax.Array:
        """Vision features [T, N, C] -> per-frame embeddings [T, tokens_per_frame, D]: projector
        tokens plus the embedding of "\n" after each frame."""
        tokens = self.projector(features)
        newline = self.llm.embed_tokens(jnp.asarray([self.cfg.newline_token_id]))
        newline = jnp.broadcast_to(newline[None].astype(tokens.dtype),
                                   (tokens.shape[0], 1, tokens.shape[-1]))
        return jnp.concatenate([tokens, newline], axis=1)

    def encode_video(self, frames: jax.Array) -> jax.Array:
        """frames [T, H, W, 3] (preprocessed) -> video embeddings [T * tokens_per_frame, D]."""
        emb = self.encode_frames(frames)
        return emb.reshape(-1, emb.shape[-1])

    def embed_prompt(self, token_ids: jax.Array, video_embeds: jax.Array | None = None):
        """Token embeddings with the one video placeholder replaced by `video_embeds`.

        token_ids [L] or [B, L]; video_embeds [V, D] or [B, V, D] -> [(B,) L - 1 + V, D].
        Works under jit (the placeholder position may be traced; concrete ids are checked: a
        row without a placeholder or with several is a ValueError naming the rows).
        """
        if video_embeds is None:
            return self.llm.embed_tokens(token_ids)
        vid = self.cfg.video_token_id
        if not isinstance(token_ids, jax.core.Tracer) and \
                getattr(token_ids, "is_fully_addressable", True):
            # numpy: under a jit a concrete (closed-over) array's jnp ops would be traced
            counts = np.sum(np.atleast_2d(np.asarray(token_ids)) == vid, axis=-1).tolist()
            bad = [(i, c) for i, c in enumerate(counts) if c != 1]
            if bad:
                raise ValueError(f"prompt must hold exactly one video placeholder (token id "
                                 f"{vid}); (row, found): {bad[:8]}")
        if token_ids.ndim == 2:
            return jax.vmap(self.embed_prompt)(token_ids, video_embeds)
        return splice(self.llm.embed_tokens(token_ids), token_ids == self.cfg.video_token_id,
                      video_embeds.astype(self.cfg.llm.dtype))

    def __call__(self, input_embeds: jax.Array, positions: jax.Array, **kwargs):
        """LLM logits for input embeddings; see `Qwen2.__call__` for the options."""
        return self.llm(input_embeds, positions, **kwargs)

    def batch_features(self, frames: jax.Array, layout: Layout = UNSHARDED) -> jax.Array:
        """Vision features [B, T, N, C] of clips [B, T, H, W, 3], each clip's frames split over
        the layout's `frames` axis."""
        axis = layout.axis("frames")
        encode = (self.vision if axis is None else
                  functools.partial(vision_features, self.vision, mesh=layout.mesh, axis=axis))
        return jnp.stack([encode(f) for f in frames])

    def prompt_from_features(self, feats, ids, attn, num_frames=None):
        """Vision features [B, T, N, C] + right-padded prompt ids / attention mask [B, L] ->
        (embeds [B, L - 1 + T * tokens_per_frame, E], valid [B, same]), right padded.
        `num_frames` [B]: each clip's real frames; the tokens of the frames after them (a short
        clip padded to the batch's T) are masked out, so the text after the video follows its
        last real frame (None: all T frames are real)."""
        b, t = feats.shape[:2]
        video = jax.vmap(self.project_frames)(feats)
        video = video.reshape(b, -1, video.shape[-1])
        valid = expand_like_video(ids, attn.astype(jnp.int32), self.cfg.video_token_id,
                                  video.shape[1], 1).astype(bool)
        if num_frames is not None:
            at = jnp.argmax(ids == self.cfg.video_token_id, axis=1)[:, None]
            frame = (jnp.arange(valid.shape[1])[None] - at) // (video.shape[1] // t)
            valid &= ~((frame >= jnp.asarray(num_frames)[:, None]) & (frame < t))
        return self.embed_prompt(ids, video), valid

    def prompts(self, feats, ids, attn, layout: Layout = UNSHARDED,
                forward_only: bool = False, num_frames=None) -> RingPrompt:
        """The prompts of a step as `Qwen2.prefill` takes them, in the ring's order and sharding:
        built there (`cfg.ring_prompt`, `models.ring_prompt`) or spliced whole, left padded and
        then cut up (`rollout_prompts` + `shard_sequence`). The same tokens at the same positions
        either way. `forward_only`: laid out in `cfg.prefill_chunks` chunks, which
        `Qwen2.prefill` runs one at a time (no gradient through that path's layout).
        `num_frames` [B]: each clip's real frames (`prompt_from_features`)."""
        chunks = self.cfg.prefill_chunks if forward_only else 1
        if self.cfg.ring_prompt:
            return ring_prompts(self, feats, ids, attn, layout, chunks, num_frames)
        x, mask = self.rollout_prompts(feats, ids, attn, layout.pad_multiple, num_frames)
        return from_left_padded(x, mask, layout, chunks)

    def rollout_prompts(self, feats, ids, attn, multiple: int = 1, num_frames=None):
        """`prompt_from_features` left padded to a multiple of `multiple` (a layout's
        `pad_multiple`): (x [B, Lp, E], mask [B, Lp]) for `Qwen2.prefill`."""
        return to_left_padded(*self.prompt_from_features(feats, ids, attn, num_frames), multiple)


def splice(token_embeds: jax.Array, is_placeholder: jax.Array, video: jax.Array) -> jax.Array:
    """Replace the single True position of `is_placeholder` [L] by the rows of `video` [V, D]."""
    n_tok, n_vid = token_embeds.shape[0], video.shape[0]
    where = jnp.argmax(is_placeholder)
    out = jnp.arange(n_tok - 1 + n_vid)
    in_video = (out >= where) & (out < where + n_vid)
    tok_index = jnp.where(out < where, out, out - n_vid + 1)
    tok = jnp.take(token_embeds, jnp.clip(tok_index, 0, n_tok - 1), axis=0)
    vid = jnp.take(video, jnp.clip(out - where, 0, n_vid - 1), axis=0)
    return jnp.where(in_video[:, None], vid, tok)


def expand_like_video(ids, per_token, video_token_id: int, num_video: int, fill):
    """A per-token array [B, L] -> [B, L - 1 + num_video], aligned with `embed_prompt`: the
    placeholder's entry becomes `num_video` entries equal to `fill`."""
    def one(row, where):
        return splice(row[:, None], where, jnp.full((num_video, 1), fill, row.dtype))[:, 0]

    return jax.vmap(one)(per_token, ids == video_token_id)


@functools.partial(nnx.jit, static_argnames=("layout",), graph_updates=False)
def encode_batch(model: VLM, frames, layout: Layout = UNSHARDED):
    """Compiled `VLM.batch_features`: the features of a step's clips, computed once and reused
    by the rollout, the reference pass and the update (frozen tower)."""
    return model.batch_features(frames, layout)


@functools.partial(nnx.jit, static_argnames=("layout",), graph_updates=False)
def make_prompts(model: VLM, feats, ids, attn, layout: Layout = UNSHARDED,
                 num_frames=None) -> RingPrompt:
    """Compiled `VLM.prompts`: the prompts of cached features laid out (and sharded) for the
    layout's ring, for `Qwen2.prefill` and the sampler (forward only: in `prefill_chunks`);
    `num_frames` [B]: each clip's real frames (the batch's `num_frames`)."""
    return model.prompts(feats, ids, attn, layout, forward_only=True, num_frames=num_frames)


def attention_options(section) -> AttentionOptions:
    """AttentionOptions from a config's `model.attention` section (absent: the defaults)."""
    return AttentionOptions(**dict(section or {}))


def remat_setting(model_cfg):
    """`model.remat` (False / True / "dots"), or "offload" when `model.remat_offload` is on with
    remat: each layer's checkpoint in pinned host memory (`layers.scan_layers`)."""
    remat = model_cfg["remat"]
    if model_cfg.get("remat_offload", False):
        if remat is not True:
            raise ValueError(f"model.remat_offload needs model.remat=True, got {remat!r}")
        return "offload"
    return remat


def llm_chunks(model_cfg) -> dict:
    """The LLM's memory knobs from a config's `model` section: `Qwen2Config.logits_chunk` and
    `mlp_chunk` (absent: 0, off)."""
    return {k: int(model_cfg.get(k, 0)) for k in ("logits_chunk", "mlp_chunk")}


def vlm_config_from(model_cfg) -> VLMConfig:
    """VLMConfig from a config's `model` section (see configs/common.py)."""
    numerics = dict(dtype=jnp.dtype(model_cfg["dtype"]),
                    param_dtype=jnp.dtype(model_cfg["param_dtype"]), remat=remat_setting(model_cfg))
    attention = attention_options(model_cfg.get("attention"))
    return VLMConfig(
        llm=Qwen2Config(**dict(model_cfg["llm"]), **numerics, attention=attention,
                        **llm_chunks(model_cfg)),
        vision=SiglipConfig(**dict(model_cfg["vision"]), **numerics,
                            attention_impl=attention.implementation,
                            frame_chunk=int(model_cfg.get("vision_chunk", 0))),
        projector_type=model_cfg["projector_type"],
        video_token_id=int(model_cfg["video_token_id"]),
        newline_token_id=int(model_cfg["newline_token_id"]),
        ring_prompt=bool(model_cfg.get("ring_prompt", False)),
        prefill_chunks=int(model_cfg.get("prefill_chunks", 1)))


def init_vlm(cfg: VLMConfig, seed: int = 0) -> VLM:
    """A randomly initialised VLM, built in one compiled call (eager init compiles per shape)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(seed))))
    state = jax.jit(lambda: nnx.split(VLM(cfg, rngs=nnx.Rngs(seed)))[1])()
    return nnx.merge(graphdef, state)
