"""The both-layouts kernel (interpret mode on CPU) with FP8 training's quantization: bit for bit
the same values as `nanochat_jax.fp8.quantize` in both layouts, and split over 8 devices without a
collective.

The Pallas interpreter fills outputs with NaN before a kernel runs (tests/test_kernels.py checks
that it still does), so a block the kernel forgets to write fails the comparison.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kernels import dual_layout
from nanochat_jax import fp8, sharding

BLOCK = (16, 32)


def quantize_both(x, dtype):
    scale = fp8._scale(x, dtype)
    return dual_layout.map_both_layouts(fp8._scaled_cast, x, scale, dtype, block=BLOCK, interpret=True)


def bits(a):
    a = np.asarray(a)
    assert not np.isnan(a.astype(np.float32)).any(), "NaN: an unwritten block"
    return a.view(np.uint8)


@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2])
@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32])
def test_both_layouts_are_the_quantized_tensor(dtype, x_dtype):
    # Several blocks each way, rows and columns of different counts, values spread over the range.
    x = (jax.random.normal(jax.random.key(0), (48, 96)) * jnp.logspace(-3, 1, 96)).astype(x_dtype)
    want, _ = fp8.quantize(x, dtype)
    q, q_t = jax.jit(quantize_both, static_argnums=1)(x, dtype)
    assert q.dtype == q_t.dtype == dtype and q.shape == (48, 96) and q_t.shape == (96, 48)
    np.testing.assert_array_equal(bits(q), bits(want))
    np.testing.assert_array_equal(bits(q_t), bits(want).T)


@pytest.mark.parametrize("rows_per_device", [32, 8], ids=["whole-blocks", "less-than-a-block"])
def test_split_over_the_batch_without_gathering(rows_per_device):
    """Rows split over 8 devices: the same values as on one device, the transposed result split
    on its columns, and no collective in the kernel (the amax's all-reduce is the only one); a
    device's share smaller than a block is mapped by XLA, with the same result."""
    assert len(jax.devices()) == 8
    x = jax.random.normal(jax.random.key(1), (8 * rows_per_device, 64), jnp.bfloat16)
    want = quantize_both(x, fp8.E4M3)
    mesh = sharding.make_mesh()
    fn = jax.jit(quantize_both, static_argnums=1, in_shardings=NamedSharding(mesh, P("data", None)))
    q, q_t = fn(x, fp8.E4M3)
    np.testing.assert_array_equal(bits(q), bits(want[0]))
    np.testing.assert_array_equal(bits(q_t), bits(want[1]))
    assert tuple(q.sharding.spec)[:1] == ("data",) and tuple(q_t.sharding.spec) == (None, "data")
    hlo = fn.lower(x, fp8.E4M3).compile().as_text()
    assert hlo.count("all-reduce(") == 1
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute"))


def test_fp8_quantizes_both_layouts_the_same_way_without_the_kernel():
    x = jax.random.normal(jax.random.key(2), (40, 24), jnp.bfloat16)  # no GPU here: the XLA path
    assert not dual_layout.supported(x)
    q, q_t, inv = fp8.quantize_both_layouts(x, fp8.E5M2)
    want, want_inv = fp8.quantize(x, fp8.E5M2)
    np.testing.assert_array_equal(bits(q), bits(want))
    np.testing.assert_array_equal(bits(q_t), bits(want).T)
    assert float(inv) == float(want_inv)
