"""The GPT: a pure function of (params, tokens), with the reference architecture.

Rotary embeddings (base 100k, the reference's sign), QK-norm scaled by 1.2, ReLU² MLP, untied
embeddings, parameter-free RMSNorm (epsilon = the dtype's machine epsilon, like torch's default),
no biases, GQA, per-layer sliding windows, value embeddings with an input-dependent gate on
alternating layers, smear (the previous token's embedding mixed in), backout (the mid-network
residual subtracted before the head), per-layer residual and x0 scalars, logits softcapped at 15
in float32, vocabulary padded to a multiple of 64 and logits cropped back.

Parameters are a plain dict. Matrices keep the reference's (out, in) orientation, so imported
checkpoints need no transposes and the optimizer's row/column conventions are the reference's.
Per-layer matrices are stacked along a leading layer axis:

    wte            (V, D)            token embedding (V = padded vocab)
    lm_head        (V, D)            unembedding
    value_embeds   (n_ve, V, D_kv)   one table per value-embedding layer, in layer order
    blocks/attn_q     (L, H*hd, D)      blocks/attn_k, attn_v  (L, D_kv, D)
    blocks/attn_proj  (L, D, D)         blocks/mlp_fc (L, 4D, D)   blocks/mlp_proj (L, D, 4D)
    blocks/ve_gate    (n_ve, H_kv, 12)
    resid_lambdas, x0_lambdas (L,)   smear_gate (1, 24)   smear_lambda, backout_lambda (1,)

Decoding passes a `KVCache` to the same `forward`: the layers are one code path for training,
prefill and decode; only where keys come from (this call's tokens, or the cache) differs.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nanochat_jax import attention as attn_lib
from nanochat_jax import fp8 as fp8_lib
from nanochat_jax.config import SMEAR_GATE_CHANNELS, VE_GATE_CHANNELS, GPTConfig, compute_dtype

ROPE_BASE = 100_000
SOFTCAP = 15.0
QK_SCALE = 1.2
IGNORE_INDEX = -1


# --- parameters -------------------------------------------------------------------------------

def param_shapes(config: GPTConfig) -> dict:
    D, V, L, hd = config.n_embd, config.padded_vocab_size, config.n_layer, config.head_dim
    n_ve = len(config.value_embedding_layers)
    return {
        "wte": (V, D),
        "lm_head": (V, D),
        "value_embeds": (n_ve, V, config.kv_dim),
        "blocks": {
            "attn_q": (L, config.n_head * hd, D),
            "attn_k": (L, config.kv_dim, D),
            "attn_v": (L, config.kv_dim, D),
            "attn_proj": (L, D, D),
            "mlp_fc": (L, 4 * D, D),
            "mlp_proj": (L, D, 4 * D),
            "ve_gate": (n_ve, config.n_kv_head, VE_GATE_CHANNELS),
        },
        "resid_lambdas": (L,),
        "x0_lambdas": (L,),
        "smear_gate": (1, SMEAR_GATE_CHANNELS),
        "smear_lambda": (1,),
        "backout_lambda": (1,),
    }


def init_params(config: GPTConfig, key: jax.Array) -> dict:
    """The reference's init: every tensor written, float32.

    Uniform weights use bound sqrt(3)/sqrt(D) (the std of N(0, 1/D)) to avoid outliers; output
    projections start at zero; the residual scalars decay with depth.
    """
    shapes = param_shapes(config)
    D, L = config.n_embd, config.n_layer
    s = 3**0.5 * D**-0.5
    names = ["wte", "lm_head", "value_embeds", "attn_q", "attn_k", "attn_v", "mlp_fc", "ve_gate", "smear_gate"]
    keys = dict(zip(names, jax.random.split(key, len(names))))

    def uniform(name, shape, low, high):
        return jax.random.uniform(keys[name], shape, jnp.float32, low, high)

    def normal(name, shape, std):
        return std * jax.random.normal(keys[name], shape, jnp.float32)

    b = shapes["blocks"]
    layer_frac = jnp.arange(L, dtype=jnp.float32) / max(L - 1, 1)
    return {
        "wte": normal("wte", shapes["wte"], 0.8),
        "lm_head": normal("lm_head", shapes["lm_head"], 0.001),
        "value_embeds": uniform("value_embeds", shapes["value_embeds"], -s, s),
        "blocks": {
            "attn_q": uniform("attn_q", b["attn_q"], -s, s),
            "attn_k": uniform("attn_k", b["attn_k"], -s, s),
            "attn_v": uniform("attn_v", b["attn_v"], -s, s),
            "attn_proj": jnp.zeros(b["attn_proj"], jnp.float32),
            "mlp_fc": uniform("mlp_fc", b["mlp_fc"], -0.4 * s, 0.4 * s),
            "mlp_proj": jnp.zeros(b["mlp_proj"], jnp.float32),
            "ve_gate": uniform("ve_gate", b["ve_gate"], 0.0, 0.02),
        },
        "resid_lambdas": 1.15 - 0.10 * layer_frac,
        "x0_lambdas": 0.20 - 0.15 * layer_frac,
        "smear_gate": uniform("smear_gate", shapes["smear_gate"], 0.0, 0.02),
        "smear_lambda": jnp.zeros((1,), jnp.float32),
        "backout_lambda": jnp.full((1,), 0.2, jnp.float32),
    }


def param_counts(config: GPTConfig) -> dict:
    """Parameter counts grouped as the reference reports them for scaling laws."""
    import math

    sizes = jax.tree.map(lambda shape: math.prod(shape), param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    counts = {
        "wte": sizes["wte"],
        "value_embeds": sizes["value_embeds"],
        "lm_head": sizes["lm_head"],
        "transformer_matrices": sum(sizes["blocks"].values()),
        "scalars": sum(sizes[k] for k in ("resid_lambdas", "x0_lambdas", "smear_gate", "smear_lambda", "backout_lambda")),
    }
    counts["total"] = sum(counts.values())
    return counts


def num_matmul_params(config: GPTConfig) -> int:
    """Parameters that multiply the token stream (2 FLOPs each per token forward): every block
    matrix, the lm_head and the smear gate; embeddings are lookups and scalars are not matmuls."""
    counts = param_counts(config)
    return counts["transformer_matrices"] + counts["lm_head"] + SMEAR_GATE_CHANNELS


def flops_per_token(config: GPTConfig) -> int:
    """The reference's training FLOPs per token (forward + backward): 6 per matmul parameter plus
    12·H·hd·min(window, T) per layer for the attention scores and values."""
    t = config.sequence_len
    attn = sum(12 * config.n_head * config.head_dim * min(w, t) for w in config.window_sizes)
    return 6 * num_matmul_params(config) + attn


# --- forward ----------------------------------------------------------------------------------

def rms_norm(x):
    x32 = x.astype(jnp.float32)
    eps = jnp.finfo(x.dtype).eps  # torch's F.rms_norm default
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rotary_cos_sin(positions, head_dim: int, dtype):
    """cos and sin of shape positions.shape + (head_dim // 2,): positions (T,) in training, (B, T)
    when decoding, where every row sits at its own position."""
    inv_freq = 1.0 / (ROPE_BASE ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


def rotary_tables(cos, sin):
    """(C, S), each (..., head_dim), such that rotating x is x * C + swap_halves(x) * S."""
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, -sin], axis=-1)


def _rotate(x_BTSHD, C, S, inverse=False):
    """Rotation by -theta on the two halves of each head (the reference's convention): first half
    x1 cos + x2 sin, second half x2 cos - x1 sin; `inverse` rotates back (the transpose). Written
    as one elementwise expression with a roll, not halves and a concatenation, so forward and
    backward each stay one fused pass."""
    C, S = C[..., None, None, :], S[..., None, None, :]  # one angle for all projections and heads
    swapped = jnp.roll(x_BTSHD, x_BTSHD.shape[-1] // 2, axis=-1)
    return x_BTSHD * C - swapped * S if inverse else x_BTSHD * C + swapped * S


@jax.custom_vjp
def rotary_qk_norm(x_BTSHD, C, S):
    """QK_SCALE * rms_norm(rotate(x)) for S stacked projections (B, T, S, H, D): the queries' and
    keys' rotary embedding and QK-norm, returned as S arrays (B, T, H, D). The hand-written
    backward pass works from the outputs (which attention keeps anyway) and one float32 scale per
    head: the norm's gradient is one reduction and the rotation's is the inverse rotation. jax's
    own transpose split the heads into halves and kept the unrotated input too (d20: 8% of a
    micro-step; 1.7 GB of peak memory)."""
    return _rotary_qk_norm_fwd(x_BTSHD, C, S)[0]


def _rotary_kernel_applies(x, C):
    """On a GPU, with one table row per position 0 ... T-1 (training, evaluation, prefill; not
    decoding rows at their own positions), rotary + QK-norm runs as the one-pass Pallas kernels
    of `kernels/rotary.py` (measured: d20 training +1.2% tokens/s, d12 +1.5%). Interpreted only
    where a test switches them on off a GPU."""
    D = x.shape[-1]
    return jax.default_backend() == "gpu" and C.ndim == 2 and D & (D - 1) == 0


def _rotary_qk_norm_fwd(x_BTSHD, C, S):
    if _rotary_kernel_applies(x_BTSHD, C):
        from kernels.rotary import rotary_qk_norm_fwd

        ys, inv_rms = rotary_qk_norm_fwd(x_BTSHD, C, S, scale=QK_SCALE, eps=float(jnp.finfo(x_BTSHD.dtype).eps),
                                         interpret=jax.default_backend() != "gpu")
        return ys, (ys, inv_rms, C, S)
    return _rotary_qk_norm_xla_fwd(x_BTSHD, C, S)


def _rotary_qk_norm_bwd(residuals, gs):
    ys, inv_rms, C, S = residuals
    if _rotary_kernel_applies(ys[0], C):
        from kernels.rotary import rotary_qk_norm_bwd

        return rotary_qk_norm_bwd(gs, ys, inv_rms, C, S, scale=QK_SCALE,
                                  interpret=jax.default_backend() != "gpu"), None, None
    return _rotary_qk_norm_xla_bwd(residuals, gs)


def _rotary_qk_norm_xla_fwd(x_BTSHD, C, S):
    r = _rotate(x_BTSHD, C, S).astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(r * r, axis=-1, keepdims=True) + jnp.finfo(x_BTSHD.dtype).eps)
    y = QK_SCALE * (r * inv_rms).astype(x_BTSHD.dtype)  # the ops of rms_norm, then the scale
    ys = tuple(y[:, :, s] for s in range(y.shape[2]))
    return ys, (ys, inv_rms, C, S)


def _rotary_qk_norm_xla_bwd(residuals, gs):
    ys, inv_rms, C, S = residuals
    g = QK_SCALE * jnp.stack(gs, axis=2).astype(jnp.float32)
    n = jnp.stack(ys, axis=2).astype(jnp.float32) / QK_SCALE
    dr = inv_rms * (g - n * jnp.mean(g * n, axis=-1, keepdims=True))
    return _rotate(dr, C.astype(jnp.float32), S.astype(jnp.float32), inverse=True).astype(ys[0].dtype), None, None


rotary_qk_norm.defvjp(_rotary_qk_norm_fwd, _rotary_qk_norm_bwd)


def linear(x, w_OI):
    """x @ W.T for a weight kept in (out, in) orientation."""
    return jnp.einsum("...i,oi->...o", x, w_OI)


def _dense(x, w_OI, fp8: bool):
    """x @ W.T, its products in FP8 when training with `fp8` and the layer is one the FP8 recipe
    covers (`fp8.applies`), else in x's dtype."""
    return fp8_lib.linear(x, w_OI) if fp8 and fp8_lib.applies(w_OI) else linear(x, w_OI)


def _stacked_linear(x_BTI, ws_OI, head_dim: int, fp8: bool):
    """x @ W.T for each of the same-shaped weights in `ws_OI`, as one product: (B, T, S, H, head_dim)."""
    B, T, _ = x_BTI.shape
    if len(ws_OI) == 1:
        return _dense(x_BTI, ws_OI[0], fp8).reshape(B, T, 1, -1, head_dim)
    return jnp.einsum("bti,soi->btso", x_BTI, jnp.stack(ws_OI)).reshape(B, T, len(ws_OI), -1, head_dim)


class KVCache(NamedTuple):
    """What decoding remembers of each row: a pytree, so it passes through jit, scan and while_loop.

    Slot s of a row holds the keys/values of position s; `lengths_B` says how many slots are filled.
    The size S is fixed when the cache is made (at most the model's sequence length) and never
    grows: writes past S are dropped, and the engine stops a row before it gets there.
    """

    k_LBSKD: jax.Array  # keys after rotary and QK-norm, in the compute dtype, stacked over layers
    v_LBSKD: jax.Array
    lengths_B: jax.Array  # int32: tokens already in each row
    prev_x_BD: jax.Array  # each row's last token's normalized embedding: smear's input for the next one


def init_cache(config: GPTConfig, batch_size: int, max_len: int, dtype) -> KVCache:
    if not 1 <= max_len <= config.sequence_len:
        raise ValueError(f"cache length {max_len} must be in [1, sequence_len={config.sequence_len}]")
    shape = (config.n_layer, batch_size, max_len, config.n_kv_head, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch_size,), jnp.int32),
                   jnp.zeros((batch_size, config.n_embd), dtype))


