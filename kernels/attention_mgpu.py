"""Flash attention for Hopper in Pallas's Mosaic GPU lowering (`plgpu`): TMA loads, wgmma and
warp specialization, with the band of `kernels/attention.py` (causal, sliding window) and GQA.

Every kernel here runs three warpgroups per program: a memory warpgroup streams blocks through a
ring of `stages` shared-memory slots (TMA copies that complete on barriers; a slot is refilled
once both consumers have released it), and two compute warpgroups, each owning one 64-row block
(wgmma's unit), consume the stream. The stream is the union of what the two blocks need; a
warpgroup passes over the blocks outside its own band without computing (it still waits for
and releases each slot, which keeps every barrier's phase in step), builds a mask only on its
band's edge blocks and runs the inside of the band unmasked (`_block_range`).

- Forward: a program owns 2 x 64 query rows of one (batch, head) and streams key/value blocks.
  The two warpgroups take turns on the tensor cores (a schedule barrier): one runs its softmax
  while the other's S = Q K^T or O += P V runs. The output accumulator stays in registers and is
  rescaled in place before each P V product. Writes the output and the base-2 log-sum-exp.
- Backward, dq: like the forward, streaming key/value blocks; per block S, P (from the saved
  log-sum-exp), dP = dO V^T, dS = P (dP - delta), dQ += dS K.
- Backward, dk/dv: a program owns 2 x 64 key rows of one (batch, kv head) and streams blocks of
  q, dO, lse and delta for every query head of the GQA group in turn, so dk and dv sum over the
  group in registers (no per-query-head gradient in memory): S^T = K Q^T, P^T, dV += P^T dO,
  dP^T = V dO^T, dS^T, dK += dS^T Q.

Inputs are bf16 or fp16 with head_dim 64 or 128; T is padded to the 128-row tile and the pad is
masked, as in the Triton kernels. Mosaic GPU needs a Hopper GPU: there is no CPU interpreter for
these kernels (jax's GPU interpreter has no transposed or register operands for wgmma), so they
are checked on the GPU, against the same oracle as the Triton kernels (`python -m kernels.bench`,
`tests/test_kernels.py` on a GPU).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.attention import (BACKWARD_DIMS, FORWARD_DIMS, LOG2E, Band, _block_range, _pad,
                               masked_score)
from kernels.mosaic import on_hopper, smem_transforms
from kernels.partition import rows_parallel

COMPUTE_WGS = 2
ROWS = 64  # rows per compute warpgroup: wgmma's M
# One value per accumulator row / column; these layouts were renamed across jax versions.
_ROW = getattr(plgpu.Layout, "WGMMA_ROW", None) or plgpu.Layout.WGMMA.reduce(1)
_COL = getattr(plgpu.Layout, "WGMMA_COL", None) or plgpu.Layout.WGMMA.reduce(0)


@dataclasses.dataclass(frozen=True)
class MgpuBlocks:
    """Per kernel, the rows of each streamed block (keys for the forward and dq, queries for
    dk/dv) and how many blocks are in flight. Defaults: the fastest at the d20 shape on the
    H200 (kernels/README.md); shared memory (227 KB) bounds rows x stages."""
    fwd_k: int = 128
    fwd_stages: int = 2
    dq_k: int = 64
    dq_stages: int = 3
    dkv_q: int = 64
    dkv_stages: int = 3


TILE = 128  # T is padded to a multiple of this (a program's 2 x 64 rows; a 128-row block)


def _positions(rows0, cols0, shape):
    rows = rows0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
    cols = cols0 + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    return rows, cols


def _walk(my_range, lo, hi, rounds, skip, step, carry):
    """The compute warpgroup's side of the stream: `rounds` passes over blocks [lo, hi) (stream
    index r * (hi - lo) + i - lo for block i of pass r); step(n, r, i, carry, masked) on the
    warpgroup's own blocks (masked on the band's edges), skip(n) on the others."""
    my_lo, full_lo, full_hi, my_hi = my_range

    def one_round(r, carry):
        def at(f, **kw):
            return lambda i, c: f(r * (hi - lo) + i - lo, r, i, c, **kw)

        def skipping(n, r, i, c):
            skip(n)
            return c

        carry = lax.fori_loop(lo, my_lo, at(skipping), carry)
        carry = lax.fori_loop(my_lo, full_lo, at(step, masked=True), carry)
        carry = lax.fori_loop(full_lo, full_hi, at(step, masked=False), carry)
        carry = lax.fori_loop(full_hi, my_hi, at(step, masked=True), carry)
        return lax.fori_loop(my_hi, hi, at(skipping), carry)

    return lax.fori_loop(0, rounds, one_round, carry) if rounds > 1 else one_round(0, carry)


def _feed(lo, hi, rounds, stages, load, free):
    """The memory warpgroup's side: load(n, r, i, slot) for every streamed block, each slot
    refilled once every barrier in `free` says both compute warpgroups released it."""
    per_round = hi - lo
    total = rounds * per_round

    def at(n, slot):
        r, i = lax.div(n, per_round), lax.rem(n, per_round) + lo
        load(r, i, slot)

    for slot in range(stages):
        pl.when(slot < total)(functools.partial(at, slot, slot))

    @pl.loop(stages, total)
    def _(n):
        slot = lax.rem(n, stages)
        for barrier in free:
            plgpu.barrier_wait(barrier.at[slot])
        at(n, slot)


def _pass_over(slot, ready, free):
    """A compute warpgroup's turn on a slot outside its band: wait for every copy, release."""
    for barrier in ready:
        plgpu.barrier_wait(barrier.at[slot])
    for barrier in free:
        plgpu.barrier_arrive(barrier.at[slot])


