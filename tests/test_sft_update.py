"""The SFT update trains the vision tower when `train.freeze_vision` is off (the features are
encoded inside the differentiated function), and leaves it alone when on; GRPO refuses a
trainable tower at start-up (its updates read the rollout's features)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import demo, tiny
from lvr_jax.models.vlm import init_vlm, vlm_config_from
from lvr_jax.train.grpo import train_grpo
from lvr_jax.train.sft import sft_step_loss, sft_update
from lvr_jax.train.state import trainable_filter
from tests.conftest import perturb


def params(module):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


@pytest.mark.parametrize("freeze_vision", [False, True])
def test_sft_update_trains_the_tower_only_when_asked(freeze_vision):
    cfg = vlm_config_from(tiny.get_config().model)
    model = perturb(init_vlm(cfg, 1), seed=7, scale=0.2)
    rng = np.random.default_rng(0)
    s = cfg.vision.image_size
    frames = jnp.asarray(rng.normal(size=(2, 2, s, s, 3)), jnp.float32)
    ids = rng.integers(10, 300, (2, 9)).astype(np.int32)
    ids[:, 2] = cfg.video_token_id
    ids, attn = jnp.asarray(ids), jnp.ones((2, 9), jnp.int32)
    mask = jnp.asarray(np.arange(9)[None].repeat(2, 0) >= 5, jnp.int32)

    def loss(m):                               # the tower's gradient, encoded inside
        return sft_step_loss(m, m.batch_features(frames), ids, attn, mask)[0]

    want = params(nnx.grad(loss)(model).vision)
    before = params(model.vision)
    opt = nnx.Optimizer(model, optax.sgd(1.0), wrt=trainable_filter(freeze_vision))
    sft_update(model, opt, frames, ids, attn, mask, freeze_vision=freeze_vision)
    moved = [b - a for a, b in zip(before, params(model.vision))]
    if freeze_vision:
        assert all(np.all(d == 0) for d in moved)
    else:                                      # SGD at rate 1: the change is minus the gradient
        assert max(np.abs(g).max() for g in want) > 1e-3
        for d, g in zip(moved, want):
            np.testing.assert_allclose(d, -g, rtol=1e-4, atol=1e-6)


def test_grpo_refuses_a_trainable_tower(tmp_path):
    config = demo.get_config("grpo")
    config.train.freeze_vision = False
    with pytest.raises(ValueError, match="train.freeze_vision=False: GRPO trains with the vision"):
        train_grpo(config, tmp_path)
