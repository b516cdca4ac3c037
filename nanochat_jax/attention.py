"""Causal self-attention with GQA and a left sliding window, behind one function.

Backends:
  xla    plain jnp; always available; the oracle every other backend is tested against.
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only.
  pallas our flash-attention kernels: on a Hopper GPU (bf16/fp16, head_dim 64 or 128) the
         Mosaic GPU ones (kernels/attention_mgpu.py), on other GPUs and for fp32 the Triton-style
         ones (kernels/attention.py), which the Pallas interpreter runs elsewhere (slow: tests).

Layout is (B, T, H, D) for queries and (B, T, H_kv, D) for keys and values, H a multiple of H_kv.
`window` w means query t sees keys t - w ... t; None means unlimited (plain causal).
"""

import jax
import jax.numpy as jnp

BACKENDS = ("xla", "cudnn", "pallas")


def default_backend() -> str:
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def attention(q_BTHD, k_BTKD, v_BTKD, *, window: int | None, backend: str = "xla"):
    T = q_BTHD.shape[1]
    if window is not None and window >= T - 1:
        window = None  # every key of the causal prefix is inside the window anyway
    if backend == "xla":
        return _attention_xla(q_BTHD, k_BTKD, v_BTKD, window)
    if backend == "cudnn":
        return jax.nn.dot_product_attention(
            q_BTHD, k_BTKD, v_BTKD, is_causal=True,
            local_window_size=None if window is None else (window, 0),
            implementation="cudnn",
        )
    if backend == "pallas":
        from kernels import attention, attention_mgpu

        if attention_mgpu.supported(q_BTHD):
            return attention_mgpu.flash_attention(q_BTHD, k_BTKD, v_BTKD, causal=True, window=window)
        return attention.flash_attention(q_BTHD, k_BTKD, v_BTKD, causal=True, window=window,
                                         interpret=jax.default_backend() != "gpu")
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def _attention_xla(q_BTHD, k_BTKD, v_BTKD, window):
    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    # GQA without repeating k/v: group the query heads that share a key/value head.
    q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
    scores_BKGTS = jnp.einsum(
        "btkgd,bskd->bkgts", q_BTKGD, k_BTKD, preferred_element_type=jnp.float32
    ) * (D ** -0.5)
    t = jnp.arange(T)[:, None]
    s = jnp.arange(T)[None, :]
    visible_TS = s <= t
    if window is not None:
        visible_TS &= t - s <= window
    scores_BKGTS = jnp.where(visible_TS, scores_BKGTS, -jnp.inf)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BTKD.dtype)
    out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS, v_BTKD)
    return out_BTKGD.reshape(B, T, H, D)


def attention_cached(q_BTHD, k_BSKD, v_BSKD, positions_BT, *, window: int | None, backend: str = "xla"):
    """Queries at absolute positions `positions_BT` (consecutive within a row) against a KV cache
    whose slot s holds position s. Key s is visible to the query at p iff s <= p and p - s <= window.

    backend "pallas" runs the split-K decode kernel (kernels/attention.py); any other is this plain
    jnp version, which runs everywhere (cuDNN has no kernel for a cache with per-row lengths).

    Sliding-window layers read only the slots their queries can see: a window of w + T slots cut
    per row out of the full-length cache with a dynamic slice. A ring buffer of w + 1 slots would
    also save the memory, but it would give sliding layers another cache layout than full ones (the
    cache is one array stacked over layers), and a prefill that wraps around the ring would need a
    second write path. Memory is not what decoding runs out of at a 2k context; bytes read per step
    are, and the slice already reads only the window.
    """
    if backend == "pallas":
        from kernels.attention import decode_attention

        return decode_attention(q_BTHD, k_BSKD, v_BSKD, positions_BT, window=window,
                                interpret=jax.default_backend() != "gpu")
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    span = S if window is None else min(S, window + T)
    start_B = jnp.zeros((B,), jnp.int32)
    if span < S:
        start_B = jnp.clip(positions_BT[:, 0] - window, 0, S - span).astype(jnp.int32)
        take = jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, span, axis=0))
        k_BSKD, v_BSKD = take(k_BSKD, start_B), take(v_BSKD, start_B)
    key_pos_BS = start_B[:, None] + jnp.arange(span)
    q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
    scores_BKGTS = jnp.einsum(
        "btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32
    ) * (D ** -0.5)
    delta_BTS = positions_BT[:, :, None] - key_pos_BS[:, None, :]
    visible_BTS = delta_BTS >= 0
    if window is not None:
        visible_BTS &= delta_BTS <= window
    scores_BKGTS = jnp.where(visible_BTS[:, None, None], scores_BKGTS, -jnp.inf)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKD.dtype)
    out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS, v_BSKD)
    return out_BTKGD.reshape(B, T, H, D)
