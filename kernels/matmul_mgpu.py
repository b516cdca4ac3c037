"""The MLP's matrix products with their elementwise step in the epilogue, for Hopper (Pallas
Mosaic GPU lowering, `plgpu`).

XLA runs the MLP's ReLU² as passes of their own over the 4·D-wide activations: cuBLAS writes
relu(x W) and a second kernel squares it; in the backward pass cuBLAS writes dA = g W_proj and a
third kernel forms dH = dA · 2 sqrt(A). Each pass reads and writes 0.7 GB per d20 micro-step
layer (`docs/perf_notes.md`). Here the product's float32 accumulator gets that step in registers
before its only store:

- `relu_squared_matmul(x, w)`: relu(x @ w.T)², the MLP's hidden activation A, for w in the
  model's (out, in) orientation: wgmma reads its tiles through a transposed view of shared
  memory, so the weight is never transposed in HBM;
- `relu_squared_grad_matmul(g, w, a)`: (g @ w) · 2 sqrt(a), the gradient at the MLP's
  pre-activation, from the output gradient g, the output projection w and the saved A.

One persistent program per SM walks the output tiles (a snake order that keeps a band of b's
columns in L2). Each has three warpgroups: a memory warpgroup streams (rows × depth) blocks of
a and (depth × 2·cols) blocks of b ((2·cols × depth) of a stored (N, K) weight) through a ring
of shared-memory slots, and two compute warpgroups each own one (rows × cols) half of the tile
(wgmma into a float32 accumulator). The epilogue runs on 64 × 64 pieces of the accumulator and
stores through shared memory by TMA; an epilogue input (a's tile for the gradient) is fetched
while the products run.

Like `kernels/attention_mgpu.py`, these run only on a Hopper GPU (no CPU interpreter for
Mosaic GPU) and are checked there against the XLA expression (`tests/test_matmul.py`,
`python -m kernels.bench_matmul`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.mosaic import on_hopper, smem_transforms
from kernels.partition import rows_parallel

COMPUTE_WGS = 2
PIECE = 64  # the epilogue's square sub-tile (64 bf16 = one 128-byte swizzled row)
_TINY = float(jnp.finfo(jnp.float32).tiny)


@dataclasses.dataclass(frozen=True)
class MatmulTiles:
    """A program's output tile is `rows` x (2 · `cols`) (one `cols` half per compute warpgroup);
    `depth` is the contraction per pipeline step and `stages` how many steps are in flight.
    `band` is the snake's width in tiles along the rows. Shared memory (227 KB) bounds
    stages x (rows + 2·cols) x depth plus the epilogue's tile."""
    rows: int = 128
    cols: int = 128
    depth: int = 64
    stages: int = 3
    band: int = 8


TILES = MatmulTiles()  # what the model runs: the fastest of the sweep (kernels/README.md)


def relu_squared(acc):
    r = jnp.maximum(acc, 0.0)
    return r * r


def relu_squared_grad(acc, a):
    """acc · 2 sqrt(a) for a >= 0, with sqrt(a) = a · rsqrt(a) (Mosaic GPU has rsqrt, not sqrt);
    the floor keeps a = 0 at 0 instead of 0 · inf."""
    a = a.astype(jnp.float32)
    return acc * (2.0 * a * lax.rsqrt(jnp.maximum(a, _TINY)))


def _sm_count() -> int:
    # 132 (an H100/H200) where no GPU is attached, e.g. when lowering for one from a CPU.
    return getattr(jax.devices()[0], "core_count", None) or 132


