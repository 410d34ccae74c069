"""Memory switches of the layer stack against the plain path: `model.mlp_chunk` (the MLP of a long
prompt in strided token pieces per device: the same logits, K/V and gradients, on the ring's mesh
too, and the compiled prefill holds less) and `model.remat_offload` (the same gradients as remat,
each layer's input placed in host memory), and the `branches` rule (each device runs its share
of the G response branches)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from lvr_jax.models.qwen2 import mlp_pieces
from lvr_jax.models.vlm import init_vlm, remat_setting, vlm_config_from
from lvr_jax.rl.policy import response_logprobs
from sharding.mesh import Layout, make_mesh
from tests.conftest import perturb
from tests.torch_reference import rel_err


def llm_with(chunk: int, remat=False, **sizes):
    cfg = vlm_config_from(tiny.get_config().model)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, mlp_chunk=chunk, remat=remat,
                                                           **sizes))
    return perturb(init_vlm(cfg, 1), seed=4, scale=0.2).llm


def test_pieces_divide_each_devices_tokens():
    cfg = vlm_config_from(tiny.get_config().model).llm
    for chunk, local, want in ((0, 100, 1), (128, 100, 1), (5, 16, 4), (7, 48, 8), (10, 35, 5),
                               (4, 13, 13)):
        assert mlp_pieces(dataclasses.replace(cfg, mlp_chunk=chunk), local) == want


def test_chunked_mlp_equals_one_call_forward_kv_and_grads():
    """On the ring's mesh (seq 4): each device's share in strided pieces."""
    layout = Layout.of(make_mesh({"seq": 4, "data": -1}))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 61, 64)), jnp.float32)      # padded to 64 on the ring
    pos = jnp.broadcast_to(jnp.arange(61), (2, 61))
    seg = jnp.asarray(np.where(np.arange(61) < [[61], [50]], 0, -1))
    w = jnp.asarray(rng.normal(size=(2, 61, 512)), jnp.float32)

    llm = llm_with(0, remat=True)

    def run(chunk):     # 16 tokens per device on the ring: 4 pieces of 4
        llm.cfg = dataclasses.replace(llm.cfg, mlp_chunk=chunk)   # same weights, new program
        graphdef, state = nnx.split(llm)

        def f(st):
            logits, (k, v) = nnx.merge(graphdef, st).forward(x, pos, segment_ids=seg,
                                                             layout=layout, return_kv=True)
            return jnp.sum(logits * w), (logits, k, v)

        return jax.jit(jax.value_and_grad(f, has_aux=True))(state)

    (_, want), g_want = run(0)
    (_, got), g_got = run(5)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        if not np.any(b):                 # the embedding table: x is given, no gradient
            assert not np.any(a)
            continue
        assert rel_err(a, b) < 1e-4


def test_chunked_mlp_prefill_holds_a_piece_of_the_intermediate_activations():
    """A wide MLP (intermediate 4096 for hidden 64, so it outweighs the dense attention's
    scores): one piece's activations instead of the whole prompt's."""
    x = jax.ShapeDtypeStruct((1, 512, 64), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 512), jnp.bool_)

    llm = llm_with(0, intermediate_size=4096)

    def temp(chunk):
        llm.cfg = dataclasses.replace(llm.cfg, mlp_chunk=chunk)
        graphdef, state = nnx.split(llm)
        f = jax.jit(lambda st, x, m: nnx.merge(graphdef, st).prefill(x, m).k)
        return f.lower(state, x, mask).compile().memory_analysis().temp_size_in_bytes

    intermediate = 512 * 4096 * 4         # one [tokens, intermediate] float32 activation
    full, chunked = temp(0), temp(128)
    assert full - chunked > 1.5 * intermediate, (full, chunked, intermediate)


def test_offloaded_checkpoints_equal_remat_and_go_to_host():
    """remat="offload" (`model.remat_offload`): the same loss and gradients as remat=True, and the
    differentiated program moves each layer's input [N, L, E] to host memory (XLA:CPU then drops
    the placement; on a GPU it is a copy to pinned host memory)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 24, 64)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(24), (2, 24))

    llm = llm_with(0)

    def grads(remat):
        llm.cfg = dataclasses.replace(llm.cfg, remat=remat)      # same weights, new program
        graphdef, state = nnx.split(llm)
        f = lambda st: jnp.sum(nnx.merge(graphdef, st).forward(x, pos) ** 2)  # noqa: E731
        return f, state

    f_remat, state = grads(True)
    f_off, state_off = grads("offload")
    want = jax.jit(jax.value_and_grad(f_remat))(state)
    got = jax.jit(jax.value_and_grad(f_off))(state_off)
    assert rel_err(got[0], want[0]) < 1e-6
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        if np.any(b):
            assert rel_err(a, b) < 1e-6
    to_host = [line for line in str(jax.make_jaxpr(jax.grad(f_off))(state_off)).splitlines()
               if "device_put" in line and "<host>[2,24,64]" in line]
    assert to_host, "no layer input placed in host memory"
    assert not [line for line in str(jax.make_jaxpr(jax.grad(f_remat))(state)).splitlines()
                if "<host>" in line]


def test_remat_offload_setting_needs_remat():
    model = tiny.get_config().model
    assert remat_setting(model) is False
    model.remat, model.remat_offload = True, True
    assert remat_setting(model) == "offload"
    model.remat = False
    with pytest.raises(ValueError, match="remat_offload needs model.remat=True"):
        remat_setting(model)


def test_split_branches_run_a_share_of_the_response_rows_per_device():
    """The `branches` rule (on `seq`, the prefix cache's axis, by default): with G = 8 branches on
    seq = 8 each device runs the layers for one branch of the training forward + backward, so the
    compiled program does well under half the FLOPs and temporaries of every device running all
    8; the queries reach the prefix shards by all-gather and the partials return reduce-scattered.
    (The equality of loss and gradients: test_policy_forward, G = 4 on seq = 4.)"""
    llm = llm_with(0)
    rng = np.random.default_rng(3)
    embeds = jnp.asarray(rng.normal(size=(1, 208, 64)), jnp.float32)
    mask = jnp.asarray(np.arange(208) >= 8)[None]
    responses = jnp.asarray(rng.integers(0, 512, (1, 8, 64)))
    graphdef, state = nnx.split(llm)
    mesh = make_mesh({"seq": 8})

    def compiled(branches):
        layout = Layout.of(mesh, {"branches": branches})
        f = lambda st: response_logprobs(nnx.merge(graphdef, st), embeds, mask, responses,  # noqa
                                         layout=layout).sum()
        return jax.jit(jax.value_and_grad(f)).lower(state).compile()

    split, every = compiled("seq"), compiled(None)
    assert split.cost_analysis()["flops"] < 0.5 * every.cost_analysis()["flops"]
    temp = lambda c: c.memory_analysis().temp_size_in_bytes  # noqa: E731
    assert temp(split) < 0.5 * temp(every)
    assert " reduce-scatter(" in split.as_text() and " reduce-scatter(" not in every.as_text()