def _attention_block(x_BTD, layer, ve_BTK, rotary, p, config, window, backend, cache_kv, positions_BT, fp8):
    """Attention of one layer; with `cache_kv` (this layer's stacked cache arrays and the layer
    index into them) the new keys/values are written at `positions_BT` and the queries attend to
    the cache. `fp8`: see `_dense`. Returns (output, cache_kv)."""
    B, T, _ = x_BTD.shape
    H, K, hd = config.n_head, config.n_kv_head, config.head_dim
    blk = p["blocks"]
    # Queries and keys from one product when they have the same width (no GQA): one product
    # forward, and backward one input gradient over twice the depth instead of two and their sum
    # (d20 +1.4% tokens/s, docs/perf_notes.md section 15). The rotary kernels split and join them
    # for free. In FP8 each weight has a scale of its own, so each is its own product.
    separate = H != K or (fp8 and fp8_lib.applies(blk["attn_q"][layer]))
    groups = [("attn_q",), ("attn_k",)] if separate else [("attn_q", "attn_k")]
    qk = []
    for names in groups:
        qk += rotary_qk_norm(_stacked_linear(x_BTD, [blk[n][layer] for n in names], hd, fp8), *rotary)
    q, k = qk
    v = _dense(x_BTD, blk["attn_v"][layer], fp8).reshape(B, T, K, hd)
    if ve_BTK is not None:
        ve_index = config.value_embedding_layers.index(layer)
        gate_BTK = 3 * jax.nn.sigmoid(_dense(x_BTD[..., :VE_GATE_CHANNELS], blk["ve_gate"][ve_index], fp8))
        v = v + gate_BTK[..., None] * ve_BTK.reshape(B, T, K, hd)
    if cache_kv is None:
        y = attn_lib.attention(q, k, v, window=window, backend=backend)
    else:
        k_LBSKD, v_LBSKD = cache_kv
        rows_B1 = jnp.arange(B)[:, None]
        # mode="drop": padding positions past the cache's end are discarded, never clamped onto
        # real slots (a clamped dynamic_update_slice would overwrite the row's last keys).
        k_LBSKD = k_LBSKD.at[layer, rows_B1, positions_BT].set(k.astype(k_LBSKD.dtype), mode="drop")
        v_LBSKD = v_LBSKD.at[layer, rows_B1, positions_BT].set(v.astype(v_LBSKD.dtype), mode="drop")
        y = attn_lib.attention_cached(q, k_LBSKD[layer], v_LBSKD[layer], positions_BT, window=window,
                                     backend=backend)
        cache_kv = (k_LBSKD, v_LBSKD)
    return _dense(y.reshape(B, T, H * hd), blk["attn_proj"][layer], fp8), cache_kv


