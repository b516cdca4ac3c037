import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanochat_jax import convert, optim, sharding

_GOLDEN = pathlib.Path(__file__).parent / "golden" / "optim_a.npz"


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.fixture(scope="module")
def golden():
    with np.load(_GOLDEN) as f:
        return {k: f[k] for k in f.files}


def _stage(golden, stage, config):
    return convert.from_reference({k.removeprefix(f"{stage}/"): v for k, v in golden.items() if k.startswith(f"{stage}/")}, config)


# --- parity with the reference ----------------------------------------------------------------

def test_parity_optim_reproduces_two_reference_steps(golden, tmp_path):
    from launch.parity import parity_optim

    out_path = tmp_path / "out.npz"
    parity_optim(str(_GOLDEN), str(out_path))
    with np.load(out_path) as out:
        for step in (1, 2):
            expected = [k for k in golden if k.startswith(f"after{step}/")]
            assert sorted(expected) == sorted(k for k in out.files if k.startswith(f"after{step}/"))
            errs = {k: rel_err(out[k], golden[k]) for k in expected}
            worst = max(errs, key=errs.get)
            assert errs[worst] < 1e-4, f"{worst}: {errs[worst]:.2e}"
            # Every parameter moved: a tensor left untouched would pass trivially only if it was also
            # untouched in the reference, which none is.
            assert all(rel_err(out[k], golden[k.replace(f"after{step}/", "before/")]) > 1e-6 for k in expected)


def test_reference_groups_match_the_references_param_groups(golden):
    """Our group assignment and per-group hyperparameters, built from the setup_optimizer
    arguments, equal the param groups the reference itself wrote."""
    config = convert.config_from_json(str(golden["config"]))
    hyperparams = json.loads(str(golden["hyperparams"]))
    groups = optim.reference_groups(config.n_embd, **hyperparams)
    labels = optim.param_labels(_stage(golden, "before", config))
    label_of = {}
    for path, names in convert.reference_names(config).items():
        label = labels
        for part in path.split("/"):
            label = label[part]
        label_of.update(dict.fromkeys(names, label))
    file_groups = json.loads(str(golden["param_groups"]))
    assert sum(len(g["param_names"]) for g in file_groups) == len(label_of)
    for g in file_groups:
        ours = {groups[label_of[n]] for n in g["param_names"]}
        assert len(ours) == 1, g["param_names"]
        ours = ours.pop()
        assert ours.kind == g["kind"]
        assert ours.lr == pytest.approx(g["lr"], rel=1e-12)
        assert ours.weight_decay == pytest.approx(g["weight_decay"], rel=1e-12)
        if g["kind"] == "adamw":
            assert ours.betas == tuple(g["betas"]) and ours.eps == g["eps"]
        else:
            assert (ours.beta2, ours.ns_steps) == (g["beta2"], g["ns_steps"])


# --- Muon pieces --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 24, 8), (3, 8, 24), (3, 16, 16)])
def test_muon_on_a_stack_is_muon_on_each_matrix(shape):
    """Stacking is only batching: the update of a stack equals the updates of its matrices."""
    kg, kp = jax.random.split(jax.random.key(0))
    g = jax.random.normal(kg, shape)
    p = jax.random.normal(kp, shape)
    tx = optim.muon(0.02, 0.95, 0.1)

    def two_steps(g, p):
        state = tx.init(p)
        u1, state = tx.update(g, state, p)
        u2, _ = tx.update(-0.5 * g, state, p + u1)
        return u2

    stacked = two_steps(g, p)
    one_by_one = jnp.concatenate([two_steps(g[i:i + 1], p[i:i + 1]) for i in range(shape[0])])
    np.testing.assert_allclose(stacked, one_by_one, rtol=1e-5, atol=1e-7)


def test_polar_express_is_nearly_orthogonal():
    x = jax.random.normal(jax.random.key(1), (2, 32, 12))  # tall
    for m in (x, jnp.swapaxes(x, -1, -2)):  # and wide
        s = jnp.linalg.svd(optim.polar_express(m), compute_uv=False)
        # The tuned iteration trades exact convergence for speed: singular values land near 1.
        assert float(s.min()) > 0.6 and float(s.max()) < 1.3


