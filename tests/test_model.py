import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import parity
from nanochat_jax import convert, model
from nanochat_jax.config import GPTConfig, config_from_depth

GOLDEN = Path(__file__).parent / "golden"


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", ["model_a", "model_b", "model_c"])
def test_reference_logits_and_loss(name, tmp_path):
    """SSSL; GQA with padded vocab and inputs longer than the context; multi-query attention."""
    parity.parity_model(str(GOLDEN / f"{name}.npz"), str(tmp_path / "out.npz"))
    with np.load(GOLDEN / f"{name}.npz") as f, np.load(tmp_path / "out.npz") as g:
        ref, ours = dict(f), dict(g)
    assert ours["logits"].shape == ref["logits"].shape
    assert rel_err(ours["logits"], ref["logits"]) < 1e-5
    assert abs(float(ours["loss"]) - float(ref["loss"])) / abs(float(ref["loss"])) < 1e-5


def test_parity_check_catches_a_perturbed_weight(tmp_path):
    """The comparison is not vacuous: nudging one late-layer matrix by 1e-3 relative breaks it."""
    with np.load(GOLDEN / "model_a.npz") as f:
        data = dict(f)
    data["param/transformer.h.3.attn.c_v.weight"] = data["param/transformer.h.3.attn.c_v.weight"] * 1.001
    np.savez(tmp_path / "perturbed.npz", **data)
    parity.parity_model(str(tmp_path / "perturbed.npz"), str(tmp_path / "out.npz"))
    with np.load(tmp_path / "out.npz") as ours:
        assert rel_err(ours["logits"], data["logits"]) > 1e-5


def test_parity_cli_reports_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit, match="parity model"):
        parity.main(["model", str(tmp_path / "missing.npz"), str(tmp_path / "out.npz")])


def test_init_matches_reference_scheme():
    config = GPTConfig(sequence_len=256, vocab_size=1000, n_layer=5, n_head=4, n_kv_head=2, n_embd=256)
    params = model.init_params(config, jax.random.key(0))
    shapes = model.param_shapes(config)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(tuple, shapes, is_leaf=lambda x: isinstance(x, tuple))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    s = math.sqrt(3 / 256)
    b = params["blocks"]
    assert abs(float(jnp.std(params["wte"])) - 0.8) < 0.01
    assert abs(float(jnp.std(params["lm_head"])) - 0.001) < 1e-5
    for name, bound in [("attn_q", s), ("attn_k", s), ("attn_v", s), ("mlp_fc", 0.4 * s)]:
        w = b[name]
        assert -bound <= float(w.min()) < -0.95 * bound and 0.95 * bound < float(w.max()) <= bound, name
        assert abs(float(jnp.std(w)) - bound / math.sqrt(3)) < 0.02 * bound, name
    v = params["value_embeds"]
    assert -s <= float(v.min()) < -0.95 * s and 0.95 * s < float(v.max()) <= s
    for gate in (b["ve_gate"], params["smear_gate"]):
        assert 0.0 <= float(gate.min()) and float(gate.max()) <= 0.02 and float(gate.std()) > 0.004
    assert not jnp.any(b["attn_proj"]) and not jnp.any(b["mlp_proj"])
    np.testing.assert_allclose(params["resid_lambdas"], [1.15, 1.125, 1.10, 1.075, 1.05], rtol=1e-6)
    np.testing.assert_allclose(params["x0_lambdas"], [0.20, 0.1625, 0.125, 0.0875, 0.05], rtol=1e-6)
    assert float(params["smear_lambda"][0]) == 0.0 and float(params["backout_lambda"][0]) == pytest.approx(0.2)


def hand_counts(depth):
    """The reference's counts written out for a full-width GQA-free model, vocab 32768."""
    D, V, L = 64 * depth, 32768, depth
    D = -(-D // 128) * 128
    H = D // 128
    n_ve = (L + 1) // 2
    matrices = L * (4 * D * D + 8 * D * D) + n_ve * H * 12
    lm_head = V * D
    windows = [512 if (i % 4 != 3 and i != L - 1) else 2048 for i in range(L)]
    flops = 6 * (matrices + lm_head + 24) + sum(12 * H * 128 * w for w in windows)
    total = 2 * V * D + n_ve * V * D + matrices + 2 * L + 24 + 2
    return matrices, lm_head, total, flops


@pytest.mark.parametrize("depth", [12, 20, 26])
def test_param_counts_and_flops(depth):
    config = config_from_depth(depth)
    counts = model.param_counts(config)
    matrices, lm_head, total, flops = hand_counts(depth)
    assert counts["transformer_matrices"] == matrices
    assert counts["lm_head"] == lm_head
    assert counts["total"] == total
    assert model.flops_per_token(config) == flops


def test_loss_ignores_minus_one_targets():
    config = GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=128)
    params = model.init_params(config, jax.random.key(1))
    params["lm_head"] = jax.random.normal(jax.random.key(2), params["lm_head"].shape)
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 100)
    targets = jnp.roll(tokens, -1, axis=1)
    masked = targets.at[:, :5].set(-1)
    logits = model.forward(params, tokens, config)
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    expected = -jnp.mean(picked[:, 5:])
    assert float(jax.jit(model.loss_fn, static_argnums=3)(params, tokens, masked, config)) == pytest.approx(float(expected), rel=1e-6)


