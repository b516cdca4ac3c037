import jax
import numpy as np
import pytest

from nanochat_jax.attention import attention


def naive_attention(q, k, v, window):
    """One query at a time, straight from the definition: keys t-window..t, shared kv heads."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    out = np.zeros_like(q, dtype=np.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                lo = 0 if window is None else max(0, t - window)
                keys, values = k[b, lo : t + 1, h // group], v[b, lo : t + 1, h // group]
                s = keys @ q[b, t, h] / np.sqrt(D)
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ values
    return out


@pytest.mark.parametrize("heads, kv_heads, window", [(4, 4, None), (4, 2, 5), (6, 1, 0), (4, 2, 100)])
def test_xla_backend_matches_definition(heads, kv_heads, window):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 12, heads, 8)).astype(np.float32)
    k = rng.standard_normal((2, 12, kv_heads, 8)).astype(np.float32)
    v = rng.standard_normal((2, 12, kv_heads, 8)).astype(np.float32)
    with jax.default_matmul_precision("highest"):  # GPUs would otherwise multiply float32 in tf32
        got = attention(q, k, v, window=window, backend="xla")
    np.testing.assert_allclose(got, naive_attention(q, k, v, window), rtol=2e-5, atol=2e-6)


def test_unknown_backend_is_a_clear_error():
    x = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(x, x, x, window=None, backend="flash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU (run on the lent H200)")
@pytest.mark.parametrize("heads, kv_heads, window", [(8, 8, None), (8, 2, 64), (8, 1, 1)])
def test_cudnn_backend_matches_xla(heads, kv_heads, window):
    """Forward and gradients of the cuDNN backend against the oracle, bf16, GQA and windows."""
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, 256, heads, 128), jnp.bfloat16)
    k = jax.random.normal(keys[1], (2, 256, kv_heads, 128), jnp.bfloat16)
    v = jax.random.normal(keys[2], (2, 256, kv_heads, 128), jnp.bfloat16)
    dy = jax.random.normal(keys[3], q.shape, jnp.bfloat16)

    def run(backend):
        out, vjp = jax.vjp(lambda *a: attention(*a, window=window, backend=backend), q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *vjp(dy))]

    for name, got, want in zip(["out", "dq", "dk", "dv"], run("cudnn"), run("xla")):
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < 2e-2, f"{name}: relative error {err:.3g}"
