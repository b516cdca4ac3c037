"""One entry for every stage of the pipeline:  python -m launch.stage <name> [flags]

Each stage lives in its own module and is imported only when it runs, so `--help` is instant.
Run `python -m launch.stage <name> --help` for a stage's flags.
"""

import importlib
import os
import sys

# name -> (module, function taking argv, one line of help)
STAGES = {
    "download": ("launch.data_cli", "main_download", "fetch pretraining shards (ClimbMix or FineWeb-Edu)"),
    "make_shards": ("launch.data_cli", "main_convert", "turn your own text/jsonl/parquet into training shards"),
    "tok": ("launch.tok", "main_tok", "train the BPE tokenizer on the pretraining text"),
    "tok_eval": ("launch.tok", "main_tok_eval", "compression ratio of the tokenizer on held-out text"),
    "base": ("launch.base_train", "main", "pretrain a GPT from scratch on the pretraining corpus"),
    "eval_bundle": ("launch.base_eval", "main_bundle", "download the reference's CORE eval bundle (checksummed)"),
    "base_eval": ("launch.base_eval", "main", "CORE and bits per byte of a base checkpoint"),
    "mid": ("launch.chat_train", "main_mid", "mid-training: conversations, multiple choice, math, spelling (all tokens)"),
    "sft": ("launch.chat_train", "main_sft", "supervised fine-tuning on conversations (assistant tokens only)"),
    "rl": ("launch.rl", "main", "reinforcement learning on GSM8K (REINFORCE, rewards from the final answer)"),
    "chat_eval": ("launch.chat_eval", "main", "chat tasks (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval) and ChatCORE of a checkpoint"),
    "report": ("launch.report", "main", "write report.md: system, every stage's settings, time and results, plots"),
    "chat_cli": ("launch.chat_cli", "main", "chat with a trained model in the terminal (-p for one answer)"),
}


def usage() -> str:
    width = max(map(len, STAGES))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in STAGES.items()]
    return "usage: python -m launch.stage <name> [flags]\n\nstages:\n" + "\n".join(lines) + \
        "\n\n`python -m launch.stage <name> --help` lists a stage's flags."


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        sys.exit(f"unknown stage {name!r}\n\n{usage()}")
    module, function, _ = STAGES[name]
    if "-h" not in rest and "--help" not in rest:
        enable_compilation_cache()
    getattr(importlib.import_module(module), function)(rest)


def enable_compilation_cache():
    """Compiled programs persist across runs (a resumed or repeated stage skips most compile time).
    NANOCHAT_JAX_CACHE overrides the location; an empty value turns it off."""
    path = os.environ.get("NANOCHAT_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanochat_jax", "xla"))
    if path:
        import jax

        jax.config.update("jax_compilation_cache_dir", path)


if __name__ == "__main__":
    main()
