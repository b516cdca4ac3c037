"""Causal self-attention with GQA and a left sliding window, behind one function.

Backends:
  xla    plain jnp; always available; the oracle every other backend is tested against.
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only.

Layout is (B, T, H, D) for queries and (B, T, H_kv, D) for keys and values, H a multiple of H_kv.
`window` w means query t sees keys t - w ... t; None means unlimited (plain causal).
"""

import jax
import jax.numpy as jnp

BACKENDS = ("xla", "cudnn")


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
