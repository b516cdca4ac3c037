"""FP8 training products: the reference's tensorwise recipe, bit for bit in the quantization and
exact in the products (on the CPU they are float32 products of the FP8 values), and a training
step that uses them on one device and on eight."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nanochat_jax import fp8, model, sharding, train
from nanochat_jax.config import GPTConfig

# Every matrix at least 128 wide, so the recipe covers the trunk's layers and the head.
CONFIG = GPTConfig(sequence_len=64, vocab_size=500, n_layer=2, n_head=1, n_kv_head=1, n_embd=128)
ROWS, T = 8, 64


def reference_quantize(x, dtype):
    """The reference's `_to_fp8` in numpy: scale = max / amax in float64, rounded to float32."""
    fmax = float(ml_dtypes.finfo(dtype).max)
    x32 = np.asarray(x, np.float32)
    scale = np.float32(fmax / max(float(np.abs(x32).max()), 1e-12))
    return np.clip(x32 * scale, -fmax, fmax).astype(dtype), np.float32(1.0) / scale


@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2])
def test_quantize_is_the_reference_recipe(dtype):
    x = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32) * 3e-3
    q, inv = jax.jit(fp8.quantize, static_argnums=1)(x, dtype)
    ref_q, ref_inv = reference_quantize(x, dtype)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), ref_q.view(np.uint8))
    assert float(inv) == pytest.approx(float(ref_inv), rel=1e-7)
    # The largest magnitude lands on the format's largest value.
    assert float(np.abs(np.asarray(q, np.float32)).max()) == float(ml_dtypes.finfo(dtype).max)


def test_an_all_zero_tensor_quantizes_to_zeros_with_a_finite_scale():
    q, inv = fp8.quantize(jnp.zeros((16, 16)), fp8.E4M3)
    assert not np.asarray(q, np.float32).any()
    assert np.isfinite(float(inv)) and float(inv) > 0


def test_the_reference_filter():
    assert fp8.applies(jnp.zeros((1280, 1280))) and fp8.applies(jnp.zeros((32768, 1280)))
    assert fp8.applies(jnp.zeros((5120, 1280))) and fp8.applies(jnp.zeros((1280, 5120)))
    assert not fp8.applies(jnp.zeros((10, 12)))  # the value-embedding gate
    assert not fp8.applies(jnp.zeros((1, 24)))  # the smear gate
    assert not fp8.applies(jnp.zeros((64, 256)))  # narrower than 128
    assert not fp8.applies(jnp.zeros((256, 136)))  # 136 is not a multiple of 16


def test_products_are_the_scaled_fp8_products():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 128)).astype(np.float32)
    w = (rng.standard_normal((256, 128)) * 0.05).astype(np.float32)
    g = rng.standard_normal((2, 16, 256)).astype(np.float32)
    y, vjp = jax.vjp(fp8.linear, x, w)
    dx, dw = vjp(g)

    xq, xi = reference_quantize(x.reshape(-1, 128), fp8.E4M3)
    wq, wi = reference_quantize(w, fp8.E4M3)
    gq, gi = reference_quantize(g.reshape(-1, 256), fp8.E5M2)
    f64 = lambda q, inv: q.astype(np.float64) * np.float64(inv)  # noqa: E731
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 256), f64(xq, xi) @ f64(wq, wi).T, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(dx).reshape(-1, 128), f64(gq, gi) @ f64(wq, wi), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(dw), f64(gq, gi).T @ f64(xq, xi), rtol=2e-5, atol=2e-5)
    # And they are the plain products up to FP8's rounding: a few percent, not more, not zero.
    exact = x.reshape(-1, 128).astype(np.float64) @ w.T.astype(np.float64)
    error = np.linalg.norm(np.asarray(y).reshape(-1, 256) - exact) / np.linalg.norm(exact)
    assert 1e-3 < error < 0.05


@pytest.fixture(scope="module")
def batch():
    tokens = np.random.default_rng(2).integers(0, CONFIG.vocab_size, (ROWS, T + 1), dtype=np.int32)
    return tokens[None, :, :-1], tokens[None, :, 1:]


def loss_and_grads(params, batch, mesh, fp8_products):
    step = train.StepConfig(model=CONFIG, fp8=fp8_products)
    placed = jax.device_put(params, sharding.param_shardings(CONFIG, mesh))
    loss, grads = train.make_loss_and_grads(step, mesh)(placed, *batch)
    return float(loss), jax.tree.map(np.asarray, grads)


@pytest.fixture(scope="module")
def one_device(live_params, batch):
    params = live_params(CONFIG)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    return params, loss_and_grads(params, batch, mesh, False), loss_and_grads(params, batch, mesh, True)


def test_fp8_step_is_close_to_the_full_precision_step(one_device):
    _, (loss, grads), (loss8, grads8) = one_device
    assert loss8 == pytest.approx(loss, rel=1e-2)
    assert loss8 != loss  # the products really ran in FP8
    for name in ("attn_q", "attn_v", "attn_proj", "mlp_fc", "mlp_proj"):
        g, g8 = grads["blocks"][name].ravel(), grads8["blocks"][name].ravel()
        assert g8 @ g / (np.linalg.norm(g8) * np.linalg.norm(g)) > 0.99, name
    g, g8 = grads["lm_head"].ravel(), grads8["lm_head"].ravel()
    assert g8 @ g / (np.linalg.norm(g8) * np.linalg.norm(g)) > 0.99


def test_fp8_step_on_eight_devices_equals_one(one_device, batch):
    # Each scale comes from the whole tensor across the devices, so the quantized operands are the
    # same; the sums' order differs, which can move a value across an FP8 rounding boundary. The
    # absolute term is for backout_lambda, whose gradient cancels to rounding level (~1e-8).
    params, _, (loss8, grads8) = one_device
    loss, grads = loss_and_grads(params, batch, sharding.make_mesh(), True)
    assert loss == pytest.approx(loss8, rel=1e-5)
    largest = max(np.linalg.norm(r) for r in jax.tree.leaves(grads8))
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads8)):
        assert np.linalg.norm(g - r) <= 1e-4 * np.linalg.norm(r) + 1e-6 * largest, jax.tree_util.keystr(path)


def test_evaluation_never_uses_fp8(one_device, batch):
    params, (loss, _), _ = one_device
    inputs, targets = batch
    assert float(model.loss_fn(params, inputs[0], targets[0], CONFIG)) == pytest.approx(loss, rel=1e-5)
