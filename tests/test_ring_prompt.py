"""Prompts built in the ring's layout (`models.ring_prompt`) equal the spliced, left-padded ones
(`VLM.rollout_prompts`) as the model sees them: the same prefix, log-probs and gradients; and no
device of the ring holds the whole prompt."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import longvila_r1_7b, tiny
from lvr_jax.models.ring_prompt import prompt_length, ring_prompts
from lvr_jax.models.vlm import init_vlm, vlm_config_from
from lvr_jax.rl.policy import response_logprobs
from sharding.mesh import Layout, make_mesh
from sharding.sequence_parallel import unzigzag
from tests.conftest import perturb
from tests.torch_reference import rel_err

B, G = 3, 2
# (ids length L, frames T, rows (real ids, placeholder index): text after it, none, before).
# "long": each text slot (3 frame units) is longer than a chunk of the ring (1 unit)
CASES = {"short": (9, 5, [(9, 3), (6, 5), (4, 0)]),
         "long": (40, 2, [(40, 20), (25, 24), (30, 0)])}


@pytest.fixture(scope="module")
def model():
    cfg = vlm_config_from(tiny.get_config().model)
    return perturb(init_vlm(cfg, 2), seed=9, scale=0.2)


def inputs(model, case: str):
    length, frames, rows = CASES[case]
    cfg = model.cfg
    rng = np.random.default_rng(0)
    ids, attn = rng.integers(0, 500, (B, length)), np.zeros((B, length), np.int32)
    for b, (n, at) in enumerate(rows):
        attn[b, :n], ids[b, at] = 1, cfg.video_token_id
    feats = rng.normal(size=(B, frames, cfg.vision.grid ** 2, cfg.vision.hidden_size))
    resp = rng.integers(0, 500, (B, G, 4))
    return tuple(jnp.asarray(a) for a in (feats.astype(np.float32), ids, attn, resp))


def layouts():
    return [Layout.of(None), Layout.of(make_mesh({"seq": 4, "data": -1}))]


COMPILED = {}


def compiled(model, case: str, ring: bool, new: bool):
    """Jitted (prefix logits, lengths, log-probs) and the gradient of the log-probs' sum, through
    the ring layout (`new`) or the spliced prompts, compiled once per module."""
    if (case, ring, new) not in COMPILED:
        feats, ids, attn, resp = inputs(model, case)
        layout = layouts()[ring]
        graphdef, state = nnx.split(model)

        def logprobs(state):
            m = nnx.merge(graphdef, state)
            if new:
                prompt, mask = ring_prompts(m, feats, ids, attn, layout), None
            else:
                prompt, mask = m.rollout_prompts(feats, ids, attn, layout.pad_multiple)
            prefix = m.llm.prefill(prompt, mask, layout=layout)
            lp = response_logprobs(m.llm, prompt, mask, resp, temperature=0.9, layout=layout)
            return jnp.sum(lp), (prefix.logits, prefix.lengths, lp)

        fn = jax.jit(jax.value_and_grad(logprobs, has_aux=True)).lower(state).compile()
        COMPILED[case, ring, new] = (fn, state, graphdef)
    return COMPILED[case, ring, new]


@pytest.mark.parametrize("case,ring", [("short", False), ("short", True), ("long", True)])
def test_same_prefix_logprobs_and_grads(model, case, ring):
    outs = []
    for new in (False, True):
        fn, state, graphdef = compiled(model, case, ring, new)
        outs.append(fn(state))
    ((_, (want_logits, want_len, want_lp)), want_grads), ((_, (logits, lengths, lp)), grads) = outs
    length, frames, rows = CASES[case]
    np.testing.assert_array_equal(lengths, want_len)
    np.testing.assert_array_equal(lengths, [n - 1 + frames * model.cfg.tokens_per_frame
                                            for n, _ in rows])
    assert rel_err(logits, want_logits) < 1e-5 and rel_err(lp, want_lp) < 1e-5
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        if float(jnp.abs(want).max()) == 0:       # the vision tower: features are inputs
            assert float(jnp.abs(got).max()) == 0
        else:
            assert rel_err(got, want) < 1e-5
    projector = jax.tree.leaves(nnx.state(nnx.merge(graphdef, grads).projector))
    assert all(float(jnp.abs(g).max()) > 0 for g in projector)    # the gradient reaches it


def test_layout_positions_and_sharding(model):
    f = model.cfg.tokens_per_frame
    for case, layout in (("short", layouts()[0]), ("short", layouts()[1]), ("long", layouts()[1])):
        feats, ids, attn, _ = inputs(model, case)
        length, frames, rows = CASES[case]
        n = layout.size("length") if layout.seq_axis else 1
        prompt = jax.jit(lambda x, i, a, lay=layout: ring_prompts(model, x, i, a, lay))(
            feats, ids, attn)
        assert prompt.shards == n
        e = model.cfg.llm.hidden_size
        assert prompt.x.shape == (B, prompt_length(length, frames, f, n), e)
        pos, seg = (np.asarray(unzigzag(a, n)) for a in (prompt.positions, prompt.segments))
        for b, (count, _) in enumerate(rows):    # real tokens in order, at 0 .. length - 1
            np.testing.assert_array_equal(pos[b][seg[b] >= 0], np.arange(count - 1 + frames * f))
        if n > 1:
            assert prompt.x.sharding.spec[1] == layout.seq_axis


def test_no_device_holds_the_whole_prompt(model):
    """The log-probs' forward + backward on the seq = 4 ring: the spliced path has arrays of the
    whole prompt's length per device; the ring layout only the quarter each device holds."""
    e, f = model.cfg.llm.hidden_size, model.cfg.tokens_per_frame
    length, frames, _ = CASES["short"]

    def longest(new):      # the longest token axis of any [B, tokens, E] array per device
        text = compiled(model, "short", True, new)[0].as_text()
        return max(int(m) for m in re.findall(rf"\[{B},(\d+),{e}\]", text))

    assert longest(False) >= length - 1 + frames * f
    assert longest(True) == prompt_length(length, frames, f, 4) // 4


def test_model_ring_prompt_switch_picks_the_layout(model):
    """`VLM.prompts`: the ring layout with `model.ring_prompt`, else the spliced prompt padded to
    2n and cut up for the ring; both RingPrompts with the same real tokens."""
    feats, ids, attn, _ = inputs(model, "short")
    length, frames, rows = CASES["short"]
    layout = layouts()[1]
    f = model.cfg.tokens_per_frame
    for switch, want in ((True, prompt_length(length, frames, f, 4)),
                         (False, -(-(length - 1 + frames * f) // 8) * 8)):
        m = nnx.merge(*nnx.split(model))
        m.cfg = dataclasses.replace(m.cfg, ring_prompt=switch)
        prompt = jax.jit(lambda x, m=m: m.prompts(x, ids, attn, layout))(feats)
        assert prompt.x.shape[1] == want and prompt.shards == 4
        np.testing.assert_array_equal(np.sum(np.asarray(prompt.mask), 1),
                                      [n - 1 + frames * f for n, _ in rows])
    assert vlm_config_from(longvila_r1_7b.get_config().model).ring_prompt
    assert not vlm_config_from(tiny.get_config().model).ring_prompt
