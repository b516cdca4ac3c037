"""Batched, jitted scoring of token sequences: the engine under CORE and the categorical chat evals.

Evaluations hand over many short rows of different lengths. Each row is right-padded to a length
bucket from a short fixed ladder (64, 128, 192, ..., 1536, 2048, 2560, ...), so the forward compiles
once per bucket instead of once per example; padding on the right is exact because attention is
causal (no real position ever sees a pad). Rows of one bucket go through in batches of a fixed row
count (a smaller power of four for a short last batch), split over the mesh's "data" axis; the
parameters are sharded as in training. Rows are batched in a fixed order, so the same evaluation
twice gives identical numbers.

The numbers are those of the reference's scoring: per position, the cross-entropy of the next token
under the float32 logits and the argmax prediction; or the logits of a few candidate tokens at one
position (the categorical chat evals).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import model, sharding
from nanochat_jax.config import GPTConfig, compute_dtype

MIN_BUCKET = 64
CANDIDATE_WIDTH = 8  # candidates per row are padded to a multiple of this (choices A-D, A-E, ...)


def bucket_length(n: int) -> int:
    """The smallest ladder length >= n. Steps are half an octave up to 2048 and a quarter above,
    where attention's quadratic cost makes padding dear: at most 1.5x (2x below 128) padding."""
    size, octave = MIN_BUCKET, MIN_BUCKET
    while size < n:
        step = octave // 4 if octave >= 2048 else octave // 2 if octave >= 2 * MIN_BUCKET else octave
        size += step
        if size >= 2 * octave:
            octave *= 2
    return size


@functools.partial(jax.jit, static_argnames=("config", "dtype", "attention_backend"))
def _next_token_scores(params, tokens_BT, *, config, dtype, attention_backend):
    """Loss of token t+1 given tokens <= t, and the argmax prediction, at every position t (the last
    column pairs with a wrapped-around target and means nothing)."""
    logits = model.forward(params, tokens_BT, config, dtype=dtype, attention_backend=attention_backend)
    targets = jnp.roll(tokens_BT, -1, axis=1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    losses = jax.nn.logsumexp(logits, axis=-1) - target_logit
    return losses, jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "attention_backend"))
def _candidate_logits(params, tokens_BT, positions_B, candidates_BC, *, config, dtype, attention_backend):
    """The logits of a few candidate tokens at one position per row: (B, C)."""
    logits = model.forward(params, tokens_BT, config, dtype=dtype, attention_backend=attention_backend)
    at_BV = jnp.take_along_axis(logits, positions_B[:, None, None], axis=1)[:, 0]
    return jnp.take_along_axis(at_BV, candidates_BC, axis=1)


