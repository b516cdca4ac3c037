"""Chat-model evaluation: `python -m launch.stage chat_eval -i sft -a "ARC-Easy|MMLU" --data-dir DATA`.

The categorical tasks (ARC-Easy, ARC-Challenge, MMLU: the answer letter with the highest logit, as
the reference scores them) on a checkpoint under `<run-dir>/<source>/`. GSM8K and HumanEval need
sampling, which this stage does not do yet. Task data is read from local files under --data-dir,
laid out like ../shared/data (`arc/`, `mmlu/`; default: the samples shipped in
nanochat_jax/tasks/data). ChatCORE is printed over the tasks that ran, marked partial unless all
five chat tasks did. Results go to `<run-dir>/chat_eval/<source>/<model-tag>/results.json`.
"""

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from nanochat_jax.evals.chat import CATEGORICAL

    p = argparse.ArgumentParser(prog="python -m launch.stage chat_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", required=True, help="which model: a folder under <run-dir> (base, mid, sft, rl)")
    p.add_argument("-a", "--task-name", default=None, help=f"tasks separated by | (default: {'|'.join(CATEGORICAL)})")
    p.add_argument("-x", "--max-problems", type=int, default=None, help="evaluate only the first N problems of each task")
    p.add_argument("-g", "--model-tag", default=None, help="model under <run-dir>/<source>/ (default: the only or newest)")
    p.add_argument("--run-dir", default="runs/default", help="run directory: reads tokenizer/ and <source>/, writes chat_eval/")
    p.add_argument("--checkpoint", default=None, help="a checkpoints directory to evaluate instead (its last step)")
    p.add_argument("--data-dir", default=None, help="task data laid out like ../shared/data (arc/, mmlu/); "
                   "default: the small samples shipped in nanochat_jax/tasks/data")
    p.add_argument("--batch-tokens", type=int, default=32768, help="padded tokens per scoring batch (memory vs speed)")
    return p


def main(argv=None):
    from nanochat_jax.evals.chat import CATEGORICAL

    args = build_parser().parse_args(argv)
    names = list(CATEGORICAL) if args.task_name is None else [n.strip() for n in args.task_name.split("|") if n.strip()]
    try:
        run(args, names)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"chat_eval: {e}")


def run(args, names):
    import time

    from launch.base_eval import load_checkpoint, make_scorer, write_results
    from nanochat_jax.evals import chat

    t0 = time.perf_counter()
    if args.data_dir is None:
        print("task data: the samples shipped in nanochat_jax/tasks/data (a few questions per task); "
              "pass --data-dir for the full test sets")
    tasks = {name: chat.load_task(name, args.data_dir) for name in names}  # fail on data before loading a model
    if args.max_problems is not None:
        tasks = {name: convs[:args.max_problems] for name, convs in tasks.items()}
    params, config, tokenizer, tag = load_checkpoint(args.run_dir, args.source, args.model_tag, args.checkpoint)
    scorer = make_scorer(params, config, tokenizer, args.batch_tokens)
    accuracies, totals = {}, {}
    for name, conversations in tasks.items():
        result = chat.evaluate_categorical(scorer, tokenizer, conversations, desc=name)
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
                **{f"{name} problems": n for name, n in totals.items()}}
    out_dir = os.path.join(args.run_dir, "chat_eval", args.source, tag)
    os.makedirs(out_dir, exist_ok=True)
    write_results(out_dir, "chat_eval", args.source, metrics, settings, time.perf_counter() - t0, summary)