def _mlp_block(x_BTD, layer, p, fp8):
    w_fc, w_proj = p["blocks"]["mlp_fc"][layer], p["blocks"]["mlp_proj"][layer]
    if fp8 and fp8_lib.applies(w_fc):  # (w_proj has the transposed shape: both or neither)
        # Plain autodiff around the FP8 products, as in the reference: the ReLU²'s backward keeps
        # its pre-activation, the second product keeps its quantized input.
        return fp8_lib.linear(jnp.square(jax.nn.relu(fp8_lib.linear(x_BTD, w_fc))), w_proj)
    return mlp(x_BTD, w_fc, w_proj)


@jax.custom_vjp
def mlp(x_BTD, w_fc, w_proj):
    """relu(x W_fc^T)² W_proj^T, with a hand-written backward pass that takes the ReLU²'s
    derivative 2 relu(h) = 2 sqrt(a) from its output a: a is kept anyway as the second product's
    input, so the 4D-wide pre-activation is neither stored (13 GB at d20 with 32 x 2048 tokens)
    nor recomputed. On Hopper the ReLU² and its derivative run in the epilogues of the products
    that produce them (`kernels/matmul_mgpu.py`) instead of as passes of their own."""
    return linear(_relu_squared_product(x_BTD, w_fc), w_proj)