@functools.partial(jax.jit, static_argnames=("epilogue", "tiles", "b_transposed"))
def _matmul(a, b, c, *, epilogue, tiles: MatmulTiles, b_transposed: bool):
    """epilogue(a @ b [, c]) for a (M, K), b (K, N) or, `b_transposed`, (N, K) for a @ b.T, c None
    or (M, N); the result in a's dtype."""
    M, K = a.shape
    N = b.shape[0] if b_transposed else b.shape[1]
    tm, tn, tk = tiles.rows, tiles.cols, tiles.depth
    m_tiles, n_tiles, k_steps = M // tm, N // (COMPUTE_WGS * tn), K // tk
    pieces = [(i, j) for i in range(tm // PIECE) for j in range(tn // PIECE)]
    dtype = a.dtype

    def pipeline(body, compute_context):
        def spec(shape, index):
            return plgpu.BlockSpec(shape, index, transforms=smem_transforms(dtype), memory_space=plgpu.SMEM)

        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_steps,), memory_registers=40,
            in_specs=[spec((tm, tk), lambda k: (0, k)),
                      spec((COMPUTE_WGS * tn, tk), lambda k: (0, k)) if b_transposed
                      else spec((tk, COMPUTE_WGS * tn), lambda k: (k, 0))],
            wg_axis="wg", num_compute_wgs=COMPUTE_WGS, max_concurrent_steps=tiles.stages,
            compute_context=compute_context)

    def matmul_epilogue(a_gmem, b_gmem, c_gmem, out_gmem):
        ignore = lambda *_, **__: None  # the allocations do not depend on the bodies

        @functools.partial(
            pl.run_scoped,
            ring=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
            # Per warpgroup its output tile in 64 x 64 pieces: first the epilogue input c (when
            # there is one), then, written over it piece by piece, the result the TMA stores.
            tile_smem=plgpu.SMEM((COMPUTE_WGS, len(pieces), PIECE, PIECE), dtype, transforms=smem_transforms(dtype)),
            c_ready=None if c_gmem is None else plgpu.Barrier(num_barriers=COMPUTE_WGS * len(pieces)),
            collective_axes="wg")
        def _(ring, tile_smem, c_ready):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
            def _tile(info):
                (t,) = info.index
                mi, ni = plgpu.planar_snake(t, (m_tiles, n_tiles), 0, tiles.band)
                rows = pl.ds(mi * tm, tm)
                my_cols = pl.ds(ni * COMPUTE_WGS * tn + wg * tn, tn)

                def piece(ref, p):
                    i, j = pieces[p]
                    return ref.at[rows, my_cols].at[pl.ds(i * PIECE, PIECE), pl.ds(j * PIECE, PIECE)]

                def compute_context(run_pipeline):
                    # The previous tile's stores must have read tile_smem before it is refilled.
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    if c_gmem is not None:
                        for p in range(len(pieces)):
                            plgpu.copy_gmem_to_smem(piece(c_gmem, p), tile_smem.at[wg, p],
                                                    c_ready.at[wg * len(pieces) + p])

                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                    def _(acc_ref):
                        run_pipeline(acc_ref)
                        acc = acc_ref[...]
                        for p, (i, j) in enumerate(pieces):
                            part = acc[i * PIECE:(i + 1) * PIECE, j * PIECE:(j + 1) * PIECE]
                            if c_gmem is None:
                                out = epilogue(part)
                            else:
                                plgpu.barrier_wait(c_ready.at[wg * len(pieces) + p])
                                out = epilogue(part, tile_smem[wg, p])
                            tile_smem[wg, p] = out.astype(dtype)
                        plgpu.commit_smem()
                        for p in range(len(pieces)):
                            plgpu.copy_smem_to_gmem(tile_smem.at[wg, p], piece(out_gmem, p))

                def mma(_, a_smem, b_smem, acc_ref):
                    my_b = pl.ds(wg * tn, tn)
                    b_kn = plgpu.transpose_ref(b_smem.at[my_b, :], (1, 0)) if b_transposed else b_smem.at[:, my_b]
                    plgpu.wgmma(acc_ref, a_smem, b_kn)
                    plgpu.wgmma_wait(0)
                    return acc_ref

                tile_cols = pl.ds(ni * COMPUTE_WGS * tn, COMPUTE_WGS * tn)
                b_tile = b_gmem.at[tile_cols, :] if b_transposed else b_gmem.at[:, tile_cols]
                pipeline(mma, compute_context)(a_gmem.at[rows, :], b_tile, allocations=ring)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    # Profiles name the kernels "matmul_relu_squared[_grad]_mosaic_gpu_kernel".
    matmul_epilogue.__name__ = f"matmul_{epilogue.__name__}"
    kernel = plgpu.kernel(
        matmul_epilogue, out_type=jax.ShapeDtypeStruct((M, N), dtype), grid=(_sm_count(),),
        grid_names=("sm",), num_threads=COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return kernel(a, b, c)


def _check(x, w, transposed: bool):
    w_shape = "(N, K)" if transposed else "(K, N)"
    if x.ndim != 3 or w.ndim != 2 or w.shape[1 if transposed else 0] != x.shape[-1]:
        raise ValueError(f"expected x (B, T, K) and w {w_shape}; got {x.shape}, {w.shape}")
    M, K = x.shape[0] * x.shape[1], x.shape[-1]
    N = w.shape[0 if transposed else 1]
    if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"x and w must share one dtype, bf16 or fp16; got {x.dtype}, {w.dtype}")
    if M % TILES.rows or K % TILES.depth or N % (COMPUTE_WGS * TILES.cols):
        raise ValueError(f"B·T={M}, K={K}, N={N} must divide by the tiles "
                         f"({TILES.rows}, {TILES.depth}, {COMPUTE_WGS * TILES.cols})")


def supported(x, w, *, transposed: bool = False) -> bool:
    """Whether these kernels run for x (B, T, K) @ w (K, N), or @ w.T for w (N, K) `transposed`:
    a Hopper GPU, bf16 or fp16, and B·T, K and N multiples of the tiles."""
    if not on_hopper():
        return False
    try:
        _check(x, w, transposed)
    except ValueError:
        return False
    return True


def _flat(x):
    return x.reshape(-1, x.shape[-1])


@functools.partial(rows_parallel, in_dims=("bti", "oi"), out_dims=("bto",))
def _relu_squared_matmul(x, w):
    return _matmul(_flat(x), w, None, epilogue=relu_squared, tiles=TILES, b_transposed=True).reshape(*x.shape[:2], -1)


@functools.partial(rows_parallel, in_dims=("bto", "oi", "bti"), out_dims=("bti",))
def _relu_squared_grad_matmul(g, w, a):
    return _matmul(_flat(g), w, _flat(a), epilogue=relu_squared_grad, tiles=TILES, b_transposed=False).reshape(a.shape)


def relu_squared_matmul(x, w):
    """relu(x @ w.T)² for x (B, T, K), w (N, K), in x's dtype (float32 accumulation, one rounding)."""
    _check(x, w, transposed=True)
    return _relu_squared_matmul(x, w)


def relu_squared_grad_matmul(g, w, a):
    """(g @ w) · 2 sqrt(a) for g (B, T, K), w (K, N) and a (B, T, N) >= 0: the gradient at the
    pre-activation h of a = relu(h)², from the gradient g of the product a @ w.T."""
    _check(g, w, transposed=False)
    if a.shape != (*g.shape[:2], w.shape[1]) or a.dtype != g.dtype:
        raise ValueError(f"a must be {(*g.shape[:2], w.shape[1])} in {g.dtype}; got {a.shape} {a.dtype}")
    return _relu_squared_grad_matmul(g, w, a)
