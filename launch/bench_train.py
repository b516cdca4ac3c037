"""Training throughput: `python -m launch.bench_train --depth 20 [--window-pattern SSSL] [--device-batch-size 32]`.

Times the real training step (model, loss, Muon + AdamW, gradient accumulation over micro-steps)
on random tokens already on the device, after compilation, the way the training loop runs it
(`launch.loop.OneStepLate`: each step dispatched before the previous one's loss is read, and timed
from the previous one's end to its own): the median of several full optimizer steps. Also times
one micro-step alone (forward + backward) so the optimizer's share is visible. Prints a table and,
last, a JSON line. Several depths or window patterns (comma-separated) run in one call, each in the
same process and on the same device.
"""

import argparse
import json
import os
import statistics
import sys
import time

PEAK_BF16 = 989e12  # H100/H200 dense bf16, the reference's MFU denominator
MEASURED_CEILING = 808e12  # bf16 8192^3 matmul measured on the lent H200


def kernel_table(trace_dir, top=50):
    """GPU time per kernel of a `jax.profiler` trace (the perfetto file under `trace_dir`): the total
    per category (matmul, attention, elementwise = XLA's own fusions) and the `top` kernels, in ms."""
    import collections
    import glob
    import gzip

    paths = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto trace under {trace_dir}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "/device:GPU" in e["args"]["name"]}
    kernels = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids:
            kernels[e["name"]] += e.get("dur", 0) / 1e3

    def category(name):
        if any(k in name for k in ("nvjet", "gemm", "cublas", "cutlass", "matmul")):
            return "matmul"
        if "cudnn" in name or "attention" in name:
            return "attention"
        return "memset/copy" if name.startswith(("Memset", "Memcpy")) else "elementwise"

    categories = collections.Counter()
    for name, ms in kernels.items():
        categories[category(name)] += ms
    return {"categories_ms": dict(categories.most_common()), "kernels_ms": dict(kernels.most_common(top))}


def bench(depth, window_pattern, device_batch_size, total_batch_size, seq_len, steps, attention_backend, loss_chunk_len,
          profile_dir=None, num_devices=None, fp8=False):
    import jax

    from launch.loop import OneStepLate
    from nanochat_jax import model, optim, sharding, train
    from nanochat_jax.config import compute_dtype, config_from_depth

    config = config_from_depth(depth, sequence_len=seq_len, window_pattern=window_pattern)
    hp = optim.derive_hyperparameters(depth, sequence_len=seq_len, total_batch_size=total_batch_size)
    devices = jax.devices()[:num_devices]
    mesh = sharding.make_mesh(devices=devices)
    rows = device_batch_size * len(devices)
    micro_steps = total_batch_size // (rows * seq_len)
    if micro_steps < 1 or micro_steps * rows * seq_len != total_batch_size:
        raise ValueError(f"total batch {total_batch_size} is not a multiple of {rows} x {seq_len}")
    dtype = compute_dtype()
    step_config = train.StepConfig(model=config, dtype=dtype.name, attention_backend=attention_backend,
                                   loss_chunk_len=loss_chunk_len, fp8=fp8)
    optimizer = optim.build_optimizer(hp.groups(), optim.param_labels, ortho_dtype=dtype, **hp.schedules())
    params, opt_state, opt_shardings = train.init_train_state(step_config, optimizer, mesh, jax.random.key(0))

    tokens = jax.random.randint(jax.random.key(1), (micro_steps, rows, seq_len + 1), 0, config.vocab_size)
    batch_sharding = sharding.batch_sharding(mesh, ndim=3, batch_axis=1)
    inputs = jax.device_put(tokens[..., :-1], batch_sharding)
    targets = jax.device_put(tokens[..., 1:], batch_sharding)

    done = []  # (loss, seconds) of each step
    runner = OneStepLate(train.make_train_step(step_config, optimizer, mesh, opt_shardings),
                         lambda loss, dt: done.append((loss, dt)))
    params, opt_state = runner(params, opt_state, inputs, targets)  # compiles; waited for
    # Then the way the training loop runs them: each step is dispatched before the previous one's
    # loss is read, and takes from the previous one's end to its own.
    for _ in range(steps):
        params, opt_state = runner(params, opt_state, inputs, targets)
    runner.settle()
    (_, first_s), *timed = done
    times = [dt for _, dt in timed]
    loss = timed[-1][0]
    step_s = statistics.median(times)
    # One micro-step alone (forward + backward), for the optimizer's share. Timed after the steps,
    # with trained weights: at init the output projections are zero, and on a power-capped GPU
    # multiplying zeros runs at higher clocks (d20: 381 ms against 432 ms per micro-step).
    micro_fn = train.make_loss_and_grads(step_config, mesh)
    jax.block_until_ready(micro_fn(params, inputs[:1], targets[:1]))  # compiles
    micro_times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(micro_fn(params, inputs[:1], targets[:1]))
        micro_times.append(time.perf_counter() - t0)
    micro_s = statistics.median(micro_times)
    compile_s = first_s - step_s  # the first step compiles the micro-step and the update
    profile = None
    if profile_dir:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            params, opt_state = runner(params, opt_state, inputs, targets)
            runner.settle()
        profile = kernel_table(profile_dir)
    flops = model.flops_per_token(config) * total_batch_size
    stats = devices[0].memory_stats() or {}
    return {
        "depth": depth, "window_pattern": window_pattern, "attention": attention_backend, "loss_chunk_len": loss_chunk_len,
        "device_batch_size": device_batch_size, "seq_len": seq_len, "micro_steps": micro_steps,
        "devices": len(devices), "device_kind": devices[0].device_kind, "dtype": dtype.name, "fp8": fp8,
        "tokens_per_s": total_batch_size / step_s, "tokens_per_s_per_device": total_batch_size / step_s / len(devices), "step_ms": 1e3 * step_s,
        # The steps' span over their count.
        "step_ms_mean": 1e3 * statistics.mean(times),
        "micro_step_ms": 1e3 * micro_s, "optimizer_ms_est": 1e3 * (step_s - micro_steps * micro_s),
        "mfu_989": 100 * flops / step_s / (PEAK_BF16 * len(devices)),
        "mfu_measured_ceiling": 100 * flops / step_s / (MEASURED_CEILING * len(devices)),
        "peak_gb": (stats.get("peak_bytes_in_use") or 0) / 1e9, "compile_s": compile_s, "loss": loss,
        **({"profile": profile} if profile else {}),
    }


