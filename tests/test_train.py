"""The same step on one device, on 8 devices as 8x1 and 4x2 meshes, and with gradient accumulation."""

import jax
import numpy as np
import optax
import pytest

from nanochat_jax import model, sharding, train
from nanochat_jax.config import GPTConfig

# GQA, padded vocab (500 -> 512), sliding windows that bite (short window 128 < T = 192).
CONFIG = GPTConfig(sequence_len=512, vocab_size=500, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)
STEP = train.StepConfig(model=CONFIG)
ROWS, T = 32, 192


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (ROWS, T + 1), dtype=np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].copy()
    # Ignored targets spread unevenly, so per-micro-batch means would differ from the global mean.
    targets[:3, :100] = -1
    targets[9, 50:] = -1
    return inputs, targets


@pytest.fixture(scope="module")
def params(live_params):
    return live_params(CONFIG)


def run(params, batch, mesh, micro_steps):
    inputs, targets = batch
    fn = train.make_loss_and_grads(STEP, mesh)
    shape = (micro_steps, ROWS // micro_steps, T)
    placed = jax.device_put(params, sharding.param_shardings(CONFIG, mesh))
    loss, grads = fn(placed, inputs.reshape(shape), targets.reshape(shape))
    return float(loss), jax.tree.map(np.asarray, grads), grads


@pytest.fixture(scope="module")
def single_device(params, batch):
    return run(params, batch, sharding.make_mesh(devices=jax.devices()[:1]), 1)


def assert_same(result, reference):
    loss, grads, _ = result
    ref_loss, ref_grads, _ = reference
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    ref_flat = jax.tree.leaves(ref_grads)
    for (path, g), r in zip(flat, ref_flat):
        assert np.linalg.norm(r) > 0, path
        assert np.linalg.norm(g - r) / np.linalg.norm(r) < 1e-5, jax.tree_util.keystr(path)


def test_loss_is_mean_over_counted_targets(params, batch, single_device):
    inputs, targets = batch
    expected = model.loss_fn(params, inputs, targets, CONFIG)
    assert single_device[0] == pytest.approx(float(expected), rel=1e-6)


def test_gradients_equal_autodiff_through_the_lookup(params, batch, single_device):
    """The step differentiates the embedding tables through their looked-up rows and scatter-adds
    those gradients itself (repeated tokens included: 6,144 tokens from a 500-token vocabulary):
    every gradient equals jax's own gradient of the loss with respect to the parameters."""
    inputs, targets = batch
    want = jax.tree.map(np.asarray, jax.grad(model.loss_fn)(params, inputs, targets, CONFIG))
    assert_same(single_device, (single_device[0], want, None))


@pytest.mark.parametrize("model_axis", [1, 2], ids=["8x1", "4x2"])
def test_eight_devices_equal_one(params, batch, single_device, model_axis):
    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh(model=model_axis)
    result = run(params, batch, mesh, 1)
    assert_same(result, single_device)
    # The gradients come back sharded like the parameters, not replicated.
    q_grad = result[2]["blocks"]["attn_q"]
    assert q_grad.sharding.spec == sharding.param_shardings(CONFIG, mesh)["blocks"]["attn_q"].spec
    assert q_grad.addressable_shards[0].data.size == q_grad.size // 8


def test_gradient_accumulation_equals_one_big_batch(params, batch, single_device):
    assert_same(run(params, batch, sharding.make_mesh(), 4), single_device)


def test_train_step_learns_and_keeps_shardings(batch):
    mesh = sharding.make_mesh(model=2)
    optimizer = optax.adamw(3e-3)
    params, opt_state, opt_shardings = train.init_train_state(STEP, optimizer, mesh, jax.random.key(0))
    mu = opt_state[0].mu["blocks"]["mlp_fc"]
    assert mu.sharding == sharding.param_shardings(CONFIG, mesh)["blocks"]["mlp_fc"]
    step = train.make_train_step(STEP, optimizer, mesh, opt_shardings)
    inputs, targets = (x.reshape(2, ROWS // 2, T) for x in batch)
    losses = []
    for _ in range(5):
        params, opt_state, loss = step(params, opt_state, inputs, targets)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    assert params["wte"].sharding == sharding.param_shardings(CONFIG, mesh)["wte"]
    assert opt_state[0].mu["blocks"]["mlp_fc"].sharding == opt_shardings[0].mu["blocks"]["mlp_fc"]