def test_muon_update_has_the_reference_norm_and_cautious_decay():
    """One step from zero state: the orthogonalized, renormalized update has Frobenius norm
    lr * sqrt(min(m, n)) * sqrt(max(1, m/n)) (NorMuon preserves it), and weight decay acts only
    where the update has the parameter's sign."""
    shape = (1, 24, 8)
    g = jax.random.normal(jax.random.key(2), shape)
    p = jax.random.normal(jax.random.key(3), shape)
    lr, wd = 0.02, 0.5
    no_decay, _ = optim.muon(lr, 0.9, 0.0).update(g, optim.muon(lr, 0.9, 0.0).init(p), p)
    expected = lr * math.sqrt(8) * math.sqrt(24 / 8)
    assert float(jnp.linalg.norm(no_decay)) == pytest.approx(expected, rel=1e-4)
    tx = optim.muon(lr, 0.9, wd)
    with_decay, _ = tx.update(g, tx.init(p), p)
    lr_eff = lr * math.sqrt(3)
    # update = -lr*u, so u*p >= 0 where -update*p >= 0
    mask = (-no_decay * p) >= 0
    np.testing.assert_allclose(with_decay, no_decay - lr_eff * wd * p * mask, rtol=1e-5, atol=1e-8)


# --- schedules ----------------------------------------------------------------------------------

def test_lr_schedule_boundaries():
    n = 1000  # warmdown = round(0.65 * 1000) = 650 steps, starting after step 350
    lr = lambda s: float(optim.lr_multiplier(s, n))  # noqa: E731
    assert lr(0) == pytest.approx(1 / 40)
    assert lr(39) == pytest.approx(1.0)  # the last warmup step reaches the peak
    assert lr(40) == lr(200) == lr(350) == 1.0
    assert lr(351) == pytest.approx(649 / 650 + (1 / 650) * 0.05)
    assert lr(999) == pytest.approx(1 / 650 + (649 / 650) * 0.05)
    assert lr(1000) == pytest.approx(0.05)
    warmdown = np.array([lr(s) for s in range(350, 1001)])
    assert np.all(np.diff(warmdown) < 0), "the warmdown must go down"


def test_momentum_and_weight_decay_schedule_boundaries():
    n = 2000  # warmdown = 1300 steps, starting at step 700
    mom = lambda s: float(optim.muon_momentum(s, n))  # noqa: E731
    assert mom(0) == pytest.approx(0.85)
    assert mom(200) == pytest.approx(0.91)
    assert mom(400) == mom(700) == pytest.approx(0.97)
    assert mom(1350) == pytest.approx(0.935)
    assert mom(2000) == pytest.approx(0.90)
    wd = lambda s: float(optim.weight_decay_multiplier(s, n))  # noqa: E731
    assert wd(0) == pytest.approx(1.0)
    assert wd(1000) == pytest.approx(0.5)
    assert wd(2000) == pytest.approx(0.0, abs=1e-7)


def _tiny_params():
    from nanochat_jax.config import GPTConfig
    from nanochat_jax.model import init_params

    config = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    return init_params(config, jax.random.key(0))


def test_scheduled_hyperparameters_follow_the_step_without_recompiling():
    params = _tiny_params()
    hp = optim.derive_hyperparameters(12, num_iterations=100)
    tx = optim.build_optimizer(hp.groups(), optim.param_labels(params), **hp.schedules())
    grads = jax.tree.map(jnp.ones_like, params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for k in range(3):
        params, state = step(params, state)
        # The state holds the values the k-th update used.
        assert float(state.hyperparams["lr_multiplier"]) == pytest.approx(float(optim.lr_multiplier(k, 100)))
        assert float(state.hyperparams["muon_momentum"]) == pytest.approx(float(optim.muon_momentum(k, 100)))
    # A constant hyperparameter set by hand is a traced value too.
    tx2 = optim.build_optimizer(hp.groups(), optim.param_labels(params), lr_multiplier=1.0)
    step2 = jax.jit(lambda p, s: tx2.update(grads, s, p))
    state2 = tx2.init(params)
    for value in (1.0, 0.5, 0.0):
        state2.hyperparams["lr_multiplier"] = jnp.asarray(value, jnp.float32)
        updates, _ = step2(params, state2)
    assert step._cache_size() == 1 and step2._cache_size() == 1
    assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates)), "lr 0 must not move anything"


# --- the depth dial -----------------------------------------------------------------------------

