"""The one-pass rotary + QK-norm kernels (interpret mode on CPU) against the model's jnp version,
and their batch-parallel partitioning on 8 devices.

The Pallas interpreter fills outputs with NaN before a kernel runs (tests/test_kernels.py checks
that it still does), so a half or a block the kernel forgets to write fails the comparison.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kernels import rotary
from nanochat_jax import model, sharding


def inputs(shape, dtype):
    """x (B, T, S, H, D), the S outputs' gradients and the tables."""
    B, T, S, H, D = shape
    x = jax.random.normal(jax.random.key(0), shape).astype(dtype)
    gs = tuple(jax.random.normal(jax.random.key(1 + s), (B, T, H, D)).astype(dtype) for s in range(S))
    C, S_table = model.rotary_tables(*model.rotary_cos_sin(jnp.arange(T), D, dtype))
    return x, gs, C, S_table


def kernels(x, gs, C, S, ys, inv):
    eps = float(jnp.finfo(x.dtype).eps)
    fwd = rotary.rotary_qk_norm_fwd(x, C, S, scale=model.QK_SCALE, eps=eps, interpret=True)
    dx = rotary.rotary_qk_norm_bwd(gs, ys, inv, C, S, scale=model.QK_SCALE, interpret=True)
    return fwd, dx


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all(), "non-finite values: an unwritten block or half"
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(2, 24, 2, 3, 16), (1, 7, 2, 5, 32), (3, 64, 2, 4, 128), (2, 48, 1, 3, 16)],
                         ids=["blocks-of-8", "one-position-blocks", "full-blocks", "one-projection"])
def test_kernels_match_the_jnp_version(shape, dtype, tol):
    """Queries and keys stacked (S = 2) or one projection alone (S = 1, as under GQA): the S outputs,
    the per-row scales and the stacked input's gradient."""
    x, gs, C, S = inputs(shape, dtype)
    want_ys, (_, want_inv, _, _) = model._rotary_qk_norm_xla_fwd(x, C, S)
    want_dx = model._rotary_qk_norm_xla_bwd((want_ys, want_inv, C, S), gs)[0]
    (ys, inv), dx = jax.jit(kernels)(x, gs, C, S, want_ys, want_inv)
    assert len(ys) == shape[2] and dx.shape == x.shape and inv.shape == want_inv.shape
    assert all(y.dtype == dtype for y in ys) and dx.dtype == dtype
    for y, want_y in zip(ys, want_ys):
        assert rel(y, want_y) < tol
    assert rel(inv, want_inv) < tol and rel(dx, want_dx) < tol


@pytest.mark.parametrize("model_axis", [1, 2], ids=["8x1", "4x2"])
def test_sharded_over_batch_and_heads_without_gathering(model_axis):
    """On 8 devices with the batch (and the heads, on a 4x2 mesh) split, each device runs the
    kernels on its own rows: the same numbers as on one device, outputs split like the input, and
    no collective in the program."""
    assert len(jax.devices()) == 8
    x, gs, C, S = inputs((8, 32, 2, 2, 16), jnp.float32)
    ys, inv = model._rotary_qk_norm_xla_fwd(x, C, S)[1][:2]
    want = kernels(x, gs, C, S, ys, inv)
    mesh = sharding.make_mesh(model=model_axis)
    heads = "model" if model_axis > 1 else None
    stacked = NamedSharding(mesh, P("data", None, None, heads))
    rows = NamedSharding(mesh, P("data", None, heads))
    fn = jax.jit(kernels, in_shardings=(stacked, (rows, rows), None, None, (rows, rows), stacked))
    got = fn(x, gs, C, S, ys, inv)
    (got_ys, got_inv), got_dx = got
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    for a, heads_dim in [(y, 2) for y in got_ys] + [(got_inv, 3), (got_dx, 3)]:
        spec = tuple(a.sharding.spec) + (None,) * 5
        assert spec[0] == "data" and spec[heads_dim] == heads
    hlo = fn.lower(x, gs, C, S, ys, inv).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"))


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["queries-and-keys-stacked", "gqa"])
def test_training_step_through_the_kernels_on_eight_devices(monkeypatch, live_params, n_kv_head):
    """The model with the kernels switched on (as on a GPU; here interpreted): loss and every
    gradient of a sharded 8-device step equal those of the jnp version on one device, with the
    queries and keys from one product and, under GQA, from two."""
    from nanochat_jax import train
    from nanochat_jax.config import GPTConfig

    config = GPTConfig(sequence_len=64, vocab_size=128, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64)
    step = train.StepConfig(model=config)
    params = live_params(config)
    tokens = np.random.default_rng(0).integers(0, 128, (1, 8, 33), dtype=np.int32)

    def run(mesh):
        fn = train.make_loss_and_grads(step, mesh)
        loss, grads = fn(jax.device_put(params, sharding.param_shardings(config, mesh)), tokens[..., :-1], tokens[..., 1:])
        return float(loss), jax.tree.map(np.asarray, grads)

    want_loss, want = run(sharding.make_mesh(devices=jax.devices()[:1]))
    monkeypatch.setattr(model, "_rotary_kernel_applies", lambda x, C: C.ndim == 2)
    got_loss, got = run(sharding.make_mesh(model=2))
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    # The kernels round differently from XLA (1e-7 relative in float32). A leaf whose gradient is
    # itself at the float32 rounding level of the whole (backout_lambda's: 2e-8 against 0.5) moves
    # by a few of its ulps between any two orders of summation (XLA alone, 8 devices against 1:
    # 5.6e-9), so it is held to the float32 resolution of the whole instead.
    scale = np.sqrt(sum(np.sum(b.astype(np.float64) ** 2) for b in jax.tree.leaves(want)))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        bound = max(1e-5 * np.linalg.norm(b), np.finfo(np.float32).eps * scale)
        assert np.linalg.norm(a - b) <= bound, jax.tree_util.keystr(path)
