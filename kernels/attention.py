"""Flash attention in Pallas (Triton-style lowering): causal or not, GQA, sliding windows,
forward and backward, plus a split-K decode kernel for the KV cache.

Layout is the model's: q (B, T, H, D), k and v (B, T, H_kv, D), H a multiple of H_kv.

Visibility is a band: query t sees key s iff  t - left <= s <= t + right  (and both < T).
Causal attention with a window w is left = w, right = 0 (the reference's `(window, 0)`: w + 1
keys); without a window left is unlimited; non-causal attention makes the band symmetric
(right = left), so a non-causal window w is |t - s| <= w.

Blocking. The forward grid is (query block, batch, query head); each program keeps its query
block in registers and walks the key/value blocks of the band. The backward grid is
(block, batch, kv head): one program computes dk and dv of one key block, summing over every
query head of its GQA group inside the kernel (no per-query-head dk/dv in memory, no reduction
afterwards), and then dq of the query block with the same index for each head of the group.
GQA never repeats k/v in memory: the BlockSpecs point query head h at kv head h // G.

What is skipped. `_block_range` gives, for one block of one axis, the blocks of the other axis
that the band touches at all ([lo, hi): nothing outside is loaded or computed) and the inner run of
them that the band covers entirely ([full_lo, full_hi): computed without building a mask). Only
the blocks on the band's two edges (the diagonal, the window's far edge) and the ragged last block
pay for a mask. The forward and both backward loops use this one function, the dk/dv loop with
the band mirrored (key s is seen by queries s - right ... s + left).

Ragged T: inputs are padded to a multiple of the block size; the pad is masked (t, s < T), and
outputs are sliced back.

Softmax runs in base 2 (exp2 with log2(e) folded into the scale); the log-sum-exp saved for the
backward is in that base too.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels.partition import rows_parallel

LOG2E = math.log2(math.e)
# Finite, so that a row with no visible key in some block gives exp2(MASK - MASK) = 1 rather than
# NaN; the next block with a visible key rescales that junk by exp2(MASK - m) = 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
UNLIMITED = 1 << 30  # a band edge further than any sequence; int32-safe arithmetic


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes. Forward: block_q x block_k. Backward: the dk/dv pass holds `bwd_major` keys
    and walks queries `bwd_minor` at a time; the dq pass holds `bwd_major` queries and walks keys
    `bwd_minor` at a time (one grid index serves both, so both use bwd_major)."""
    block_q: int = 128
    block_k: int = 128
    bwd_major: int = 64
    bwd_minor: int = 64
    num_warps_fwd: int = 8
    num_stages_fwd: int = 3
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2


# Tiles measured on the H200 (kernels/README.md): bf16 takes 128 x 128 forward tiles; fp32 tiles
# are twice the bytes, and 128 x 128 with three pipeline stages overflows shared memory at D = 128.
DEFAULT_BLOCKS = {
    jnp.dtype(jnp.bfloat16): Blocks(),
    jnp.dtype(jnp.float32): Blocks(block_q=128, block_k=64, bwd_major=64, bwd_minor=32),
}


@dataclasses.dataclass(frozen=True)
class Band:
    left: int
    right: int
    seq_len: int

    @staticmethod
    def of(causal: bool, window: int | None, seq_len: int) -> "Band":
        left = UNLIMITED if window is None or window >= seq_len - 1 else int(window)
        return Band(left, 0 if causal else left, seq_len)

    def mirrored(self) -> "Band":
        return Band(self.right, self.left, self.seq_len)

    def visible(self, rows, cols):
        """Where row position sees column position; rows and cols broadcast against each
        other (a column and a row vector, or two full grids of positions)."""
        return ((cols >= rows - self.left) & (cols <= rows + self.right)
                & (rows < self.seq_len) & (cols < self.seq_len))


