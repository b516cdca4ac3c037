"""Model configuration and the single `--depth` dial.

Everything about the architecture's shape derives from `depth`, exactly as the reference does it:
width = depth x 64 rounded up to a whole number of 128-wide heads, one head per 128 channels,
2048-token context, a 32768-token vocabulary. The precision policy (what dtype the matmuls run in)
lives here too because every stage asks the same question.
"""

import dataclasses
import math
import os

ASPECT_RATIO = 64
HEAD_DIM = 128
VOCAB_PAD_MULTIPLE = 64  # wte, lm_head and value embeddings are padded; logits are cropped back
VE_GATE_CHANNELS = 12  # value-embedding gate reads this many leading channels of the block input
SMEAR_GATE_CHANNELS = 24  # smear gate reads this many leading channels of the embedding


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hashable, so it can be a static argument of jitted functions."""

    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if not self.window_pattern or set(self.window_pattern.upper()) - set("SL"):
            raise ValueError(f"window_pattern={self.window_pattern!r}: use only the letters S and L")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @property
    def window_sizes(self) -> tuple[int, ...]:
        """Per-layer left window: query t sees keys t - w ... t (w + 1 keys).

        "L" is `sequence_len` itself (not unlimited: on longer inputs even long layers slide, as in
        the reference); "S" is a quarter of it rounded up to 128; the last layer is always "L".
        """
        long_window = self.sequence_len
        short_window = -(-long_window // 4 // 128) * 128
        pattern = self.window_pattern.upper()
        sizes = [short_window if pattern[i % len(pattern)] == "S" else long_window for i in range(self.n_layer)]
        sizes[-1] = long_window
        return tuple(sizes)

    @property
    def value_embedding_layers(self) -> tuple[int, ...]:
        """Layers with a value embedding: every other one, always including the last."""
        return tuple(i for i in range(self.n_layer) if i % 2 == (self.n_layer - 1) % 2)

    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_from_depth(
    depth: int,
    *,
    vocab_size: int = 32768,
    sequence_len: int = 2048,
    window_pattern: str = "SSSL",
    n_kv_head: int | None = None,
    aspect_ratio: int = ASPECT_RATIO,
    head_dim: int = HEAD_DIM,
) -> GPTConfig:
    """The reference's depth dial: width, heads and everything else follow from `depth`."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_head if n_kv_head is None else n_kv_head,
        n_embd=model_dim,
        window_pattern=window_pattern,
    )


# --- precision policy -------------------------------------------------------------------------
# Master weights, optimizer state, softcap and loss are always float32. Matmuls and activations run
# in the compute dtype: bfloat16 on accelerators, float32 on CPU, or whatever NANOCHAT_DTYPE says.

DTYPE_ENV = "NANOCHAT_DTYPE"
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def compute_dtype():
    """The dtype activations and matmuls use (a jnp dtype). Asks jax for the backend only when called."""
    import jax.numpy as jnp

    name = os.environ.get(DTYPE_ENV, "").strip().lower()
    if name:
        if name not in _DTYPE_NAMES:
            raise ValueError(f"{DTYPE_ENV}={name!r}: expected one of {sorted(set(_DTYPE_NAMES))}")
        return jnp.dtype(_DTYPE_NAMES[name])
    import jax

    return jnp.dtype("float32" if jax.default_backend() == "cpu" else "bfloat16")
