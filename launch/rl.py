"""Reinforcement learning on GSM8K: `python -m launch.stage rl`.

The reference's simplified GRPO, i.e. REINFORCE: every step samples `--num-samples` completions of
each of `--examples-per-step` training problems through the engine (temperature 1, top-k 50); a
completion's reward is 1 when its final answer is right, else 0; its advantage is the reward minus
the mean reward of the samples of the same problem. The loss is the advantage-weighted negative
log-likelihood of the tokens the model sampled (never the prompt, the calculator's forced output
or the padding), recomputed by the model on the sampled sequences, normalised per token (the
DAPO-style token-level normalisation; here over all sampled tokens of the step, where the reference
normalises per forward pass of `--device-batch-size` rows). No KL term and no PPO ratio: on policy.

The learning rate is `--init-lr-frac` of the base values, ramped linearly down to 0 over one epoch
of GSM8K train (or `--num-iterations`); the optimizer is fresh. pass@k on GSM8K test every
`--eval-every` steps. Writes `<run-dir>/rl/<model-tag>/` like the other stages; `--resume`
continues exactly (a step's problems and sampling seed depend only on the step number).
"""

import argparse
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.stage rl", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--run-dir", default="runs/default", help="run directory: reads tokenizer/ and the source model")
    g.add_argument("--source", default="sft", help="stage whose model to start from")
    g.add_argument("--source-tag", default=None, help="model tag of the source (default: its newest)")
    g.add_argument("--source-step", type=int, default=None, help="checkpoint step of the source (default: the last)")
    g.add_argument("--model-tag", default=None, help="subfolder name for this model (default: the source's tag)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="task data laid out like nanochat_jax/tasks/data")
    g.add_argument("--hf", action="store_true", help="read GSM8K from the Hugging Face hub")
    g = p.add_argument_group("horizon, batch and sampling")
    g.add_argument("--num-epochs", type=int, default=1, help="epochs over GSM8K train")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = from --num-epochs)")
    g.add_argument("--device-batch-size", type=int, default=8, help="rows per device per forward/backward pass")
    g.add_argument("--examples-per-step", type=int, default=16, help="problems per optimizer step")
    g.add_argument("--num-samples", type=int, default=16, help="samples per problem")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50, help="0 = no top-k")
    g = p.add_argument_group("optimization")
    g.add_argument("--embedding-lr", type=float, default=0.2)
    g.add_argument("--unembedding-lr", type=float, default=0.004)
    g.add_argument("--matrix-lr", type=float, default=0.02)
    g.add_argument("--init-lr-frac", type=float, default=0.05, help="LR as a fraction of the base LR at step 0")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=int, default=60, help="pass@k every N steps (-1 = only at the end)")
    g.add_argument("--eval-examples", type=int, default=400, help="GSM8K test problems per evaluation (0 = none)")
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--save-every", type=int, default=60, help="checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--keep", type=int, default=3)
    g.add_argument("--resume", action="store_true", help="resume from the latest checkpoint, if any")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"rl: {e}")


def rewards_and_advantages(rewards_PS):
    """(P, S) rewards -> advantages: each reward minus the mean over the samples of its problem."""
    import numpy as np

    r = np.asarray(rewards_PS, np.float32)
    return r - r.mean(axis=1, keepdims=True)


def rollout_batch(prompts, samples, advantages_PS, pad_id: int, length: int | None = None):
    """Model inputs, targets and per-token weights (each (P*S, T)) for the sampled sequences:
    prompt + sample, padded with `pad_id`; targets are -1 wherever the token was not sampled by the
    model (prompt, tool-forced output, padding) and weights the sample's advantage elsewhere 0."""
    import numpy as np

    seqs, masks, adv = [], [], []
    for prompt, group, a_S in zip(prompts, samples, advantages_PS):
        for s, a in zip(group, a_S):
            seqs.append(list(prompt) + list(s.tokens))
            masks.append([0] * len(prompt) + list(s.masks))
            adv.append(a)
    T = max(len(s) for s in seqs) - 1 if length is None else length
    ids = np.full((len(seqs), T + 1), pad_id, np.int32)
    mask = np.zeros((len(seqs), T + 1), np.int32)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)], mask[i, :len(m)] = s, m
    targets = np.where(mask[:, 1:] == 1, ids[:, 1:], -1).astype(np.int32)
    weights = np.where(targets >= 0, np.asarray(adv, np.float32)[:, None], 0.0).astype(np.float32)
    return ids[:, :-1], targets, weights


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 1) % 2**31


