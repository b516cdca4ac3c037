"""The MLP's matmul-with-epilogue kernels (kernels/matmul_mgpu.py) against float32 references on
a Hopper GPU (there is no CPU interpreter for Mosaic GPU); their input checks on any machine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import matmul_mgpu
from kernels.bench_matmul import max_rel as _max_rel
from kernels.mosaic import on_hopper
from nanochat_jax import model

ON_HOPPER = on_hopper()
BF16_STEP = 2.0 ** -8  # one bfloat16 rounding, relative


def _inputs(B, T, K, N):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (B, T, K), jnp.bfloat16).at[0, 0].set(0)
    w = (jax.random.normal(keys[1], (K, N)) * K ** -0.5).astype(jnp.bfloat16)
    a = jnp.square(jax.nn.relu(jax.random.normal(keys[2], (B, T, N), jnp.bfloat16)))
    return x, w, a


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU kernels need a Hopper GPU")
@pytest.mark.parametrize("B,T,K,N", [(1, 128, 64, 256), (2, 384, 768, 3072), (4, 256, 1280, 5120)])
def test_epilogues_match_float32_products(B, T, K, N):
    """Each kernel against its formula on the float32 product, within one bf16 rounding; rows
    whose a is 0 get an exact 0 gradient (no 0 · inf), and tiles past the first are written."""
    x, w, a = _inputs(B, T, K, N)
    h = jnp.einsum("btk,kn->btn", x, w, preferred_element_type=jnp.float32)
    got = matmul_mgpu.relu_squared_matmul(x, w.T)  # the weight in (out, in) orientation
    assert got.shape == (B, T, N) and got.dtype == jnp.bfloat16
    assert _max_rel(got, jnp.square(jax.nn.relu(h))) <= BF16_STEP
    got = matmul_mgpu.relu_squared_grad_matmul(x, w, a)
    want = h * 2 * jnp.sqrt(a.astype(jnp.float32))
    assert _max_rel(got, want) <= BF16_STEP
    assert np.all(np.asarray(got)[np.asarray(a) == 0] == 0)


@pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU kernels need a Hopper GPU")
def test_model_mlp_with_kernels_matches_the_xla_path():
    """The model's MLP and its three gradients, kernels against the XLA expressions (what runs
    off Hopper), in bf16: within a couple of bf16 roundings."""
    x, w, _ = _inputs(2, 256, 256, 1024)
    w_fc, w_proj = w.T, (jax.random.normal(jax.random.key(5), (256, 1024)) * 0.03).astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(6), x.shape, jnp.bfloat16)
    assert model._mlp_kernels_apply(x, w_fc, transposed=True)
    got, got_vjp = jax.vjp(jax.jit(model.mlp), x, w_fc, w_proj)
    plain = lambda x, w_fc, w_proj: model.linear(jnp.square(jax.nn.relu(model.linear(x, w_fc))), w_proj)
    want, want_vjp = jax.vjp(plain, x, w_fc, w_proj)
    assert _max_rel(got, want) <= 2 * BF16_STEP
    for got_d, want_d in zip(got_vjp(g), want_vjp(g)):
        assert np.linalg.norm(np.asarray(got_d, np.float32) - np.asarray(want_d, np.float32)) <= \
            2 * BF16_STEP * np.linalg.norm(np.asarray(want_d, np.float32))


def test_kernels_reject_what_they_cannot_run():
    x, w, a = _inputs(1, 128, 64, 256)
    with pytest.raises(ValueError, match="expected x"):
        matmul_mgpu.relu_squared_matmul(x[0], w.T)
    with pytest.raises(ValueError, match=r"expected x \(B, T, K\) and w \(N, K\)"):
        matmul_mgpu.relu_squared_matmul(x, w)
    with pytest.raises(ValueError, match=r"and w \(K, N\)"):
        matmul_mgpu.relu_squared_grad_matmul(x, w.T, a)
    with pytest.raises(ValueError, match="dtype"):
        matmul_mgpu.relu_squared_matmul(x.astype(jnp.float32), w.T.astype(jnp.float32))
    with pytest.raises(ValueError, match="divide"):
        matmul_mgpu.relu_squared_matmul(x[:, :100], w.T)
    with pytest.raises(ValueError, match="a must be"):
        matmul_mgpu.relu_squared_grad_matmul(x, w, a[:, :64])
    assert not matmul_mgpu.supported(x[:, :100], w)
    assert not matmul_mgpu.supported(x, w, transposed=True)
    assert not matmul_mgpu.supported(x.astype(jnp.float32), w.astype(jnp.float32))


def test_bench_names_bad_shapes_and_refuses_without_hopper():
    import subprocess
    import sys

    run = lambda *a: subprocess.run([sys.executable, "-m", "kernels.bench_matmul", *a], capture_output=True, text=True)
    bad = run("--shapes", "d20,d99")
    assert bad.returncode == 2 and "unknown shape(s) d99" in bad.stderr and "Traceback" not in bad.stderr
    if not ON_HOPPER:
        refused = run()
        assert refused.returncode == 1 and "needs a Hopper GPU" in refused.stderr


def test_bench_table_is_markdown_with_one_line_per_row():
    from kernels.bench_matmul import table

    row = {"shape": "d20", "op": "relu_squared", "ms_ours": 1.25, "ms_xla": 1.5, "tflops_ours": 680.2,
           "tflops_xla": 560.1, "err_ours": 2.9e-3, "err_xla": 6.3e-3}
    lines = table([row, row]).split("\n")
    assert len(lines) == 4 and lines[1] == "| " + " | ".join(["---"] * 9) + " |"
    assert lines[2] == "| d20 | relu_squared | 1.250 | 1.500 | 0.83x | 680 | 560 | 2.9e-03 | 6.3e-03 |"
