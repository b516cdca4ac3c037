import os

# Eight fake CPU devices for the sharding tests; must be set before anything imports jax.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 300-token BPE trained on ~20 KB of the built-in corpus (well under a second)."""
    from nanochat_jax import data
    from nanochat_jax.tokenizer import Tokenizer

    return Tokenizer.train(data.iter_texts(max_chars=20_000), 300)
