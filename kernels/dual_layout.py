"""An elementwise map written in both layouts in one pass (Pallas, Triton-style lowering).

FP8 training uses each quantized operand in two layouts: x as (tokens, in) for the forward product
and as (in, tokens) for the weight gradient, the output gradient g as (tokens, out) for the input
gradient and as (out, tokens) for the weight gradient, since Hopper's FP8 GEMMs take both operands
with the contracted dimension innermost. XLA quantizes in one pass and transposes the 8-bit result
in another, which reads the whole tensor again (`docs/perf_notes.md` section 18). Here a program
maps a block of rows and columns and stores the result twice, as it is and transposed.

Sharding: the rows stay split over the batch like the input's, so the transposed result is split
on its columns (`kernels.partition.rows_parallel`); no collective. Where the kernel does not run
(`supported`), or on a device's share that does not divide by the block, the same map runs in
XLA, followed by a transpose.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels.partition import rows_parallel

# Rows x columns per program and warps: the fastest of a sweep on the H200 at 65,536 x 1280 and
# x 5120, 0.16 and 0.57 ms against XLA's 0.23 and 0.84 (kernels/results/dual_layout_run13.json).
BLOCK = (64, 128)
NUM_WARPS = 4


def _kernel(x_ref, scale_ref, y_ref, y_t_ref, *, fn):
    y = fn(x_ref[...], scale_ref[0], y_ref.dtype)
    y_ref[...] = y
    y_t_ref[...] = y.T


def _by_xla(fn, x, scale, out_dtype):
    y = fn(x, scale, out_dtype)
    return y, y.T


def _local(x, scale, *, fn, out_dtype, block, num_warps, interpret):
    M, C = x.shape
    bm, bc = block
    if M % bm or C % bc:  # a device's share of the rows may not divide by the block
        return _by_xla(fn, x, scale[0], out_dtype)
    return pl.pallas_call(
        functools.partial(_kernel, fn=fn),
        grid=(M // bm, C // bc),
        in_specs=[pl.BlockSpec((bm, bc), lambda i, j: (i, j)), pl.BlockSpec((1,), lambda i, j: (0,))],
        out_specs=[pl.BlockSpec((bm, bc), lambda i, j: (i, j)), pl.BlockSpec((bc, bm), lambda i, j: (j, i))],
        out_shape=[jax.ShapeDtypeStruct((M, C), out_dtype), jax.ShapeDtypeStruct((C, M), out_dtype)],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )(x, scale)


@functools.lru_cache(maxsize=None)
def _sharded(fn, out_dtype, block, num_warps, interpret):
    def local(x, scale):  # positional arguments only: custom_partitioning resolves no keywords
        return tuple(_local(x, scale, fn=fn, out_dtype=out_dtype, block=block, num_warps=num_warps,
                            interpret=interpret))

    return rows_parallel(local, ("bc", "s"), ("bc", "cb"))


def supported(x) -> bool:
    """Whether the kernel can run for x: a 2-D x on a GPU with FP8 conversions (compute capability
    8.9 or more). Each device's share whose sides do not divide by the block is mapped by XLA
    (`_local`)."""
    if jax.default_backend() != "gpu" or x.ndim != 2:
        return False
    return tuple(map(int, getattr(jax.devices()[0], "compute_capability", "0.0").split("."))) >= (8, 9)


def map_both_layouts(fn, x, scale, out_dtype, *, block=BLOCK, num_warps=NUM_WARPS, interpret=False):
    """(y, y.T) for y = fn(x, scale, out_dtype), an elementwise map of a 2-D x (M, C) with a float32
    scalar: the kernel where it runs (`supported`, or `interpret`), else XLA's map and a transpose.
    `fn` must be hashable and the same object from call to call (a module-level function): each
    distinct one is a kernel of its own."""
    if not (interpret or supported(x)):
        return _by_xla(fn, x, scale, out_dtype)
    scale = jnp.reshape(scale, (1,)).astype(jnp.float32)
    return _sharded(fn, jnp.dtype(out_dtype), tuple(block), num_warps, interpret)(x, scale)
