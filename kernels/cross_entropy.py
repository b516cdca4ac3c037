"""The softcapped cross-entropy and its logits' gradient in one pass (Pallas, Triton-style lowering).

The model's head loss needs, per row of logits z (one position, the whole vocabulary), c = cap ·
tanh(z / cap) in float32, the row's log-sum-exp of c, and for the backward pass the gradient
coef · (softmax(c) - onehot(target)) · (1 - (c / cap)²). Left to XLA that is a reduction pass in
the forward and an elementwise pass in the backward, and each recomputes the tanh and the exp: at
32 x 2048 x 32768 bf16 logits per micro-step that work, not memory, sets their time (2.3 + 4.0
ms on an H200, against 1.0 + 2.6 ms for reading the logits once and reading and writing them once;
`python -m kernels.bench_loss`).

Here a row is held whole in registers from its load to its gradient's store: z is read once, c
formed once, exp(c) reduced to the log-sum-exp, and the gradient for a cotangent of 1 written. A
program walks 64 rows and issues each row's load during the previous row's arithmetic. The model
runs it in the forward pass under differentiation and keeps the gradient instead of the logits
(`nanochat_jax.model.head_loss_sum`); the backward pass only scales the head's products by the
cotangent.

Same float32 arithmetic as the model's jnp version, but for the exp (see `_exp`) and the order of
the log-sum-exp's sum. Rows keep the batch's sharding (`kernels.partition.rows_parallel`).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels.partition import rows_parallel

MAX_ROW = 32768  # a row of float32 c in registers: 32 values per thread at 32 warps
NUM_WARPS = 32
ROWS_PER_PROGRAM = 64  # rows one program walks through, each row's load issued during the previous row
LOG2_E = math.log2(math.e)


def supported(z_BTP) -> bool:
    """Whether the kernel takes these logits: on a GPU, (B, T, P) with P a power of two up to
    MAX_ROW (one row per program, held in registers)."""
    P = z_BTP.shape[-1]
    return jax.default_backend() == "gpu" and z_BTP.ndim == 3 and P & (P - 1) == 0 and P <= MAX_ROW


def _exp(x):
    """exp as Triton lowers its own float32 exp (torch.compile's kernels included): one hardware
    exp2 of x · log2 e. Pallas lowers `jnp.exp` to libdevice's `expf` instead, whose range
    reduction made this kernel 1.2x slower (kernels/README.md, the loss)."""
    return jnp.exp2(x * LOG2_E)


def _kernel(z_ref, target_ref, coef_ref, dz_ref, lse_ref, *, softcap, vocab_size):
    rows, P = z_ref.shape
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, P), 1)
    real = cols < vocab_size

    def load(r):
        return z_ref[pl.ds(r, 1), :]

    def row(r, z):
        # The next row's load is issued before this row's arithmetic, so it arrives meanwhile.
        z_next = load(jnp.minimum(r + 1, rows - 1))
        c = softcap * jnp.tanh(z.astype(jnp.float32) / softcap)  # (1, P)
        # |c| <= softcap, so exp(c) cannot overflow: no running maximum.
        lse = jnp.log(jnp.sum(jnp.where(real, _exp(c), 0.0), axis=1, keepdims=True))  # (1, 1)
        is_target = (cols == target_ref[pl.ds(r, 1)][:, None]).astype(jnp.float32)
        dc = coef_ref[pl.ds(r, 1)][:, None] * (_exp(c - lse) - is_target)
        dz = jnp.where(real, dc * (1.0 - jnp.square(c / softcap)), 0.0)
        dz_ref[pl.ds(r, 1), :] = dz.astype(dz_ref.dtype)
        lse_ref[pl.ds(r, 1)] = lse[:, 0]
        return z_next

    jax.lax.fori_loop(0, rows, row, load(0))


def _local(z_BTP, targets_BT, coef_BT, *, softcap, vocab_size, interpret):
    B, T, P = z_BTP.shape
    R = min(ROWS_PER_PROGRAM, (B * T) & -(B * T))
    block = pl.BlockSpec((R, P), lambda i: (i, 0))
    per_row = pl.BlockSpec((R,), lambda i: (i,))
    dz, lse = pl.pallas_call(
        functools.partial(_kernel, softcap=softcap, vocab_size=vocab_size),
        grid=(B * T // R,),
        in_specs=[block, per_row, per_row],
        out_specs=[block, per_row],
        out_shape=[jax.ShapeDtypeStruct((B * T, P), z_BTP.dtype), jax.ShapeDtypeStruct((B * T,), jnp.float32)],
        compiler_params=plt.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
    )(z_BTP.reshape(B * T, P), targets_BT.reshape(-1).astype(jnp.int32), coef_BT.reshape(-1).astype(jnp.float32))
    return dz.reshape(B, T, P), lse.reshape(B, T)


@functools.lru_cache(maxsize=None)
def _sharded(softcap, vocab_size, interpret):
    def local(z, targets, coef):  # positional arguments only: custom_partitioning resolves no keywords
        return _local(z, targets, coef, softcap=softcap, vocab_size=vocab_size, interpret=interpret)

    return rows_parallel(local, ("btv", "bt", "bt"), ("btv", "bt"))


def softcapped_cross_entropy_grad(z_BTP, targets_BT, coef_BT, vocab_size: int, *, softcap: float,
                                  interpret: bool = False):
    """(dz, lse) for logits z (B, T, P), of which the first `vocab_size` columns are real, with
    c = softcap · tanh(z / softcap) in float32: lse (B, T) float32 = log sum exp(c) over the real
    columns, and dz, in z's dtype, the gradient of the sum over rows of coef · (lse - c[target])
    with respect to z (0 in the padding columns; a target outside [0, vocab_size), such as the
    ignored -1, selects no column)."""
    return _sharded(float(softcap), int(vocab_size), interpret)(z_BTP, targets_BT, coef_BT)