def _stream_keys_and_values(kv_refs, b, kv_head, lo, hi, rows, stages, smem, ready, free):
    """The memory warpgroup of the forward and dq kernels: key/value blocks lo ... hi - 1 of one
    (batch, kv head), `rows` positions each."""
    plgpu.set_max_registers(40, action="decrease")

    def load(r, j, slot):
        block = (b, pl.ds(j * rows, rows), kv_head)
        for src, dst, barrier in zip(kv_refs, smem, ready):
            plgpu.copy_gmem_to_smem(src.at[block], dst.at[slot], barrier.at[slot])

    _feed(lo, hi, 1, stages, load, free)


def _one_compile(kernel):
    """Jit each kernel on its own: a model calling attention in every layer then lowers (and
    XLA compiles) one copy per kernel and shape, not one per call (d12: 20 s of lowering)."""
    return jax.jit(kernel, static_argnames=("band", "scale", "blocks"))


def _kernel_call(body, out_type, scratch, grid, grid_names):
    # The kernel takes body's name (profiles show "attention_dq_mosaic_gpu_kernel").
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=grid,
                        grid_names=grid_names, num_threads=COMPUTE_WGS + 1, thread_name="wg",
                        compiler_params=plgpu.CompilerParams(approx_math=True))


def _ring(stages, dtype, rows, D):
    return plgpu.SMEM((stages, rows, D), dtype, transforms=smem_transforms(dtype))


def _ready(stages, copies=1):
    # Each TMA copy arrives once on its barrier (announcing its bytes): a barrier that several
    # copies complete on needs that many arrivals.
    return plgpu.Barrier(num_arrivals=copies, num_barriers=stages)


def _free(stages):
    return plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages)


# ---------------------------------------------------------------------------------------------
# forward


