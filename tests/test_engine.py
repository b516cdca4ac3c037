"""KV-cache decoding against the full forward, sampling, seeds, tool use, streaming, the cache bound.

Two tiny models, each compiled once: a random one with every weight non-degenerate (so attention,
smear and value embeddings all matter), and a "scripted" one whose greedy output is a chosen
next-token function, for exact tool-use and UTF-8 sequences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax import model
from nanochat_jax.config import GPTConfig
from nanochat_jax.engine import Engine, Request, bucket

SLOTS, CACHE_LEN = 8, 256


@pytest.fixture(scope="module")
def random_engine(tiny_tokenizer):
    config = GPTConfig(sequence_len=256, vocab_size=tiny_tokenizer.vocab_size, n_layer=3, n_head=4, n_kv_head=2,
                       n_embd=64)
    params = model.init_params(config, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 64))
    # init zeroes the output projections and smear; perturb everything so the cache path is exercised
    params = jax.tree.map(lambda w: w + 0.5 * (jnp.std(w) + 0.05) * jax.random.normal(next(keys), w.shape), params)
    params["lm_head"] = params["lm_head"] * 100  # confident predictions: argmax margins far above fp32 noise
    assert config.window_sizes[0] == 128 < CACHE_LEN
    return Engine(params, config, tiny_tokenizer, dtype="float32", chunk=16, prefill_rows=1)


def run(engine, requests, slots=SLOTS, cache_len=CACHE_LEN):
    batch = engine.new_batch(slots, cache_len)
    for r in requests:
        batch.submit(r)
    batch.run()
    assert all(r.done for r in requests)
    return requests


def prompt_of(tokenizer, n):
    ids = tokenizer.encode("Anarchism is a political philosophy and movement that is sceptical of authority " * 4,
                           prepend=tokenizer.bos_token_id)
    assert len(ids) >= n
    return ids[:n]


def test_greedy_with_cache_is_argmax_of_full_forward(random_engine, tiny_tokenizer):
    """Prompts on both sides of the 16/32 prefill bucket boundary, decoding past the 128 window."""
    assert bucket(16, CACHE_LEN) == 16 and bucket(17, CACHE_LEN) == 32
    prompts = [prompt_of(tiny_tokenizer, n) for n in (16, 17, 40)]
    requests = run(random_engine, [Request(p, max_tokens=150, temperature=0.0) for p in prompts])
    config, params = random_engine.config, random_engine.params
    for prompt, r in zip(prompts, requests):
        sample = r.samples[0]
        sequence = prompt + sample.tokens
        assert len(sequence) > 128 + 16 or sample.finish_reason == "stop"
        argmax = np.asarray(jnp.argmax(model.forward(params, jnp.array([sequence]), config, dtype="float32")[0], -1))
        assert argmax[len(prompt) - 1: len(sequence) - 1].tolist() == sample.tokens
        if sample.finish_reason == "stop":
            assert argmax[-1] in random_engine.stop_ids
        assert sample.masks == [1] * len(sample.tokens)


def test_samples_and_seeds(random_engine, tiny_tokenizer):
    prompt = prompt_of(tiny_tokenizer, 20)

    def texts(**kw):
        (r,) = run(random_engine, [Request(prompt, max_tokens=12, **kw)])
        return [s.tokens for s in r.samples]

    four = texts(temperature=1.0, seed=7, num_samples=4)
    assert len({s[0] for s in four}) > 1, "every sample drew the same first token"
    assert texts(temperature=1.0, seed=7, num_samples=4) == four
    assert texts(temperature=1.0, seed=8, num_samples=4) != four
    greedy = texts(temperature=0.0)[0]
    assert texts(temperature=1.0, top_k=1, seed=3)[0] == greedy
    assert texts(temperature=1.0, top_p=1e-6, seed=3)[0] == greedy
    assert texts(temperature=1.0, top_k=0, seed=3)[0] == texts(temperature=1.0, top_k=None, seed=3)[0]
    # the same request in a different batch position and company draws the same text
    r1, r2 = run(random_engine, [Request(prompt[:5], max_tokens=12, temperature=1.0, seed=1),
                                 Request(prompt, max_tokens=12, temperature=1.0, seed=7, num_samples=4)])
    assert [s.tokens for s in r2.samples] == four


def test_cache_bound(random_engine, tiny_tokenizer):
    prompt = prompt_of(tiny_tokenizer, 40)
    batch = random_engine.new_batch(SLOTS, CACHE_LEN)
    r = batch.submit(Request(prompt, max_tokens=10_000, temperature=1.0, top_k=0))
    shapes = jax.tree.map(jnp.shape, batch._state)
    batch.run()
    assert jax.tree.map(jnp.shape, batch._state) == shapes
    s = r.samples[0]
    assert s.finish_reason == "length" or s.finish_reason == "stop"
    if s.finish_reason == "length":
        assert len(prompt) + len(s.tokens) == CACHE_LEN
    assert int(np.max(np.asarray(batch._state.cache.lengths_B))) <= CACHE_LEN
    with pytest.raises(ValueError, match="the context holds 256"):
        batch.submit(Request(list(range(256)), max_tokens=1))


# --- a scripted model: greedy decoding follows a chosen next-token table ------------------------

@pytest.fixture(scope="module")
def scripted(tiny_tokenizer):
    tok = tiny_tokenizer
    s, byte = tok.encode_special, (lambda c: tok.enc.encode_single_token(c.encode() if isinstance(c, str) else bytes([c])))
    chains = [
        [s("<|assistant_start|>"), s("<|python_start|>"), byte("1"), byte("2"), byte("*"), byte("3"), s("<|python_end|>")],
        [s("<|output_end|>"), byte("!"), s("<|assistant_end|>")],
        [s("<|user_end|>"), *[byte(b) for b in "🌍京".encode()], s("<|assistant_end|>")],
    ]
    config = GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=128)
    params = model.init_params(config, jax.random.key(0))  # attention/MLP outputs and smear start at zero
    wte = np.array(params["wte"])
    lm_head = np.zeros_like(params["lm_head"])
    sources = [t for chain in chains for t in chain[:-1]]
    assert len(set(sources)) == len(sources) < config.n_embd
    for i, source in enumerate(sources):
        wte[source] = np.eye(config.n_embd)[i]  # orthogonal embeddings for the scripted tokens
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            lm_head[b] += 10 * np.eye(config.n_embd)[sources.index(a)]
    params = {**params, "wte": jnp.asarray(wte), "lm_head": jnp.asarray(lm_head)}
    return Engine(params, config, tok, dtype="float32", chunk=3)


def test_tool_use_forces_the_calculator_output(scripted, tiny_tokenizer):
    tok = tiny_tokenizer
    s = tok.encode_special
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "12 times 3?"},
                                                     {"role": "assistant", "content": ""}]})
    (r,) = run(scripted, [Request(prompt, max_tokens=40, temperature=0.0)], slots=4)
    sample = r.samples[0]
    output = tok.encode("36")
    expected = [s("<|python_start|>"), *tok.encode("12*3"), s("<|python_end|>"),
                s("<|output_start|>"), *output, s("<|output_end|>"), tok.encode("!")[0]]
    assert tok.decode(sample.tokens) == "<|python_start|>12*3<|python_end|><|output_start|>36<|output_end|>!"
    assert sample.tokens == expected
    assert sample.masks == [1] * 6 + [0] * (len(output) + 2) + [1]
    assert sample.finish_reason == "stop"


def test_tool_refusal_forces_nothing(scripted, tiny_tokenizer):
    calls = []
    scripted_tool, scripted.tool = scripted.tool, lambda expr: calls.append(expr)  # returns None: refused
    try:
        prompt = [tiny_tokenizer.bos_token_id, tiny_tokenizer.encode_special("<|assistant_start|>")]
        (r,) = run(scripted, [Request(prompt, max_tokens=10, temperature=0.0)], slots=4)
    finally:
        scripted.tool = scripted_tool
    assert calls == ["12*3"]
    assert r.samples[0].masks == [1] * len(r.samples[0].tokens)


def test_streaming_never_splits_a_character(scripted, tiny_tokenizer):
    prompt = [tiny_tokenizer.bos_token_id, tiny_tokenizer.encode_special("<|user_end|>")]
    request = Request(prompt, max_tokens=20, temperature=0.0)
    pieces = list(scripted.stream(prompt, max_tokens=20, request=request))
    # 7 byte tokens in chunks of 3: every chunk ends inside a character, and nothing shows half of one
    assert len(request.samples[0].tokens) == 7
    assert "".join(pieces) == "🌍京" and all("\ufffd" not in p for p in pieces)
    assert len(pieces) == 2