def _mlp_kernels_apply(x_BTK, w, transposed=False):
    """Whether x @ w (x @ w.T if `transposed`) runs as a `kernels/matmul_mgpu.py` kernel: on
    Hopper, for training- and evaluation-sized inputs (decoding's few rows take the XLA path)."""
    from kernels import matmul_mgpu

    return matmul_mgpu.supported(x_BTK, w, transposed=transposed)


def _relu_squared_product(x_BTD, w_fc):
    """a = relu(x W_fc^T)²."""
    if _mlp_kernels_apply(x_BTD, w_fc, transposed=True):
        from kernels.matmul_mgpu import relu_squared_matmul

        return relu_squared_matmul(x_BTD, w_fc)
    return jnp.square(jax.nn.relu(linear(x_BTD, w_fc)))


def _relu_squared_product_grad(g_BTD, w_proj, a):
    """The gradient at the pre-activation h: (g W_proj) · 2 sqrt(a)."""
    if _mlp_kernels_apply(g_BTD, w_proj):
        from kernels.matmul_mgpu import relu_squared_grad_matmul

        return relu_squared_grad_matmul(g_BTD, w_proj, a)
    da = jnp.einsum("...o,of->...f", g_BTD, w_proj)
    return ((2 * da.astype(jnp.float32)) * jnp.sqrt(a.astype(jnp.float32))).astype(a.dtype)


