import pytest

from nanochat_jax.config import GPTConfig, compute_dtype, config_from_depth


@pytest.mark.parametrize("depth, dim, heads", [(4, 256, 2), (12, 768, 6), (20, 1280, 10), (26, 1664, 13), (3, 256, 2)])
def test_depth_dial(depth, dim, heads):
    c = config_from_depth(depth)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (depth, dim, heads, heads, 128)
    assert (c.sequence_len, c.vocab_size) == (2048, 32768)


def test_windows_sssl_last_layer_long():
    c = config_from_depth(6)
    # short = ceil(2048/4 to 128) = 512; long = sequence_len; pattern tiled, last forced long
    assert c.window_sizes == (512, 512, 512, 2048, 512, 2048)
    assert config_from_depth(2, sequence_len=1000).window_sizes == (256, 1000)  # 250 -> 256
    assert config_from_depth(3, window_pattern="L").window_sizes == (2048,) * 3


def test_value_embedding_layers_alternate_and_include_last():
    assert config_from_depth(4).value_embedding_layers == (1, 3)
    assert config_from_depth(5).value_embedding_layers == (0, 2, 4)


def test_padded_vocab():
    assert GPTConfig(vocab_size=500, n_embd=64, n_head=4, n_kv_head=4).padded_vocab_size == 512
    assert GPTConfig(vocab_size=512, n_embd=64, n_head=4, n_kv_head=4).padded_vocab_size == 512


def test_bad_configs_are_explained():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4)
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig(window_pattern="SXL")
    with pytest.raises(ValueError, match="depth"):
        config_from_depth(0)


def test_compute_dtype_switch(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "bf16")
    assert compute_dtype().name == "bfloat16"
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    assert compute_dtype().name == "float32"
    monkeypatch.delenv("NANOCHAT_DTYPE")
    assert compute_dtype().name == "float32"  # CPU default
    monkeypatch.setenv("NANOCHAT_DTYPE", "int8")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE"):
        compute_dtype()
