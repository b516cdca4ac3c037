"""Conversation training: `python -m launch.stage mid` and `python -m launch.stage sft`.

Both start from a saved model (`--source`: base for mid, mid in the speedrun's chain for SFT) and
train on a data mixture (`nanochat_jax/tasks/mixtures.py`) packed best-fit into rows of whole
conversations: a conversation is never cropped, the rest of a row is padding that the loss ignores.

- mid: the reference's last mid-training recipe; the loss is on every token; a fresh optimizer.
- sft: the reference's newest recipe; the loss is on the assistant's tokens only (never the
  prompts or tool outputs); the optimizer's momentum buffers are warm-started from the source.

As in the reference, the context length, batch sizes and the embedding / unembedding / matrix
learning rates are inherited from the source run unless given; weight decay is 0 (pretraining
already decayed it to 0); the learning rate is `--init-lr-frac` of the base value, flat, then
linearly down to `--final-lr-frac` over the last `--warmdown-ratio` of training; Muon's momentum
warms up from 0.85 to 0.95 over 300 steps. Training is one epoch of the mixture (progress is
measured in conversations consumed) unless `--num-iterations` is given.

Writes `<run-dir>/<stage>/<model-tag>/`: `checkpoints/`, `metrics.jsonl` and `summary.json` (as
the base stage). Ctrl-C or SIGTERM saves and exits; `--resume` continues exactly.
"""

import argparse
import os
import sys
import time

from nanochat_jax.tasks import mixtures

CHAT_PROMPTS = ["Hi! Who are you?", "What is the capital of France?", "How many r are in strawberry?"]
MOMENTUM_WARMUP_STEPS = 300

# The reference's settings for each stage; every one is also a flag.
STAGES = {
    "mid": dict(source="base", recipe=mixtures.MID, supervise="all", load_optimizer=0, init_lr_frac=1.0,
                warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0, eval_every=150, eval_tokens=20 * 524288),
    "sft": dict(source="base", recipe=mixtures.SFT, supervise="assistant", load_optimizer=1, init_lr_frac=0.8,
                warmup_ratio=0.0, warmdown_ratio=0.5, final_lr_frac=0.0, eval_every=200, eval_tokens=40 * 524288),
}
# Inherited from the source run when not given (None): (flag, the reference's fallback).
INHERITED = [("max_seq_len", 2048), ("device_batch_size", 32), ("total_batch_size", 524288),
             ("embedding_lr", 0.3), ("unembedding_lr", 0.004), ("matrix_lr", 0.02)]


def build_parser(stage: str) -> argparse.ArgumentParser:
    d = STAGES[stage]
    p = argparse.ArgumentParser(prog=f"python -m launch.stage {stage}", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--run-dir", default="runs/default", help="run directory: reads tokenizer/ and the source model")
    g.add_argument("--source", default=d["source"], help="stage whose model to start from (base, mid, sft)")
    g.add_argument("--source-tag", default=None, help="model tag of the source (default: its newest)")
    g.add_argument("--source-step", type=int, default=None, help="checkpoint step of the source (default: the last)")
    g.add_argument("--model-tag", default=None, help="subfolder name for this model (default: the source's tag)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="task data laid out like nanochat_jax/tasks/data "
                                                    "(default: the small samples shipped there; e.g. ../shared/data)")
    g.add_argument("--hf", action="store_true", help="read SmolTalk, MMLU and GSM8K from the Hugging Face hub")
    g.add_argument("--conversations", default=None, help="your own conversations (jsonl) added to the mixture")
    g.add_argument("--words", default=None, help="word list for the spelling tasks (default: the built-in corpus)")
    g.add_argument("--mmlu-epochs", type=int, default=d["recipe"]["mmlu_epochs"])
    g.add_argument("--gsm8k-epochs", type=int, default=d["recipe"]["gsm8k_epochs"])
    g = p.add_argument_group("horizon and batch (None = inherit from the source run)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = one epoch of the mixture)")
    g.add_argument("--max-seq-len", type=int, default=None)
    g.add_argument("--device-batch-size", type=int, default=None)
    g.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step")
    g = p.add_argument_group("optimization (None = inherit from the source run)")
    g.add_argument("--embedding-lr", type=float, default=None)
    g.add_argument("--unembedding-lr", type=float, default=None)
    g.add_argument("--matrix-lr", type=float, default=None)
    g.add_argument("--load-optimizer", type=int, choices=(0, 1), default=d["load_optimizer"],
                   help="warm-start the optimizer state from the source checkpoint")
    g.add_argument("--init-lr-frac", type=float, default=d["init_lr_frac"], help="LR as a fraction of the base LR")
    g.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"])
    g.add_argument("--warmdown-ratio", type=float, default=d["warmdown_ratio"])
    g.add_argument("--final-lr-frac", type=float, default=d["final_lr_frac"])
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=int, default=d["eval_every"], help="val bpb every N steps (-1 = only at the end)")
    g.add_argument("--eval-tokens", type=int, default=d["eval_tokens"], help="tokens per val evaluation")
    g.add_argument("--wandb-project", default=None, help="also log to Weights & Biases under this project")
    g.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints kept (older ones are deleted)")
    g.add_argument("--resume", action="store_true", help="resume from the latest checkpoint, if any")
    return p


