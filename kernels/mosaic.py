"""What the Mosaic GPU kernels (`attention_mgpu.py`, `matmul_mgpu.py`) share."""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu


def on_hopper() -> bool:
    """Whether the first device is a Hopper GPU (compute capability 9.x), which these kernels need."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "").startswith("9")


def smem_transforms(dtype):
    """Shared-memory tiles for wgmma and TMA: 128-byte swizzled rows (64 two-byte elements)."""
    return plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128)