def _block_range(i, own: int, other: int, band: Band):
    """For block i (size `own`) of one axis, the blocks (size `other`) of the other axis as
    (lo, full_lo, full_hi, hi): [lo, hi) touch the band, [full_lo, full_hi) lie wholly inside it
    (and inside the sequence), so they need no mask. Works on traced program ids."""
    T = band.seq_len
    div = jax.lax.div  # every operand below is >= 0: truncation is floor
    first = i * own
    last = jnp.minimum(first + own, T) - 1  # last real position of the block
    lo = div(jnp.maximum(first - band.left, 0), other)
    hi = div(jnp.minimum(last + band.right, T - 1), other) + 1
    # Wholly visible: the block's last position still sees the column block's first position,
    # its first position sees the column block's last, and neither block holds padding.
    full_lo = div(jnp.maximum(first + own - 1 - band.left, 0) + other - 1, other)
    full_hi = div(jnp.minimum(first + band.right + 1, T), other)
    full_hi = jnp.where(first + own > T, full_lo, full_hi)
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def _banded_loop(lo, full_lo, full_hi, hi, body, carry):
    """Runs body(j, carry, masked) over [lo, hi): the edges with the mask, the inside without."""
    carry = jax.lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = jax.lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _dot(a, b, trans_a=False, trans_b=False):
    # fp32 inputs get true fp32 products (the matrix units would otherwise use tf32).
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plt.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def masked_score(c: float) -> float:
    """The raw score given to a masked pair when logits are formed as s * c - shift: it stays
    finite after the multiply by c."""
    return MASK_VALUE / max(c, 1.0)


def _scores(q, k, rows, cols, band, c, masked):
    """Raw q.k of a (rows x cols) tile, masked outside the band when asked. Callers form the
    base-2 logits as s * c - shift in one fused multiply-add."""
    s = _dot(q, k, trans_b=True)
    return jnp.where(band.visible(rows[:, None], cols[None, :]), s, masked_score(c)) if masked else s


# The dimensions of the flash kernels' arrays for `rows_parallel`: forward (q, k, v) -> (o, lse),
# backward (q, k, v, o, lse, do) -> (dq, dk, dv).
FORWARD_DIMS = (("bthd", "btkd", "btkd"), ("bthd", "bht"))
BACKWARD_DIMS = (("bthd", "btkd", "btkd", "bthd", "bht", "bthd"), ("bthd", "btkd", "btkd"))


