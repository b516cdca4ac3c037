"""Pallas attention kernels (interpret mode on CPU) against plain-jnp oracles.

The Pallas interpreter fills every output with NaN before the kernel runs (checked below), so a
block the kernel forgets to write shows up as NaN and fails the error check.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from kernels import attention_mgpu
from kernels.attention import Blocks, decode_attention, flash_attention
from nanochat_jax.attention import attention, attention_cached

# Tiny tiles keep the interpreter fast and make every test shape span several blocks.
SMALL = Blocks(block_q=16, block_k=16, bwd_major=16, bwd_minor=16)
MIXED = Blocks(block_q=32, block_k=16, bwd_major=32, bwd_minor=16)


def reference(q, k, v, causal, window):
    """softmax over the band: t - w <= s <= t (causal) or |t - s| <= w, in float32."""
    B, T, H, D = q.shape
    K = k.shape[2]
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    s = jnp.einsum("btkgd,bskd->bkgts", qf.reshape(B, T, K, H // K, D), kf,
                   precision="highest") * D ** -0.5
    t, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    visible = (j <= t) if causal else jnp.ones((T, T), bool)
    if window is not None:
        visible &= (t - j <= window) & (causal | (j - t <= window))
    p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
    return jnp.einsum("bkgts,bskd->btkgd", p, vf, precision="highest").reshape(B, T, H, D)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all(), "non-finite values: an unwritten block or a bad mask"
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_interpreter_poisons_outputs():
    out = pl.pallas_call(lambda x_ref, o_ref: None, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                         interpret=True)(jnp.ones(8))
    assert np.isnan(np.asarray(out)).all()


def test_reference_is_the_model_oracle():
    q, k, v = (jax.random.normal(key, (2, 11, h, 8)) for key, h in zip(jax.random.split(jax.random.key(0), 3), (4, 2, 2)))
    for window in (None, 3):
        assert rel_err(reference(q, k, v, True, window), attention(q, k, v, window=window, backend="xla")) < 1e-6


# (B, T, H, H_kv, D, causal, window, dtype, blocks): T never a multiple of the tile; windows
# below, at and beyond T; GQA 1, 2 and 4.
CASES = [
    (1, 37, 2, 2, 16, True, None, jnp.float32, SMALL),
    (2, 45, 4, 2, 16, True, 7, jnp.float32, MIXED),
    (3, 21, 4, 1, 16, False, None, jnp.float32, SMALL),
    (1, 50, 2, 1, 32, False, 9, jnp.float32, MIXED),
    (2, 23, 4, 4, 16, True, 22, jnp.float32, SMALL),   # window == T - 1: the whole prefix
    (1, 19, 4, 1, 16, True, 40, jnp.float32, SMALL),   # window > T
    (1, 40, 4, 2, 32, True, 17, jnp.bfloat16, MIXED),
    (1, 33, 2, 1, 16, False, None, jnp.bfloat16, SMALL),
]


@pytest.mark.parametrize("B, T, H, K, D, causal, window, dtype, blocks", CASES)
def test_flash_attention_forward_and_gradients(B, T, H, K, D, causal, window, dtype, blocks):
    keys = jax.random.split(jax.random.key(T * 1000 + H * 10 + K), 4)
    q = jax.random.normal(keys[0], (B, T, H, D), dtype)
    k = jax.random.normal(keys[1], (B, T, K, D), dtype)
    v = jax.random.normal(keys[2], (B, T, K, D), dtype)
    dy = jax.random.normal(keys[3], (B, T, H, D), dtype)
    kernel = functools.partial(flash_attention, causal=causal, window=window, blocks=blocks,
                               interpret=True)
    oracle = functools.partial(reference, causal=causal, window=window)
    got_out, got_vjp = jax.vjp(kernel, q, k, v)
    want_out, want_vjp = jax.vjp(lambda *a: oracle(*a).astype(dtype), q, k, v)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, got, want in zip(("out", "dq", "dk", "dv"), (got_out, *got_vjp(dy)),
                               (want_out, *want_vjp(dy))):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        err = rel_err(got, want)
        assert err < tol, f"{name}: relative error {err:.3g}"


# (B, T, H, H_kv, D, causal, window): ragged T, GQA 1-4, windows inside and beyond T, D 64 and 128.
MOSAIC_CASES = [
    (1, 256, 2, 1, 128, True, None),
    (2, 1000, 8, 2, 128, True, None),
    (2, 1100, 6, 2, 128, True, 300),
    (1, 777, 4, 4, 64, True, 64),
    (1, 640, 4, 1, 128, False, None),
    (1, 300, 2, 2, 128, True, 500),
]


@pytest.mark.skipif(not attention_mgpu.supported(jnp.zeros((1, 1, 1, 128), jnp.bfloat16)),
                    reason="the Mosaic GPU kernels need a Hopper GPU (run on the lent H200)")
@pytest.mark.parametrize("B, T, H, K, D, causal, window", MOSAIC_CASES)
def test_mosaic_flash_attention_forward_and_gradients(B, T, H, K, D, causal, window):
    keys = jax.random.split(jax.random.key(T + H), 4)
    q = jax.random.normal(keys[0], (B, T, H, D), jnp.bfloat16)
    k, v = (jax.random.normal(key, (B, T, K, D), jnp.bfloat16) for key in keys[1:3])
    dy = jax.random.normal(keys[3], (B, T, H, D), jnp.bfloat16)
    kernel = functools.partial(attention_mgpu.flash_attention, causal=causal, window=window)
    got_out, got_vjp = jax.vjp(kernel, q, k, v)
    want_out, want_vjp = jax.vjp(functools.partial(reference, causal=causal, window=window),
                                 *(x.astype(jnp.float32) for x in (q, k, v)))
    for name, got, want in zip(("out", "dq", "dk", "dv"), (got_out, *got_vjp(dy)),
                               (want_out, *want_vjp(dy.astype(jnp.float32)))):
        assert got.dtype == jnp.bfloat16 and got.shape == want.shape, name
        err = rel_err(got, want)
        assert err < 2e-2, f"{name}: relative error {err:.3g}"


def test_mosaic_flash_attention_rejects_what_it_cannot_run():
    q = jnp.zeros((1, 16, 4, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        attention_mgpu.flash_attention(*(x.astype(jnp.float32) for x in (q, q, q)))
    with pytest.raises(ValueError, match="head_dim 64 or 128"):
        attention_mgpu.flash_attention(q[..., :32], q[..., :32], q[..., :32])
    with pytest.raises(ValueError, match="multiple of H_kv"):
        attention_mgpu.flash_attention(q, q[:, :, :3], q[:, :, :3])


def test_flash_attention_rejects_bad_shapes():
    q = jnp.zeros((1, 16, 3, 16))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q, jnp.zeros((1, 16, 2, 16)), jnp.zeros((1, 16, 2, 16)), interpret=True)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q.astype(jnp.float16), q.astype(jnp.float16), q.astype(jnp.float16),
                        interpret=True)


@pytest.mark.parametrize("T, H, K, window, dtype", [
    (1, 4, 2, None, jnp.float32),
    (3, 4, 1, 5, jnp.float32),
    (2, 2, 2, 0, jnp.bfloat16),
])
def test_decode_attention_matches_cached_oracle(T, H, K, window, dtype):
    B, S, D = 3, 48, 16
    keys = jax.random.split(jax.random.key(T + 7 * H), 4)
    q = jax.random.normal(keys[0], (B, T, H, D), dtype)
    k = jax.random.normal(keys[1], (B, S, K, D), dtype)
    v = jax.random.normal(keys[2], (B, S, K, D), dtype)
    starts = jnp.array([0, 13, S - T])  # an empty prefix, a middle, the cache's last slots
    positions = starts[:, None] + jnp.arange(T)
    got = decode_attention(q, k, v, positions, window=window, block_k=16, num_splits=2,
                           interpret=True)
    want = attention_cached(q, k, v, positions, window=window)
    assert got.dtype == dtype
    assert rel_err(got, want) < (1e-5 if dtype == jnp.float32 else 2e-2)


def test_pallas_backend_is_wired():
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (1, 20, 4, 16))
    k, v = (jax.random.normal(key, (1, 20, 2, 16)) for key in keys[1:])
    got = attention(q, k, v, window=5, backend="pallas")
    with jax.default_matmul_precision("highest"):  # on a GPU, XLA's fp32 products are tf32 otherwise
        want = attention(q, k, v, window=5, backend="xla")
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("model_axis, H, K", [(1, 4, 2), (2, 4, 2), (2, 4, 1)],
                         ids=["batch-split", "batch-and-heads-split", "heads-whole-gqa-4"])
def test_flash_attention_sharded_without_gathering(model_axis, H, K):
    """On 8 devices, the forward and all three gradients equal one device's, split like the
    inputs, with no collective in the program: each device runs the kernels on its own rows.
    Heads are split only where every head count divides the axis (4:1 GQA with one key/value
    head on two devices runs with the heads whole)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from nanochat_jax import sharding

    assert len(jax.devices()) == 8
    keys = jax.random.split(jax.random.key(5), 4)
    q, dy = (jax.random.normal(key, (8, 24, H, 16)) for key in keys[:2])
    k, v = (jax.random.normal(key, (8, 24, K, 16)) for key in keys[2:])

    def grads(q, k, v, dy):
        out, vjp = jax.vjp(functools.partial(flash_attention, window=9, blocks=SMALL, interpret=True), q, k, v)
        return out, *vjp(dy)

    want = jax.jit(grads)(q, k, v, dy)
    mesh = sharding.make_mesh(model=model_axis)
    heads = "model" if model_axis > 1 else None
    heads_split = heads if K % model_axis == 0 else None
    rows, kv_rows = (NamedSharding(mesh, P("data", None, h)) for h in (heads, heads_split))
    fn = jax.jit(grads, in_shardings=(rows, kv_rows, kv_rows, rows))
    got = fn(q, k, v, dy)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=name)
        spec = tuple(a.sharding.spec) + (None,) * 4
        assert spec[0] == "data" and (heads_split != heads or spec[2] == heads), (name, a.sharding.spec)
    if heads_split == heads:  # (otherwise the kernels gather the query heads, as they must)
        hlo = fn.lower(q, k, v, dy).compile().as_text()
        collectives = ("all-gather", "all-reduce", "all-to-all", "collective-permute")
        assert not any(op in hlo for op in collectives)
