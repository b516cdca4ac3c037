"""Bits per byte: the loss normalised by the bytes the target tokens stand for.

Unlike the mean loss it does not depend on the vocabulary, so models with different tokenizers
compare. Special tokens (0 bytes) and ignored targets (-1) do not count.
"""

import functools
import math

import jax
import jax.numpy as jnp

from nanochat_jax import model
from nanochat_jax.config import GPTConfig


@functools.partial(jax.jit, static_argnames=("config", "dtype", "attention_backend"))
def nats_and_bytes(params, tokens_BT, targets_BT, token_bytes_V, *, config: GPTConfig, dtype, attention_backend):
    """Summed loss (nats) over the counted targets of one batch, and the bytes they stand for."""
    logits = model.forward(params, tokens_BT, config, dtype=dtype, attention_backend=attention_backend)
    valid = targets_BT != model.IGNORE_INDEX
    safe = jnp.where(valid, targets_BT, 0)
    bytes_BT = jnp.where(valid, token_bytes_V[safe], 0)
    losses = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, safe[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(bytes_BT > 0, losses, 0.0)), jnp.sum(bytes_BT)


def evaluate_bpb(params, batches, num_batches: int, token_bytes_V, *, config, dtype, attention_backend,
                 to_global=lambda x: x) -> float:
    """Bits per byte over `num_batches` batches of `(tokens, targets)`; `to_global` places a host
    batch on the mesh. Sums are accumulated on device and read once at the end."""
    total_nats, total_bytes = 0.0, 0
    for _ in range(num_batches):
        tokens, targets = next(batches)
        nats, nbytes = nats_and_bytes(params, to_global(tokens), to_global(targets), token_bytes_V,
                                      config=config, dtype=dtype, attention_backend=attention_backend)
        total_nats, total_bytes = total_nats + nats, total_bytes + nbytes
    total_bytes = int(total_bytes)
    return float(total_nats) / (math.log(2) * total_bytes) if total_bytes else float("inf")