def print_profile(r, top):
    """GPU milliseconds of one traced step: per category, then the `top` kernels."""
    prof = r["profile"]
    print(f"d{r['depth']} {r['window_pattern']}: GPU time of one step by category (ms): " +
          ", ".join(f"{k} {v:.1f}" for k, v in prof["categories_ms"].items()))
    for name, ms in list(prof["kernels_ms"].items())[:top]:
        print(f"{ms:10.2f}  {name[:120]}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m launch.bench_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", default="20", help="comma-separated depths")
    parser.add_argument("--window-pattern", default="L", help="comma-separated patterns (L = full attention)")
    parser.add_argument("--device-batch-size", type=int, default=32)
    parser.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median reported)")
    parser.add_argument("--attention", default=None, help="attention backend (default: the platform's)")
    parser.add_argument("--loss-chunk-len", type=int, default=None, help="positions per head/loss chunk (0 = whole rows)")
    parser.add_argument("--fp8", action="store_true",
                        help="the linear layers' products in FP8, as the reference's --fp8 (nanochat_jax/fp8.py)")
    parser.add_argument("--json", help="also append the JSON lines to this file")
    parser.add_argument("--devices", default=None,
                        help="comma-separated device counts, each run on the first N devices (default: all)")
    parser.add_argument("--profile", metavar="DIR", help="trace one more step into DIR and print GPU time per kernel")
    args = parser.parse_args(argv)

    from nanochat_jax.attention import default_backend

    from nanochat_jax.train import StepConfig

    import jax

    backend = args.attention or default_backend()
    chunk = StepConfig.loss_chunk_len if args.loss_chunk_len is None else args.loss_chunk_len
    results = []
    device_counts = [None] if args.devices is None else [int(n) for n in args.devices.split(",")]
    for n in device_counts:
        rows_per_step = args.device_batch_size * (n or jax.device_count()) * args.max_seq_len
        if args.total_batch_size % rows_per_step:
            parser.error(f"--total-batch-size {args.total_batch_size} is not a multiple of --device-batch-size "
                         f"{args.device_batch_size} x {n or jax.device_count()} devices x --max-seq-len {args.max_seq_len}")
    runs = [(d, w, n) for d in map(int, args.depth.split(",")) for w in args.window_pattern.split(",") for n in device_counts]
    for depth, pattern, num_devices in runs:
        profile_dir = args.profile and os.path.join(args.profile, f"d{depth}_{pattern}_{num_devices or 'all'}")
        try:
            r = bench(depth, pattern, args.device_batch_size, args.total_batch_size, args.max_seq_len,
                      args.steps, backend, chunk, profile_dir, num_devices, args.fp8)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            # The configuration does not fit: say so and go on with the others.
            print(f"d{depth} {pattern}, device batch {args.device_batch_size}: out of device memory "
                  f"({str(e).splitlines()[0][:160]}); a smaller --device-batch-size needs less", file=sys.stderr)
            r = {"depth": depth, "window_pattern": pattern, "device_batch_size": args.device_batch_size,
                 "devices": num_devices or jax.device_count(), "fp8": args.fp8, "error": "out of device memory"}
        results.append(r)
        if "profile" in r:
            print_profile(r, top=40)
        print(json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
    header = ("depth", "window", "products", "devices", "tok/s", "tok/s/device", "step ms", "micro ms", "optim ms", "MFU 989",
              "MFU ceil", "peak GB", "compile s")
    print(" | ".join(header))
    for r in results:
        row = [str(r["depth"]), r["window_pattern"], "fp8" if r.get("fp8") else r.get("dtype", ""), str(r["devices"])]
        if "error" in r:
            print(" | ".join(row + [r["error"]]))
            continue
        print(" | ".join(row + [f"{r['tokens_per_s']:,.0f}",
                                f"{r['tokens_per_s_per_device']:,.0f}", f"{r['step_ms']:.1f}",
                                f"{r['micro_step_ms']:.1f}", f"{r['optimizer_ms_est']:.1f}", f"{r['mfu_989']:.1f}%",
                                f"{r['mfu_measured_ceiling']:.1f}%", f"{r['peak_gb']:.1f}", f"{r['compile_s']:.1f}"]))
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    print(json.dumps(results[-1] if len(results) == 1 else results))
    if any("error" in r for r in results):
        sys.exit(1)

if __name__ == "__main__":
    main()
