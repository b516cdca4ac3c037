"""Base-model evaluation: `python -m launch.stage base_eval`, and `eval_bundle` to fetch CORE's data.

    python -m launch.stage eval_bundle                        # once: the reference's eval_bundle.zip
    python -m launch.stage base_eval --run-dir R --eval core,bpb [--max-per-task 100]

CORE (the reference's 22-task in-context suite, see `nanochat_jax/evals/core.py`) and bits per byte
on the train and val splits, for a checkpoint the `base` stage wrote (`<run-dir>/base/<model-tag>`,
or any checkpoints directory with --checkpoint). CORE reads a local eval bundle (--eval-bundle, default the
download location); nothing is downloaded while evaluating. Results go to
`<run-dir>/base_eval/<model-tag>/` (`results.json` for the report card, `core.csv` as the reference writes it).
"""

import argparse
import json
import os
import sys


def load_checkpoint(run_dir: str, source: str, model_tag: str | None, checkpoint: str | None):
    """(params, config, tokenizer, name) of the model to evaluate: `<run_dir>/<source>/<model_tag>`
    found as the chat CLI finds it (no tag: the only or newest model), or the checkpoint directory
    `checkpoint`; the tokenizer is the run's. `name` labels the output files."""
    from nanochat_jax.engine import load_model

    if checkpoint is None:
        params, config, tokenizer = load_model(run_dir, source, model_tag)
        return params, config, tokenizer, model_tag or f"d{config.n_layer}"
    from launch.tok import tokenizer_dir
    from nanochat_jax.checkpoint import restore_params
    from nanochat_jax.tokenizer import Tokenizer

    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"no checkpoint directory {checkpoint}")
    tokenizer = Tokenizer.from_directory(tokenizer_dir(run_dir))
    params, config = restore_params(checkpoint)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir(run_dir)} has {tokenizer.vocab_size} tokens, the model "
                         f"{config.vocab_size}: they are not from the same run")
    parts = os.path.normpath(os.path.abspath(checkpoint)).split(os.sep)
    return params, config, tokenizer, parts[-2] if parts[-1] == "checkpoints" else parts[-1]


def make_scorer(params, config, tokenizer, batch_tokens: int):
    """A Scorer on a mesh over every device, in the run's compute dtype and attention backend."""
    import jax

    from nanochat_jax import sharding
    from nanochat_jax.attention import default_backend
    from nanochat_jax.config import compute_dtype
    from nanochat_jax.evals.scoring import Scorer

    print(f"model: {json.dumps(config.to_json_dict())} | devices: {len(jax.devices())} | dtype: {compute_dtype().name}")
    return Scorer(params, config, sharding.make_mesh(), pad_id=tokenizer.bos_token_id, batch_tokens=batch_tokens,
                  dtype=compute_dtype(), attention_backend=default_backend())


