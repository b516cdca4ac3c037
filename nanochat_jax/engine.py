"""KV-cache inference: jitted prefill, an on-device decode loop, sampling, tool use, streaming.

How a request flows. Its prompt is prefilled into a small cache, padded to a length bucket (powers
of two) so that a handful of compiled shapes serve every prompt; the rows of that cache are copied
into free rows ("slots") of one fixed-size batch cache (a prompt with n samples fills n slots from
one prefill). Then `_decode_chunk` runs up to `chunk` tokens for every slot in one device call: a
while_loop that feeds each token through the model, samples the next on device and stops a row at
<|assistant_end|>/<|bos|>, at <|python_end|> (to let the host run the tool), at its token budget or
when its cache is full. Between chunks the host reads the new tokens, runs the tool-use state
machine (the calculator's answer is forced into the row as <|output_start|>…<|output_end|> at the
start of the next chunk), hands the tokens to whoever waits for them, retires finished rows and
admits waiting requests into free slots — so requests arriving while others decode join the same
batch (continuous batching).

Randomness: row r of a request draws its t-th token with the key
fold_in(fold_in(fold_in(key(seed), stream), sample), t): independent of the batch it shares and
of the chunk size, so a seed reproduces its text and every sample of a prompt differs.
"""

import collections
import dataclasses
import functools
import os
import queue
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import model
from nanochat_jax.config import GPTConfig, compute_dtype

MIN_BUCKET = 16


def bucket(n: int, cap: int) -> int:
    """Padded size for n: the next power of two from MIN_BUCKET on, at most `cap`."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return min(size, cap)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# --- device side --------------------------------------------------------------------------------

def sample_tokens(logits_BV, keys_B, temperature_B, top_k_B, top_p_B):
    """One token per row: argmax where temperature is 0, else a draw at that temperature from the
    top_k (0 = all) most likely tokens, cut further to the smallest set holding top_p of their mass."""
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def draw(_):
        V = logits_BV.shape[-1]
        sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
        rank_V = jnp.arange(V)
        k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
        t_B1 = jnp.maximum(temperature_B, 1e-6)[:, None]
        in_k_BV = rank_V < k_B[:, None]
        probs_BV = jax.nn.softmax(jnp.where(in_k_BV, sorted_BV / t_B1, -jnp.inf), axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        in_p_BV = (mass_before_BV < top_p_B[:, None]) | (top_p_B[:, None] >= 1.0)
        n_keep_B = jnp.maximum(jnp.sum(in_k_BV & in_p_BV, axis=-1), 1)
        threshold_B1 = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
        masked_BV = jnp.where(logits_BV >= threshold_B1, logits_BV / t_B1, -jnp.inf)
        return jax.vmap(jax.random.categorical)(keys_B, masked_BV).astype(jnp.int32)

    # All-greedy batches (evals, benchmarks) skip the vocabulary sort.
    drawn_B = jax.lax.cond(jnp.any(temperature_B > 0), draw, lambda _: greedy_B, None)
    return jnp.where(temperature_B > 0, drawn_B, greedy_B)


class DecodeState(NamedTuple):
    cache: model.KVCache
    logits_BV: jax.Array  # float32: each row's distribution for its next token


class Controls(NamedTuple):
    """What the host decides per row for one chunk (small arrays, sent every chunk)."""

    active_B: jax.Array  # bool: the row takes part
    budget_B: jax.Array  # int32: most tokens the row may emit in this chunk
    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array
    seed_B: jax.Array  # uint32
    stream_B: jax.Array  # int32: which prompt of its request
    sample_B: jax.Array  # int32: which sample of that prompt
    count_B: jax.Array  # int32: tokens the row has emitted before this chunk
    forced_BN: jax.Array  # int32: tokens to emit instead of sampling, first n_forced_B of them
    n_forced_B: jax.Array


@functools.partial(jax.jit, static_argnames=("config",))
def _prefill(params, tokens_bT, lengths_b, config: GPTConfig):
    """A fresh cache of length T holding the prompts, and each prompt's next-token logits."""
    b, T = tokens_bT.shape
    dtype = params["wte"].dtype
    cache = model.init_cache(config, b, T, dtype)
    logits_bV, cache = model.forward(params, tokens_bT, config, dtype=dtype, cache=cache,
                                     num_new_B=lengths_b, last_only=True)
    return cache, logits_bV