def test_importer_round_trip_and_errors():
    config = GPTConfig(sequence_len=64, vocab_size=100, n_layer=3, n_head=2, n_kv_head=1, n_embd=128)
    params = jax.tree.map(np.asarray, model.init_params(config, jax.random.key(0)))
    state = convert.to_reference(params, config)
    assert "transformer.h.2.attn.ve_gate.weight" in state and "transformer.h.1.attn.ve_gate.weight" not in state
    assert state["transformer.h.1.attn.c_k.weight"].shape == (64, 128)
    back = convert.from_reference({"_orig_mod." + k: v for k, v in state.items()}, config)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    with pytest.raises(KeyError, match="lacks"):
        convert.from_reference({k: v for k, v in state.items() if k != "lm_head.weight"}, config)
    with pytest.raises(ValueError, match="does not fit"):
        convert.from_reference(state, GPTConfig(sequence_len=64, vocab_size=100, n_layer=3, n_head=2, n_kv_head=2, n_embd=128))


@pytest.mark.parametrize("chunk_len", [8, 7, 64])
def test_chunked_loss_equals_full_loss_and_gradients(chunk_len, live_params):
    """The chunked head (logits never materialized for the whole batch) changes nothing but rounding;
    7 does not divide T, so padding is exercised too. (3 layers: with 2, the backout layer is the last
    one and the final norm makes its gain's gradient exactly zero.)"""
    config = GPTConfig(sequence_len=64, vocab_size=100, n_layer=3, n_head=2, n_kv_head=1, n_embd=128)
    params = live_params(config)
    tokens = jax.random.randint(jax.random.key(3), (2, 24), 0, 100)
    targets = jnp.roll(tokens, -1, axis=1).at[0, :9].set(-1)

    def loss(p, chunk):
        total, count = model.loss_sum(p, tokens, targets, config, chunk_len=chunk)
        return total / count

    full, full_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 0)
    chunked, chunked_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, chunk_len)
    assert float(chunked) == pytest.approx(float(full), rel=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(chunked_grads), jax.tree.leaves(full_grads)):
        assert np.linalg.norm(b) > 0 and np.linalg.norm(a - b) < 1e-5 * np.linalg.norm(b), jax.tree_util.keystr(path)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("weighted", [False, True])
