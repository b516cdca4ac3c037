"""Pretraining: `python -m launch.stage base`.

Flags and defaults are the reference's (`scripts/base_train.py`); the depth dial derives width,
batch size, learning rates, weight decay and the horizon, printed at the start. The run directory
is explicit: the stage reads `<run-dir>/tokenizer` (written by the `tok` stage) and writes
`<run-dir>/base/<model-tag>/`: `checkpoints/` (Orbax; the last one is the trained model) and
`metrics.jsonl`. Ctrl-C or SIGTERM saves a checkpoint and exits cleanly; `--resume` continues from
the latest checkpoint exactly where it stopped (same next batch, same schedules, same loop state).
"""

import argparse
import json
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.stage base", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--run-dir", default="runs/default", help="run directory: reads tokenizer/, writes base/")
    g.add_argument("--data-dir", default=None, help="folder of parquet/jsonl shards (default: the built-in corpus)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    g.add_argument("--model-tag", default=None, help="subfolder name for this model (default: d<depth>)")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=20, help="number of layers; everything else follows")
    g.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio")
    g.add_argument("--head-dim", type=int, default=128, help="target head dimension")
    g.add_argument("--max-seq-len", type=int, default=2048, help="context length")
    g.add_argument("--window-pattern", default="SSSL", help="sliding windows tiled over layers: L=full, S=quarter")
    g = p.add_argument_group("horizon (first one set wins)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = derive)")
    g.add_argument("--target-flops", type=float, default=-1.0, help="steps to reach these FLOPs (-1 = off)")
    g.add_argument("--target-param-data-ratio", type=float, default=12, help="tokens per scaling parameter")
    g = p.add_argument_group("optimization")
    g.add_argument("--device-batch-size", type=int, default=32, help="rows per device per micro-step")
    g.add_argument("--fp8", action="store_true",
                   help="train the linear layers' products in FP8 with per-tensor scales, as the reference's --fp8 "
                        "(Hopper or newer GPUs run them on FP8 tensor cores; elsewhere they are emulated, slowly); "
                        "evaluation stays in the compute dtype")
    g.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1 = derive)")
    g.add_argument("--embedding-lr", type=float, default=0.3)
    g.add_argument("--unembedding-lr", type=float, default=0.008)
    g.add_argument("--matrix-lr", type=float, default=0.02)
    g.add_argument("--scalar-lr", type=float, default=0.5)
    g.add_argument("--weight-decay", type=float, default=0.28, help="Muon's cautious weight decay at d12")
    g.add_argument("--warmup-steps", type=int, default=40)
    g.add_argument("--warmdown-ratio", type=float, default=0.65)
    g.add_argument("--final-lr-frac", type=float, default=0.05)
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=int, default=250, help="val bits-per-byte every N steps (-1 = off)")
    g.add_argument("--eval-tokens", type=int, default=80 * 524288, help="tokens per val evaluation")
    g.add_argument("--sample-every", type=int, default=2000, help="print greedy continuations of a few prompts every N steps (-1 = off)")
    g.add_argument("--wandb-project", default=None, help="also log to Weights & Biases under this project (needs `pip install wandb`)")
    g.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints kept (older ones are deleted)")
    g.add_argument("--resume-from-step", type=int, default=-1, help="resume from this checkpoint step (-1 = off)")
    g.add_argument("--resume", action="store_true", help="resume from the latest checkpoint, if any")
    return p


SAMPLE_PROMPTS = [
    "The largest ocean on Earth is",
    "Water freezes at a temperature of",
    "The first person to walk on the Moon was",
    "Three plus four equals",
]


