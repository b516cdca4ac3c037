"""Inference benchmark: `python -m launch.bench_infer --depth 20` (random weights) or
`--run-dir runs/x --source sft` (a checkpoint).

For each batch size: time to first token (prefill of one prompt, its cache copied to every row, one
decode step) and greedy decode tokens/s over the remaining tokens, in the engine's chunked
on-device loop. Bandwidth utilization is the decode's bytes per step (the weights it reads, plus
each row's visible keys and values at the mean context length) over the time per step, divided by
the chip's peak bandwidth. Rows never stop early: no token ends them here. A table, then JSON on
the last line.
"""

import argparse
import json
import sys
import time

PEAK_BANDWIDTH = [("h200", 4.8e12), ("h100", 3.35e12), ("h800", 3.35e12), ("a100", 2.0e12), ("b200", 8.0e12)]


def build_parser():
    p = argparse.ArgumentParser(prog="python -m launch.bench_infer", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depth", type=int, default=20, help="random-weight model of this depth (without --run-dir)")
    p.add_argument("--run-dir", default=None, help="benchmark a checkpoint of this run instead")
    p.add_argument("-i", "--source", default="sft")
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("--batch-sizes", default="1,8,32,128", help="comma-separated")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--chunk", type=int, default=64, help="decode steps per device call")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        if min(batch_sizes) < 1 or args.prompt_len < 1 or args.new_tokens < 2 or args.chunk < 1:
            raise ValueError("batch sizes and --prompt-len must be >= 1, --new-tokens >= 2, --chunk >= 1")
        run(args, batch_sizes)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"bench_infer: {e}")


def run(args, batch_sizes):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nanochat_jax import engine as eng
    from nanochat_jax import model
    from nanochat_jax.config import compute_dtype, config_from_depth

    if args.run_dir:
        params, config, _ = eng.load_model(args.run_dir, args.source, args.model_tag)
        name = f"{args.run_dir}/{args.source}"
    else:
        config = config_from_depth(args.depth)
        params = model.init_params(config, jax.random.key(0))
        name = f"random d{args.depth}"
    total_len = args.prompt_len + args.new_tokens
    if total_len > config.sequence_len:
        raise ValueError(f"prompt + new tokens = {total_len} exceeds the context {config.sequence_len}")
    dtype = compute_dtype()
    params = jax.tree.map(lambda w: jnp.asarray(w, dtype), params)
    cache_len = eng.bucket(total_len, config.sequence_len)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, args.prompt_len).astype(np.int32)
    T = eng.bucket(args.prompt_len, cache_len)
    tokens = np.zeros((1, T), np.int32)
    tokens[0, : args.prompt_len] = prompt
    device = jax.devices()[0]
    peak_bw = next((bw for k, bw in PEAK_BANDWIDTH if k in device.device_kind.lower()), None)
    item = jnp.dtype(dtype).itemsize
    sizes = {k: int(np.prod(v.shape)) for k, v in params.items() if k != "blocks"}
    block_params = sum(int(np.prod(v.shape)) for v in params["blocks"].values())
    dense_params = block_params + sizes["lm_head"] + sum(v for k, v in sizes.items()
                                                          if k not in ("wte", "lm_head", "value_embeds"))
    mean_ctx = args.prompt_len + args.new_tokens / 2
    kv_per_row = sum(min(w + 1, mean_ctx) for w in config.window_sizes) * 2 * config.kv_dim * item

    def controls(B, budget, count):
        z = lambda dt: np.zeros(B, dt)  # noqa: E731
        return eng.Controls(np.ones(B, bool), np.full(B, budget, np.int32), z(np.float32), z(np.int32),
                            np.ones(B, np.float32), z(np.uint32), z(np.int32), np.arange(B, dtype=np.int32),
                            np.full(B, count, np.int32), np.zeros((B, args.chunk), np.int32), z(np.int32))

    def generate(B):
        """(ttft_s, decode_s) of one greedy generation of new_tokens for B rows."""
        decode = dict(config=config, stop_ids=(-2,), pause_id=-2)  # nothing stops a row early
        t0 = time.perf_counter()
        state = eng.DecodeState(model.init_cache(config, B, cache_len, dtype), jnp.zeros((B, config.vocab_size)))
        small, logits = eng._prefill(params, tokens, np.array([args.prompt_len], np.int32), config=config)
        state = eng._insert(state, small, logits, np.zeros(B, np.int32), np.arange(B, dtype=np.int32))
        state, first = eng._decode_chunk(params, state, controls(B, 1, 0), n_steps=1, **decode)
        first.block_until_ready()
        t1 = time.perf_counter()
        done = 1
        while done < args.new_tokens:
            state, out = eng._decode_chunk(params, state, controls(B, args.new_tokens - done, done),
                                           n_steps=args.chunk, **decode)
            done += min(args.chunk, args.new_tokens - done)
        out.block_until_ready()
        assert int(np.asarray(state.cache.lengths_B).min()) == args.prompt_len + args.new_tokens
        return t1 - t0, time.perf_counter() - t1

    print(f"model: {name} | {json.dumps(config.to_json_dict())}")
    print(f"device: {device.device_kind} | dtype {jnp.dtype(dtype).name} | prompt {args.prompt_len} | "
          f"new tokens {args.new_tokens} | cache {cache_len} | chunk {args.chunk}")
    print(f"{'batch':>6} {'ttft ms':>9} {'decode tok/s':>13} {'ms/step':>8} {'GB/s':>7} {'util':>6} {'peak GiB':>9}")
    results = []
    for B in batch_sizes:
        generate(B)  # compile
        ttft, decode_s = generate(B)
        steps = args.new_tokens - 1
        step_s = decode_s / steps
        step_bytes = dense_params * item + B * (config.n_embd + len(config.value_embedding_layers) * config.kv_dim) * item \
            + B * kv_per_row
        achieved = step_bytes / step_s
        stats = device.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        row = {"batch_size": B, "ttft_ms": round(ttft * 1e3, 3), "decode_tok_per_s": round(B * steps / decode_s, 1),
               "ms_per_step": round(step_s * 1e3, 4), "bytes_per_step": int(step_bytes),
               "achieved_GBps": round(achieved / 1e9, 2),
               "bandwidth_util": None if peak_bw is None else round(achieved / peak_bw, 4),
               "peak_memory_GiB": None if peak is None else round(peak / 2**30, 3)}
        results.append(row)
        util = "-" if row["bandwidth_util"] is None else f"{row['bandwidth_util']:.1%}"
        mem = "-" if peak is None else f"{row['peak_memory_GiB']:.2f}"
        print(f"{B:>6} {row['ttft_ms']:>9.1f} {row['decode_tok_per_s']:>13.1f} {row['ms_per_step']:>8.3f} "
              f"{row['achieved_GBps']:>7.1f} {util:>6} {mem:>9}", flush=True)
    print(json.dumps({"model": name, "config": config.to_json_dict(), "device": device.device_kind,
                      "dtype": jnp.dtype(dtype).name, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                      "cache_len": cache_len, "chunk": args.chunk, "peak_bandwidth_Bps": peak_bw,
                      "weight_bytes": int(dense_params * item), "results": results}))


if __name__ == "__main__":
    main()