@_one_compile
def _forward(q, k, v, band: Band, scale: float, blocks: MgpuBlocks):
    """q (B, Tp, H, D), k and v (B, Tp, K, D), Tp a multiple of TILE. Returns the output and the
    base-2 log-sum-exp (B, H, Tp) of the logits scale * log2(e) * q.k."""
    B, Tp, H, D = q.shape
    G = H // k.shape[2]
    bk, stages, dtype = blocks.fwd_k, blocks.fwd_stages, q.dtype
    c = scale * LOG2E
    pairs = Tp // (COMPUTE_WGS * ROWS)

    def attention_forward(q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem,
                          q_ready, k_ready, v_ready, k_free, v_free, turn):
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        pair = pairs - 1 - lax.axis_index("pair")  # the longest rows (causal) start first
        lo, _, _, hi = _block_range(pair, COMPUTE_WGS * ROWS, bk, band)

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            block = pair * COMPUTE_WGS + wg
            row0 = block * ROWS
            q_smem = qo_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, ROWS), h], q_smem, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])

            def wait_for_keys(n):
                # Block n's keys are awaited one step early, while the tensor cores are busy.
                @pl.when(n < hi - lo)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(n, stages)])

            def skip(n):
                slot = lax.rem(n, stages)
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                wait_for_keys(n + 1)
                take_turn()
                take_turn()

            def step(n, r, j, carry, masked):
                acc, m, l = carry
                slot = lax.rem(n, stages)

                def qk(s_ref):
                    plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    take_turn()  # the other warpgroup's P V runs while this product finishes
                    return s_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    s = jnp.where(band.visible(*_positions(row0, j * bk, s.shape)), s, -jnp.inf)
                # m is kept in base-2 units, so p = exp2(s * c - m) is one multiply-add. Masked
                # scores are -inf (a finite mask value would leave the multiply-add's rounding
                # error, huge at that magnitude, in the exponent); a row that has seen no key
                # yet (m = -inf) subtracts 0 instead.
                m_new = jnp.maximum(m, s.max(axis=1) * c)
                shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m - shift)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(shift, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p = p.astype(dtype)
                acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
                plgpu.barrier_arrive(turn)  # softmax done: the other warpgroup may multiply
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)  # and it has issued its product: our turn

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p, v_smem.at[slot])
                    wait_for_keys(n + 1)

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            acc = plgpu.layout_cast(jnp.zeros((ROWS, D), jnp.float32), plgpu.Layout.WGMMA)
            m = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), _ROW)
            l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), _ROW)
            wait_for_keys(0)
            pl.when(wg == 1)(take_turn)  # warpgroup 1 runs half a step behind warpgroup 0
            acc, m, l = _walk(_block_range(block, ROWS, bk, band), lo, hi, 1, skip, step,
                              (acc, m, l))
            pl.when(wg == 0)(take_turn)

            # Rows of padding past T may have seen no key (l = 0): o = 0 and lse = 0 there, so
            # that the backward's exp2(masked - lse) is 0.
            seen = l > 0
            l = jnp.where(seen, l, 1.0)
            q_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
            lse_smem.at[wg][...] = jnp.where(seen, m + jnp.log(l) * LOG2E, 0.0)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(row0, ROWS), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, ROWS)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            _stream_keys_and_values((k_ref, v_ref), b, lax.div(h, jnp.int32(G)), lo, hi, bk,
                                    stages, (k_smem, v_smem), (k_ready, v_ready), (k_free, v_free))

    scratch = (plgpu.SMEM((COMPUTE_WGS, ROWS, D), dtype, transforms=smem_transforms(dtype)),
               _ring(stages, dtype, bk, D), _ring(stages, dtype, bk, D),
               plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.float32),
               _ready(COMPUTE_WGS), _ready(stages), _ready(stages), _free(stages), _free(stages),
               plgpu.Barrier(num_arrivals=COMPUTE_WGS))
    out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((B, H, Tp), jnp.float32))
    return _kernel_call(attention_forward, out_type, scratch, (H, pairs, B),
                        ("heads", "pair", "batch"))(q, k, v)


# ---------------------------------------------------------------------------------------------
# backward


@_one_compile
def _dq(q, k, v, o, do, lse, band: Band, scale: float, blocks: MgpuBlocks):
    """dq, and delta = rowsum(o * do) (B, H, Tp) for the dk/dv kernel, computed on the way."""
    B, Tp, H, D = q.shape
    G = H // k.shape[2]
    bk, stages, dtype = blocks.dq_k, blocks.dq_stages, q.dtype
    c = scale * LOG2E
    mask_value = masked_score(c)
    pairs = Tp // (COMPUTE_WGS * ROWS)

    def attention_dq(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dq_ref, delta_ref,
                     q_smem2, o_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem,
                     q_ready, k_ready, v_ready, k_free, v_free):
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        pair = pairs - 1 - lax.axis_index("pair")
        lo, _, _, hi = _block_range(pair, COMPUTE_WGS * ROWS, bk, band)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            block = pair * COMPUTE_WGS + wg
            row0 = block * ROWS
            q_smem, o_smem, do_smem = q_smem2.at[wg], o_smem2.at[wg], do_smem2.at[wg]
            rows = (b, pl.ds(row0, ROWS), h)
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_ready.at[wg])
            plgpu.copy_gmem_to_smem(o_ref.at[rows], o_smem, q_ready.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, q_ready.at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(row0, ROWS)], lse_smem2.at[wg], q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            lse = plgpu.load(lse_smem2.at[wg], (), layout=_ROW)
            o_ = plgpu.load(o_smem, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
            do_ = plgpu.load(do_smem, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
            delta = (o_ * do_).sum(axis=1)
            delta_smem2.at[wg][...] = delta
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(delta_smem2.at[wg], delta_ref.at[b, h, pl.ds(row0, ROWS)])

            def skip(n):
                _pass_over(lax.rem(n, stages), (k_ready, v_ready), (k_free, v_free))

            def step(n, r, j, dq, masked):
                slot = lax.rem(n, stages)
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])

                def products(refs):
                    s_ref, dp_ref = refs
                    plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    plgpu.wgmma(dp_ref, do_smem, plgpu.transpose_ref(v_smem.at[slot], (1, 0)))
                    return s_ref[...], dp_ref[...]

                s, dp = pl.run_scoped(products, (plgpu.ACC((ROWS, bk), jnp.float32),) * 2)
                plgpu.barrier_arrive(v_free.at[slot])
                if masked:
                    s = jnp.where(band.visible(*_positions(row0, j * bk, s.shape)), s, mask_value)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(lse, s.shape, [0]))
                ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))

                def dq_product(acc_ref):
                    plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])

                dq = pl.run_state(dq_product)(plgpu.ACC.init(dq))
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            dq = plgpu.layout_cast(jnp.zeros((ROWS, D), jnp.float32), plgpu.Layout.WGMMA)
            dq = _walk(_block_range(block, ROWS, bk, band), lo, hi, 1, skip, step, dq)
            q_smem[...] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            _stream_keys_and_values((k_ref, v_ref), b, lax.div(h, jnp.int32(G)), lo, hi, bk,
                                    stages, (k_smem, v_smem), (k_ready, v_ready), (k_free, v_free))

    own = plgpu.SMEM((COMPUTE_WGS, ROWS, D), dtype, transforms=smem_transforms(dtype))
    rows_f32 = plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.float32)
    scratch = (own, own, own, rows_f32, rows_f32, _ring(stages, dtype, bk, D),
               _ring(stages, dtype, bk, D), _ready(COMPUTE_WGS, copies=4), _ready(stages),
               _ready(stages), _free(stages), _free(stages))
    out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((B, H, Tp), jnp.float32))
    return _kernel_call(attention_dq, out_type, scratch, (H, pairs, B),
                        ("heads", "pair", "batch"))(q, k, v, o, do, lse)