@functools.partial(jax.jit, donate_argnums=(0,))
def _insert(state: DecodeState, small: model.KVCache, small_logits_bV, src_n, dst_n):
    """Slot dst_n[i] := row src_n[i] of the prefilled cache; dst_n out of range (padding) is dropped."""
    T = small.k_LBSKD.shape[2]

    def put(big, rows):
        return big.at[:, dst_n, :T].set(rows[:, src_n], mode="drop")

    cache = state.cache
    return DecodeState(
        model.KVCache(put(cache.k_LBSKD, small.k_LBSKD), put(cache.v_LBSKD, small.v_LBSKD),
                      cache.lengths_B.at[dst_n].set(small.lengths_B[src_n], mode="drop"),
                      cache.prev_x_BD.at[dst_n].set(small.prev_x_BD[src_n], mode="drop")),
        state.logits_BV.at[dst_n].set(small_logits_bV[src_n], mode="drop"))


@functools.partial(jax.jit, static_argnames=("config", "n_steps", "stop_ids", "pause_id"), donate_argnums=(1,))
def _decode_chunk(params, state: DecodeState, ctl: Controls, config: GPTConfig, n_steps: int,
                  stop_ids: tuple[int, ...], pause_id: int):
    """Up to n_steps tokens for every active row; returns the new state and the tokens (B, n_steps),
    -1 where a row emitted nothing."""
    B = ctl.active_B.shape[0]
    S = state.cache.k_LBSKD.shape[2]
    dtype = params["wte"].dtype
    fold = jax.vmap(jax.random.fold_in)
    row_keys_B = fold(fold(jax.vmap(jax.random.key)(ctl.seed_B), ctl.stream_B), ctl.sample_B)

    def cond(carry):
        i, active_B = carry[0], carry[1]
        return (i < n_steps) & jnp.any(active_B)

    def body(carry):
        i, active_B, state, tokens_BN = carry
        sampled_B = sample_tokens(state.logits_BV, fold(row_keys_B, ctl.count_B + i), ctl.temperature_B,
                                  ctl.top_k_B, ctl.top_p_B)
        forced_now_B = i < ctl.n_forced_B
        token_B = jnp.where(forced_now_B, ctl.forced_BN[:, i], sampled_B)
        token_B = jnp.where(active_B, token_B, -1)
        tokens_BN = tokens_BN.at[:, i].set(token_B)
        # Every emitted token goes into the cache, the stopping ones too (a paused row resumes
        # after its <|python_end|>); inactive rows add nothing and keep their logits.
        logits_BV, cache = model.forward(params, jnp.maximum(token_B, 0)[:, None], config, dtype=dtype,
                                         cache=state.cache, num_new_B=active_B.astype(jnp.int32), last_only=True)
        logits_BV = jnp.where(active_B[:, None], logits_BV, state.logits_BV)
        stops_B = jnp.isin(token_B, jnp.array(stop_ids)) | ((token_B == pause_id) & ~forced_now_B)
        active_B = active_B & ~stops_B & (cache.lengths_B < S) & (i + 1 < ctl.budget_B)
        return i + 1, active_B, DecodeState(cache, logits_BV), tokens_BN

    active_B = ctl.active_B & (ctl.budget_B > 0) & (state.cache.lengths_B < S)
    init = (jnp.int32(0), active_B, state, jnp.full((B, n_steps), -1, jnp.int32))
    _, _, state, tokens_BN = jax.lax.while_loop(cond, body, init)
    return state, tokens_BN


# --- host side ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Sample:
    tokens: list[int]  # generated ids, without the terminating <|assistant_end|>/<|bos|>
    masks: list[int]  # 1 where the model sampled the token, 0 where the tool forced it
    finish_reason: str | None = None  # "stop" (the model ended it) or "length" (max_tokens / context)