def build_parser() -> argparse.ArgumentParser:
    from nanochat_jax.evals.bundle import DEFAULT_BUNDLE_DIR

    p = argparse.ArgumentParser(prog="python -m launch.stage base_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="run directory: reads tokenizer/ and base/, writes base_eval/")
    p.add_argument("--model-tag", default=None, help="model under <run-dir>/base/ (default: the only or newest)")
    p.add_argument("--checkpoint", default=None, help="a checkpoints directory to evaluate instead (its last step)")
    p.add_argument("--eval", default="core,bpb", help="comma-separated: core, bpb (default: %(default)s)")
    p.add_argument("--max-per-task", type=int, default=-1, help="CORE examples per task after the shuffle (-1 = all)")
    p.add_argument("--eval-bundle", default=None, help=f"CORE eval bundle folder (default: {DEFAULT_BUNDLE_DIR}); "
                   "../shared/data/core is laid out like it")
    p.add_argument("--batch-tokens", type=int, default=32768, help="padded tokens per CORE scoring batch (memory vs speed)")
    p.add_argument("--data-dir", default=None, help="bpb: folder of pretraining shards (default: the built-in corpus)")
    p.add_argument("--device-batch-size", type=int, default=32, help="bpb: rows per device")
    p.add_argument("--split-tokens", type=int, default=40 * 524288, help="bpb: tokens evaluated per split")
    return p


def main(argv=None):
    from nanochat_jax.evals.bundle import BundleError

    args = build_parser().parse_args(argv)
    modes = {m.strip() for m in args.eval.split(",") if m.strip()}
    if "sample" in modes:
        sys.exit("base_eval: --eval sample is not part of base_eval yet (try `python -m launch.stage chat_cli -i base -p ...`); "
                 "use core,bpb")
    if not modes or modes - {"core", "bpb"}:
        sys.exit(f"base_eval: unknown --eval modes {sorted(modes - {'core', 'bpb'}) or '(none)'}; choose from core, bpb")
    try:
        run(args, modes)
    except (FileNotFoundError, ValueError, BundleError) as e:
        sys.exit(f"base_eval: {e}")


def run(args, modes):
    import time

    from nanochat_jax.evals import bundle, core

    t0 = time.perf_counter()
    bundle_dir = bundle.find_bundle(args.eval_bundle) if "core" in modes else None  # fail before loading a model
    params, config, tokenizer, tag = load_checkpoint(args.run_dir, "base", args.model_tag, args.checkpoint)
    scorer = make_scorer(params, config, tokenizer, args.batch_tokens)
    out_dir = os.path.join(args.run_dir, "base_eval", tag)
    os.makedirs(out_dir, exist_ok=True)
    metrics, settings, details = {}, {"model_tag": tag, "evals": sorted(modes)}, {"model_config": config.to_json_dict()}
    if "bpb" in modes:
        details["bpb"] = evaluate_bpb_splits(scorer, tokenizer, args)
        metrics.update({f"{split} bpb": value for split, value in details["bpb"].items()})
        settings["bpb tokens per split"] = args.split_tokens
    if "core" in modes:
        print("=" * 80 + "\nCORE evaluation\n" + "=" * 80)
        summary = core.evaluate_core(scorer, tokenizer, bundle_dir, max_per_task=args.max_per_task)
        csv_path = os.path.join(out_dir, "core.csv")
        core.write_csv(summary, csv_path)
        print(f"results written to {csv_path}\n{core.core_line(summary)}")
        metrics["CORE"] = core_metric_value(summary)
        settings.update({"CORE examples per task": "all" if args.max_per_task < 0 else args.max_per_task,
                         "eval bundle": bundle_dir, "CORE tasks missing": ", ".join(summary["missing"]) or "none"})
        details["core"] = summary
    write_results(out_dir, "base_eval", "base", metrics, settings, time.perf_counter() - t0, details)


def core_metric_value(summary: dict):
    """CORE for the results file: the number when complete; when tasks are missing, a string that
    says it is partial, so no table can show it as a full CORE."""
    if summary["core_metric"] is not None:
        return summary["core_metric"]
    done = summary["num_tasks"] - len(summary["missing"])
    return f"{summary['core_partial']:.4f} (partial: {done}/{summary['num_tasks']} tasks)"


def write_results(out_dir: str, stage: str, model: str, metrics: dict, settings: dict, seconds: float, details: dict):
    """`<out_dir>/results.json` in the report card's format (see nanochat_jax/report.py), details included."""
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump({"stage": stage, "model": model, "metrics": metrics, "settings": settings, "time_s": seconds,
                   "details": details}, f, indent=1)
    print(f"results: {path}")


def evaluate_bpb_splits(scorer, tokenizer, args) -> dict:
    """Bits per byte on the train and val splits, as the reference reports them."""
    import jax

    from nanochat_jax import data, sharding
    from nanochat_jax.evals.bpb import evaluate_bpb

    seq_len = scorer.config.sequence_len
    n_devices = len(jax.devices())
    tokens_per_step = args.device_batch_size * seq_len * n_devices
    steps = max(1, args.split_tokens // tokens_per_step)
    local_rows = args.device_batch_size * jax.local_device_count()
    token_bytes = jax.device_put(tokenizer.token_bytes(), sharding.replicated(scorer.mesh))
    batch_sharding = sharding.batch_sharding(scorer.mesh)
    out = {}
    for split in ("train", "val"):
        batches = data.pretrain_batches(tokenizer, local_rows, seq_len, source=args.data_dir, split=split,
                                        process_index=jax.process_index(), process_count=jax.process_count())
        out[split] = evaluate_bpb(scorer.params, batches, steps, token_bytes, config=scorer.config, dtype=scorer.dtype,
                                  attention_backend=scorer.attention_backend,
                                  to_global=lambda x: sharding.global_batch(x, batch_sharding))
        print(f"{split} bpb: {out[split]:.6f} ({steps} batches of {tokens_per_step:,} tokens)")
    return out


def main_bundle(argv=None):
    from nanochat_jax.evals import bundle

    p = argparse.ArgumentParser(prog="python -m launch.stage eval_bundle",
                                description="Download and unpack the reference's CORE eval bundle (checksummed).")
    p.add_argument("--out", default=bundle.DEFAULT_BUNDLE_DIR, help="where the bundle folder goes (default: %(default)s)")
    p.add_argument("--url", default=bundle.EVAL_BUNDLE_URL, help="archive URL (default: the reference's)")
    p.add_argument("--sha256", default=bundle.EVAL_BUNDLE_SHA256,
                   help="expected sha256 of the archive (default: the reference's); 'none' skips the check")
    args = p.parse_args(argv)
    try:
        dest = bundle.download_bundle(args.out, args.url, None if args.sha256.lower() == "none" else args.sha256)
    except (bundle.BundleError, OSError) as e:
        sys.exit(f"eval_bundle: {e}")
    print(f"eval bundle in {dest}; base_eval finds it there (or pass --eval-bundle {dest})")