@_one_compile
def _dkv(q, k, v, do, lse, delta, band: Band, scale: float, blocks: MgpuBlocks):
    B, Tp, H, D = q.shape
    K = k.shape[2]
    G = H // K
    bq, stages, dtype = blocks.dkv_q, blocks.dkv_stages, q.dtype
    c = scale * LOG2E
    mask_value = masked_score(c)
    pairs = Tp // (COMPUTE_WGS * ROWS)
    seen_by = band.mirrored()  # key s is seen by queries s - right ... s + left

    def attention_dkv(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                      k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem,
                      kv_ready, q_ready, do_ready, q_free, do_free):
        b, kv_head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        pair = lax.axis_index("pair")  # causal: the first keys are seen by the most queries
        lo, _, _, hi = _block_range(pair, COMPUTE_WGS * ROWS, bq, seen_by)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            block = pair * COMPUTE_WGS + wg
            row0 = block * ROWS
            k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
            rows = (b, pl.ds(row0, ROWS), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, kv_ready.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, kv_ready.at[wg])
            plgpu.barrier_wait(kv_ready.at[wg])

            def skip(n):
                _pass_over(lax.rem(n, stages), (q_ready, do_ready), (q_free, do_free))

            def step(n, r, i, carry, masked):
                dk, dv = carry
                slot = lax.rem(n, stages)
                plgpu.barrier_wait(q_ready.at[slot])

                def scores(sT_ref):
                    plgpu.wgmma(sT_ref, k_smem, plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
                    return sT_ref[...]

                sT = pl.run_scoped(scores, plgpu.ACC((ROWS, bq), jnp.float32))
                if masked:
                    sT = jnp.where(seen_by.visible(*_positions(row0, i * bq, sT.shape)), sT,
                                   mask_value)
                lse = plgpu.load(lse_smem.at[slot], (), layout=_COL)
                pT = jnp.exp2(sT * c - lax.broadcast_in_dim(lse, sT.shape, [1]))
                plgpu.barrier_wait(do_ready.at[slot])

                def dv_and_dpT(refs):
                    dv_ref, dpT_ref = refs
                    plgpu.wgmma(dv_ref, pT.astype(dtype), do_smem.at[slot])
                    plgpu.wgmma(dpT_ref, v_smem, plgpu.transpose_ref(do_smem.at[slot], (1, 0)))

                zeros = plgpu.layout_cast(jnp.zeros((ROWS, bq), jnp.float32), plgpu.Layout.WGMMA)
                dv, dpT = pl.run_state(dv_and_dpT)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros)))
                plgpu.barrier_arrive(do_free.at[slot])
                delta = plgpu.load(delta_smem.at[slot], (), layout=_COL)
                dsT = pT * (dpT - lax.broadcast_in_dim(delta, dpT.shape, [1]))

                def dk_product(acc_ref):
                    plgpu.wgmma(acc_ref, dsT.astype(dtype), q_smem.at[slot])

                dk = pl.run_state(dk_product)(plgpu.ACC.init(dk))
                plgpu.barrier_arrive(q_free.at[slot])
                return dk, dv

            zeros = plgpu.layout_cast(jnp.zeros((ROWS, D), jnp.float32), plgpu.Layout.WGMMA)
            dk, dv = _walk(_block_range(block, ROWS, bq, seen_by), lo, hi, G, skip, step,
                           (zeros, zeros))
            k_smem[...] = (dk * scale).astype(dtype)
            v_smem[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows])
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def load(r, i, slot):
                h = kv_head * G + r
                rows = (b, pl.ds(i * bq, bq), h)
                plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(i * bq, bq)], lse_smem.at[slot],
                                        q_ready.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_ready.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(i * bq, bq)],
                                        delta_smem.at[slot], do_ready.at[slot])

            _feed(lo, hi, G, stages, load, (q_free, do_free))

    own = plgpu.SMEM((COMPUTE_WGS, ROWS, D), dtype, transforms=smem_transforms(dtype))
    ring_f32 = plgpu.SMEM((stages, bq), jnp.float32)
    scratch = (own, own, _ring(stages, dtype, bq, D), _ring(stages, dtype, bq, D), ring_f32, ring_f32,
               _ready(COMPUTE_WGS, copies=2), _ready(stages, copies=2), _ready(stages, copies=2),
               _free(stages), _free(stages))
    out_type = (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype))
    return _kernel_call(attention_dkv, out_type, scratch, (K, pairs, B),
                        ("heads", "pair", "batch"))(q, k, v, do, lse, delta)