class Request:
    """One prompt, how to sample it, and its samples as they grow.

    `events` receives (sample, [new ids]) after every chunk that added tokens, then None once every
    sample has finished; it is the thread-safe way to follow a request that another thread runs.
    """

    def __init__(self, tokens, *, max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float = 1.0, seed: int = 0, num_samples: int = 1, stream: int = 0):
        if not tokens or not all(isinstance(t, (int, np.integer)) for t in tokens):
            raise ValueError("a prompt is a non-empty list of token ids")
        if max_tokens < 1 or num_samples < 1:
            raise ValueError(f"max_tokens ({max_tokens}) and num_samples ({num_samples}) must be at least 1")
        if temperature < 0 or (top_k or 0) < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
        self.tokens = [int(t) for t in tokens]
        self.max_tokens, self.temperature, self.top_k, self.top_p = max_tokens, temperature, top_k or 0, top_p
        self.seed, self.stream = seed % 2**32, stream
        self.samples = [Sample([], []) for _ in range(num_samples)]
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()

    @property
    def done(self) -> bool:
        return all(s.finish_reason for s in self.samples)

    def cancel(self):
        """Stop generating (e.g. the client went away); the batch frees the slots at its next step."""
        self.cancelled.set()


@dataclasses.dataclass
class _Row:
    request: Request
    sample: int
    emitted: int = 0
    forced: collections.deque = dataclasses.field(default_factory=collections.deque)
    in_python: bool = False
    expression: list = dataclasses.field(default_factory=list)