def _mlp_fwd(x_BTD, w_fc, w_proj):
    a = _relu_squared_product(x_BTD, w_fc)
    return linear(a, w_proj), (x_BTD, a, w_fc, w_proj)


WEIGHT_GRADIENT_SPLITS = 2


def _weight_gradient(g_BTO, x_BTI):
    """sum over (b, t) of g ⊗ x, (O, I), in g's dtype, as WEIGHT_GRADIENT_SPLITS products over
    slices of the batch whose float32 results are added: one product over all 65,536 tokens of a
    micro-step has too few output tiles for the GPU's 132 SMs (measured: docs/perf_notes.md
    section 12). With the batch sharded, the slices are the devices' own rows or groups of them;
    the sums are the same."""
    B = g_BTO.shape[0]
    n = WEIGHT_GRADIENT_SPLITS if B % WEIGHT_GRADIENT_SPLITS == 0 else 1
    g = g_BTO.reshape(n, -1, g_BTO.shape[-1])
    x = x_BTI.reshape(n, -1, x_BTI.shape[-1])
    return jnp.einsum("nso,nsi->noi", g, x, preferred_element_type=jnp.float32).sum(0).astype(g_BTO.dtype)


def _mlp_bwd(residuals, g_BTD):
    x_BTD, a, w_fc, w_proj = residuals
    dh = _relu_squared_product_grad(g_BTD, w_proj, a)
    return jnp.einsum("...f,fi->...i", dh, w_fc), _weight_gradient(dh, x_BTD), _weight_gradient(g_BTD, a)


mlp.defvjp(_mlp_fwd, _mlp_bwd)


def forward(params: dict, tokens_BT, config: GPTConfig, *, dtype=None, attention_backend: str = "xla",
            cache: KVCache | None = None, num_new_B=None, last_only: bool = False):
    """Logits (B, T, vocab_size) in float32 for int tokens (B, T).

    Without a cache (training, evaluation) T >= 2 and the result is the logits. With a cache, row b's
    tokens continue it at positions lengths_B[b] + t; only the first num_new_B[b] of them (default
    all T) are real, the rest is padding whose keys are never attended to and whose logits mean
    nothing. Returns (logits, new_cache) with the lengths advanced by num_new_B; `last_only` keeps
    just each row's last real position, (B, vocab_size), which spares a prefill the (B, T, V) logits.
    """
    p = _cast(params, dtype)
    B, T = tokens_BT.shape
    if cache is not None:
        num_new_B = jnp.full((B,), T, jnp.int32) if num_new_B is None else num_new_B.astype(jnp.int32)
    rows = embedding_rows(params, tokens_BT, config, dtype)
    x, x_embed, cache_kv = _trunk(p, rows, config, attention_backend, cache)
    if cache is not None:
        last_B = jnp.clip(num_new_B - 1, 0, T - 1)
        if last_only:
            x = jnp.take_along_axis(x, last_B[:, None, None], axis=1)[:, 0]
    logits = _head(x, p, config)
    if cache is None:
        return logits
    last_x_BD = jnp.take_along_axis(x_embed, last_B[:, None, None], axis=1)[:, 0]
    prev_x_BD = jnp.where((num_new_B > 0)[:, None], last_x_BD, cache.prev_x_BD).astype(cache.prev_x_BD.dtype)
    return logits, KVCache(*cache_kv, cache.lengths_B + num_new_B, prev_x_BD)


EMBEDDING_TABLES = ("wte", "value_embeds")


def _dtype(dtype):
    return compute_dtype() if dtype is None else jnp.dtype(dtype)


def _cast(params, dtype):
    """Every weight in the compute dtype, without the embedding tables: only the looked-up rows are
    cast (`embedding_rows`), so the whole tables are never copied (casting them here cost a copy of
    11 tables per micro-step at d20). Master weights stay float32 outside."""
    dtype = _dtype(dtype)
    return {k: jax.tree.map(lambda w: w.astype(dtype), v) for k, v in params.items() if k not in EMBEDDING_TABLES}


