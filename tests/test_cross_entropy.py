"""The loss's one-pass kernel (interpret mode on CPU) against the model's jnp version, through the
model's head loss, and its batch-parallel partitioning on 8 devices.

The Pallas interpreter fills outputs with NaN before a kernel runs, so a row the kernel forgets
to write fails the comparisons.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kernels import cross_entropy
from nanochat_jax import model, sharding


def inputs(B, T, padded, vocab, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    z = (8 * jax.random.normal(keys[0], (B, T, padded))).astype(dtype)  # some beyond the softcap's knee
    targets = jax.random.randint(keys[1], (B, T), 0, vocab).at[0, :3].set(model.IGNORE_INDEX)
    coef = jax.random.uniform(keys[2], (B, T), jnp.float32, -1, 1).at[0, :3].set(0)
    return z, targets, coef


# (B, T, padded vocabulary, vocabulary): without and with padding columns.
SHAPES = [(2, 8, 128, 128), (2, 12, 256, 150)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_the_jnp_version(shape, dtype, monkeypatch):
    """Against the jnp version with its exp taken as the kernel takes it (an exp2, as Triton does;
    it differs from exp by up to |x| float32 ulps), the same float32 arithmetic: the log-sum-exp
    agrees to float32 rounding (its sum runs in another order), also with the exact one, and the
    gradient to one rounding to z's dtype plus what that log-sum-exp difference carries into it
    (|coef| · softmax · (1 - tanh²) <= 1 times it); the padding columns and the ignored targets'
    rows get exactly 0."""
    B, T, padded, vocab = shape
    z, targets, coef = inputs(*shape, dtype)
    with monkeypatch.context() as patch:
        patch.setattr(jnp, "exp", cross_entropy._exp)
        want_dz, want_lse = model._softcapped_cross_entropy_grad_xla(z, targets, coef, vocab)
    got_dz, got_lse = cross_entropy.softcapped_cross_entropy_grad(z, targets, coef, vocab, softcap=model.SOFTCAP,
                                                                   interpret=True)
    c = model.SOFTCAP * np.tanh(np.asarray(z[..., :vocab], np.float64) / model.SOFTCAP)
    np.testing.assert_allclose(np.asarray(got_lse), np.log(np.exp(c).sum(-1)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_lse), np.asarray(want_lse), rtol=1e-6)
    assert got_dz.dtype == dtype
    got_dz, want_dz = np.asarray(got_dz, np.float32), np.asarray(want_dz, np.float32)
    assert np.isfinite(got_dz).all()
    ulp = float(jnp.finfo(dtype).eps)
    lse_diff = float(np.abs(np.asarray(got_lse) - np.asarray(want_lse)).max())
    np.testing.assert_allclose(got_dz, want_dz, rtol=ulp, atol=ulp * np.abs(want_dz).max() + lse_diff)
    assert not got_dz[..., vocab:].any() and not got_dz[0, :3].any()


def test_the_model_head_loss_through_the_kernel(monkeypatch):
    """The model's head loss and both its gradients with the kernel switched on (as on a GPU;
    here interpreted) equal the jnp version's."""
    B, T, padded, vocab, D = 2, 16, 256, 200, 32
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    w = 3 * jax.random.normal(jax.random.key(1), (padded, D))
    _, targets, coef = inputs(B, T, padded, vocab, jnp.float32)

    def loss_and_grads():
        loss = lambda x, w: model.head_loss_sum(x, w, targets, coef, vocab) / 7
        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    want_loss, want = loss_and_grads()
    monkeypatch.setattr(model, "_loss_kernel_applies", lambda logits: True)
    got_loss, got = loss_and_grads()
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * np.abs(b).max())


def test_sharded_over_the_batch_without_gathering():
    z, targets, coef = inputs(8, 8, 256, 200, jnp.bfloat16)
    rows = NamedSharding(sharding.make_mesh(), P("data"))

    def kernel(z, targets, coef):
        return cross_entropy.softcapped_cross_entropy_grad(z, targets, coef, 200, softcap=model.SOFTCAP, interpret=True)

    want = kernel(z, targets, coef)
    fn = jax.jit(kernel, in_shardings=(rows, rows, rows))
    got = fn(z, targets, coef)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        assert tuple(a.sharding.spec)[0] == "data"
    hlo = fn.lower(z, targets, coef).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"))