def main_mid(argv=None):
    _main("mid", argv)


def main_sft(argv=None):
    _main("sft", argv)


def _main(stage, argv):
    args = build_parser(stage).parse_args(argv)
    try:
        run(stage, args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"{stage}: {e}")


def lr_multiplier(progress: float, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Of training progress in [0, 1]: linear warmup, flat, linear warmdown to `final_lr_frac`."""
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1 - warmdown_ratio:
        return 1.0
    decay = (progress - (1 - warmdown_ratio)) / warmdown_ratio
    return (1 - decay) + decay * final_lr_frac


def muon_momentum(step: int) -> float:
    frac = min(step / MOMENTUM_WARMUP_STEPS, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def source_directory(run_dir: str, source: str, tag: str | None) -> str:
    stage_dir = os.path.join(run_dir, source)
    tags = sorted(t for t in os.listdir(stage_dir) if os.path.isdir(os.path.join(stage_dir, t, "checkpoints"))) \
        if os.path.isdir(stage_dir) else []
    if not tags:
        raise FileNotFoundError(f"no {source!r} model in {run_dir}; run `python -m launch.stage {source} "
                                f"--run-dir {run_dir}` first")
    if tag is None:
        tag = max(tags, key=lambda t: os.path.getmtime(os.path.join(stage_dir, t)))
    if tag not in tags:
        raise FileNotFoundError(f"no {source!r} model {tag!r} in {run_dir}; there are: {', '.join(tags)}")
    return os.path.join(stage_dir, tag)


def inherit(args, source_meta: dict) -> list[str]:
    """Fills the None flags from the source run (its flags; the base stage also saved the derived
    total batch size) and returns one line per decision."""
    flags = source_meta.get("flags", {})
    lines = []
    for name, fallback in INHERITED:
        theirs = source_meta.get(name) if name == "total_batch_size" else flags.get(name)
        ours = getattr(args, name)
        if ours is None:
            setattr(args, name, theirs if theirs is not None else fallback)
            lines.append(f"{name} = {getattr(args, name)} (inherited)")
        elif theirs is not None and ours != theirs:
            lines.append(f"{name} = {ours} (the source used {theirs})")
    return lines


def run(stage, args):
    import jax
    import numpy as np
    from tqdm import tqdm

    from launch import loop as loop_lib
    from launch.tok import tokenizer_dir
    from nanochat_jax import data, model, optim, sharding, train
    from nanochat_jax.attention import default_backend
    from nanochat_jax.checkpoint import Checkpoints
    from nanochat_jax.config import GPTConfig, compute_dtype
    from nanochat_jax.evals.bpb import evaluate_bpb
    from nanochat_jax.tokenizer import Tokenizer

    wall_start = time.perf_counter()
    tok_dir = tokenizer_dir(args.run_dir)
    if not os.path.isdir(tok_dir):
        raise FileNotFoundError(f"no tokenizer in {tok_dir}; run `python -m launch.stage tok --run-dir {args.run_dir}` first")
    tokenizer = Tokenizer.from_directory(tok_dir)
    src_dir = source_directory(args.run_dir, args.source, args.source_tag)
    source = Checkpoints(os.path.join(src_dir, "checkpoints"))
    source_meta = source.meta(args.source_step)
    for line in inherit(args, source_meta):
        print(line)
    config = GPTConfig(**{**source_meta["model_config"], "sequence_len": args.max_seq_len})
    out_dir = os.path.join(args.run_dir, stage, args.model_tag or os.path.basename(src_dir))
    os.makedirs(out_dir, exist_ok=True)

    recipe = mixtures.Recipe(data_dir=args.data_dir, hf=args.hf, conversations=args.conversations, words=args.words,
                             **{**STAGES[stage]["recipe"], "mmlu_epochs": args.mmlu_epochs,
                                "gsm8k_epochs": args.gsm8k_epochs})
    train_mix, val_mix = mixtures.train_mixture(recipe), mixtures.val_mixture(recipe)
    print(f"training mixture: {len(train_mix):,} conversations {train_mix.sizes}")
    print(f"validation mixture: {len(val_mix):,} conversations {val_mix.sizes}")

    mesh = sharding.make_mesh()
    n_devices, n_local = len(jax.devices()), jax.local_device_count()
    rows_per_micro = args.device_batch_size * n_devices
    micro_steps = loop_lib.micro_steps(args.total_batch_size, args.device_batch_size, args.max_seq_len, n_devices)
    dtype = compute_dtype()
    step_config = train.StepConfig(model=config, dtype=dtype.name, attention_backend=default_backend())
    flops_per_token = model.flops_per_token(config)
    print(f"source: {src_dir} step {source_meta['step']} | devices: {n_devices} ({jax.devices()[0].device_kind}) | "
          f"micro-steps per step: {micro_steps} of {rows_per_micro} x {args.max_seq_len} | compute dtype: {dtype.name}")

    # Weight decay 0: pretraining already took Muon's decay to 0 by its end.
    groups = optim.reference_groups(config.n_embd, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                    matrix_lr=args.matrix_lr, weight_decay=0.0)
    optimizer = optim.build_optimizer(groups, optim.param_labels, ortho_dtype=dtype)
    params, opt_state, opt_shardings = train.init_train_state(step_config, optimizer, mesh, jax.random.key(0))
    step_fn = train.make_train_step(step_config, optimizer, mesh, opt_shardings)

    local_rows = args.device_batch_size * n_local
    proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
    supervise = STAGES[stage]["supervise"]
    micro_sharding = sharding.batch_sharding(mesh, ndim=3, batch_axis=1)
    train_batches = loop_lib.step_batches(  # see base_train
        data.conversation_dataset(train_mix, tokenizer, local_rows, args.max_seq_len, supervise=supervise,
                                  prefetch=2 * micro_steps, **proc), micro_steps, micro_sharding)

    checkpoints, resume_step = loop_lib.open_checkpoints(os.path.join(out_dir, "checkpoints"), config, keep=args.keep,
                                                         resume=args.resume)
    loop = {"smooth_loss": 0.0, "min_val_bpb": float("inf"), "training_time_s": 0.0, "progress": 0.0}
    start_step = 0
    if resume_step is not None:
        params, opt_state, data_state, meta = checkpoints.restore(resume_step, params, opt_state)
        train_batches.set_state(data_state)
        loop, start_step = meta["loop"], meta["step"]
        print(f"resumed from step {start_step} of {checkpoints.directory}")
    else:
        params, loaded, _, _ = source.restore(source_meta["step"], params, opt_state if args.load_optimizer else None)
        if args.load_optimizer:
            opt_state = loaded  # momentum buffers; the learning rates are this stage's
    source.close()

    settings = {**vars(args), "stage": stage, "source_dir": src_dir, "source_step": source_meta["step"],
                "supervise": supervise, "micro_steps": micro_steps, "devices": n_devices,
                "device_kind": jax.devices()[0].device_kind, "compute_dtype": dtype.name,
                "train_mixture": train_mix.sizes, "val_mixture": val_mix.sizes}

    log = loop_lib.MetricsLog(out_dir, wandb_project=args.wandb_project, name=f"{stage}-{os.path.basename(out_dir)}",
                              config=settings)
    total = args.num_iterations if args.num_iterations > 0 else None
    bar = loop_lib.progress_bar(total, start_step, stage)
    steps = loop_lib.OneStepLate(step_fn, loop_lib.step_accounting(
        start_step=start_step, loop=loop, flops_per_token=flops_per_token, log=log, bar=bar))

    def save(step):
        steps.settle()
        meta = {"model_config": config.to_json_dict(), "flags": settings, "loop": loop,
                "total_batch_size": args.total_batch_size}
        checkpoints.save(step, params, opt_state, train_batches.get_state(), meta)

    eval_sharding = sharding.batch_sharding(mesh)
    token_bytes = jax.device_put(tokenizer.token_bytes(), sharding.replicated(mesh))
    eval_batches_n = max(1, args.eval_tokens // (rows_per_micro * args.max_seq_len))

    def val_bpb():
        batches = data.conversation_batches(val_mix, tokenizer, local_rows, args.max_seq_len, supervise=supervise,
                                            **proc)
        return evaluate_bpb(params, batches, eval_batches_n, token_bytes, config=config, dtype=dtype.name,
                            attention_backend=step_config.attention_backend,
                            to_global=lambda x: sharding.global_batch(x, eval_sharding))

    def epoch_done():
        consumed = data.conversations_consumed(train_batches.get_state()) * jax.process_count()
        done = consumed >= len(train_mix)
        if jax.process_count() > 1:  # every process must stop at the same step
            from jax.experimental import multihost_utils

            done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
        return done, consumed / len(train_mix)

    step, finished = start_step, False
    with loop_lib.stop_requests() as stop:
        try:
            while True:
                finished = step >= args.num_iterations if args.num_iterations > 0 else epoch_done()[0]
                if finished or stop:
                    save(step)  # before the final eval: an eval crash must not cost the run
                if stop:
                    tqdm.write(f"interrupted: saved step {step}; continue with --resume")
                    break
                periodic = args.eval_every > 0 and step % args.eval_every == 0 and not (step == start_step > 0)
                if (finished or periodic) and args.eval_tokens > 0:
                    steps.settle()  # the record carries the training time so far
                    bpb = val_bpb()
                    loop["min_val_bpb"] = min(loop["min_val_bpb"], bpb)
                    log.record(step=step, val_bpb=bpb, training_time_s=loop["training_time_s"])
                    log.flush()
                    tqdm.write(f"step {step:05d} | val bpb {bpb:.4f}")
                if finished:
                    break
                batch = next(train_batches)
                # Progress counts the conversations in this step too, like the reference's prefetch.
                progress = step / args.num_iterations if args.num_iterations > 0 else epoch_done()[1]
                loop["progress"] = max(loop["progress"], progress)
                lrm = lr_multiplier(loop["progress"], args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
                loop_lib.set_hyperparameters(opt_state, lr_multiplier=args.init_lr_frac * lrm,
                                             muon_momentum=muon_momentum(step), muon_wd_multiplier=1.0)
                params, opt_state = steps(params, opt_state, *batch, step=step, tokens=args.total_batch_size,
                                          lr_multiplier=args.init_lr_frac * lrm, progress=loop["progress"])
                step += 1
                if args.save_every > 0 and step % args.save_every == 0:
                    save(step)
        finally:
            bar.close()
            log.close()
            checkpoints.close()
    if not finished:
        return
    samples = chat_samples(params, config, tokenizer, dtype.name)
    for prompt, answer in samples.items():
        print(f"  {prompt!r} -> {answer!r}")
    if jax.process_index() == 0:
        results = {"min_val_bpb": loop["min_val_bpb"]} if loop["min_val_bpb"] < float("inf") else {}
        loop_lib.write_summary(out_dir, stage=stage, settings={**settings, "flops_per_token": flops_per_token,
                                                               "parameters": model.param_counts(config)["total"]},
                               steps=step, tokens=step * args.total_batch_size,
                               training_time_s=loop["training_time_s"], wall_time_s=time.perf_counter() - wall_start,
                               results={**results, "samples": samples})
    best = "n/a" if loop["min_val_bpb"] == float("inf") else f"{loop['min_val_bpb']:.4f}"
    print(f"{stage}: {step} steps | training time (excluding compilation): {loop['training_time_s']:.1f}s | "
          f"min val bpb: {best} | checkpoints: {checkpoints.directory}")


def chat_samples(params, config, tokenizer, dtype, max_tokens: int = 48) -> dict[str, str]:
    """Greedy answers to a few chat prompts: a look at what the stage taught (tool calls run)."""
    from nanochat_jax.engine import Engine

    engine = Engine(params, config, tokenizer, dtype=dtype)
    prompts = [tokenizer.render_for_completion({"messages": [{"role": "user", "content": p},
                                                             {"role": "assistant", "content": ""}]})
               for p in CHAT_PROMPTS]
    samples = engine.generate_batch(prompts, max_tokens=max_tokens, temperature=0.0)
    return {p: tokenizer.decode(s[0].tokens) for p, s in zip(CHAT_PROMPTS, samples)}