def embedding_rows(params, tokens_BT, config: GPTConfig, dtype=None):
    """What the tokens look up in the embedding tables, in the compute dtype: {"wte": (B, T, D),
    "value_embeds": one (B, T, D_kv) array per value-embedding layer}. The trunk sees only these
    rows, so training can differentiate with respect to them and scatter-add their gradients into
    its accumulated table gradients itself (`add_row_gradients`): autodiff through the lookup
    would scatter them into zero-filled full-size tables first and then add those (three 1.7 GB
    buffers and their sums per micro-step at d20)."""
    dtype = _dtype(dtype)
    ve = [_value_embedding(params["value_embeds"], i, tokens_BT) for i in range(len(config.value_embedding_layers))]
    return {"wte": params["wte"][tokens_BT].astype(dtype), "value_embeds": [r.astype(dtype) for r in ve]}


def add_row_gradients(tables, row_grads, tokens_BT):
    """`tables` ({"wte", "value_embeds"}, float32) plus the gradients of the rows `embedding_rows`
    looked up for `tokens_BT`, scatter-added where they came from: in place when `tables` is
    donated (the training step's accumulator)."""
    n, V, K = tables["value_embeds"].shape
    ve = tables["value_embeds"].reshape(n * V, K)
    for i, g in enumerate(row_grads["value_embeds"]):
        ve = ve.at[i * V + tokens_BT].add(g.astype(ve.dtype))
    wte = tables["wte"].at[tokens_BT].add(row_grads["wte"].astype(tables["wte"].dtype))
    return {"wte": wte, "value_embeds": ve.reshape(n, V, K)}


def _unstack(p):
    """The layer-stacked leaves as lists of per-layer arrays, split once. Its transpose joins the
    per-layer gradients with one concatenation; indexing the stacks layer by layer instead would
    build a full-size gradient for every layer and add them up (a quarter of a d20 step)."""
    def split(a):
        return [jnp.squeeze(x, 0) for x in jnp.split(a, a.shape[0])]

    return {**p, "blocks": {k: split(v) for k, v in p["blocks"].items()}}


def _value_embedding(tables, index, tokens_BT):
    """Rows of table `index` of the stacked value-embedding tables, gathered from the stack seen as
    one long table (no per-table slice is copied)."""
    n, V, K = tables.shape
    return tables.reshape(n * V, K)[index * V + tokens_BT]


def _trunk(p, rows, config, attention_backend, cache, fp8=False):
    """The final normalized hidden states (B, T, D), the normalized embeddings (smear's input for
    the next decode step) and the updated per-layer keys/values (None without a cache), from the
    tokens' `embedding_rows`. `fp8`: see `_dense`."""
    p = _unstack(p)
    dtype = p["lm_head"].dtype
    B, T, _ = rows["wte"].shape
    if cache is None:
        positions = jnp.arange(T)  # (T,): every row starts at 0
        prev_x_BD = jnp.zeros((B, config.n_embd), dtype)
    else:
        positions = cache.lengths_B[:, None] + jnp.arange(T)  # (B, T)
        prev_x_BD = cache.prev_x_BD.astype(dtype)
    rotary = rotary_tables(*rotary_cos_sin(positions, config.head_dim, dtype))

    x = rms_norm(rows["wte"])
    # Smear: each position takes in a gated share of the previous token's embedding; the first
    # token of a sequence has none (in training that is t = 0, when decoding a row's slot 0).
    x_prev_BTD = jnp.concatenate([prev_x_BD[:, None], x[:, :-1]], axis=1)
    gate_BT1 = p["smear_lambda"] * jax.nn.sigmoid(_dense(x[..., :SMEAR_GATE_CHANNELS], p["smear_gate"], fp8))
    x_embed = x
    x = x + jnp.where((positions > 0)[..., None], gate_BT1 * x_prev_BTD, 0)

    cache_kv = None if cache is None else (cache.k_LBSKD, cache.v_LBSKD)
    x0 = x
    backout_layer = config.n_layer // 2
    x_backout = None
    for layer, window in enumerate(config.window_sizes):
        x = p["resid_lambdas"][layer] * x + p["x0_lambdas"][layer] * x0
        ve = None
        if layer in config.value_embedding_layers:
            ve = rows["value_embeds"][config.value_embedding_layers.index(layer)]
        y, cache_kv = _attention_block(rms_norm(x), layer, ve, rotary, p, config, window, attention_backend,
                                       cache_kv, positions, fp8)
        x = x + y
        x = x + _mlp_block(rms_norm(x), layer, p, fp8)
        if layer == backout_layer:
            x_backout = x
    return rms_norm(x - p["backout_lambda"] * x_backout), x_embed, cache_kv


