import os

# Eight fake CPU devices for the sharding tests; must be set before anything imports jax.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