def test_head_loss_matches_autodiff_of_the_plain_formula(dtype, tol, weighted):
    """The head's loss (custom gradient, no float32 logits kept) against jax's own gradient of the
    textbook formula: logits x W^T, softcap in float32, crop the padded vocabulary, log-softmax,
    ignore -1; at a cotangent other than 1, as the mean over tokens gives."""
    vocab, padded, D = 100, 128, 32
    x = jax.random.normal(jax.random.key(0), (3, 7, D)).astype(dtype)
    w = (4 * jax.random.normal(jax.random.key(3), (padded, D))).astype(dtype)  # some logits beyond the cap
    targets = jax.random.randint(jax.random.key(1), (3, 7), 0, vocab).at[0, :3].set(-1).at[2, 6].set(vocab - 1)
    weights = jax.random.normal(jax.random.key(2), (3, 7)) if weighted else None

    def plain(x, w):
        c = model.SOFTCAP * jnp.tanh(model.linear(x, w)[..., :vocab].astype(jnp.float32) / model.SOFTCAP)
        valid = targets != -1
        picked = jnp.take_along_axis(jax.nn.log_softmax(c), jnp.where(valid, targets, 0)[..., None], -1)[..., 0]
        losses = -picked if weights is None else -picked * weights
        return jnp.sum(jnp.where(valid, losses, 0.0)) / 3

    fused = lambda x, w: model.head_loss_sum(x, w, targets, weights, vocab) / 3
    want, want_grads = jax.value_and_grad(plain, argnums=(0, 1))(x, w)
    got, got_grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(x, w)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    for got_d, want_d in zip(got_grads, want_grads):
        assert got_d.dtype == dtype
        want_d, got_d = np.asarray(want_d, np.float32), np.asarray(got_d, np.float32)
        assert np.linalg.norm(got_d - want_d) <= tol * np.linalg.norm(want_d)
    assert not np.any(np.asarray(got_grads[0][0, :3], np.float32))  # ignored targets pass no gradient back


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rotary_qk_norm_forward_and_gradient(dtype):
    """The fused rotary + QK-norm of stacked queries and keys (B, T, 2, H, hd): each output bitwise
    equal to rotating the two halves and normalizing (the reference's order of operations), the
    gradient equal to jax's own gradient of that formula (training positions (T,) and decoding
    positions (B, T))."""
    B, T, H, hd = 2, 5, 3, 8
    x = jax.random.normal(jax.random.key(0), (B, T, 2, H, hd)).astype(dtype)
    g = tuple(jax.random.normal(jax.random.key(1 + s), (B, T, H, hd)).astype(dtype) for s in range(2))

    def plain(x, cos, sin):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        cos, sin = cos[..., None, None, :], sin[..., None, None, :]
        rotated = jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)
        y = model.rms_norm(rotated) * model.QK_SCALE
        return y[:, :, 0], y[:, :, 1]

    for positions in (jnp.arange(T), jnp.arange(B * T).reshape(B, T) + 7):
        cos, sin = model.rotary_cos_sin(positions, hd, dtype)
        fused = lambda x: model.rotary_qk_norm(x, *model.rotary_tables(cos, sin))
        want, want_vjp = jax.vjp(lambda x: plain(x, cos, sin), x)
        got, got_vjp = jax.vjp(fused, x)
        assert len(got) == 2
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        want_dx = np.asarray(want_vjp(g)[0], np.float32)
        got_dx = np.asarray(got_vjp(g)[0], np.float32)
        tol = 1e-6 if dtype == jnp.float32 else 1e-2
        assert np.linalg.norm(got_dx - want_dx) <= tol * np.linalg.norm(want_dx)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 4e-3)])
def test_mlp_gradient_takes_the_relu_squared_derivative_from_its_output(dtype, tol):
    """The MLP with its hand-written backward pass (ReLU²'s derivative 2 sqrt(a) from the output)
    against jax's gradients of the plain formula, with negative, zero and positive
    pre-activations; in bfloat16 the two may differ by the rounding of the stored a, well under
    one bfloat16 step of the result."""
    B, T, D = 2, 8, 16
    x = jax.random.normal(jax.random.key(0), (B, T, D)).astype(dtype).at[0, 0].set(0)
    w_fc = (jax.random.normal(jax.random.key(1), (4 * D, D)) * D ** -0.5).astype(dtype)
    w_proj = (jax.random.normal(jax.random.key(2), (D, 4 * D)) * D ** -0.5).astype(dtype)
    g = jax.random.normal(jax.random.key(3), (B, T, D)).astype(dtype)
    plain = lambda x, w_fc, w_proj: model.linear(jnp.square(jax.nn.relu(model.linear(x, w_fc))), w_proj)
    want, want_vjp = jax.vjp(plain, x, w_fc, w_proj)
    got, got_vjp = jax.vjp(jax.jit(model.mlp), x, w_fc, w_proj)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    h = np.asarray(model.linear(x, w_fc), np.float32)
    assert (h < 0).any() and (h > 0).any() and (h[0, 0] == 0).all()
    for want_d, got_d in zip(want_vjp(g), got_vjp(g)):
        assert got_d.dtype == dtype
        want_d, got_d = np.asarray(want_d, np.float32), np.asarray(got_d, np.float32)
        assert np.linalg.norm(got_d - want_d) <= tol * np.linalg.norm(want_d)


def test_loss_gradient_recomputes_the_softcap_instead_of_storing_it():
    """The loss's two passes over the compute-dtype logits (log-sum-exp, then the gradient) each
    compute tanh: compiled, the gradient holds two tanh over the whole (B, T, V) logits, not one
    whose float32 result would be stored between them (8.6 GB per micro-step at d20)."""
    x, w, targets = jnp.zeros((4, 64, 32), jnp.bfloat16), jnp.zeros((256, 32), jnp.bfloat16), jnp.zeros((4, 64), jnp.int32)
    grad = jax.jit(jax.grad(lambda x: model.head_loss_sum(x, w, targets, None, 250)))
    hlo = grad.lower(x).compile().as_text()
    assert len(re.findall(r"= f32\[4,64,250\]\{[0-9,]*\} tanh\(", hlo)) == 2