class Batch:
    """A fixed number of slots sharing one KV cache of `cache_len` positions; not thread-safe except
    `submit`, which any thread may call while one thread runs `step`."""

    def __init__(self, engine: "Engine", slots: int, cache_len: int):
        self.engine, self.slots, self.cache_len = engine, slots, cache_len
        config = engine.config
        cache = model.init_cache(config, slots, cache_len, engine.dtype)
        self._state = DecodeState(cache, jnp.zeros((slots, config.vocab_size), jnp.float32))
        self._rows: list[_Row | None] = [None] * slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()

    def submit(self, request: Request) -> Request:
        n = len(request.tokens)
        if n >= self.cache_len:
            raise ValueError(f"the prompt has {n} tokens, but the context holds {self.cache_len} "
                             f"and at least one must be left for the answer")
        if len(request.samples) > self.slots:
            raise ValueError(f"{len(request.samples)} samples do not fit in {self.slots} slots")
        with self._lock:
            self._waiting.append(request)
        return request

    def busy(self) -> bool:
        return bool(self._waiting) or any(self._rows)

    def active_rows(self) -> int:
        return sum(r is not None for r in self._rows)

    def waiting(self) -> int:
        return len(self._waiting)

    def step(self) -> None:
        """Admit what fits, then decode one chunk for every active row."""
        for slot, row in enumerate(self._rows):
            if row is not None and row.request.cancelled.is_set():
                self._finish(slot, "cancelled")
        self._admit()
        if any(self._rows):
            self._decode()

    def run(self, progress=None) -> None:
        while self.busy():
            self.step()
            if progress is not None:
                progress()

    # ---- admission ----------------------------------------------------------------------------

    def _admit(self):
        free = [s for s, r in enumerate(self._rows) if r is None]
        group: list[Request] = []
        with self._lock:
            while self._waiting and len(self._waiting[0].samples) <= len(free) - sum(len(r.samples) for r in group) \
                    and len(group) < self.engine.prefill_rows:
                request = self._waiting.popleft()
                if not request.cancelled.is_set():
                    group.append(request)
                else:
                    self._close(request, "cancelled")
        if not group:
            return
        lengths = [len(r.tokens) for r in group]
        b, T = _pow2(len(group)), bucket(max(lengths), self.cache_len)
        tokens = np.zeros((b, T), np.int32)
        for i, r in enumerate(group):
            tokens[i, : lengths[i]] = r.tokens
        small, logits = _prefill(self.engine.params, tokens, np.array(lengths + [1] * (b - len(group)), np.int32),
                                 config=self.engine.config)
        src, dst = [], []
        for i, request in enumerate(group):
            for sample in range(len(request.samples)):
                slot = free.pop(0)
                self._rows[slot] = _Row(request, sample)
                src.append(i)
                dst.append(slot)
        n = _pow2(len(src))
        src += [0] * (n - len(src))
        dst += [self.slots] * (n - len(dst))  # out of range: dropped
        self._state = _insert(self._state, small, logits, np.array(src, np.int32), np.array(dst, np.int32))

    # ---- decoding -----------------------------------------------------------------------------

    def _decode(self):
        N, B = self.engine.chunk, self.slots
        c = {name: np.zeros(B, dtype) for name, dtype in [
            ("active_B", bool), ("budget_B", np.int32), ("temperature_B", np.float32), ("top_k_B", np.int32),
            ("top_p_B", np.float32), ("seed_B", np.uint32), ("stream_B", np.int32), ("sample_B", np.int32),
            ("count_B", np.int32), ("n_forced_B", np.int32)]}
        c["forced_BN"] = np.zeros((B, N), np.int32)
        for slot, row in enumerate(self._rows):
            if row is None:
                continue
            r = row.request
            c["active_B"][slot] = True
            c["budget_B"][slot] = r.max_tokens - row.emitted
            c["temperature_B"][slot], c["top_k_B"][slot], c["top_p_B"][slot] = r.temperature, r.top_k, r.top_p
            c["seed_B"][slot], c["stream_B"][slot], c["sample_B"][slot] = r.seed, r.stream, row.sample
            c["count_B"][slot] = row.emitted
            forced = list(row.forced)[:N]
            c["forced_BN"][slot, : len(forced)] = forced
            c["n_forced_B"][slot] = len(forced)
        self._state, tokens_BN = _decode_chunk(self.engine.params, self._state, Controls(**c),
                                               config=self.engine.config, n_steps=N,
                                               stop_ids=self.engine.stop_ids, pause_id=self.engine.pause_id)
        tokens_BN = np.asarray(tokens_BN)
        for slot, row in enumerate(self._rows):
            if row is not None:
                self._take(slot, row, [int(t) for t in tokens_BN[slot] if t >= 0])

    def _take(self, slot: int, row: _Row, tokens: list[int]):
        """Book a row's new tokens: the tool-use state machine, stopping, and the request's events."""
        engine, sample = self.engine, row.request.samples[row.sample]
        new, reason = [], None
        for token in tokens:
            forced = bool(row.forced)
            if forced:
                row.forced.popleft()
            row.emitted += 1
            if token in engine.stop_ids:
                reason = "stop"
                break
            new.append(token)
            sample.tokens.append(token)
            sample.masks.append(0 if forced else 1)
            if token == engine.python_start:
                row.in_python, row.expression = True, []
            elif token == engine.pause_id and row.in_python:
                row.in_python = False
                result = engine.tool(engine.tokenizer.decode(row.expression)) if row.expression else None
                if result is not None:
                    row.forced.extend([engine.output_start, *engine.tokenizer.encode(str(result)), engine.output_end])
            elif row.in_python:
                row.expression.append(token)
        if reason is None and (row.emitted >= row.request.max_tokens or
                               len(row.request.tokens) + row.emitted >= self.cache_len):
            reason = "length"
        if new:
            row.request.events.put((row.sample, new))
        if reason:
            self._finish(slot, reason)

    def _finish(self, slot: int, reason: str):
        row = self._rows[slot]
        self._rows[slot] = None
        row.request.samples[row.sample].finish_reason = reason
        if row.request.done:
            row.request.events.put(None)

    def _close(self, request: Request, reason: str):
        for s in request.samples:
            s.finish_reason = reason
        request.events.put(None)


