"""A clip shorter than the batch's T (`data.pipeline.short_video="all"`, an fps cap) is padded
with frames that its prompt masks out: its prefix, response log-probs and SFT loss equal those
of the clip alone with only its own frames, on the spliced and the ring layouts; and the data
pipeline gives every batch the config's T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from lvr_jax.data.dataset import collate
from lvr_jax.models.ring_prompt import ring_prompts
from lvr_jax.models.vlm import init_vlm, vlm_config_from
from lvr_jax.rl.policy import response_logprobs
from lvr_jax.train.sft import sft_step_loss
from sharding.mesh import Layout, make_mesh
from tests.conftest import perturb
from tests.torch_reference import rel_err

T, REAL = 4, (2, 4)           # the batch's frames; each row's real frames
L, AT, N_IDS = 9, 3, (9, 7)   # ids length, the placeholder's index, each row's real ids


@pytest.fixture(scope="module")
def setup():
    cfg = vlm_config_from(tiny.get_config().model)
    model = perturb(init_vlm(cfg, 3), seed=11, scale=0.2)
    rng = np.random.default_rng(5)
    ids, attn = rng.integers(10, 400, (2, L)).astype(np.int32), np.zeros((2, L), np.int32)
    for b, n in enumerate(N_IDS):
        attn[b, :n], ids[b, AT] = 1, cfg.video_token_id
    # the padding frames hold features unlike zeros: were they read, every row 0 figure moves
    feats = rng.normal(size=(2, T, cfg.vision.grid ** 2, cfg.vision.hidden_size)).astype(np.float32)
    resp = rng.integers(10, 400, (2, 3, 5)).astype(np.int32)
    return model, *(jnp.asarray(a) for a in (feats, ids, attn, resp))


def _run(model, feats, ids, attn, resp, layout, num_frames, ring: bool):
    """(prefix logits, lengths, response log-probs) of the batch under `layout`."""
    graphdef, state = nnx.split(model)

    def fn(state, feats, ids, attn, resp, nf):
        m = nnx.merge(graphdef, state)
        if ring:
            prompt, mask = ring_prompts(m, feats, ids, attn, layout, num_frames=nf), None
        else:
            prompt, mask = m.rollout_prompts(feats, ids, attn, layout.pad_multiple, nf)
        prefix = m.llm.prefill(prompt, mask, layout=layout)
        lp = response_logprobs(m.llm, prompt, mask, resp, temperature=0.8, layout=layout)
        return prefix.logits, prefix.lengths, lp

    return jax.jit(fn)(state, feats, ids, attn, resp, num_frames)


def _alone(model, feats, ids, attn, resp):
    """Each row by itself with only its real frames (no padding anywhere)."""
    outs = [_run(model, feats[b:b + 1, :REAL[b]], ids[b:b + 1], attn[b:b + 1], resp[b:b + 1],
                 Layout.of(None), None, False) for b in range(2)]
    return [np.concatenate([np.asarray(o[i]) for o in outs]) for i in range(3)]


@pytest.mark.parametrize("ring", [False, True])
def test_padded_frames_change_nothing(setup, ring):
    model, feats, ids, attn, resp = setup
    want = _alone(model, feats, ids, attn, resp)
    layout = Layout.of(make_mesh({"seq": 4, "data": -1})) if ring else Layout.of(None)
    got = _run(model, feats, ids, attn, resp, layout, jnp.asarray(REAL), ring)
    f = model.cfg.tokens_per_frame
    np.testing.assert_array_equal(got[1], [n - 1 + r * f for n, r in zip(N_IDS, REAL)])
    np.testing.assert_array_equal(got[1], want[1])
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[2], want[2]) < 1e-5
    unmasked = _run(model, feats, ids, attn, resp, layout, None, ring)   # the old behaviour
    assert rel_err(unmasked[2][:1], want[2][:1]) > 1e-3


def test_sft_loss_of_a_padded_clip(setup):
    model, feats, ids, attn, _ = setup
    loss_mask = jnp.asarray(np.arange(L)[None] >= 5, jnp.int32) * attn
    alone = [sft_step_loss(model, feats[b:b + 1, :REAL[b]], ids[b:b + 1], attn[b:b + 1],
                           loss_mask[b:b + 1])[1] for b in range(2)]
    _, got = sft_step_loss(model, feats, ids, attn, loss_mask, num_frames=jnp.asarray(REAL))
    assert float(got["num_tokens"]) == sum(float(a["num_tokens"]) for a in alone) > 0
    want = sum(float(a["nll_sum"]) for a in alone)
    assert abs(float(got["nll_sum"]) - want) < 1e-5 * abs(want)


def test_collate_pads_every_batch_to_the_config_frames():
    def example(t, i):
        return dict(input_ids=[1, 2, 3], frame_indices=list(range(t)),
                    frames=np.ones((t, 2, 2, 3), np.uint8), index=i, problem_id=str(i),
                    answer="A", category="c")

    got = collate([example(2, 0), example(3, 1)], pad_id=0, frames=5)
    assert got["frames"].shape == (2, 5, 2, 2, 3)
    np.testing.assert_array_equal(got["num_frames"], [2, 3])
    assert got["frames"][0, 2:].max() == 0 and got["frames"][1, :3].min() == 1
    np.testing.assert_array_equal(got["frame_indices"][0], [0, 1, -1, -1, -1])
    assert collate([example(6, 0)], pad_id=0, frames=5)["frames"].shape[1] == 6