def _head(x, p, config):
    """Softcapped float32 logits, cropped to the real vocabulary."""
    return _softcap(linear(x, p["lm_head"])[..., : config.vocab_size])


def _softcap(z):
    return SOFTCAP * jnp.tanh(z.astype(jnp.float32) / SOFTCAP)


def loss_sum(params, tokens_BT, targets_BT, config: GPTConfig, *, dtype=None, attention_backend: str = "xla",
             chunk_len: int = 0, weights_BT=None, rows=None, fp8: bool = False):
    """Summed token losses and the number of counted targets (-1 = ignored). With `weights_BT` each
    counted token's loss is multiplied by its weight (RL: the sample's advantage); the count is unchanged.
    `rows`: the tokens' `embedding_rows`, when the caller looked them up (then `params` needs no
    embedding tables). `fp8`: the linear layers' products in FP8 (`nanochat_jax/fp8.py`), for
    training only.

    With `chunk_len` > 0 the head runs over `chunk_len` positions of every row at a time and is
    recomputed in the backward pass: the logits of the whole batch (4.3 GB in bf16 at 32 x 2048 x
    32768) never exist, only one chunk's. Rows stay whole, so a batch sharded by rows stays so.
    """
    p = _cast(params, dtype)
    rows = embedding_rows(params, tokens_BT, config, dtype) if rows is None else rows
    x_BTD, _, _ = _trunk(p, rows, config, attention_backend, None, fp8)
    fp8 = fp8 and fp8_lib.applies(p["lm_head"])
    if chunk_len <= 0 or chunk_len >= x_BTD.shape[1]:
        return _head_loss(x_BTD, p["lm_head"], targets_BT, weights_BT, config.vocab_size, fp8)
    B, T, D = x_BTD.shape
    pad = -T % chunk_len
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    n = (T + pad) // chunk_len
    x_NBcD = x_BTD.reshape(B, n, chunk_len, D).swapaxes(0, 1)
    t_NBc = targets_BT.reshape(B, n, chunk_len).swapaxes(0, 1)
    xs = (x_NBcD, t_NBc)
    if weights_BT is not None:
        w_BT = jnp.pad(weights_BT, ((0, 0), (0, pad)))
        xs += (w_BT.reshape(B, n, chunk_len).swapaxes(0, 1),)

    @jax.checkpoint
    def chunk(carry, xs):
        total, count = _head_loss(xs[0], p["lm_head"], xs[1], xs[2] if len(xs) > 2 else None, config.vocab_size, fp8)
        return (carry[0] + total, carry[1] + count), None

    (total, count), _ = jax.lax.scan(chunk, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), xs)
    return total, count


def _head_loss(x_BTD, lm_head, targets_BT, weights_BT, vocab_size, fp8):
    """(summed token losses, number of counted targets) of the head on hidden states `x_BTD`."""
    if fp8:
        lm_head = lm_head.astype(x_BTD.dtype)
    total = head_loss_sum(x_BTD, lm_head, targets_BT, weights_BT, vocab_size, fp8)
    return total, jnp.sum(targets_BT != IGNORE_INDEX)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def head_loss_sum(x_BTD, lm_head, targets_BT, weights_BT, vocab_size: int, fp8: bool = False):
    """sum over counted targets of weight x (logsumexp(c) - c[target]), where c = softcap(x W^T)
    in float32 over the first `vocab_size` columns (the rest is the vocabulary's padding); targets
    equal to -1 are ignored and `weights_BT=None` means weight 1.

    The same numbers as `_head` followed by a log-softmax, but the float32 logits never exist.
    Under differentiation the forward pass goes on from each row's log-sum-exp to the gradient at
    the logits for a cotangent of 1 (on a GPU in one kernel, `kernels/cross_entropy.py`: the
    logits are read once and their softcap computed once) and keeps that instead of the logits;
    the backward pass scales the head's two products by the cotangent. `fp8`: the head's three
    products in FP8 (`nanochat_jax/fp8.py`); the gradient at the logits is quantized unscaled.
    """
    logits_BTP = (fp8_lib.linear if fp8 else linear)(x_BTD, lm_head)
    lse_BT = _log_sum_exp(logits_BTP, vocab_size)
    return _loss_total(logits_BTP, lse_BT, targets_BT, _loss_coefficients(targets_BT, weights_BT))


def _log_sum_exp(logits_BTP, vocab_size):
    # |c| <= SOFTCAP, so exp(c) cannot overflow: a single pass with no running maximum.
    return jnp.log(jnp.sum(jnp.exp(_softcap(logits_BTP[..., :vocab_size])), axis=-1))