def _to_host(x) -> np.ndarray:
    if jax.process_count() > 1:  # each host holds only its rows: gather them all
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class Scorer:
    """A model placed on a mesh, ready to score rows of token ids in bucketed, sharded batches.

    `batch_tokens` bounds the padded tokens of one batch (rows = batch_tokens // bucket, rounded up
    to a multiple of the data-axis size); it trades memory for speed and never changes a number
    beyond float rounding.
    """

    def __init__(self, params, config: GPTConfig, mesh, *, pad_id: int, batch_tokens: int = 32768,
                 dtype=None, attention_backend: str = "xla", progress: bool = True):
        self.config, self.mesh, self.pad_id = config, mesh, pad_id
        self.batch_tokens = batch_tokens
        self.dtype = (compute_dtype() if dtype is None else jnp.dtype(dtype)).name
        self.attention_backend = attention_backend
        self.progress = progress and jax.process_index() == 0
        self.params = jax.device_put(params, sharding.param_shardings(config, mesh))
        self._rows_sharding = sharding.batch_sharding(mesh)
        self._vector_sharding = sharding.batch_sharding(mesh, ndim=1)
        self.shapes: set[tuple[int, int]] = set()  # (rows, length) of every batch so far: one compile each

    def _static(self):
        return dict(config=self.config, dtype=self.dtype, attention_backend=self.attention_backend)

    def _batches(self, rows: list[list[int]], desc: str | None):
        """Yield (row indices, padded host array) per batch: rows grouped by bucket, in order."""
        n_data = self.mesh.shape["data"]
        by_bucket: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            if len(row) < 2:
                raise ValueError(f"row {i} has {len(row)} token(s); scoring needs at least 2")
            by_bucket.setdefault(bucket_length(len(row)), []).append(i)
        plan = []
        for length in sorted(by_bucket):
            most = -(-max(1, self.batch_tokens // length) // n_data)  # rows per device in a full batch
            members = by_bucket[length]
            for k in range(0, len(members), most * n_data):
                chunk = members[k:k + most * n_data]
                # A short batch shrinks to a power of four rows per device: each shape is one more
                # compile (costly for big models on GPUs), each padding row wasted work; four balances them.
                need, per_device = -(-len(chunk) // n_data), 1
                while per_device < need:
                    per_device *= 4
                per_device = min(most, per_device)
                plan.append((length, per_device * n_data, chunk))
                self.shapes.add((per_device * n_data, length))
        from tqdm import tqdm

        for length, per_batch, members in tqdm(plan, desc=desc, unit="batch", leave=False,
                                               disable=not self.progress or len(plan) < 2):
            block = np.full((per_batch, length), self.pad_id, np.int32)
            for r, i in enumerate(members):
                block[r, :len(rows[i])] = rows[i]
            yield members, block

    def _local(self, block: np.ndarray) -> np.ndarray:
        """This process's share of a batch (all of it on one host)."""
        n = block.shape[0] // jax.process_count()
        return block[jax.process_index() * n:(jax.process_index() + 1) * n]

    def _run(self, batches, launch, collect):
        """Dispatch each batch (`launch`, asynchronous) before reading back the one before it
        (`collect`), so the host pads and transfers while the devices compute."""
        pending = None
        for members, block in batches:
            launched = (members, launch(members, block))
            if pending is not None:
                collect(*pending)
            pending = launched
        if pending is not None:
            collect(*pending)

    def next_token_scores(self, rows: list[list[int]], desc: str | None = None):
        """For every row: (losses, predictions), each of length len(row) - 1, where losses[t] is
        -log p(row[t+1] | row[:t+1]) and predictions[t] the argmax token after row[:t+1]."""
        out = [None] * len(rows)

        def launch(members, block):
            tokens = sharding.global_batch(self._local(block), self._rows_sharding)
            return _next_token_scores(self.params, tokens, **self._static())

        def collect(members, result):
            losses, preds = map(_to_host, result)
            for r, i in enumerate(members):
                n = len(rows[i]) - 1
                out[i] = (losses[r, :n], preds[r, :n])

        self._run(self._batches(rows, desc), launch, collect)
        return out

    def candidate_logits(self, rows: list[list[int]], positions: list[int], candidates: list[list[int]],
                         desc: str | None = None) -> list[np.ndarray]:
        """For every row: the logits of its candidate token ids at its position."""
        if not rows:
            return []
        width = -(-max(len(c) for c in candidates) // CANDIDATE_WIDTH) * CANDIDATE_WIDTH  # one shape, one compile
        out = [None] * len(rows)

        def launch(members, block):
            pos = np.zeros(block.shape[0], np.int32)
            cand = np.zeros((block.shape[0], width), np.int32)
            for r, i in enumerate(members):
                pos[r] = positions[i]
                cand[r, :len(candidates[i])] = candidates[i]
            return _candidate_logits(
                self.params, sharding.global_batch(self._local(block), self._rows_sharding),
                sharding.global_batch(self._local(pos), self._vector_sharding),
                sharding.global_batch(self._local(cand), self._rows_sharding), **self._static())

        def collect(members, logits):
            logits = _to_host(logits)
            for r, i in enumerate(members):
                out[i] = logits[r, :len(candidates[i])]

        self._run(self._batches(rows, desc), launch, collect)
        return out
