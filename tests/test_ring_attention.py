"""Ring attention (MR-SP stage 2) == dense attention, forward and gradients, on 8 CPU devices."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lvr_jax.models.attention import (QUERY_BLOCK, causal_blocks_attention, dense_attention,
                                      whole_prompt_attention)
from sharding.mesh import make_mesh
from sharding.ring_attention import ring_attention, ring_attention_local_stats
from sharding.sequence_parallel import (
    pad_to_multiple,
    padded_length,
    unzigzag,
    unzigzag_indices,
    zigzag,
    zigzag_indices,
    zigzag_positions,
)

B, L, H, KVH, D = 2, 37, 4, 2, 8
TOL = 1e-5


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_inputs(seed, length=L, heads=H, kv_heads=KVH, dtype=jnp.float32):
    """Fresh standard-normal q, k, v and output cotangent (numpy RNG: no compiles)."""
    rng = np.random.default_rng(seed)

    def draw(h):
        return jnp.asarray(rng.standard_normal((B, length, h, D), np.float32), dtype)

    return draw(heads), draw(kv_heads), draw(kv_heads), draw(heads)


def packed_segments(length=L):
    """Two packed batches: segments of different lengths, one padding hole (-1), trailing pad."""
    rows = []
    for cuts in ((11, 26, 28), (5, 20, 33)):
        s = np.zeros(length, np.int32)
        s[cuts[0]:] = 1
        s[cuts[1]:cuts[2]] = -1  # padding inside the sequence
        s[cuts[2]:] = 2
        rows.append(s)
    rows[1][-2:] = -1  # trailing padding
    return jnp.asarray(np.stack(rows))


def with_grads(attn):
    """jit(q, k, v, ct, seg) -> (out, (dq, dk, dv)) with loss = sum(out * ct)."""

    def f(q, k, v, ct, seg):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, seg), q, k, v)
        return out, vjp(ct)

    return jax.jit(f)


@functools.cache
def dense_fn(causal):
    return with_grads(lambda q, k, v, seg: dense_attention(q, k, v, causal=causal,
                                                           segment_ids=seg))


@functools.cache
def dense_fwd(causal):
    return jax.jit(functools.partial(dense_attention, causal=causal))


def ring_fn(mesh, causal, **kw):
    return with_grads(lambda q, k, v, seg: ring_attention(q, k, v, mesh=mesh, causal=causal,
                                                          segment_ids=seg, **kw))


def check_against_dense(mesh, causal, seg, seed, key_tile=512, **shape):
    q, k, v, ct = make_inputs(seed, **shape)
    out, grads = ring_fn(mesh, causal, key_tile=key_tile)(q, k, v, ct, seg)
    ref, ref_grads = dense_fn(causal)(q, k, v, ct, seg)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel(out, ref) < TOL, rel(out, ref)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert rel(g, r) < TOL, (name, rel(g, r))
    return out, grads


# ----------------------------------------------------------------------------- zigzag helpers


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_zigzag_roundtrip(n):
    length = padded_length(37, n)
    assert length % (2 * n) == 0 and 37 <= length < 37 + 2 * n
    perm = zigzag_indices(length, n)
    assert sorted(perm.tolist()) == list(range(length))
    np.testing.assert_array_equal(perm[unzigzag_indices(length, n)], np.arange(length))
    chunk = length // (2 * n)
    for i in range(n):  # device i holds chunks i and 2n-1-i, in that order
        local = perm[2 * i * chunk:2 * (i + 1) * chunk]
        np.testing.assert_array_equal(local[:chunk], np.arange(i * chunk, (i + 1) * chunk))
        j = 2 * n - 1 - i
        np.testing.assert_array_equal(local[chunk:], np.arange(j * chunk, (j + 1) * chunk))

    x = jax.random.normal(jax.random.key(n), (2, 37, 3))
    xp, orig = pad_to_multiple(x, n)
    assert orig == 37 and xp.shape == (2, length, 3)
    z = zigzag(xp, n)
    np.testing.assert_array_equal(np.asarray(z), np.asarray(xp)[:, perm])
    np.testing.assert_array_equal(np.asarray(unzigzag(z, n)[:, :37]), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(zigzag_positions(length, n, 2)),
                                  np.broadcast_to(perm, (2, length)))


# ----------------------------------------------------------------------------- ring == dense

MESHES = {
    "seq1": {"seq": 1, "data": -1},
    "seq2": {"seq": 2, "data": -1},
    "seq4": {"seq": 4, "data": -1},
    "seq8": {"seq": 8},
    "data2_seq4": {"data": 2, "seq": 4},
}


@pytest.mark.parametrize("name", list(MESHES))
def test_ring_matches_dense_causal_packed_gqa(name):
    """Causal, GQA (4 heads / 2 kv heads), packed segments with padding, length 37."""
    mesh = make_mesh(MESHES[name])
    seg = packed_segments()
    out, _ = check_against_dense(mesh, True, seg, seed=hash(name) % 1000)
    # padding queries attend to nothing: exactly zero output
    assert float(jnp.abs(jnp.where((seg < 0)[..., None, None], out, 0.0)).max()) == 0.0


@pytest.mark.parametrize("tile,name", [(3, "seq2"), (4, "seq1")])
def test_ring_key_tiles_match_dense(tile, name):
    """Sub-blocks folded in key tiles that do not divide the key chunks (37 tokens padded to 40
    on seq 2: chunks of 10, tiles 3, 3, 3 and a last one shifted back over 2 keys already
    folded; on seq 1 chunks of 19 in tiles of 4)."""
    check_against_dense(make_mesh(MESHES[name]), True, packed_segments(), seed=30 + tile,
                        key_tile=tile)


def test_ring_matches_dense_noncausal():
    mesh = make_mesh({"seq": 4, "data": 2})
    check_against_dense(mesh, False, packed_segments(), seed=12)


def test_ring_matches_dense_heads_over_tensor_mha():
    """No segment ids, MHA, heads sharded over 'tensor' with batch over data and a seq ring."""
    mesh = make_mesh({"data": 2, "seq": 2, "tensor": 2})
    check_against_dense(mesh, True, None, seed=13, kv_heads=H)


def test_ring_on_a_mesh_of_only_a_seq_axis():
    """A user's mesh without the project's other axes ('data', 'fsdp', 'tensor'): they count as
    size 1 (the ring had failed with KeyError: 'data')."""
    mesh = jax.make_mesh((4,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:4])
    check_against_dense(mesh, True, packed_segments(), seed=15)


def test_one_device_prompt_attention_without_positions():
    """`whole_prompt_attention` / `causal_blocks_attention` with positions left out: the index,
    as `dense_attention` takes them, in every query block past the first (a block had got
    positions 0.. against keys 0..end, hiding most of its causal keys: 0.7 relative error)."""
    q, k, v, _ = make_inputs(16, length=2 * QUERY_BLOCK + 9)
    ref = dense_fwd(True)(q, k, v)
    for fn in (whole_prompt_attention, causal_blocks_attention):
        assert rel(jax.jit(fn)(q, k, v, None, None), ref) < TOL


def test_ring_bf16_forward():
    mesh = make_mesh({"seq": 2, "data": -1})
    q, k, v, _ = make_inputs(14, dtype=jnp.bfloat16)
    out = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=mesh))(q, k, v)
    ref = dense_fwd(True)(*(x.astype(jnp.float32) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    assert rel(out.astype(jnp.float32), ref) < 2e-2


# ----------------------------------------------------------------------------- block skipping


def test_causal_zigzag_skips_blocks_evenly():
    """Causal zigzag: each device computes 2n+1 of its 4n sub-blocks; non-causal computes all;
    both still equal dense attention."""
    n = 4
    mesh = make_mesh({"seq": n, "data": -1})
    length = 4 * n * 2  # local length 8 -> two chunks of 4
    q, k, v, _ = make_inputs(20 + n, length=length)
    perm = zigzag_indices(length, n)
    qz, kz, vz = (np.asarray(x)[:, perm] for x in (q, k, v))
    pos = np.broadcast_to(perm.astype(np.int32), (B, length))
    sz = np.zeros((B, length), np.int32)
    xs, ts = P(None, "seq"), P(None, "seq")

    def run(causal):
        def local(q, k, v, pos, seg):
            out, _, count = ring_attention_local_stats(q, k, v, pos, pos, seg, seg,
                                                       axis_name="seq", causal=causal)
            return out, count[None]

        f = jax.shard_map(local, mesh=mesh, in_specs=(xs, xs, xs, ts, ts),
                          out_specs=(xs, P("seq")))
        out, counts = jax.jit(f)(qz, kz, vz, pos, sz)
        out = np.asarray(out)[:, unzigzag_indices(length, n)]
        assert rel(out, dense_fwd(causal)(q, k, v)) < TOL
        return np.asarray(counts)

    np.testing.assert_array_equal(run(True), np.full(n, 2 * n + 1))
    np.testing.assert_array_equal(run(False), np.full(n, 4 * n))


def test_ring_has_no_conditionals_forward_or_backward():
    """The zigzag schedule picks its sub-blocks with selects, not `lax.cond`: the compiled ring
    forward and backward on seq = 4 hold no `conditional` (on GPU each one copied its predicate to
    the host)."""
    mesh = make_mesh({"seq": 4, "data": -1})
    q, k, v, ct = make_inputs(41, length=40)
    f = jax.jit(lambda q, k, v: jax.vjp(lambda q, k, v: ring_attention(q, k, v, mesh=mesh),
                                        q, k, v)[1](ct))
    hlo = f.lower(q, k, v).compile().as_text()
    assert re.search(r"\bwhile\(", hlo)                  # the ring loops are there
    assert not re.search(r"\bconditional\(", hlo)      # an HLO conditional op
    ref = dense_fn(True)(q, k, v, ct, None)[1]
    for g, r in zip(f(q, k, v), ref):
        assert rel(g, r) < TOL
