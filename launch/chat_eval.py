"""Chat-model evaluation: `python -m launch.stage chat_eval -i sft -a "ARC-Easy|MMLU" --data-dir DATA`.

The categorical tasks (ARC-Easy, ARC-Challenge, MMLU: the answer letter with the highest logit, as
the reference scores them) on a checkpoint under `<run-dir>/<source>/`. GSM8K and HumanEval need
sampling, which this stage does not do yet. Task data is read from local files under --data-dir,
laid out like ../shared/data (`arc/`, `mmlu/`). ChatCORE is printed over the tasks that ran, marked
partial unless all five chat tasks did.
"""

import argparse
import json
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
    p.add_argument("--data-dir", default=None, help="task data folder laid out like ../shared/data (arc/, mmlu/)")
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
    from launch.base_eval import load_checkpoint, make_scorer
    from nanochat_jax.evals import chat

    if args.data_dir is None:
        raise ValueError("pass --data-dir: a folder laid out like ../shared/data (arc/, mmlu/)")
    tasks = {name: chat.load_task(name, args.data_dir) for name in names}  # fail on data before loading a model
    if args.max_problems is not None:
        tasks = {name: convs[:args.max_problems] for name, convs in tasks.items()}
    params, config, tokenizer, tag = load_checkpoint(args.run_dir, args.source, args.model_tag, args.checkpoint)
    scorer = make_scorer(params, config, tokenizer, args.batch_tokens)
    accuracies = {}
    for name, conversations in tasks.items():
        result = chat.evaluate_categorical(scorer, tokenizer, conversations, desc=name)
        accuracies[name] = result["accuracy"]
        print(f"{name} accuracy: {100 * result['accuracy']:.2f}% ({result['passed']}/{result['total']})")
    summary = chat.chatcore(accuracies)
    if summary["chatcore"] is not None:
        print(f"ChatCORE metric: {summary['chatcore']:.4f}")
    else:
        print(f"ChatCORE metric: PARTIAL {summary['chatcore_partial']:.4f} over {', '.join(accuracies)} "
              f"(missing: {', '.join(summary['missing'])}); not comparable to a full ChatCORE")
    out_dir = os.path.join(args.run_dir, "chat_eval")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{args.source}_{tag}.json"), "w") as f:
        json.dump({"model": f"{args.source}/{tag}", "accuracy": accuracies, **summary}, f, indent=1)