# By hand: width D = 64 * depth rounded up to 128, heads H = D / 128, value embeddings on every other
# layer (n_ve), scaling params = 12 D^2 per layer + n_ve * H * 12 (ve gates) + 32768 * D (lm_head).
#   d12: D 768,  n_ve 6:  12*12*768^2  + 6*6*12   + 32768*768  = 110,100,912
#   d20: D 1280, n_ve 10: 20*12*1280^2 + 10*10*12 + 32768*1280 = 435,160,240
#   d26: D 1664, n_ve 13: 26*12*1664^2 + 13*13*12 + 32768*1664 = 918,423,532
# Tokens = 12 x that. Batch = 2^round(log2(2^19 * (tokens / tokens_d12)^0.383)):
#   d20: ratio 3.95238, log2 = 19.76 -> 2^20;  d26: ratio 8.34165, log2 = 20.17 -> 2^20.
# Iterations = tokens // batch; LRs x sqrt(batch / 2^19); wd = 0.28 sqrt(batch / 2^19) / ratio.
@pytest.mark.parametrize("depth,scaling,batch,iterations,wd,ratio", [
    (12, 110_100_912, 2**19, 2520, 0.28, 1.0),
    (20, 435_160_240, 2**20, 4980, 0.28 * math.sqrt(2) / (435_160_240 / 110_100_912), 435_160_240 / 110_100_912),
    (26, 918_423_532, 2**20, 10510, 0.28 * math.sqrt(2) / (918_423_532 / 110_100_912), 918_423_532 / 110_100_912),
])
def test_derived_hyperparameters(depth, scaling, batch, iterations, wd, ratio):
    hp = optim.derive_hyperparameters(depth)
    assert hp.num_scaling_params == scaling
    assert hp.target_tokens == 12 * scaling
    assert hp.total_batch_size == batch
    assert hp.num_iterations == iterations
    scale = math.sqrt(batch / 2**19)
    assert hp.batch_lr_scale == pytest.approx(scale)
    assert hp.weight_decay == pytest.approx(wd, rel=1e-9)
    assert (hp.embedding_lr, hp.unembedding_lr, hp.matrix_lr, hp.scalar_lr) == pytest.approx(
        (0.3 * scale, 0.008 * scale, 0.02 * scale, 0.5 * scale))
    groups = hp.groups()
    width_scale = (hp.model_dim / 768) ** -0.5
    assert groups["wte"].lr == pytest.approx(0.3 * scale * width_scale)
    assert groups["lm_head"].lr == pytest.approx(0.008 * scale * width_scale)
    assert groups["value_embeds"].lr == pytest.approx(0.15 * scale * width_scale)
    assert groups["matrix"].lr == pytest.approx(0.02 * scale) and groups["matrix"].weight_decay == hp.weight_decay
    assert f"{iterations:,}" in str(hp)


# --- sharding -------------------------------------------------------------------------------------

def _sharded_step(params, grads, config, mesh, groups):
    p_sh = sharding.param_shardings(config, mesh)
    params, grads = jax.device_put(params, p_sh), jax.device_put(grads, p_sh)
    tx = optim.build_optimizer(groups, optim.param_labels(params), muon_momentum=0.95, ortho_dtype=jnp.float32)
    s_sh = sharding.state_shardings(jax.eval_shape(tx.init, params), p_sh, mesh)
    state = jax.jit(tx.init, out_shardings=s_sh)(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
    return step(params, state, grads)


def test_one_device_and_eight_devices_agree_and_state_is_sharded(golden):
    assert jax.device_count() == 8
    config = convert.config_from_json(str(golden["config"]))
    params, grads = _stage(golden, "before", config), _stage(golden, "grad1", config)
    groups = optim.reference_groups(config.n_embd, **json.loads(str(golden["hyperparams"])))
    # Cautious weight decay jumps where an update coordinate crosses zero, and this data has one
    # within 1e-9 of it (blocks/mlp_fc), which summing in another order on 8 devices flips. The mask
    # is elementwise, so it needs no sharding test; without it the step is continuous and comparable.
    groups["matrix"] = dataclasses.replace(groups["matrix"], weight_decay=0.0)
    mesh1 = sharding.make_mesh(devices=jax.devices()[:1])
    mesh8 = sharding.make_mesh()
    params1, _ = _sharded_step(params, grads, config, mesh1, groups)
    params8, state8 = _sharded_step(params, grads, config, mesh8, groups)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params1), jax.tree.leaves(params8)):
        assert rel_err(b, a) < 1e-5, jax.tree_util.keystr(path)

    muon_state = state8.inner_state.inner_states["matrix"].inner_state
    # The factored second moment keeps the sharded (model-width) axis of attn_proj; that of mlp_fc
    # reduces it away and is a small replicated vector.
    for leaf in (muon_state.momentum["blocks"]["mlp_fc"], muon_state.second_moment["blocks"]["attn_proj"]):
        assert "data" in leaf.sharding.spec and not leaf.sharding.is_fully_replicated
        assert leaf.addressable_shards[0].data.size == leaf.size // 8
    adam_state = state8.inner_state.inner_states["wte"].inner_state[0]
    assert adam_state.mu["wte"].sharding.spec == params8["wte"].sharding.spec == jax.sharding.PartitionSpec(None, "data")