def run(args):
    import jax
    import numpy as np
    from tqdm import tqdm

    from launch import loop as loop_lib
    from launch.chat_train import source_directory
    from launch.tok import tokenizer_dir
    from nanochat_jax import model, optim, sharding, train
    from nanochat_jax.attention import default_backend
    from nanochat_jax.checkpoint import Checkpoints
    from nanochat_jax.config import GPTConfig, compute_dtype
    from nanochat_jax.engine import Engine
    from nanochat_jax.tasks import gsm8k
    from nanochat_jax.tokenizer import Tokenizer

    wall_start = time.perf_counter()
    tok_dir = tokenizer_dir(args.run_dir)
    if not os.path.isdir(tok_dir):
        raise FileNotFoundError(f"no tokenizer in {tok_dir}; run `python -m launch.stage tok --run-dir {args.run_dir}` first")
    tokenizer = Tokenizer.from_directory(tok_dir)
    src_dir = source_directory(args.run_dir, args.source, args.source_tag)
    source = Checkpoints(os.path.join(src_dir, "checkpoints"))
    source_meta = source.meta(args.source_step)
    config = GPTConfig(**source_meta["model_config"])
    out_dir = os.path.join(args.run_dir, "rl", args.model_tag or os.path.basename(src_dir))
    os.makedirs(out_dir, exist_ok=True)

    train_set = gsm8k.load("train", args.data_dir, args.hf)
    val_set = gsm8k.load("test", args.data_dir, args.hf)
    E, S = args.examples_per_step, args.num_samples
    num_steps = args.num_iterations if args.num_iterations > 0 else (len(train_set) // E) * args.num_epochs
    if num_steps < 1:
        raise ValueError(f"{len(train_set)} training problems make no step of {E} problems")

    mesh = sharding.make_mesh()
    n_devices = len(jax.devices())
    if jax.process_count() > 1:
        raise ValueError("rl runs on one host")  # the rollouts are sampled on the host of process 0
    rows_per_micro = args.device_batch_size * n_devices
    if (E * S) % rows_per_micro:
        raise ValueError(f"{E} x {S} sequences per step is not a multiple of one pass's {rows_per_micro} rows "
                         f"({args.device_batch_size} x {n_devices} devices)")
    micro_steps = E * S // rows_per_micro
    dtype = compute_dtype()
    step_config = train.StepConfig(model=config, dtype=dtype.name, attention_backend=default_backend())
    groups = optim.reference_groups(config.n_embd, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                    matrix_lr=args.matrix_lr, weight_decay=0.0)
    optimizer = optim.build_optimizer(groups, optim.param_labels, ortho_dtype=dtype)
    params, opt_state, opt_shardings = train.init_train_state(step_config, optimizer, mesh, jax.random.key(0))
    step_fn = train.make_train_step(step_config, optimizer, mesh, opt_shardings)
    print(f"source: {src_dir} step {source_meta['step']} | {num_steps} steps of {E} problems x {S} samples | "
          f"{micro_steps} passes of {rows_per_micro} rows | compute dtype: {dtype.name}")

    checkpoints, resume_step = loop_lib.open_checkpoints(os.path.join(out_dir, "checkpoints"), config, keep=args.keep,
                                                         resume=args.resume)
    loop = {"smooth_loss": 0.0, "training_time_s": 0.0, "last_pass_at": {}}
    start_step = 0
    if resume_step is not None:
        params, opt_state, _, meta = checkpoints.restore(resume_step, params, opt_state)
        loop, start_step = meta["loop"], meta["step"]
        print(f"resumed from step {start_step} of {checkpoints.directory}")
    else:
        params, _, _, _ = source.restore(source_meta["step"], params, None)
    source.close()

    settings = {**vars(args), "stage": "rl", "source_dir": src_dir, "source_step": source_meta["step"],
                "num_steps": num_steps, "micro_steps": micro_steps, "devices": n_devices,
                "device_kind": jax.devices()[0].device_kind, "compute_dtype": dtype.name}

    flops_per_token = model.flops_per_token(config)
    log = loop_lib.MetricsLog(out_dir, wandb_project=args.wandb_project, name=f"rl-{os.path.basename(out_dir)}",
                              config=settings)
    bar = loop_lib.progress_bar(num_steps, start_step, "rl")
    steps = loop_lib.OneStepLate(step_fn, loop_lib.step_accounting(
        start_step=start_step, loop=loop, flops_per_token=flops_per_token, log=log, bar=bar))

    def save(step):
        steps.settle()
        meta = {"model_config": config.to_json_dict(), "flags": settings, "loop": loop}
        checkpoints.save(step, params, opt_state, {"step": step}, meta)

    pad_id = tokenizer.encode_special("<|assistant_end|>")  # never a target: masked out
    micro_sharding = sharding.batch_sharding(mesh, ndim=3, batch_axis=1)
    top_k = args.top_k or None

    def engine():
        return Engine(params, config, tokenizer, dtype=dtype.name)

    def pass_at_k():
        problems = val_set[:args.eval_examples]
        k = args.device_batch_size
        prompts = [tokenizer.render_for_completion(c) for c in problems]
        samples = engine().generate_batch(prompts, max_tokens=args.max_new_tokens, num_samples=k,
                                          temperature=1.0, top_k=50, seed=args.seed)
        right = np.array([[gsm8k.evaluate(c, tokenizer.decode(s.tokens)) for s in group]
                          for c, group in zip(problems, samples)])
        return {f"pass@{i}": float(right[:, :i].any(axis=1).mean()) for i in range(1, k + 1)}

    def rollouts(step):
        problems = [train_set[(step * E + i) % len(train_set)] for i in range(E)]
        prompts = [tokenizer.render_for_completion(c) for c in problems]
        samples = engine().generate_batch(prompts, max_tokens=args.max_new_tokens, num_samples=S,
                                          temperature=args.temperature, top_k=top_k,
                                          seed=step_seed(args.seed, step))
        rewards = np.array([[float(gsm8k.evaluate(c, tokenizer.decode(s.tokens))) for s in group]
                            for c, group in zip(problems, samples)], np.float32)
        # The length is rounded up so that few distinct shapes are compiled.
        longest = max(len(p) + len(s.tokens) for p, g in zip(prompts, samples) for s in g) - 1
        length = min(-(-longest // 64) * 64, max(longest, config.sequence_len))
        inputs, targets, weights = rollout_batch(prompts, samples, rewards_and_advantages(rewards), pad_id, length)
        lengths = [len(s.tokens) for g in samples for s in g]
        shape = (micro_steps, rows_per_micro, inputs.shape[1])
        batch = tuple(sharding.global_batch(a.reshape(shape), micro_sharding) for a in (inputs, targets, weights))
        return batch, float(rewards.mean()), float(np.mean(lengths)), int((targets >= 0).sum())

    step, finished = start_step, False
    with loop_lib.stop_requests() as stop:
        try:
            while True:
                finished = step >= num_steps
                if finished or stop:
                    save(step)
                if stop:
                    tqdm.write(f"interrupted: saved step {step}; continue with --resume")
                    break
                periodic = args.eval_every > 0 and step % args.eval_every == 0 and not (step == start_step > 0)
                if (finished or periodic) and args.eval_examples > 0:
                    loop["last_pass_at"] = pass_at_k()
                    log.record(step=step, **loop["last_pass_at"], training_time_s=loop["training_time_s"])
                    log.flush()
                    tqdm.write(f"step {step:05d} | " + ", ".join(f"{k} {v:.4f}" for k, v in loop["last_pass_at"].items()))
                if finished:
                    break
                batch, reward, seq_len, sampled = rollouts(step)
                lrm = 1.0 - step / num_steps
                loop_lib.set_hyperparameters(opt_state, lr_multiplier=args.init_lr_frac * lrm, muon_momentum=0.95,
                                             muon_wd_multiplier=1.0)
                params, opt_state = steps(params, opt_state, *batch, step=step, tokens=batch[0].size,
                                          lr_multiplier=args.init_lr_frac * lrm, reward=reward,
                                          sequence_length=seq_len, sampled_tokens=sampled)
                # The next rollouts sample from this step's params, so nothing overlaps the step:
                # it is accounted for at once, without the sampling time.
                steps.settle()
                step += 1
                if args.save_every > 0 and step % args.save_every == 0:
                    save(step)
        finally:
            bar.close()
            log.close()
            checkpoints.close()
    if not finished:
        return
    loop_lib.write_summary(out_dir, stage="rl", settings={**settings, "flops_per_token": flops_per_token,
                                                           "parameters": model.param_counts(config)["total"]},
                           steps=step, tokens=0, training_time_s=loop["training_time_s"],
                           wall_time_s=time.perf_counter() - wall_start, results=dict(loop["last_pass_at"]))
    print(f"rl: {step} steps | training time (excluding compilation): {loop['training_time_s']:.1f}s | "
          f"{loop['last_pass_at']} | checkpoints: {checkpoints.directory}")
