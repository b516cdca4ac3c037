"""Rotary embedding + QK-norm of the queries and keys in one pass (Pallas, Triton-style lowering).

The model's `rotary_qk_norm` computes y = scale * rms_norm(rotate(x)) per head of D channels. Left
to XLA that is two passes over x forward (a reduction for the norm, then a second pass that
rotates again and scales) and two backward (a reduction of g * y, then the inverse rotation).
Each kernel here reads its inputs once and writes once: a program holds its rows of D channels in
registers, so the norm's reduction never leaves the program. Same arithmetic as the jnp version in
`nanochat_jax.model`: the rotation rounded to x's dtype, the norm in float32, the result rounded,
then scaled in x's dtype.

Layout: x (B, T, S, H, D) is the output of one product for S stacked projections (the queries
and the keys, S = 2) or of one projection (S = 1). The forward pass writes S separate arrays
(B, T, H, D), the layout attention reads; the backward pass reads their S gradients and writes one
(B, T, S, H, D) gradient, the layout of the product's own backward. So the queries and keys share
one product forward and backward (docs/perf_notes.md section 15) without a copy to split or join
them. A program takes P positions of one head of one batch element, all S projections of them:
P * S rows, with the tables' P rows read once for all.

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
# shape, queries and keys together (ms, forward / backward; kernels/results/rotary_stacked_run9.json):
# 8 rows 0.218 / 0.213, 32 rows 0.202 / 0.192. An earlier sweep with one projection: 128 rows
# spilled registers (0.346 / 0.533 against 0.274 / 0.269 at 32).
MAX_ROWS_PER_PROGRAM = 32


def positions_per_program(T: int, S: int, max_rows: int) -> int:
    """The largest power of two up to `max_rows` / S dividing T (blocks never straddle the end;
    Triton blocks have power-of-two sides)."""
    return min(max(max_rows // S, 1), T & -T)


def _halves(ref, *index):
    """The two halves of the last dimension of ref[index] (rows, D), in float32."""
    half = ref.shape[-1] // 2
    rows = index or (slice(None),)
    return ref[(*rows, slice(0, half))].astype(jnp.float32), ref[(*rows, slice(half, None))].astype(jnp.float32)


def _fwd_kernel(x_ref, c_ref, s_ref, *out_refs, scale, eps):
    *y_refs, inv_ref = out_refs
    dtype = y_refs[0].dtype
    half = x_ref.shape[-1] // 2
    c1, c2 = _halves(c_ref)
    s1, s2 = _halves(s_ref)
    for s, y_ref in enumerate(y_refs):
        x1, x2 = _halves(x_ref, slice(None), s)
        # Rotation by the tables C = [cos, cos], S = [sin, -sin]: x * C + swap_halves(x) * S.
        r1 = (x1 * c1 + x2 * s1).astype(dtype).astype(jnp.float32)
        r2 = (x2 * c2 + x1 * s2).astype(dtype).astype(jnp.float32)
        mean_sq = (jnp.sum(r1 * r1, axis=1) + jnp.sum(r2 * r2, axis=1)) / (2 * half)
        inv = jax.lax.rsqrt(mean_sq + eps)
        y_ref[:, :half] = (scale * (r1 * inv[:, None]).astype(dtype).astype(jnp.float32)).astype(dtype)
        y_ref[:, half:] = (scale * (r2 * inv[:, None]).astype(dtype).astype(jnp.float32)).astype(dtype)
        inv_ref[:, s] = inv


def _bwd_kernel(*refs, scale):
    *gy_refs, inv_ref, c_ref, s_ref, dx_ref = refs  # the S outputs' gradients, then the S outputs
    S = len(gy_refs) // 2
    half = dx_ref.shape[-1] // 2
    c1, c2 = _halves(c_ref)
    s1, s2 = _halves(s_ref)
    for s, (g_ref, y_ref) in enumerate(zip(gy_refs[:S], gy_refs[S:])):
        g1, g2 = _halves(g_ref)
        y1, y2 = _halves(y_ref)
        g1, g2, n1, n2 = scale * g1, scale * g2, y1 / scale, y2 / scale
        inv = inv_ref[:, s][:, None]
        mean_gn = ((jnp.sum(g1 * n1, axis=1) + jnp.sum(g2 * n2, axis=1)) / (2 * half))[:, None]
        d1, d2 = inv * (g1 - n1 * mean_gn), inv * (g2 - n2 * mean_gn)
        # The inverse rotation: x * C - swap_halves(x) * S.
        dx_ref[:, s, :half] = (d1 * c1 - d2 * s1).astype(dx_ref.dtype)
        dx_ref[:, s, half:] = (d2 * c2 - d1 * s2).astype(dx_ref.dtype)


def _specs(P, S, D):
    """BlockSpecs on grid (position block i, head h, batch b): the stacked rows (B, T, S, H, D), one
    projection's rows (B, T, H, D), one float per row (B, T, S, H) and the tables (T, D)."""
    stacked = pl.BlockSpec((None, P, S, None, D), lambda i, h, b: (b, i, 0, h, 0))
    rows = pl.BlockSpec((None, P, None, D), lambda i, h, b: (b, i, h, 0))
    per_row = pl.BlockSpec((None, P, S, None), lambda i, h, b: (b, i, 0, h))
    table = pl.BlockSpec((P, D), lambda i, h, b: (i, 0))
    return stacked, rows, per_row, table