def greedy_continuations(params, config, tokenizer, prompts, max_tokens, *, dtype, attention_backend):
    """Greedy continuations from the full forward on a fixed-size buffer (one compilation; the
    model is causal, so the padding after the written tokens never changes a prediction)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nanochat_jax import model

    encoded = [tokenizer.encode(p, prepend=tokenizer.bos_token_id) for p in prompts]
    length = -(-(max(map(len, encoded)) + max_tokens) // 32) * 32
    buffer = np.zeros((len(prompts), length), np.int32)
    for row, ids in enumerate(encoded):
        buffer[row, : len(ids)] = ids
    positions = np.array([len(ids) for ids in encoded])

    @jax.jit
    def next_tokens(params, buffer, positions):
        logits = model.forward(params, buffer, config, dtype=dtype, attention_backend=attention_backend)
        return jnp.argmax(logits[jnp.arange(len(prompts)), positions - 1], axis=-1)

    for _ in range(max_tokens):
        buffer[np.arange(len(prompts)), positions] = np.asarray(next_tokens(params, buffer, positions))
        positions += 1
    return [tokenizer.decode(buffer[row, len(ids) : positions[row]].tolist()) for row, ids in enumerate(encoded)]


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"base: {e}")


def run(args):
    import jax
    from tqdm import tqdm

    from nanochat_jax import data, model, optim, sharding, train
    from nanochat_jax.config import compute_dtype, config_from_depth
    from nanochat_jax.evals.bpb import evaluate_bpb
    from nanochat_jax.tokenizer import Tokenizer
    from nanochat_jax.attention import default_backend
    from launch import loop as loop_lib
    from launch.tok import tokenizer_dir

    tok_dir = tokenizer_dir(args.run_dir)
    if not os.path.isdir(tok_dir):
        raise FileNotFoundError(f"no tokenizer in {tok_dir}; run `python -m launch.stage tok --run-dir {args.run_dir}` first")
    tokenizer = Tokenizer.from_directory(tok_dir)
    out_dir = os.path.join(args.run_dir, "base", args.model_tag or f"d{args.depth}")
    os.makedirs(out_dir, exist_ok=True)

    config = config_from_depth(args.depth, vocab_size=tokenizer.vocab_size, sequence_len=args.max_seq_len,
                               window_pattern=args.window_pattern, aspect_ratio=args.aspect_ratio,
                               head_dim=args.head_dim)
    hp = optim.derive_hyperparameters(
        args.depth, vocab_size=tokenizer.vocab_size, sequence_len=args.max_seq_len,
        aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
        target_param_data_ratio=args.target_param_data_ratio,
        total_batch_size=None if args.total_batch_size < 0 else args.total_batch_size,
        num_iterations=None if args.num_iterations < 0 else args.num_iterations,
        embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr, matrix_lr=args.matrix_lr,
        scalar_lr=args.scalar_lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        warmdown_ratio=args.warmdown_ratio, final_lr_frac=args.final_lr_frac)
    flops_per_token = model.flops_per_token(config)
    num_iterations = hp.num_iterations
    if args.num_iterations < 0 and args.target_flops > 0:
        num_iterations = round(args.target_flops / (flops_per_token * hp.total_batch_size))
    if num_iterations < 1:
        raise ValueError(f"the horizon comes to {num_iterations} steps; set --num-iterations")

    mesh = sharding.make_mesh()
    n_devices, n_local = len(jax.devices()), jax.local_device_count()
    rows_per_micro = args.device_batch_size * n_devices
    micro_steps = loop_lib.micro_steps(hp.total_batch_size, args.device_batch_size, args.max_seq_len, n_devices)
    dtype = compute_dtype()
    step_config = train.StepConfig(model=config, dtype=dtype.name, attention_backend=default_backend(), fp8=args.fp8)

    print(f"model: {json.dumps(config.to_json_dict())}")
    print(f"parameters: {json.dumps(model.param_counts(config))}")
    print(f"FLOPs per token: {flops_per_token:.4e}")
    print(hp)
    print(f"iterations: {num_iterations:,} | devices: {n_devices} ({jax.devices()[0].device_kind}) | "
          f"micro-steps per step: {micro_steps} of {rows_per_micro} x {args.max_seq_len} | compute dtype: {dtype.name}"
          f"{' | FP8 products' if args.fp8 else ''}")

    # The schedules run inside the compiled update, from the optimizer's own step count (saved with
    # it, so a resumed run continues them): nothing to compute or transfer on the host per step.
    schedules = hp.schedules()
    optimizer = optim.build_optimizer(hp.groups(), optim.param_labels, ortho_dtype=dtype, **schedules)
    params, opt_state, opt_shardings = train.init_train_state(step_config, optimizer, mesh, jax.random.key(args.seed))
    step_fn = train.make_train_step(step_config, optimizer, mesh, opt_shardings)

    local_rows = args.device_batch_size * n_local
    proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
    # Two optimizer steps of micro-batches tokenized ahead: with fewer, the background thread stops
    # while the device computes and the next step waits for its rows to be tokenized.
    micro_sharding = sharding.batch_sharding(mesh, ndim=3, batch_axis=1)
    train_batches = loop_lib.step_batches(
        data.pretrain_dataset(tokenizer, local_rows, args.max_seq_len, source=args.data_dir, split="train",
                              seed=args.seed, prefetch=2 * micro_steps, **proc), micro_steps, micro_sharding)

    wall_start = time.perf_counter()
    checkpoints, resume_step = loop_lib.open_checkpoints(os.path.join(out_dir, "checkpoints"), config, keep=args.keep,
                                                         resume=args.resume, resume_from_step=args.resume_from_step)
    loop = {"smooth_loss": 0.0, "min_val_bpb": float("inf"), "training_time_s": 0.0}
    start_step = 0
    if resume_step is not None:
        params, opt_state, data_state, meta = checkpoints.restore(resume_step, params, opt_state)
        train_batches.set_state(data_state)
        loop, start_step = meta["loop"], meta["step"]
        print(f"resumed from step {start_step} of {checkpoints.directory}")

    log = loop_lib.MetricsLog(out_dir, wandb_project=args.wandb_project, name=args.model_tag or f"d{args.depth}",
                              config=vars(args))
    bar = loop_lib.progress_bar(num_iterations, start_step, "base")
    steps = loop_lib.OneStepLate(step_fn, loop_lib.step_accounting(
        start_step=start_step, loop=loop, flops_per_token=flops_per_token, log=log, bar=bar))

    def save(step):
        steps.settle()
        meta = {"model_config": config.to_json_dict(), "flags": vars(args), "loop": loop, "seed": args.seed,
                "total_batch_size": hp.total_batch_size, "num_iterations": num_iterations}
        checkpoints.save(step, params, opt_state, train_batches.get_state(), meta)

    eval_sharding = sharding.batch_sharding(mesh)
    token_bytes = jax.device_put(tokenizer.token_bytes(), sharding.replicated(mesh))
    eval_batches_n = max(1, args.eval_tokens // (rows_per_micro * args.max_seq_len))

    def val_bpb():
        batches = data.pretrain_batches(tokenizer, local_rows, args.max_seq_len, source=args.data_dir,
                                        split="val", **proc)
        return evaluate_bpb(params, batches, eval_batches_n, token_bytes, config=config, dtype=dtype.name,
                            attention_backend=step_config.attention_backend,
                            to_global=lambda x: sharding.global_batch(x, eval_sharding))

    host = jax.local_devices(backend="cpu")[0]
    step = start_step
    with loop_lib.stop_requests() as stop:
        try:
            while True:
                last = step == num_iterations
                if last or stop:
                    save(step)  # before the final eval: an eval crash must not cost the run
                if stop:
                    tqdm.write(f"interrupted: saved step {step}; continue with --resume")
                    break
                if args.eval_every > 0 and (last or step % args.eval_every == 0) and not (step == start_step > 0):
                    steps.settle()  # the record carries the training time so far
                    bpb = val_bpb()
                    loop["min_val_bpb"] = min(loop["min_val_bpb"], bpb)
                    log.record(step=step, val_bpb=bpb, training_time_s=loop["training_time_s"])
                    log.flush()
                    tqdm.write(f"step {step:05d} | val bpb {bpb:.4f}")
                if args.sample_every > 0 and (last or (step > 0 and step % args.sample_every == 0)):
                    samples = greedy_continuations(params, config, tokenizer, SAMPLE_PROMPTS, 16, dtype=dtype.name,
                                                   attention_backend=step_config.attention_backend)
                    for prompt, text in zip(SAMPLE_PROMPTS, samples):
                        tqdm.write(f"  {prompt!r} -> {text!r}")
                if last:
                    break
                batch = next(train_batches)
                with jax.default_device(host):  # the record's copy of the schedule: nothing for the GPU to wait on
                    lr_multiplier = float(schedules["lr_multiplier"](step))
                params, opt_state = steps(params, opt_state, *batch, step=step, tokens=hp.total_batch_size,
                                          lr_multiplier=lr_multiplier)
                step += 1
                if args.save_every > 0 and step % args.save_every == 0 and step < num_iterations:
                    save(step)
        finally:
            bar.close()
            log.close()
            checkpoints.close()
    if step == num_iterations and jax.process_index() == 0:
        settings = {**vars(args), "total_batch_size": hp.total_batch_size, "num_iterations": num_iterations,
                    "micro_steps": micro_steps, "devices": n_devices, "device_kind": jax.devices()[0].device_kind,
                    "compute_dtype": dtype.name, "parameters": model.param_counts(config)["total"],
                    "flops_per_token": flops_per_token}
        loop_lib.write_summary(out_dir, stage="base", settings=settings, steps=step, tokens=step * hp.total_batch_size,
                               training_time_s=loop["training_time_s"], wall_time_s=time.perf_counter() - wall_start,
                               results={"min_val_bpb": loop["min_val_bpb"]} if loop["min_val_bpb"] < float("inf") else {})
    best = "n/a" if loop["min_val_bpb"] == float("inf") else f"{loop['min_val_bpb']:.4f}"
    print(f"training time (excluding compilation): {loop['training_time_s']:.1f}s | min val bpb: {best} | "
          f"checkpoints: {checkpoints.directory}")
    return params
