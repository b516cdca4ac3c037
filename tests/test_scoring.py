"""The batched scorer: the bucket ladder, and numbers independent of padding, batching and mesh size."""

import jax
import numpy as np
import pytest

from nanochat_jax import model, sharding
from nanochat_jax.config import GPTConfig
from nanochat_jax.evals.scoring import Scorer, bucket_length


def test_bucket_ladder():
    ladder = sorted({bucket_length(n) for n in range(1, 5000)})
    assert ladder == [64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 2560, 3072, 3584, 4096, 5120]
    assert all(bucket_length(n) >= n for n in range(1, 5000))


@pytest.fixture(scope="module")
def tiny():
    config = GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, window_pattern="SL")
    params = jax.device_get(model.init_params(config, jax.random.key(0)))
    # Nonzero output projections, so every block matters.
    rng = np.random.default_rng(0)
    params["blocks"]["attn_proj"] = rng.normal(0, 0.1, params["blocks"]["attn_proj"].shape).astype(np.float32)
    params["blocks"]["mlp_proj"] = rng.normal(0, 0.1, params["blocks"]["mlp_proj"].shape).astype(np.float32)
    rows = [list(rng.integers(0, 100, n)) for n in (40, 3, 70)]  # two buckets, longer than sequence_len
    return config, params, rows


def _scores(config, params, rows, devices, batch_tokens):
    mesh = sharding.make_mesh(devices=devices)
    scorer = Scorer(params, config, mesh, pad_id=0, batch_tokens=batch_tokens, dtype="float32", progress=False)
    return scorer.next_token_scores(rows)


def test_scores_do_not_depend_on_padding_batching_or_mesh(tiny):
    config, params, rows = tiny
    eight = _scores(config, params, rows, jax.devices(), 256)
    one = _scores(config, params, rows, jax.devices()[:1], 128)
    forward = jax.jit(model.forward, static_argnums=2, static_argnames="dtype")
    for row, (l8, p8), (l1, p1) in zip(rows, eight, one):
        assert l8.shape == p8.shape == (len(row) - 1,)
        logits = np.asarray(forward(params, np.array([row]), config, dtype="float32")[0, :-1])
        want = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1) - logits[np.arange(len(row) - 1), row[1:]]
        np.testing.assert_allclose(l8, want, atol=2e-5)
        np.testing.assert_allclose(l1, l8, atol=2e-5)
        np.testing.assert_array_equal(p8, logits.argmax(-1))
    again = _scores(config, params, rows, jax.devices(), 256)
    for (a, pa), (b, pb) in zip(eight, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(pa, pb)


def test_rows_too_short_are_refused(tiny):
    config, params, _ = tiny
    with pytest.raises(ValueError, match="at least 2"):
        _scores(config, params, [[1, 2], [3]], jax.devices()[:1], 64)
