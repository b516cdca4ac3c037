"""Chat-model evaluation: `python -m launch.stage chat_eval -i sft -a "ARC-Easy|GSM8K" --data-dir DATA`.

The reference's five chat tasks on a checkpoint under `<run-dir>/<source>/`: the categorical ones
(ARC-Easy, ARC-Challenge, MMLU: the answer letter with the highest logit) and the generative ones
(GSM8K: the number after "####" of a sampled solution, calculator included; HumanEval: the sampled
program run against the problem's tests in the sandbox). Sampling is greedy unless -t is given; a
problem passes if any of its -n samples does. Task data is read from local files under --data-dir,
laid out like ../shared/data (`arc/`, `mmlu/`, `gsm8k/`, `humaneval/`; default: the samples shipped
in nanochat_jax/tasks/data). ChatCORE is printed over the tasks that ran, marked partial unless all
five did. Results go to `<run-dir>/chat_eval/<source>/<model-tag>/results.json`.
"""

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from nanochat_jax.evals.chat import BASELINES

    p = argparse.ArgumentParser(prog="python -m launch.stage chat_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", required=True, help="which model: a folder under <run-dir> (base, mid, sft, rl)")
    p.add_argument("-a", "--task-name", default=None, help=f"tasks separated by | (default: {'|'.join(BASELINES)})")
    p.add_argument("-x", "--max-problems", type=int, default=None, help="evaluate only the first N problems of each task")
    p.add_argument("-g", "--model-tag", default=None, help="model under <run-dir>/<source>/ (default: the only or newest)")
    p.add_argument("--run-dir", default="runs/default", help="run directory: reads tokenizer/ and <source>/, writes chat_eval/")
    p.add_argument("--checkpoint", default=None, help="a checkpoints directory to evaluate instead (its last step)")
    p.add_argument("--data-dir", default=None, help="task data laid out like ../shared/data (arc/, mmlu/, gsm8k/, humaneval/); "
                   "default: the small samples shipped in nanochat_jax/tasks/data")
    p.add_argument("--batch-tokens", type=int, default=32768, help="padded tokens per scoring batch (memory vs speed)")
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature of GSM8K/HumanEval (0: greedy)")
    p.add_argument("-m", "--max-new-tokens", type=int, default=512, help="most tokens sampled per completion")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per problem (it passes if any does)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed")
    return p


def main(argv=None):
    from nanochat_jax.evals.chat import BASELINES

    args = build_parser().parse_args(argv)
    names = list(BASELINES) if args.task_name is None else [n.strip() for n in args.task_name.split("|") if n.strip()]
    try:
        run(args, names)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"chat_eval: {e}")


def run(args, names):
    import time

    from launch.base_eval import load_checkpoint, make_scorer, write_results
    from nanochat_jax.engine import Engine
    from nanochat_jax.evals import chat

    t0 = time.perf_counter()
    if args.data_dir is None:
        print("task data: the samples shipped in nanochat_jax/tasks/data (a few questions per task); "
              "pass --data-dir for the full test sets")
    tasks = {name: chat.load_task(name, args.data_dir) for name in names}  # fail on data before loading a model
    if args.max_problems is not None:
        tasks = {name: convs[:args.max_problems] for name, convs in tasks.items()}
    params, config, tokenizer, tag = load_checkpoint(args.run_dir, args.source, args.model_tag, args.checkpoint)
    # Each kind of task needs its own compiled programs: build only what the chosen tasks use.
    scorer = make_scorer(params, config, tokenizer, args.batch_tokens) if set(names) & set(chat.CATEGORICAL) else None
    engine = Engine(params, config, tokenizer) if set(names) & set(chat.GENERATIVE) else None
    accuracies, totals = {}, {}
    for name, conversations in tasks.items():
        if name in chat.CATEGORICAL:
            result = chat.evaluate_categorical(scorer, tokenizer, conversations, desc=name)
        else:
            result = chat.evaluate_generative(
                engine, tokenizer, conversations, chat.judge(name), num_samples=args.num_samples,
                max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                progress=True)
        accuracies[name], totals[name] = result["accuracy"], result["total"]
        print(f"{name} accuracy: {100 * result['accuracy']:.2f}% ({result['passed']}/{result['total']})")
    summary = chat.chatcore(accuracies)
    metrics = dict(accuracies)
    if summary["chatcore"] is not None:
        metrics["ChatCORE"] = summary["chatcore"]
        print(f"ChatCORE metric: {summary['chatcore']:.4f}")
    else:
        metrics["ChatCORE"] = f"{summary['chatcore_partial']:.4f} (partial: {len(accuracies)}/{len(chat.BASELINES)} tasks)"
        print(f"ChatCORE metric: PARTIAL {summary['chatcore_partial']:.4f} over {', '.join(accuracies)} "
              f"(missing: {', '.join(summary['missing'])}); not comparable to a full ChatCORE")
    settings = {"model_tag": tag, "task data": args.data_dir or "shipped samples",
                **({"temperature": args.temperature, "top_k": args.top_k, "num_samples": args.num_samples,
                    "max_new_tokens": args.max_new_tokens, "seed": args.seed} if engine else {}),
                **{f"{name} problems": n for name, n in totals.items()}}
    out_dir = os.path.join(args.run_dir, "chat_eval", args.source, tag)
    os.makedirs(out_dir, exist_ok=True)
    write_results(out_dir, "chat_eval", args.source, metrics, settings, time.perf_counter() - t0, summary)