class Engine:
    """A model ready for decoding: weights in the compute dtype, the tokenizer, the tool."""

    def __init__(self, params, config: GPTConfig, tokenizer, *, dtype=None, chunk: int = 32,
                 prefill_rows: int = 8, tool=None):
        self.config, self.tokenizer = config, tokenizer
        self.dtype = jnp.dtype(compute_dtype() if dtype is None else dtype)
        # Every decode step reads every weight: keep them in the compute dtype, cast once here.
        self.params = jax.tree.map(lambda w: jnp.asarray(w, self.dtype), params)
        self.chunk, self.prefill_rows = chunk, prefill_rows
        if tool is None:
            from nanochat_jax.execution import use_calculator as tool
        self.tool = tool
        special = tokenizer.encode_special
        self.stop_ids = (special("<|assistant_end|>"), tokenizer.bos_token_id)
        self.python_start, self.pause_id = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def new_batch(self, slots: int, cache_len: int | None = None) -> Batch:
        return Batch(self, slots, self.config.sequence_len if cache_len is None else cache_len)

    def generate_batch(self, prompts: list[list[int]], *, max_tokens: int, num_samples: int = 1,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0, seed: int = 42,
                       max_slots: int = 128, progress: bool = False) -> list[list[Sample]]:
        """Samples for many prompts at once (evals, RL): for each prompt, its `num_samples` Samples."""
        if not prompts:
            return []
        longest = max(len(p) for p in prompts)
        cache_len = bucket(longest + max_tokens, self.config.sequence_len)
        slots = max(_pow2(min(len(prompts) * num_samples, max_slots)), _pow2(num_samples))
        batch = self.new_batch(slots, cache_len)
        requests = [batch.submit(Request(p, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                         top_p=top_p, seed=seed, num_samples=num_samples, stream=i))
                    for i, p in enumerate(prompts)]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(requests), desc="generate", unit="prompt")
        finished = 0

        def tick():
            nonlocal finished
            now = sum(r.done for r in requests)
            bar.update(now - finished)
            finished = now

        batch.run(tick if bar else None)
        if bar:
            bar.close()
        return [r.samples for r in requests]

    def stream(self, tokens: list[int], *, max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float = 1.0, seed: int = 42, request: Request | None = None):
        """Text of one sample as it is generated, in whole UTF-8 characters. Pass `request` to read
        its finish reason and tokens afterwards."""
        request = request or Request(tokens, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                     top_p=top_p, seed=seed)
        batch = self.new_batch(1, bucket(len(request.tokens) + request.max_tokens, self.config.sequence_len))
        batch.submit(request)
        decoder = self.tokenizer.stream_decoder()
        while batch.busy():
            batch.step()
            while not request.events.empty():
                event = request.events.get_nowait()
                if event is not None:
                    text = "".join(decoder.push(t) for t in event[1])
                    if text:
                        yield text
        tail = decoder.flush()
        if tail:
            yield tail


# --- loading ------------------------------------------------------------------------------------

def load_model(run_dir: str, stage: str, model_tag: str | None = None):
    """(params, config, tokenizer) of the checkpoint `<run_dir>/<stage>/<model_tag>/`; without a tag,
    the only model of that stage (or the most recently written one)."""
    from nanochat_jax.tokenizer import Tokenizer

    stage_dir = os.path.join(run_dir, stage)
    if not os.path.isdir(stage_dir):
        raise FileNotFoundError(f"no {stage!r} models in {run_dir} (missing {stage_dir})")
    if model_tag is None:
        tags = [t for t in os.listdir(stage_dir) if os.path.isdir(os.path.join(stage_dir, t))]
        if not tags:
            raise FileNotFoundError(f"no model in {stage_dir}")
        model_tag = max(tags, key=lambda t: os.path.getmtime(os.path.join(stage_dir, t)))
    directory = os.path.join(stage_dir, model_tag)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no model {model_tag!r} in {stage_dir}")
    from nanochat_jax.checkpoint import restore_params

    params, config = restore_params(os.path.join(directory, "checkpoints"))
    tokenizer = Tokenizer.from_directory(os.path.join(run_dir, "tokenizer"))
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"the tokenizer in {run_dir}/tokenizer has {tokenizer.vocab_size} tokens, "
                         f"the model {config.vocab_size}: they are not from the same run")
    return params, config, tokenizer


def demo_model(seed: int = 0):
    """(params, config, tokenizer) of a tiny random-weight model: for trying the UI without training.
    The tokenizer is trained on a little of the built-in corpus (about a second)."""
    from nanochat_jax import data
    from nanochat_jax.config import config_from_depth
    from nanochat_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(data.iter_texts(max_chars=200_000), 512)
    config = config_from_depth(2, vocab_size=tokenizer.vocab_size, sequence_len=512, aspect_ratio=64, head_dim=64)
    return model.init_params(config, jax.random.key(seed)), config, tokenizer
