"""The fused-kernel sub-blocks (`sharding.fused_blocks`): the ring and the branches' prefix
attention through the kernels' contract equal dense attention (forward and gradients) on CPU
(kernel "xla"), and the "cudnn" kernel lowers for CUDA to cuDNN flash-attention calls without
conditionals (the lowering runs here; the kernel itself runs in launch/gpu_check.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lvr_jax.models.attention import causal_blocks_attention, prefix_stats, whole_prompt_attention
from sharding import fused_blocks
from sharding.mesh import make_mesh
from sharding.ring_attention import ring_attention, ring_attention_local_stats
from sharding.sequence_parallel import unzigzag_indices, zigzag_indices
from tests.test_ring_attention import (
    MESHES,
    TOL,
    dense_fn,
    dense_fwd,
    make_inputs,
    packed_segments,
    rel,
    with_grads,
)


def fused_ring(mesh, causal, kernel="xla"):
    return with_grads(lambda q, k, v, seg: ring_attention(q, k, v, mesh=mesh, causal=causal,
                                                          segment_ids=seg, kernel=kernel))


def test_encode_adds_zero_within_a_segment_and_masks_across():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 6, 2, 8)), jnp.float32) for _ in range(2))
    q_seg = jnp.asarray([[0, 0, 3, 7, -1, 1]])
    kv_seg = jnp.asarray([[0, 3, -1, 7, 1, 5]])
    qe, ke, ve = fused_blocks.encode(q, k, k, q_seg, kv_seg)
    assert qe.shape[-1] == ke.shape[-1] == ve.shape[-1] == fused_blocks.padded_dim(8) == 16
    extra = np.einsum("bqhd,bkhd->bhqk", np.asarray(qe[..., 8:]), np.asarray(ke[..., 8:]))
    qs, ks = np.asarray(q_seg)[0], np.asarray(kv_seg)[0]
    want = np.where((qs[:, None] == ks[None, :]) & (ks[None, :] >= 0), 0.0, -2.0 ** 15)
    want[qs < 0] = 0.0       # padding queries see everything; the ring zeroes their rows
    np.testing.assert_array_equal(extra[0, 0], want)
    np.testing.assert_array_equal(np.asarray(qe[..., :8]), np.asarray(q))
    assert float(jnp.abs(ve[..., 8:]).max()) == 0.0
    assert fused_blocks.kernel_for("auto", jnp.bfloat16) == "tiled"     # CPU backend
    with pytest.raises(ValueError, match="ring kernel"):
        fused_blocks.kernel_for("flash", jnp.bfloat16)


@pytest.mark.parametrize("name", list(MESHES))
def test_fused_ring_matches_dense_causal_packed_gqa(name):
    mesh = make_mesh(MESHES[name])
    seg = packed_segments()
    q, k, v, ct = make_inputs(hash(name) % 1000 + 7)
    out, grads = fused_ring(mesh, True)(q, k, v, ct, seg)
    ref, ref_grads = dense_fn(True)(q, k, v, ct, seg)
    assert rel(out, ref) < TOL, rel(out, ref)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel(g, r) < TOL, (name, rel(g, r))
    assert float(jnp.abs(jnp.where((seg < 0)[..., None, None], out, 0.0)).max()) == 0.0


@pytest.mark.parametrize("mesh_shape,causal,kv_heads,seg", [
    ({"seq": 4, "data": 2}, False, 2, True), ({"data": 2, "seq": 2, "tensor": 2}, True, 4, False)])
def test_fused_ring_noncausal_and_heads_over_tensor(mesh_shape, causal, kv_heads, seg):
    seg = packed_segments() if seg else None
    q, k, v, ct = make_inputs(17, kv_heads=kv_heads)
    out, grads = fused_ring(make_mesh(mesh_shape), causal)(q, k, v, ct, seg)
    ref, ref_grads = dense_fn(causal)(q, k, v, ct, seg)
    assert rel(out, ref) < TOL
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < TOL


def test_fused_whole_prompt_attention_matches_dense():
    """One device, no ring: the prompt's attention as one fused call (causal by index, segments
    encoded) equals dense attention, forward and gradients; padding rows are exactly 0."""
    seg = packed_segments()
    q, k, v, ct = make_inputs(19)
    pos = jnp.broadcast_to(jnp.arange(q.shape[1]), seg.shape)
    fused = with_grads(lambda q, k, v, seg: whole_prompt_attention(q, k, v, pos, pos, seg, seg,
                                                                   implementation="xla"))
    out, grads = fused(q, k, v, ct, seg)
    ref, ref_grads = dense_fn(True)(q, k, v, ct, seg)
    assert rel(out, ref) < TOL
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < TOL
    assert float(jnp.abs(jnp.where((seg < 0)[..., None, None], out, 0.0)).max()) == 0.0


def test_causal_query_blocks_match_dense():
    """Off GPU the one-device prompt attention runs query blocks against the keys up to their end
    (37 tokens in blocks of 8: the last one short), packed segments: dense, forward and grads."""
    seg = packed_segments()
    q, k, v, ct = make_inputs(21)
    pos = jnp.broadcast_to(jnp.arange(q.shape[1]), seg.shape)
    blocks = with_grads(lambda q, k, v, seg: causal_blocks_attention(q, k, v, pos, pos, seg, seg,
                                                                     block=8))
    out, grads = blocks(q, k, v, ct, seg)
    ref, ref_grads = dense_fn(True)(q, k, v, ct, seg)
    assert rel(out, ref) < TOL
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < TOL


def test_fused_ring_keeps_the_zigzag_balance_and_refuses_unencodable_segments():
    """2n + 1 of 4n sub-blocks per device (as the tiled ring); a segment id the encoding cannot
    hold turns the output NaN instead of attending across segments."""
    n = 4
    mesh = make_mesh({"seq": n, "data": -1})
    length = 4 * n * 2
    q, k, v, _ = make_inputs(24, length=length)
    perm = zigzag_indices(length, n)
    qz, kz, vz = (np.asarray(x)[:, perm] for x in (q, k, v))
    pos = np.broadcast_to(perm.astype(np.int32), (2, length))
    spec = P(None, "seq")

    def local(q, k, v, pos, seg):
        out, _, count = ring_attention_local_stats(q, k, v, pos, pos, seg, seg, axis_name="seq",
                                                   kernel="xla")
        return out, count[None]

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=(spec, P("seq"))))
    out, counts = f(qz, kz, vz, pos, np.zeros((2, length), np.int32))
    np.testing.assert_array_equal(np.asarray(counts), np.full(n, 2 * n + 1))
    assert rel(np.asarray(out)[:, unzigzag_indices(length, n)], dense_fwd(True)(q, k, v)) < TOL
    out, _ = f(qz, kz, vz, pos, np.full((2, length), fused_blocks.SLOTS, np.int32))
    assert bool(jnp.all(jnp.isnan(out)))


def test_fused_prefix_partials_equal_einsum_ones_with_gradients():
    """The branches' prefix attention: fused partials (output, log-sum-exp -> max, sum, weighted
    values) merged over a seq = 4 shard_map give the einsum ones' output and log-sum-exp, and the
    same gradients of a loss on both (the lse's cotangent goes through the kernel's backward)."""
    mesh = make_mesh({"seq": 4, "data": -1})
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((2, 3, 2, 2, 2, 8)), jnp.float32)   # B G T KVH Hg D
    k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8)), jnp.float32) for _ in range(2))
    valid = jnp.asarray(rng.random((2, 16)) < 0.6).at[:, 0].set(True).at[:, 4:8].set(False)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(kernel):
        def stats(q, k, v, valid):
            return prefix_stats(q, k, v, valid, scale=0.3, axis="seq", kernel=kernel)

        f = jax.shard_map(stats, mesh=mesh, in_specs=(P(), P(None, "seq"), P(None, "seq"),
                                                      P(None, "seq")), out_specs=P())

        def one(q, k, v):
            m, l_sum, o = f(q, k, v, valid)   # the shift m differs; m + log(sum) does not
            return jnp.sum(w * o / l_sum[..., None]) + jnp.sum((m + jnp.log(l_sum)) * w[..., 0])

        return jax.jit(jax.value_and_grad(one, argnums=(0, 1, 2)))(q, k, v)

    (got, g_got), (want, g_want) = loss("xla"), loss("tiled")
    assert abs(float(got - want)) < 1e-5 * abs(float(want))
    for a, b in zip(g_got, g_want):
        assert rel(a, b) < 1e-5
    # the fused kernels take the prefix by token; branch_attention swaps a heads-first one
    with pytest.raises(ValueError, match="'xla' kernel takes the prefix by token"):
        prefix_stats(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), valid, scale=0.3,
                     kernel="xla", heads_first=True)


def test_cudnn_kernel_lowers_for_cuda_without_conditionals():
    """The "cudnn" ring on seq = 4, forward + backward, lowered for CUDA on this CPU machine:
    every sub-block is a cuDNN flash-attention call (3 at step 0, 2 in the loop body, 2 at the
    last step, forward and backward alike) and no conditional is left."""
    mesh = make_mesh({"seq": 4, "data": -1})
    q, k, v, ct = make_inputs(41, length=64, dtype=jnp.bfloat16)
    f = jax.jit(lambda q, k, v: jax.vjp(
        lambda q, k, v: ring_attention(q, k, v, mesh=mesh, kernel="cudnn"), q, k, v)[1](ct))
    text = f.trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @__cudnn\$fmhaSoftmax\(", text)) == 7
    assert len(re.findall(r"custom_call @__cudnn\$fmhaSoftmaxBackward\(", text)) == 7
    assert "stablehlo.while" in text
    assert "stablehlo.case" not in text and "stablehlo.if" not in text


def test_cudnn_prefix_attention_lowers_for_cuda():
    """The branches' prefix attention with the "cudnn" kernel, differentiated, in a seq = 4
    shard_map (queries replicated, the prefix sharded): one cuDNN forward and one backward."""
    mesh = make_mesh({"seq": 4, "data": -1})
    q = jnp.zeros((1, 8, 1, 4, 7, 128), jnp.bfloat16)
    k = v = jnp.zeros((1, 64, 4, 128), jnp.bfloat16)
    valid = jnp.ones((1, 64), bool)

    def stats(q, k, v, valid):
        m, l_sum, o = prefix_stats(q, k, v, valid, scale=128 ** -0.5, axis="seq", kernel="cudnn")
        return jnp.sum(o / l_sum[..., None]) + jnp.sum(m + jnp.log(l_sum))

    f = jax.shard_map(stats, mesh=mesh, in_specs=(P(), P(None, "seq"), P(None, "seq"),
                                                  P(None, "seq")), out_specs=P())
    text = jax.jit(jax.grad(f, argnums=(0, 1, 2))).trace(q, k, v, valid).lower(
        lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @__cudnn\$fmhaSoftmax\(", text)) == 1
    assert len(re.findall(r"custom_call @__cudnn\$fmhaSoftmaxBackward\(", text)) == 1
