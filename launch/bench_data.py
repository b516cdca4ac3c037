"""Benchmark: tokens per second the pretraining pipeline delivers, tokenizing on the fly.

    python -m launch.bench_data [--source DIR] [--batches 30] [--json OUT.json]

Reads parquet, tokenizes with tiktoken, best-fit packs rows of 2049 tokens, all in the background
threads of the real pipeline; the consumer only takes batches. Compare the number with what one GPU
consumes: the reference trains d20 at about 164k tokens/s on an H200.

Then a training loop is imitated: each optimizer step takes --micro-steps batches and the device
computes for --step-seconds while the host waits; the table gives how long each step waited for its
batches with 2 batches prefetched and with two steps' worth (what the training stages use).
"""

import argparse
import json
import os
import statistics
import time


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m launch.bench_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="shard folder (default: the built-in corpus)")
    parser.add_argument("--tokenizer-dir", help="a trained tokenizer (default: train a 32768 one on the source)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--micro-steps", type=int, default=8, help="batches per optimizer step in the imitated loop")
    parser.add_argument("--step-seconds", type=float, default=1.0, help="device time per step in the imitated loop")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from nanochat_jax import data
    from nanochat_jax.tokenizer import Tokenizer

    if args.tokenizer_dir:
        tok = Tokenizer.from_directory(args.tokenizer_dir)
    else:
        tok = Tokenizer.train(data.iter_texts(args.source, doc_cap=10_000), 32768)
    print(f"cpu cores: {os.cpu_count()}, vocab {tok.vocab_size}, batch {args.batch_size}x{args.seq_len}")
    rows = []
    for threads, lookahead in [(1, 2), (2, 4), (4, 8)]:
        it = data.pretrain_batches(tok, args.batch_size, args.seq_len, source=args.source, seed=0,
                                   tokenizer_threads=threads, lookahead=lookahead)
        next(it)  # start-up: first reads, buffer fill
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        dt = time.perf_counter() - t0
        it.close()
        tps = args.batches * args.batch_size * args.seq_len / dt
        rows.append({"tokenizer_threads": threads, "lookahead": lookahead, "tokens_per_s": tps})
        print(f"tokenizer_threads={threads} lookahead={lookahead}: {tps:,.0f} tokens/s "
              f"({dt / args.batches * 1e3:.1f} ms per batch)")
    waits = []
    for prefetch in (2, 2 * args.micro_steps):
        it = data.pretrain_batches(tok, args.batch_size, args.seq_len, source=args.source, seed=0, prefetch=prefetch)
        per_step = []
        for _ in range(6):  # the first step is the start-up, not counted
            t0 = time.perf_counter()
            for _ in range(args.micro_steps):
                next(it)
            per_step.append(time.perf_counter() - t0)
            time.sleep(args.step_seconds)  # the device computing the step
        it.close()  # stop its prefetch thread now, not at interpreter shutdown
        wait = statistics.median(per_step[1:])
        waits.append({"prefetch": prefetch, "wait_per_step_s": wait})
        print(f"training loop, {args.micro_steps} batches per step, {args.step_seconds:g} s of device time: "
              f"prefetch {prefetch}: waits {wait:.3f} s per step for its batches")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "batch_size": args.batch_size, "seq_len": args.seq_len,
                       "vocab_size": tok.vocab_size, "results": rows, "training_loop": waits}, f, indent=1)


if __name__ == "__main__":
    main()