_PARAMS = plt.CompilerParams(num_warps=4, num_stages=1)


def _fwd_local(x_BTSHD, C_TD, S_TD, *, scale, eps, max_rows, interpret):
    B, T, S, H, D = x_BTSHD.shape
    P = positions_per_program(T, S, max_rows)
    stacked, rows, per_row, table = _specs(P, S, D)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, eps=eps),
        grid=(T // P, H, B),
        in_specs=[stacked, table, table],
        out_specs=[rows] * S + [per_row],
        out_shape=[jax.ShapeDtypeStruct((B, T, H, D), x_BTSHD.dtype)] * S
        + [jax.ShapeDtypeStruct((B, T, S, H), jnp.float32)],
        compiler_params=_PARAMS,
        interpret=interpret,
    )(x_BTSHD, C_TD, S_TD)


def _bwd_local(*args, scale, max_rows, interpret):
    *gy, inv_BTSH, C_TD, S_TD = args
    B, T, S, H = inv_BTSH.shape
    D = C_TD.shape[-1]
    P = positions_per_program(T, S, max_rows)
    stacked, rows, per_row, table = _specs(P, S, D)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, scale=scale),
        grid=(T // P, H, B),
        in_specs=[rows] * (2 * S) + [per_row, table, table],
        out_specs=stacked,
        out_shape=jax.ShapeDtypeStruct((B, T, S, H, D), gy[0].dtype),
        compiler_params=_PARAMS,
        interpret=interpret,
    )(*gy, inv_BTSH, C_TD, S_TD)


@functools.lru_cache(maxsize=None)
def _fwd_fn(S, scale, eps, max_rows, interpret):
    def local(x, C, S_table):  # positional arguments only: custom_partitioning resolves no keywords
        return tuple(_fwd_local(x, C, S_table, scale=scale, eps=eps, max_rows=max_rows, interpret=interpret))

    return rows_parallel(local, ("btshd", "td", "td"), ("bthd",) * S + ("btsh",))


@functools.lru_cache(maxsize=None)
def _bwd_fn(S, scale, max_rows, interpret):
    def local(*args):
        return _bwd_local(*args, scale=scale, max_rows=max_rows, interpret=interpret)

    return rows_parallel(local, ("bthd",) * (2 * S) + ("btsh", "td", "td"), ("btshd",))


def rotary_qk_norm_fwd(x_BTSHD, C_TD, S_TD, *, scale: float, eps: float, max_rows: int = MAX_ROWS_PER_PROGRAM,
                       interpret: bool = False):
    """(ys, inv_rms): ys the S arrays (B, T, H, D) y = scale * rms_norm(rotate(x[:, :, s])) in x's
    dtype, inv_rms (B, T, S, H, 1) float32. C and S are the model's rotary tables (T, D) for
    positions 0 ... T-1."""
    *ys, inv = _fwd_fn(x_BTSHD.shape[2], float(scale), float(eps), max_rows, interpret)(x_BTSHD, C_TD, S_TD)
    return tuple(ys), inv[..., None]


def rotary_qk_norm_bwd(gs, ys, inv_rms_BTSH1, C_TD, S_TD, *, scale: float,
                       max_rows: int = MAX_ROWS_PER_PROGRAM, interpret: bool = False):
    """The gradient (B, T, S, H, D) with respect to x, from the S outputs' gradients `gs` and the
    outputs `ys` and inv_rms that the forward returned."""
    return _bwd_fn(len(gs), float(scale), max_rows, interpret)(*gs, *ys, inv_rms_BTSH1[..., 0], C_TD, S_TD)