# ---------------------------------------------------------------------------------------------
# public entry point


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash(q, k, v, band, scale, blocks):
    return _flash_fwd(q, k, v, band, scale, blocks)[0]


@functools.lru_cache(maxsize=None)
def _kernels(band, scale, blocks):
    """The forward and the two backward kernels, split over the batch and heads of a sharded
    program."""
    def gradients(q, k, v, o, lse, do):
        dq, delta = _dq(q, k, v, o, do, lse, band, scale, blocks)
        return (dq, *_dkv(q, k, v, do, lse, delta, band, scale, blocks))

    forward = rows_parallel(lambda q, k, v: _forward(q, k, v, band, scale, blocks), *FORWARD_DIMS)
    backward = rows_parallel(gradients, *BACKWARD_DIMS)
    return forward, backward


def _flash_fwd(q, k, v, band, scale, blocks):
    T = q.shape[1]
    Tp = -(-T // TILE) * TILE
    forward, _ = _kernels(band, scale, blocks)
    o, lse = forward(_pad(q, Tp), _pad(k, Tp), _pad(v, Tp))
    o = o[:, :T]
    return o, (q, k, v, o, lse)


def _flash_bwd(band, scale, blocks, residuals, do):
    q, k, v, o, lse = residuals
    T, Tp = q.shape[1], lse.shape[2]
    _, backward = _kernels(band, scale, blocks)
    grads = backward(*(_pad(x, Tp) for x in (q, k, v, o)), lse, _pad(do, Tp))
    return tuple(g[:, :T] for g in grads)


_flash.defvjp(_flash_fwd, _flash_bwd)


def supported(q) -> bool:
    """Whether these kernels run for queries like q here: a Hopper GPU (compute capability 9.x),
    bf16 or fp16, head_dim 64 or 128."""
    return on_hopper() and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] in (64, 128)


def flash_attention(q, k, v, *, causal: bool = True, window: int | None = None,
                    sm_scale: float | None = None, blocks: MgpuBlocks = MgpuBlocks()):
    """`kernels.attention.flash_attention` on Hopper's Mosaic GPU lowering: the same band and
    GQA, bf16 or fp16, head_dim 64 or 128."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[1] != k.shape[1]:
        raise ValueError(f"expected q (B, T, H, D) and k, v (B, T, H_kv, D); got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2] or q.shape[3] != k.shape[3] or q.shape[3] not in (64, 128):
        raise ValueError(f"need H a multiple of H_kv and head_dim 64 or 128; got {q.shape}, {k.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"q, k, v must share one dtype, bf16 or fp16; got {q.dtype}")
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0 or None, got {window}")
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    return _flash(q, k, v, Band.of(causal, window, q.shape[1]), scale, blocks)
