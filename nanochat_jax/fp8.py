"""FP8 products for training the linear layers: the reference's `--fp8` recipe ("tensorwise").

A linear layer makes three products: y = x W^T forward, dx = g W and dW = g^T x backward. Here each
runs on 8-bit floating-point operands, each operand with one float32 scale for the whole tensor,
recomputed from its largest magnitude at every call (no history): the input and the weight in
e4m3 (more mantissa), the output's gradient in e5m2 (more range). The forward product accumulates
the fast way, the two backward products the precise way, as the reference's `torch._scaled_mm`
calls do. Only training uses this; evaluation and sampling stay in the compute dtype.

How it reaches the FP8 tensor cores: the 8-bit operands go straight into a `dot_general` with a
bfloat16 (the compute dtype's) result, which is then multiplied by the two inverse scales. On
Hopper XLA makes that one cuBLASLt FP8 GEMM with the product of the scales applied inside it
(rounded to bfloat16 first: within 2^-9 of the reference's float32 scales), and picks fast
accumulation when the dot's precision is DEFAULT, the precise one when it is HIGHEST. Dequantizing
the operands before the dot (convert, times the scale) is the pattern XLA documents, but this XLA
left it a bfloat16 GEMM on dequantized copies (measured: docs/perf_notes.md section 18).
Elsewhere (the CPU tests) the same graph is a product of the exact FP8 values.

Those GEMMs take both operands with the contracted dimension innermost, and the weight gradient
contracts over the tokens: x and g are quantized in both layouts at once (`quantize_both_layouts`).
"""

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn  # inputs and weights
E5M2 = jnp.float8_e5m2  # gradients
EPS = 1e-12  # the smallest magnitude a scale is taken from: an all-zero tensor gets a finite scale
MIN_FEATURES = 128  # smaller layers (the gates) stay in the compute dtype, as in the reference


def applies(w_OI) -> bool:
    """Whether a weight's layer trains in FP8: the reference's filter, both sides a multiple of 16
    (what the FP8 GEMM needs) and the smaller one at least 128."""
    out_features, in_features = w_OI.shape[-2:]
    return out_features % 16 == 0 and in_features % 16 == 0 and min(out_features, in_features) >= MIN_FEATURES


def quantize(x, dtype):
    """(x in `dtype`, the float32 inverse of its scale), with scale = dtype's max / max |x|: the
    largest magnitude lands on the format's largest value, the rest rounds to nearest (even) after
    saturating, so nothing overflows to NaN. The reference divides in float64; float32 division
    is correctly rounded too, so the scales agree but for rounding ties."""
    scale = _scale(x, dtype)
    return _scaled_cast(x, scale, dtype), 1.0 / scale


def quantize_both_layouts(x, dtype):
    """`quantize` of a 2-D x, the result also transposed: (x_q, x_q^T, inverse scale). On a GPU
    one kernel writes both (`kernels/dual_layout.py`); XLA would transpose the 8-bit copy in a
    pass of its own."""
    from kernels import dual_layout

    scale = _scale(x, dtype)
    x_q, x_q_t = dual_layout.map_both_layouts(_scaled_cast, x, scale, dtype)
    return x_q, x_q_t, 1.0 / scale


def _scale(x, dtype):
    return float(jnp.finfo(dtype).max) / jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32))), EPS)


def _scaled_cast(x, scale, dtype):
    fmax = float(jnp.finfo(dtype).max)
    return jnp.clip(x.astype(jnp.float32) * scale, -fmax, fmax).astype(dtype)


def _scaled_dot(a_q, a_inv, b_q, b_inv, contract, out_dtype, fast_accumulation):
    """a · b for 2-D quantized operands contracting dims `contract` = (a's, b's), in `out_dtype`:
    the FP8 product, then times both inverse scales (see the module's docstring)."""
    precision = jax.lax.Precision.DEFAULT if fast_accumulation else jax.lax.Precision.HIGHEST
    y = jax.lax.dot_general(a_q, b_q, (contract, ((), ())), precision=precision, preferred_element_type=out_dtype)
    return y * (a_inv * b_inv).astype(out_dtype)


def product_fwd(x, w_OI):
    """y = x W^T in x's dtype from e4m3 operands, and what `product_bwd` needs (the quantized
    operands; x's transposed, (in, tokens), the layout of the weight gradient's product)."""
    x_q, x_q_t, x_inv = quantize_both_layouts(x.reshape(-1, x.shape[-1]), E4M3)
    w_q, w_inv = quantize(w_OI, E4M3)
    y = _scaled_dot(x_q, x_inv, w_q, w_inv, ((1,), (1,)), x.dtype, fast_accumulation=True)
    return y.reshape(*x.shape[:-1], -1), (x_q_t, x_inv, w_q, w_inv)


def product_bwd(residuals, g, out_dtype):
    """(dx, dW) = (g W, g^T x) in `out_dtype` for y = x W^T, with g quantized to e5m2."""
    x_q_t, x_inv, w_q, w_inv = residuals
    g_q, g_q_t, g_inv = quantize_both_layouts(g.reshape(-1, g.shape[-1]), E5M2)
    dx = _scaled_dot(g_q, g_inv, w_q, w_inv, ((1,), (0,)), out_dtype, fast_accumulation=False)
    dw = _scaled_dot(g_q_t, g_inv, x_q_t, x_inv, ((1,), (1,)), out_dtype, fast_accumulation=False)
    return dx.reshape(*g.shape[:-1], -1), dw


def linear(x, w_OI):
    """x @ W^T for a weight kept in (out, in) orientation, its three products in FP8; the result
    and both gradients in x's dtype (the weight's gradient is cast back to its own)."""
    return _linear(x, w_OI.astype(x.dtype))


@jax.custom_vjp
def _linear(x, w_OI):
    return product_fwd(x, w_OI)[0]


def _linear_bwd(residuals, g):
    return product_bwd(residuals, g, g.dtype)


_linear.defvjp(product_fwd, _linear_bwd)