# ---------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, band, scale, block_q, block_k):
    i = pl.program_id(0)
    q = q_ref[...]
    rows = i * block_q + jnp.arange(block_q)
    c = scale * LOG2E

    def body(j, carry, masked):
        o, m, l = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = _scores(q, k, rows, j * block_k + jnp.arange(block_k), band, c, masked)
        m_new = jnp.maximum(m, s.max(axis=1) * c)  # c > 0: max commutes with the scale
        correction = jnp.exp2(m - m_new)
        p = jnp.exp2(s * c - m_new[:, None])
        l = l * correction + p.sum(axis=1)
        o = o * correction[:, None] + _dot(p.astype(v.dtype), v)
        return o, m_new, l

    D = q.shape[-1]
    init = (jnp.zeros((block_q, D), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    o, m, l = _banded_loop(*_block_range(i, block_q, block_k, band), body, init)
    # A row of padding past T may have seen no block at all (l = 0): give it o = 0 and lse = 0,
    # so that the backward's exp2(MASK - lse) is 0 there rather than inf.
    seen = l > 0
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(l), 0.0)


def _forward(q, k, v, band, scale, blocks, interpret):
    """Padded inputs (B, Tp, H, D) -> output (B, Tp, H, D) and base-2 lse (B, H, Tp)."""
    B, Tp, H, D = q.shape
    G = H // k.shape[2]
    bq, bk = blocks.block_q, blocks.block_k
    kernel = functools.partial(_fwd_kernel, band=band, scale=scale, block_q=bq, block_k=bk)
    return pl.pallas_call(
        kernel,
        grid=(Tp // bq, B, H),
        in_specs=[
            pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, Tp, None, D), lambda i, b, h: (b, 0, h // G, 0)),
            pl.BlockSpec((None, Tp, None, D), lambda i, b, h: (b, 0, h // G, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps_fwd,
                                           num_stages=blocks.num_stages_fwd),
        interpret=interpret,
        name="flash_attention_fwd",
    )(q, k, v)


# ---------------------------------------------------------------------------------------------
# backward


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref,
                *, band, scale, major, minor, group):
    j = pl.program_id(0)
    D = q_ref.shape[-1]
    c = scale * LOG2E

    # dk, dv of key block j: every query head of the group, every query block that sees it.
    k = k_ref[pl.ds(j * major, major), :]
    v = v_ref[pl.ds(j * major, major), :]
    cols = j * major + jnp.arange(major)
    q_blocks = _block_range(j, major, minor, band.mirrored())

    def dkv_body(t, carry, masked, g):
        dk, dv = carry
        rows = pl.ds(t * minor, minor)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        s = _scores(q, k, t * minor + jnp.arange(minor), cols, band, c, masked)
        p = jnp.exp2(s * c - lse_ref[g, rows][:, None])
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (_dot(do, v, trans_b=True) - delta_ref[g, rows][:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    def dkv_head(g, carry):
        return _banded_loop(*q_blocks, functools.partial(dkv_body, g=g), carry)

    zeros = jnp.zeros((major, D), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, group, dkv_head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)

    # dq of query block j, one head of the group at a time.
    rows = pl.ds(j * major, major)
    row_ids = j * major + jnp.arange(major)
    k_blocks = _block_range(j, major, minor, band)

    def dq_head(g, _):
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        lse, delta = lse_ref[g, rows], delta_ref[g, rows]

        def body(j2, dq, masked):
            kc = k_ref[pl.ds(j2 * minor, minor), :]
            vc = v_ref[pl.ds(j2 * minor, minor), :]
            s = _scores(q, kc, row_ids, j2 * minor + jnp.arange(minor), band, c, masked)
            p = jnp.exp2(s * c - lse[:, None])
            ds = p * (_dot(do, vc, trans_b=True) - delta[:, None])
            return dq + _dot(ds.astype(kc.dtype), kc)

        dq = _banded_loop(*k_blocks, body, jnp.zeros((major, D), jnp.float32))
        dq_ref[:, g, :] = (dq * scale).astype(dq_ref.dtype)
        return 0

    jax.lax.fori_loop(0, group, dq_head, 0)


def _backward(q, k, v, o, lse, do, band, scale, blocks, interpret):
    B, Tp, H, D = q.shape
    K = k.shape[2]
    G = H // K
    major, minor = blocks.bwd_major, blocks.bwd_minor
    # delta_t = sum_d o * do: the softmax-gradient term of each row, cheap enough for XLA.
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    whole_group = pl.BlockSpec((None, Tp, G, D), lambda j, b, c: (b, 0, c, 0))
    kv_whole = pl.BlockSpec((None, Tp, None, D), lambda j, b, c: (b, 0, c, 0))
    rows_group = pl.BlockSpec((None, G, Tp), lambda j, b, c: (b, c, 0))
    kernel = functools.partial(_bwd_kernel, band=band, scale=scale, major=major, minor=minor,
                               group=G)
    return pl.pallas_call(
        kernel,
        grid=(Tp // major, B, K),
        in_specs=[whole_group, kv_whole, kv_whole, whole_group, rows_group, rows_group],
        out_specs=[
            pl.BlockSpec((None, major, G, D), lambda j, b, c: (b, j, c, 0)),
            pl.BlockSpec((None, major, None, D), lambda j, b, c: (b, j, c, 0)),
            pl.BlockSpec((None, major, None, D), lambda j, b, c: (b, j, c, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps_bwd,
                                           num_stages=blocks.num_stages_bwd),
        interpret=interpret,
        name="flash_attention_bwd",
    )(q, k, v, do, lse, delta)


# ---------------------------------------------------------------------------------------------
# public entry point


def _check(q, k, v):
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"expected q (B, T, H, D) and k, v (B, T, H_kv, D); got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    B, T, H, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"k/v shape {k.shape} does not match q shape {q.shape}")
    if H % k.shape[2]:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {k.shape[2]}")
    if D not in (64, 128) and D % 16:
        raise ValueError(f"head_dim {D} unsupported: use 64 or 128 (any multiple of 16 works)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"q, k, v must share one dtype, bf16 or fp32; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")


def _pad(x, Tp):
    return x if x.shape[1] == Tp else jnp.pad(x, ((0, 0), (0, Tp - x.shape[1]), (0, 0), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _flash(q, k, v, band, scale, blocks, interpret):
    return _flash_fwd(q, k, v, band, scale, blocks, interpret)[0]


@functools.lru_cache(maxsize=None)
def _kernels(band, scale, blocks, interpret):
    """The forward and backward kernels, split over the batch and heads of a sharded program."""
    forward = rows_parallel(lambda q, k, v: _forward(q, k, v, band, scale, blocks, interpret),
                            *FORWARD_DIMS)
    backward = rows_parallel(
        lambda q, k, v, o, lse, do: _backward(q, k, v, o, lse, do, band, scale, blocks, interpret),
        *BACKWARD_DIMS)
    return forward, backward


def _flash_fwd(q, k, v, band, scale, blocks, interpret):
    T = q.shape[1]
    Tp = -(-T // _tile(blocks)) * _tile(blocks)
    forward, _ = _kernels(band, scale, blocks, interpret)
    o, lse = forward(_pad(q, Tp), _pad(k, Tp), _pad(v, Tp))
    o = o[:, :T]
    return o, (q, k, v, o, lse)


def _flash_bwd(band, scale, blocks, interpret, residuals, do):
    q, k, v, o, lse = residuals
    T, Tp = q.shape[1], lse.shape[2]
    _, backward = _kernels(band, scale, blocks, interpret)
    grads = backward(*(_pad(x, Tp) for x in (q, k, v, o)), lse, _pad(do, Tp))
    return tuple(g[:, :T] for g in grads)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _tile(blocks: Blocks) -> int:
    return max(blocks.block_q, blocks.block_k, blocks.bwd_major, blocks.bwd_minor)


def flash_attention(q, k, v, *, causal: bool = True, window: int | None = None,
                    sm_scale: float | None = None, blocks: Blocks | None = None,
                    interpret: bool = False):
    """softmax(q k^T * sm_scale + band mask) v, differentiable (Pallas backward).

    q (B, T, H, D); k, v (B, T, H_kv, D) with H % H_kv == 0; bf16 or fp32. `window` w: query t
    sees keys t - w ... t (causal) or t - w ... t + w (not causal); None = unlimited.
    `blocks` None picks the measured tiles for the dtype."""
    _check(q, k, v)
    blocks = DEFAULT_BLOCKS[q.dtype] if blocks is None else blocks
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0 or None, got {window}")
    for size in dataclasses.astuple(blocks)[:4]:
        if size < 16 or size & (size - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {blocks}")
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    return _flash(q, k, v, Band.of(causal, window, q.shape[1]), scale, blocks, interpret)


# ---------------------------------------------------------------------------------------------
# decode: a few new queries per row against the KV cache


def _decode_kernel(pos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, window, scale, block_k,
                   chunk, cache_len):
    """One (row, kv head, split): the group's queries (G * T rows) against the keys of this
    split's chunk of the cache that any of them can see."""
    c = pl.program_id(2)
    pos = pos_ref[...]
    q = q_ref[...]
    band_lo = jnp.min(pos) - (UNLIMITED if window is None else window)
    lo = jax.lax.div(jnp.maximum(jnp.maximum(band_lo, 0), c * chunk), block_k)
    end = jnp.minimum(jnp.max(pos) + 1, jnp.minimum((c + 1) * chunk, cache_len))
    hi = jax.lax.div(jnp.maximum(end, 0) + block_k - 1, block_k)

    def body(j, carry):
        o, m, l = carry
        cols = j * block_k + jnp.arange(block_k)
        s = _dot(q, k_ref[pl.ds(j * block_k, block_k), :], trans_b=True) * (scale * LOG2E)
        delta = pos[:, None] - cols[None, :]
        visible = delta >= 0
        if window is not None:
            visible &= delta <= window
        s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        correction = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        v = v_ref[pl.ds(j * block_k, block_k), :]
        return (o * correction[:, None] + _dot(p.astype(v.dtype), v), m_new,
                l * correction + p.sum(axis=1))

    R, D = q.shape
    init = (jnp.zeros((R, D), jnp.float32), jnp.full((R,), -jnp.inf, jnp.float32),
            jnp.zeros((R,), jnp.float32))
    o, m, l = jax.lax.fori_loop(lo, jnp.maximum(hi, lo), body, init)
    # A split with nothing to see reports lse = -inf and is weighted out by the combine.
    seen = l > 0
    o_ref[...] = jnp.where(seen[:, None], o / jnp.where(seen, l, 1.0)[:, None], 0.0)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), -jnp.inf)


def decode_attention(q, k_cache, v_cache, positions, *, window: int | None,
                     sm_scale: float | None = None, block_k: int = 64, num_splits: int = 8,
                     interpret: bool = False):
    """q (B, T, H, D) at absolute positions (B, T) against a cache (B, S, H_kv, D) whose slot s
    holds position s: key s is visible from position p iff s <= p and p - s <= window.
    Same semantics as `nanochat_jax.attention.attention_cached`.

    Split-K ("flash decoding"): the cache is cut into `num_splits` chunks, each a program per
    (row, kv head), so a batch of one still fills the GPU; each program skips the blocks of its
    chunk that no query sees (past the longest position, before the window), and the partial
    results are merged by their log-sum-exp. The group's query heads share one program, so
    every key block is read once per kv head."""
    B, T, H, D = q.shape
    S, K = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"cache shapes {k_cache.shape}, {v_cache.shape} do not match q {q.shape}")
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    if S % 16:
        raise ValueError(f"cache length {S} must be a multiple of 16 for the Pallas decode kernel")
    block_k = math.gcd(block_k, S)  # a block never straddles the cache's end
    G = H // K
    R = G * T
    Rp = max(16, pl.next_power_of_2(R))  # the matrix units want at least 16 rows
    chunk = -(-S // num_splits // block_k) * block_k
    splits = -(-S // chunk)
    # Rows ordered (group head, query) per kv head; pad rows repeat the last real row.
    q_BKRD = q.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B, K, R, D)
    pos_BR = jnp.tile(positions.astype(jnp.int32), (1, G))
    if Rp > R:
        q_BKRD = jnp.concatenate([q_BKRD, jnp.repeat(q_BKRD[:, :, -1:], Rp - R, axis=2)], axis=2)
        pos_BR = jnp.concatenate([pos_BR, jnp.repeat(pos_BR[:, -1:], Rp - R, axis=1)], axis=1)
    scale = D ** -0.5 if sm_scale is None else float(sm_scale)
    kernel = functools.partial(_decode_kernel, window=window, scale=scale, block_k=block_k,
                               chunk=chunk, cache_len=S)
    o, lse = pl.pallas_call(
        kernel,
        grid=(B, K, splits),
        in_specs=[
            pl.BlockSpec((None, Rp), lambda b, h, c: (b, 0)),
            pl.BlockSpec((None, None, Rp, D), lambda b, h, c: (b, h, 0, 0)),
            pl.BlockSpec((None, S, None, D), lambda b, h, c: (b, 0, h, 0)),
            pl.BlockSpec((None, S, None, D), lambda b, h, c: (b, 0, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, Rp, D), lambda b, h, c: (b, h, c, 0, 0)),
            pl.BlockSpec((None, None, None, Rp), lambda b, h, c: (b, h, c, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((B, K, splits, Rp, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, splits, Rp), jnp.float32)],
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="decode_attention",
    )(pos_BR, q_BKRD, k_cache, v_cache)
    m = lse.max(axis=2, keepdims=True)
    w = jnp.where(jnp.isfinite(m), jnp.exp2(lse - m), 0.0)
    o = (o * w[..., None]).sum(axis=2) / jnp.maximum(w.sum(axis=2), 1e-30)[..., None]
    o = o[:, :, :R].reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)
    return o.astype(q.dtype)
