"""Time a full CORE pass: every available task, every example (or --max-per-task of each).

    python -m launch.bench_core --depth 20 --eval-bundle ../shared/data/core     # on the GPU
    python -m launch.bench_core --depth 2 --max-per-task 8 --eval-bundle ../shared/data/core   # CPU check

A model of the depth with random weights (the reference's init, its vocabulary size and context), or
a saved one with --checkpoint; prompts rendered with the run's tokenizer (--tokenizer, default the
golden test tokenizer: vocab 1024, so prompts come out longer than with the 32k tokenizer and the
time is an upper bound). The first pass includes one compile per length bucket; `--passes 2` also
times a warm pass. Prints a per-task table (examples, scored rows, real and padded tokens, seconds)
and one JSON line for scripts. Accuracies of a random model are meaningless; the times are the point.
"""

import argparse
import json
import os
import sys
import time

GOLDEN_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "golden", "tokenizer_a.json")


def _tokenizer(path: str | None):
    from nanochat_jax.tokenizer import Tokenizer

    if path:
        return Tokenizer.from_directory(path)
    from launch.parity import _golden_tokenizer

    with open(GOLDEN_TOKENIZER) as f:
        return _golden_tokenizer(json.load(f))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20, help="random-weight model of this depth (ignored with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="time a saved model instead (a checkpoints directory)")
    p.add_argument("--tokenizer", default=None, help="a saved tokenizer folder (default: the golden test tokenizer)")
    p.add_argument("--eval-bundle", default=None, help="CORE eval bundle folder (default: the download location)")
    p.add_argument("--max-per-task", type=int, default=-1, help="examples per task (-1 = all)")
    p.add_argument("--batch-tokens", type=int, default=32768, help="padded tokens per scoring batch")
    p.add_argument("--passes", type=int, default=1, help="passes over the suite; the last one is tabulated")
    args = p.parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"bench_core: {e}")


def run(args):
    import jax

    from nanochat_jax import model, sharding
    from nanochat_jax.attention import default_backend
    from nanochat_jax.config import compute_dtype, config_from_depth
    from nanochat_jax.evals import bundle, core
    from nanochat_jax.evals.scoring import Scorer

    bundle_dir = bundle.find_bundle(args.eval_bundle)
    tokenizer = _tokenizer(args.tokenizer)
    if args.checkpoint:
        from nanochat_jax.checkpoint import restore_params
        from launch.base_eval import make_scorer

        params, config = restore_params(args.checkpoint)
        scorer = make_scorer(params, config, tokenizer, args.batch_tokens)
        what = args.checkpoint
    else:
        config = config_from_depth(args.depth)
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) exceeds the model's ({config.vocab_size})")
        mesh = sharding.make_mesh()
        params = jax.jit(model.init_params, static_argnums=0, out_shardings=sharding.param_shardings(config, mesh))(
            config, jax.random.key(0))
        scorer = Scorer(params, config, mesh, pad_id=tokenizer.bos_token_id, batch_tokens=args.batch_tokens,
                        dtype=compute_dtype(), attention_backend=default_backend())
        what = f"d{args.depth} (random weights)"
    tasks = [t for t in core.load_tasks(bundle_dir) if os.path.exists(core.task_data_path(bundle_dir, t))]
    missing = [t.label for t in core.load_tasks(bundle_dir) if t not in tasks]
    data = {t.label: core.load_examples(core.task_data_path(bundle_dir, t), args.max_per_task) for t in tasks}
    print(f"model: {what} | {jax.devices()[0].device_kind} x {len(jax.devices())} | dtype {scorer.dtype} | "
          f"attention {scorer.attention_backend} | batch tokens {args.batch_tokens:,}")
    print(f"tasks: {len(tasks)} available, missing: {', '.join(missing) or 'none'}")

    pass_seconds, rows = [], []
    for _ in range(args.passes):
        rows, t_pass = [], time.perf_counter()
        for task in tasks:
            t0 = time.perf_counter()
            result = core.evaluate_task(scorer, tokenizer, task, data[task.label], details=False)
            seconds = time.perf_counter() - t0
            rows.append({"task": task.label, "examples": result["num_examples"], "rows": result["rows"],
                         "tokens": result["tokens"], "padded_tokens": result["padded_tokens"],
                         "seconds": seconds, "accuracy": result["accuracy"]})
        pass_seconds.append(time.perf_counter() - t_pass)

    header = f"{'task':<34} {'examples':>8} {'rows':>7} {'tokens':>11} {'padded':>11} {'seconds':>8} {'tok/s':>10}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['task']:<34} {r['examples']:>8,} {r['rows']:>7,} {r['tokens']:>11,} {r['padded_tokens']:>11,} "
              f"{r['seconds']:>8.2f} {r['tokens'] / r['seconds']:>10,.0f}")
    tokens = sum(r["tokens"] for r in rows)
    padded = sum(r["padded_tokens"] for r in rows)
    print("-" * len(header))
    print(f"{'total':<34} {sum(r['examples'] for r in rows):>8,} {sum(r['rows'] for r in rows):>7,} {tokens:>11,} "
          f"{padded:>11,} {pass_seconds[-1]:>8.2f} {tokens / pass_seconds[-1]:>10,.0f}")
    print("passes (s): " + ", ".join(f"{s:.2f}" for s in pass_seconds) +
          f" (the first includes compiling {len(scorer.shapes)} batch shapes)")
    print(json.dumps({"bench": "core", "model": what, "device": jax.devices()[0].device_kind, "devices": len(jax.devices()),
                      "dtype": scorer.dtype, "batch_tokens": args.batch_tokens, "max_per_task": args.max_per_task,
                      "tasks": len(tasks), "missing": missing, "pass_seconds": pass_seconds, "batch_shapes": len(scorer.shapes),
                      "tokens": tokens,
                      "padded_tokens": padded, "per_task": rows}))


if __name__ == "__main__":
    main()
