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


@pytest.fixture(scope="session")
def live_params():
    """`make(config)`: initialised parameters with every path of the network live (numpy). The
    reference init zeroes the output projections and the smear gain, which leaves most gradients
    exactly zero (and a few at rounding level), so comparisons of gradients would prove little;
    `launch.mesh_check.live_weights` makes them live, as the node check does."""
    import jax
    import numpy as np

    from launch.mesh_check import live_weights
    from nanochat_jax import model

    def make(config):
        return jax.tree.map(np.asarray, live_weights(model.init_params(config, jax.random.key(0))))

    return make
