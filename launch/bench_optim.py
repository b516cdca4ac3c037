"""Time one optimizer step (Muon + AdamW, update applied) at a given depth.

    python -m launch.bench_optim --depth 20      # on the GPU; the reference takes 34 ms on an H200
    python -m launch.bench_optim --depth 2       # a quick check on a CPU

Builds the depth's parameters and random gradients on a mesh over every device (each leaf
sharded over `data` along its first divisible axis), compiles the jitted step with donated
buffers, then times `--repeats` steps (block_until_ready each) and reports the median. Prints the
depth's hyperparameters, a table, and one JSON line for scripts.

Optimizer state is 8 bytes per AdamW parameter (two float32 moments) and about 4 per Muon
parameter (the momentum; NorMuon's second moment is one float per row or column): at d20, 5.2 GiB
for 896.5M parameters, 6.25 bytes each, divided over the `data` axis.
"""

import argparse
import functools
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from nanochat_jax import optim, sharding
from nanochat_jax.config import compute_dtype, config_from_depth
from nanochat_jax.model import init_params


def _nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--ortho-dtype", default=None, help="orthogonalization dtype (default: the compute dtype)")
    args = parser.parse_args(argv)

    config = config_from_depth(args.depth)
    hp = optim.derive_hyperparameters(args.depth)
    print(hp)
    mesh = sharding.make_mesh()
    init = functools.partial(init_params, config)
    shapes = jax.eval_shape(init, jax.random.key(0))
    p_sh = sharding.param_shardings(config, mesh)
    params = jax.jit(init, out_shardings=p_sh)(jax.random.key(0))

    def random_grads(key):
        keys = jax.random.split(key, len(jax.tree.leaves(shapes)))
        leaves = [1e-3 * jax.random.normal(k, s.shape, jnp.float32) for k, s in zip(keys, jax.tree.leaves(shapes))]
        return jax.tree.unflatten(jax.tree.structure(shapes), leaves)

    grads = jax.jit(random_grads, out_shardings=p_sh)(jax.random.key(1))

    ortho_dtype = jnp.dtype(args.ortho_dtype) if args.ortho_dtype else compute_dtype()
    tx = optim.build_optimizer(hp.groups(), optim.param_labels(params), **hp.schedules(), ortho_dtype=ortho_dtype)
    s_sh = sharding.state_shardings(jax.eval_shape(tx.init, params), p_sh, mesh)
    state = jax.jit(tx.init, out_shardings=s_sh)(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh), donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = step.lower(params, state, grads).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))

    params, state = jax.block_until_ready(compiled(params, state, grads))  # first run: allocation, autotuning
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        params, state = jax.block_until_ready(compiled(params, state, grads))
        times.append(time.perf_counter() - t0)

    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_muon = sum(x.size for x in jax.tree.leaves(params["blocks"]))
    stats = jax.devices()[0].memory_stats() or {}
    median = statistics.median(times)
    result = {
        "depth": args.depth,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "ortho_dtype": str(ortho_dtype),
        "params": n_params,
        "muon_params": n_muon,
        "state_bytes_per_param": _nbytes(state) / n_params,
        "step_ms_median": 1e3 * median,
        "step_ms_min": 1e3 * min(times),
        "compile_s": compile_s,
        "flops_per_step": flops,
        "tflops_per_s": flops / median / 1e12 if flops else None,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    }
    rows = [
        ("device", result["device"]),
        ("orthogonalization dtype", result["ortho_dtype"]),
        ("parameters (Muon)", f"{n_params:,} ({n_muon:,})"),
        ("optimizer state", f"{_nbytes(state) / 2**30:.2f} GiB, {result['state_bytes_per_param']:.3f} bytes/param"),
        ("step, median of " + str(args.repeats), f"{result['step_ms_median']:.2f} ms (min {result['step_ms_min']:.2f} ms)"),
        ("compile", f"{compile_s:.1f} s"),
        ("FLOPs per step (XLA)", f"{flops:.3e}" + (f", {result['tflops_per_s']:.1f} TFLOP/s" if flops else "")),
    ]
    if result["peak_bytes_in_use"] is not None:
        rows.append(("peak device memory", f"{result['peak_bytes_in_use'] / 2**30:.2f} GiB"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(json.dumps(result))
    if not all(math.isfinite(float(jnp.sum(x))) for x in jax.tree.leaves(params)):
        raise SystemExit("non-finite parameters after the benchmark steps")


if __name__ == "__main__":
    main()
