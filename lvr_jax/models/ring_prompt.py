"""Video prompts built directly in the ring's order and sharding (`RingPrompt`), so no device
ever holds the whole spliced prompt (or its gradient).

The rollout, the reference pass and the update all start from vision features [B, T, N, C] and
right-padded prompt ids with one video placeholder. Splicing the projected frames into the
token embeddings at the placeholder and left padding (`VLM.rollout_prompts`) moves every row by
a data-dependent offset: a [B, L, E] array with no useful sharding, and a float32 gradient of the
same size in the update (at 4,096 frames: 1.05M tokens x 3,584 = 7.5 GB + 15 GB per device).

Here the layout is static instead, and masks do the rest (attention masks come from positions and
segment ids, so array order only has to grow with position among real tokens, which is what the
zigzag ring's schedule needs). In the natural order (before the zigzag) the prompt is a whole
number of frame-sized units of f tokens (f = tokens per frame):

    [ pre slot: k units | T frames | padding frames | post slot: k units ]

with k = ceil((L - 1) / f) units (L: the ids' length) for the text before the placeholder (left
padded in its slot) and k for the text after it (left padded: the prompt's last token ends the
array), and 2n * u units in all (n the ring size, u = ceil((T + 2k) / 2n) units per ring chunk;
a multiple of S for a prompt laid out in S chunks, `sequence_parallel.zigzag`'s `chunks`, which
`Qwen2.prefill` then runs one chunk at a time).
Padding is segment -1. The zigzag gives device d chunks d and 2n-1-d, whole units, so each
device builds its piece from its own frames: the features (padded by k zero frames at both
ends) are zigzagged by frame, the projector runs on each device's frames, and the 2k text
units replace the stand-in frames where the zigzag put them (a gather from the small text
array by a constant index per unit, so each device takes only its own). The cost over
`rollout_prompts`: at most 2n - 1 padding frames and 2k*f - (L - 1) slot tokens, masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sharding.mesh import Layout
from sharding.sequence_parallel import shard_sequence, zigzag, zigzag_indices


@struct.dataclass
class RingPrompt:
    """A batch of prompts laid out for a ring of `shards` devices (see the module docstring):
    x [B, Lp, E] (sharded over the layout's `length`), positions and segments [B, Lp] (segment
    0: a real token, -1: padding), in the ring's order: what `Qwen2.prefill` takes as is.
    `chunks` > 1: zigzagged chunk by chunk (`sequence_parallel.zigzag`) for a prefill in that
    many sequential chunks (forward only; the training forward takes `chunks` = 1)."""
    x: jax.Array
    positions: jax.Array
    segments: jax.Array
    shards: int = struct.field(pytree_node=False, default=1)
    chunks: int = struct.field(pytree_node=False, default=1)

    @property
    def shape(self):
        return self.x.shape

    @property
    def mask(self) -> jax.Array:
        return self.segments >= 0


def from_left_padded(x, mask, layout: Layout, chunks: int = 1) -> RingPrompt:
    """Left-padded prompts x [B, L, E] with mask [B, L] (token prompts, or the spliced video
    prompts of `VLM.rollout_prompts`) as a `RingPrompt`: positions count the real tokens,
    padding is segment -1; under a ring (or in `chunks` > 1) padded, zigzagged and sharded
    (`shard_sequence`)."""
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    seg = jnp.where(mask, 0, -1).astype(jnp.int32)
    if layout.seq_axis is not None or chunks > 1:
        x, positions, seg, _ = shard_sequence(layout, x, positions, seg, chunks)
    return RingPrompt(x, positions, seg, shards=ring_size(layout), chunks=chunks)


def ring_size(layout: Layout) -> int:
    """The ring's device count (1 without sequence parallelism)."""
    return layout.size("length")


