"""Rotary embedding + QK-norm of the queries or keys in one pass (Pallas, Triton-style lowering).

The model's `rotary_qk_norm` computes y = scale * rms_norm(rotate(x)) per head of D channels. Left
to XLA that is two passes over x forward (a reduction for the norm, then a second pass that
rotates again and scales) and two backward (a reduction of g * y, then the inverse rotation).
Each kernel here reads its inputs once and writes once: a program takes R rows of (batch,
position, head) and holds each row's D channels in registers, so the norm's reduction never
leaves the program. Same arithmetic as the jnp version in `nanochat_jax.model`: the rotation
rounded to x's dtype, the norm in float32, the result rounded, then scaled in x's dtype.

Layout: x (B, T, H, D) is read as (B, T*H, D); the rotary tables (T, D) are repeated per head once
(T*H rows: 5 MB at T = 2048, H = 10), so a block of rows reads its angles as a block too.

Sharding: both kernels keep the batch's and the heads' sharding and run on each device's rows
(`kernels.partition.rows_parallel`).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels.partition import rows_parallel

# 4 warps over 32 rows of 128: 32 values of each input per thread. Measured on the H200 at the d20
# shape (ms, forward / backward): 16 rows 0.246 / 0.280, 32 rows 0.274 / 0.269, 128 rows 0.346 / 0.533
# (register spills), XLA's two passes 0.435 / 0.408.
MAX_ROWS_PER_PROGRAM = 32


def rows_per_program(T: int, H: int, max_rows: int) -> int:
    """The largest power of two up to `max_rows` dividing T*H (blocks never straddle the end)."""
    n = T * H
    return min(max_rows, n & -n)


def _halves(ref):
    half = ref.shape[-1] // 2
    return ref[:, :half].astype(jnp.float32), ref[:, half:].astype(jnp.float32)


def _fwd_kernel(x_ref, c_ref, s_ref, y_ref, inv_ref, *, scale, eps):
    dtype = y_ref.dtype
    half = x_ref.shape[-1] // 2
    x1, x2 = _halves(x_ref)
    c1, c2 = _halves(c_ref)
    s1, s2 = _halves(s_ref)
    # Rotation by the tables C = [cos, cos], S = [sin, -sin]: x * C + swap_halves(x) * S.
    r1 = (x1 * c1 + x2 * s1).astype(dtype).astype(jnp.float32)
    r2 = (x2 * c2 + x1 * s2).astype(dtype).astype(jnp.float32)
    mean_sq = (jnp.sum(r1 * r1, axis=1) + jnp.sum(r2 * r2, axis=1)) / (2 * half)
    inv = jax.lax.rsqrt(mean_sq + eps)
    y_ref[:, :half] = (scale * (r1 * inv[:, None]).astype(dtype).astype(jnp.float32)).astype(dtype)
    y_ref[:, half:] = (scale * (r2 * inv[:, None]).astype(dtype).astype(jnp.float32)).astype(dtype)
    inv_ref[...] = inv


def _bwd_kernel(g_ref, y_ref, inv_ref, c_ref, s_ref, dx_ref, *, scale):
    half = g_ref.shape[-1] // 2
    g1, g2 = _halves(g_ref)
    y1, y2 = _halves(y_ref)
    c1, c2 = _halves(c_ref)
    s1, s2 = _halves(s_ref)
    g1, g2, n1, n2 = scale * g1, scale * g2, y1 / scale, y2 / scale
    inv = inv_ref[...][:, None]
    mean_gn = ((jnp.sum(g1 * n1, axis=1) + jnp.sum(g2 * n2, axis=1)) / (2 * half))[:, None]
    d1, d2 = inv * (g1 - n1 * mean_gn), inv * (g2 - n2 * mean_gn)
    # The inverse rotation: x * C - swap_halves(x) * S.
    dx_ref[:, :half] = (d1 * c1 - d2 * s1).astype(dx_ref.dtype)
    dx_ref[:, half:] = (d2 * c2 - d1 * s2).astype(dx_ref.dtype)


def _specs(R, D):
    """BlockSpecs on grid (row block i, batch b): rows (B, T*H, D), one float per row (B, T*H),
    and the tables repeated per head (T*H, D)."""
    rows = pl.BlockSpec((None, R, D), lambda i, b: (b, i, 0))
    per_row = pl.BlockSpec((None, R), lambda i, b: (b, i))
    table = pl.BlockSpec((R, D), lambda i, b: (i, 0))
    return rows, per_row, table


def _fwd_local(x_BTHD, C_TD, S_TD, *, scale, eps, max_rows, interpret):
    B, T, H, D = x_BTHD.shape
    R = rows_per_program(T, H, max_rows)
    rows, per_row, table = _specs(R, D)
    y, inv = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, eps=eps),
        grid=(T * H // R, B),
        in_specs=[rows, table, table],
        out_specs=[rows, per_row],
        out_shape=[jax.ShapeDtypeStruct((B, T * H, D), x_BTHD.dtype), jax.ShapeDtypeStruct((B, T * H), jnp.float32)],
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
    )(x_BTHD.reshape(B, T * H, D), jnp.repeat(C_TD, H, axis=0), jnp.repeat(S_TD, H, axis=0))
    return y.reshape(B, T, H, D), inv.reshape(B, T, H)


def _bwd_local(g_BTHD, y_BTHD, inv_BTH, C_TD, S_TD, *, scale, max_rows, interpret):
    B, T, H, D = g_BTHD.shape
    R = rows_per_program(T, H, max_rows)
    rows, per_row, table = _specs(R, D)
    dx = pl.pallas_call(
        functools.partial(_bwd_kernel, scale=scale),
        grid=(T * H // R, B),
        in_specs=[rows, rows, per_row, table, table],
        out_specs=rows,
        out_shape=jax.ShapeDtypeStruct((B, T * H, D), g_BTHD.dtype),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
    )(g_BTHD.reshape(B, T * H, D), y_BTHD.reshape(B, T * H, D), inv_BTH.reshape(B, T * H),
      jnp.repeat(C_TD, H, axis=0), jnp.repeat(S_TD, H, axis=0))
    return dx.reshape(B, T, H, D)


@functools.lru_cache(maxsize=None)
def _fwd_fn(scale, eps, max_rows, interpret):
    def local(x, C, S):  # positional arguments only: custom_partitioning resolves no keywords
        return _fwd_local(x, C, S, scale=scale, eps=eps, max_rows=max_rows, interpret=interpret)

    return rows_parallel(local, ("bthd", "td", "td"), ("bthd", "bth"))


@functools.lru_cache(maxsize=None)
def _bwd_fn(scale, max_rows, interpret):
    def local(g, y, inv, C, S):
        return _bwd_local(g, y, inv, C, S, scale=scale, max_rows=max_rows, interpret=interpret)

    return rows_parallel(local, ("bthd", "bthd", "bth", "td", "td"), ("bthd",))


def rotary_qk_norm_fwd(x_BTHD, C_TD, S_TD, *, scale: float, eps: float, max_rows: int = MAX_ROWS_PER_PROGRAM,
                       interpret: bool = False):
    """(y, inv_rms): y = scale * rms_norm(rotate(x)) in x's dtype, inv_rms (B, T, H, 1) float32.
    C and S are the model's rotary tables (T, D) for positions 0 ... T-1."""
    y, inv = _fwd_fn(float(scale), float(eps), max_rows, interpret)(x_BTHD, C_TD, S_TD)
    return y, inv[..., None]


def rotary_qk_norm_bwd(g_BTHD, y_BTHD, inv_rms_BTH1, C_TD, S_TD, *, scale: float,
                       max_rows: int = MAX_ROWS_PER_PROGRAM, interpret: bool = False):
    """The gradient with respect to x, from the output y and inv_rms that the forward returned."""
    return _bwd_fn(float(scale), max_rows, interpret)(g_BTHD, y_BTHD, inv_rms_BTH1[..., 0], C_TD, S_TD)
