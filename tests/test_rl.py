import json

import numpy as np
import pytest

from launch import rl
from nanochat_jax.engine import Sample

CONFIG = dict(sequence_len=64, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)


def test_advantages_are_rewards_minus_the_problems_mean():
    adv = rl.rewards_and_advantages([[1, 0], [1, 1]])
    np.testing.assert_array_equal(adv, [[0.5, -0.5], [0.0, 0.0]])


def test_rollout_batch_masks_and_weights():
    samples = [[Sample([5, 6], [1, 1]), Sample([7, 8, 9], [1, 0, 1])], [Sample([4], [1]), Sample([3, 2], [1, 1])]]
    inputs, targets, weights = rl.rollout_batch([[1, 2], [1]], samples, [[0.5, -0.5], [0.0, 0.0]], pad_id=0)
    np.testing.assert_array_equal(inputs, [[1, 2, 5, 6], [1, 2, 7, 8], [1, 4, 0, 0], [1, 3, 2, 0]])
    np.testing.assert_array_equal(targets, [[-1, 5, 6, -1], [-1, 7, -1, 9], [4, -1, -1, -1], [3, 2, -1, -1]])
    np.testing.assert_array_equal(weights, [[0, .5, .5, 0], [0, -.5, 0, -.5], [0, 0, 0, 0], [0, 0, 0, 0]])


def _logsoftmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_weighted_loss_matches_numpy_and_unit_weights_are_the_mean_loss(live_params):
    import jax.numpy as jnp

    from nanochat_jax import model
    from nanochat_jax.config import GPTConfig

    config = GPTConfig(**CONFIG)
    params = live_params(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, (4, 8)).astype(np.int32)
    targets = rng.integers(0, 300, (4, 8)).astype(np.int32)
    targets[rng.random((4, 8)) < 0.4] = -1
    adv = rl.rewards_and_advantages([[1, 0], [0, 0]]).reshape(-1)
    weights = np.where(targets >= 0, adv[:, None], 0).astype(np.float32)
    logp = _logsoftmax(np.asarray(model.forward(params, jnp.asarray(tokens), config), np.float64))
    valid = targets >= 0
    lp = np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    expected = -(lp * weights * valid).sum() / valid.sum()  # - sum(adv * logp) / sampled tokens
    total, count = model.loss_sum(params, tokens, targets, config, weights_BT=weights)
    np.testing.assert_allclose(float(total / count), expected, rtol=1e-5, atol=1e-6)
    for chunk in (0, 3):
        ones = model.loss_sum(params, tokens, targets, config, chunk_len=chunk, weights_BT=np.ones((4, 8), np.float32))
        plain = model.loss_sum(params, tokens, targets, config, chunk_len=chunk)
        np.testing.assert_allclose(float(ones[0] / ones[1]), float(plain[0] / plain[1]), rtol=1e-6)
    chunked = model.loss_sum(params, tokens, targets, config, chunk_len=3, weights_BT=weights)
    np.testing.assert_allclose(float(chunked[0] / chunked[1]), expected, rtol=1e-5, atol=1e-6)


@pytest.fixture
def run_dir(tmp_path, tiny_tokenizer, live_params, monkeypatch):
    import jax

    from nanochat_jax.checkpoint import Checkpoints
    from nanochat_jax.config import GPTConfig

    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    tiny_tokenizer.save(str(tmp_path / "tokenizer"))
    config = GPTConfig(**CONFIG)
    ck = Checkpoints(str(tmp_path / "sft" / "d1" / "checkpoints"))
    ck.save(5, jax.tree.map(np.asarray, live_params(config)), None, {}, {"model_config": config.to_json_dict(), "flags": {}})
    ck.close()
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    rows = [{"question": "1+1?", "answer": "<<1+1=2>>2\n#### 2"}, {"question": "2+3?", "answer": "5\n#### 5"},
            {"question": "4-1?", "answer": "#### 3"}]
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _rl(run_dir, tag, *extra):
    rl.main(["--run-dir", str(run_dir), "--data-dir", str(run_dir / "data"), "--model-tag", tag, "--examples-per-step", "2",
             "--num-samples", "4", "--device-batch-size", "1", "--max-new-tokens", "6", "--num-iterations", "4",
             "--eval-every", "-1", "--eval-examples", "1", "--save-every", "-1", "--matrix-lr", "0.2", *extra])


def test_resumed_rl_matches_an_uninterrupted_run(run_dir, monkeypatch):
    import jax

    from nanochat_jax.tasks import gsm8k

    # A random model is never right: reward completions of odd length so that advantages are not 0.
    monkeypatch.setattr(gsm8k, "evaluate", lambda conv, text: len(text) % 2 == 1)

    from nanochat_jax.checkpoint import restore_params

    import shutil

    _rl(run_dir, "a", "--save-every", "2")
    # Continue from the middle checkpoint of the same run (a shorter run would have another LR schedule).
    (run_dir / "rl" / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "rl" / "a" / "checkpoints" / "2", run_dir / "rl" / "b" / "checkpoints" / "2")
    _rl(run_dir, "b", "--resume")
    a, _ = restore_params(str(run_dir / "rl" / "a" / "checkpoints"))
    b, _ = restore_params(str(run_dir / "rl" / "b" / "checkpoints"))
    src, _ = restore_params(str(run_dir / "sft" / "d1" / "checkpoints"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6), a, b)
    assert any(not np.allclose(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(src)))
    summary = json.loads((run_dir / "rl" / "a" / "summary.json").read_text())
    assert summary["steps"] == 4 and "pass@1" in summary["results"]
    records = [json.loads(line) for line in (run_dir / "rl" / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["reward"] <= 1 for r in records if "reward" in r)