def slot_units(text: int, tokens_per_frame: int) -> int:
    """k: frame-sized units of each text slot for ids of length `text` (the placeholder out)."""
    return max(1, -(-(text - 1) // tokens_per_frame))


def chunk_units(text: int, frames: int, tokens_per_frame: int, shards: int, chunks: int = 1) -> int:
    """u: units per ring chunk, the 2n chunks holding both slots and the frames (a multiple of
    `chunks`, the prefill's sequential chunks)."""
    need = frames + 2 * slot_units(text, tokens_per_frame)
    return -(-need // (2 * shards * chunks)) * chunks


def prompt_length(text: int, frames: int, tokens_per_frame: int, shards: int,
                  chunks: int = 1) -> int:
    """Lp of a `RingPrompt` for ids of length `text` and `frames` frames."""
    return 2 * shards * chunk_units(text, frames, tokens_per_frame, shards, chunks) * tokens_per_frame


def _text(ids, attn, video_token_id):
    """Per row: the placeholder's index `at` and the count of text tokens after it, both [B]."""
    at = jnp.argmax(ids == video_token_id, axis=1).astype(jnp.int32)
    post = jnp.sum(attn.astype(jnp.int32), axis=1) - at - 1
    return at, jnp.maximum(post, 0)


def ring_layout(at, post, text: int, frames: int, tokens_per_frame: int, shards: int,
                chunks: int = 1, num_frames=None):
    """Positions and segments [B, Lp] (in the ring's order) for placeholder indices `at` [B] and
    after-placeholder text lengths `post` [B]; also the ids' index of each slot token (pre and
    post slots, [B, S] each, -1 where padding). `num_frames` [B]: each row's real frames (the
    rest are padding; the text after the video follows the last real one); None: all."""
    f, k = tokens_per_frame, slot_units(text, tokens_per_frame)
    real = frames if num_frames is None else jnp.asarray(num_frames)[:, None]
    s = k * f
    total = prompt_length(text, frames, f, shards, chunks)
    g = jnp.arange(total)[None, :]
    at, post = at[:, None], post[:, None]
    pre_i = g - (s - at)                                    # token index in the pre slot
    post_m = g - (total - s) - (s - post)                   # m-th token after the placeholder
    is_pre, is_post = g < s, g >= total - s
    in_video = (g >= s) & (g < s + frames * f) & ((g - s) // f < real)
    pos = jnp.where(is_pre, pre_i, jnp.where(is_post, at + real * f + post_m, at + g - s))
    ok = jnp.where(is_pre, pre_i >= 0, jnp.where(is_post, post_m >= 0, in_video))
    slot = jnp.arange(s)[None, :]
    pre_src = jnp.where(slot >= s - at, slot - (s - at), -1)
    post_src = jnp.where(slot >= s - post, at + 1 + slot - (s - post), -1)
    seg = jnp.where(ok, 0, -1).astype(jnp.int32)
    pos = jnp.where(ok, pos, 0).astype(jnp.int32)
    order = lambda a: zigzag(a, shards, chunks=chunks)  # noqa: E731
    return order(pos), order(seg), pre_src, post_src


def ring_prompts(vlm, feats, ids, attn, layout: Layout, chunks: int = 1,
                 num_frames=None) -> RingPrompt:
    """Vision features [B, T, N, C] + right-padded ids / attention mask [B, L] (one video
    placeholder per row; `num_frames` [B] of each clip's T frames real, None: all) ->
    `RingPrompt` for the layout's ring (in `chunks` prefill chunks): equal, as attention sees
    it, to `VLM.rollout_prompts` (same tokens at the same positions), but built where it is
    used."""
    n = ring_size(layout)
    b, frames = feats.shape[:2]
    text, f = ids.shape[1], vlm.cfg.tokens_per_frame
    k, u = slot_units(text, f), chunk_units(text, frames, f, n, chunks)
    pad = [(0, 0), (k, 2 * n * u - frames - k)] + [(0, 0)] * (feats.ndim - 2)
    feats = layout.constrain(zigzag(jnp.pad(feats, pad), n, chunks=chunks),
                             ("batch", "length", None, None))
    video = jax.vmap(vlm.project_frames)(feats)           # [B, 2nu, f, E], each device its own
    video = layout.constrain(video, ("batch", "length", None, None))
    e = video.shape[-1]
    at, post = _text(ids, attn, vlm.cfg.video_token_id)
    pos, seg, pre_src, post_src = ring_layout(at, post, text, frames, f, n, chunks, num_frames)

    def slot(src):
        emb = vlm.llm.embed_tokens(jnp.take_along_axis(ids, jnp.maximum(src, 0), axis=1))
        return (emb * (src >= 0)[..., None].astype(emb.dtype)).astype(video.dtype)

    # the text units where the zigzag put natural units 0..k-1 and U-k..U-1; the rest video
    units = 2 * n * u
    natural = zigzag_indices(units, n, chunks)
    src = np.where(natural < k, natural, np.where(natural >= units - k, natural - units + 2 * k,
                                                   2 * k))
    text_units = jnp.concatenate([slot(pre_src), slot(post_src)], 1).reshape(b, 2 * k, f, e)
    text_units = jnp.pad(text_units, [(0, 0), (0, 1), (0, 0), (0, 0)])   # unit 2k: zeros
    overlay = layout.constrain(jnp.take(text_units, jnp.asarray(src), axis=1),
                               ("batch", "length", None, None))
    x = jnp.where(jnp.asarray(src < 2 * k)[None, :, None, None], overlay, video)
    x = layout.constrain(x.reshape(b, -1, e), ("batch", "length", None))
    return RingPrompt(x, pos, seg, shards=n, chunks=chunks)