def _loss_coefficients(targets_BT, weights_BT):
    """Each token's weight in the summed loss: 0 for an ignored target, else its weight (or 1)."""
    valid = targets_BT != IGNORE_INDEX
    return jnp.where(valid, 1.0 if weights_BT is None else weights_BT, 0.0)


def _loss_total(logits_BTP, lse_BT, targets_BT, coef_BT):
    target_c_BT = _softcap(jnp.take_along_axis(logits_BTP, jnp.maximum(targets_BT, 0)[..., None], axis=-1)[..., 0])
    return jnp.sum(coef_BT * (lse_BT - target_c_BT))


def _loss_kernel_applies(logits_BTP):
    """Whether the loss and its gradient run as the one-pass Pallas kernel of
    `kernels/cross_entropy.py` (on a GPU; measured in docs/perf_notes.md section 13)."""
    from kernels import cross_entropy

    return cross_entropy.supported(logits_BTP)


def _softcapped_cross_entropy_grad(logits_BTP, targets_BT, coef_BT, vocab_size):
    """(dz, lse): the gradient at the logits of the loss total for a cotangent of 1, in the logits'
    dtype, and each row's log-sum-exp."""
    if _loss_kernel_applies(logits_BTP):
        from kernels.cross_entropy import softcapped_cross_entropy_grad

        return softcapped_cross_entropy_grad(logits_BTP, targets_BT, coef_BT, vocab_size, softcap=SOFTCAP,
                                             interpret=jax.default_backend() != "gpu")
    return _softcapped_cross_entropy_grad_xla(logits_BTP, targets_BT, coef_BT, vocab_size)


def _softcapped_cross_entropy_grad_xla(logits_BTP, targets_BT, coef_BT, vocab_size):
    lse_BT = _log_sum_exp(logits_BTP, vocab_size)
    # The barrier makes the second pass recompute the softcap's tanh: shared, XLA would store the
    # float32 tanh of every logit (8.6 GB at d20) between the two passes.
    logits_BTP, lse_BT = jax.lax.optimization_barrier((logits_BTP, lse_BT))
    c_BTV = _softcap(logits_BTP[..., :vocab_size])
    is_target = jnp.arange(vocab_size) == targets_BT[..., None]
    dc_BTV = coef_BT[..., None] * (jnp.exp(c_BTV - lse_BT[..., None]) - is_target)
    dz_BTV = dc_BTV * (1 - jnp.square(c_BTV / SOFTCAP))  # d softcap(z) / dz = 1 - tanh^2
    pad = [(0, 0)] * (dz_BTV.ndim - 1) + [(0, logits_BTP.shape[-1] - vocab_size)]
    return jnp.pad(dz_BTV, pad).astype(logits_BTP.dtype), lse_BT


def _head_loss_sum_fwd(x_BTD, lm_head, targets_BT, weights_BT, vocab_size, fp8):
    if fp8:
        logits_BTP, product = fp8_lib.product_fwd(x_BTD, lm_head)
    else:
        logits_BTP, product = linear(x_BTD, lm_head), (x_BTD, lm_head)
    coef_BT = _loss_coefficients(targets_BT, weights_BT)
    dz_BTP, lse_BT = _softcapped_cross_entropy_grad(logits_BTP, targets_BT, coef_BT, vocab_size)
    return _loss_total(logits_BTP, lse_BT, targets_BT, coef_BT), (product, dz_BTP)


def _head_loss_sum_bwd(vocab_size, fp8, residuals, g):
    product, dz_BTP = residuals
    if fp8:  # x, W and so the logits and dz share one dtype (`_head_loss`)
        (dx, dw), x_dtype, w_dtype = fp8_lib.product_bwd(product, dz_BTP, jnp.float32), dz_BTP.dtype, dz_BTP.dtype
    else:
        x_BTD, lm_head = product
        dx = jnp.einsum("...o,oi->...i", dz_BTP, lm_head, preferred_element_type=jnp.float32)
        dw = jnp.einsum("...o,...i->oi", dz_BTP, x_BTD, preferred_element_type=jnp.float32)
        x_dtype, w_dtype = x_BTD.dtype, lm_head.dtype
    return (g * dx).astype(x_dtype), (g * dw).astype(w_dtype), None, None


head_loss_sum.defvjp(_head_loss_sum_fwd, _head_loss_sum_bwd)


def loss_fn(params, tokens_BT, targets_BT, config: GPTConfig, **loss_kwargs):
    """Mean cross-entropy over the targets that are not -1."""
    total, count = loss_sum(params, tokens_BT, targets_BT, config, **loss_kwargs)
    return total / count
