"""One optimizer step on all devices equals the same step on one device: `python -m launch.mesh_check --depth 12`.

The real training step (model, loss, Muon + AdamW, gradient accumulation) from the same initial
weights and the same global batch of random tokens, once on a mesh of every device and once on the
first device alone, which accumulates over as many micro-steps as there are devices. Prints the
relative error of every parameter after the step (worst first) and a JSON line; exits with 1 when
one exceeds --tolerance. Run it in float32 (the default) so rounding does not hide a real bug.

The weights are those of the reference init with its zeroed output projections, lm_head scale and
smear gain made live (random): at init many gradients are exactly zero or at rounding level, and
Adam's first step turns each of those into a full +-lr step of arbitrary sign, so the check would
compare noise. Muon's cautious weight decay is switched off for the same reason: its mask flips
where an update coordinate is within rounding of zero (see tests/test_optim.py).
"""

import argparse
import dataclasses
import json
import sys


def live_weights(params):
    """The init's zero (or tiny) output projections, lm_head and smear gain replaced by random values,
    on the same shardings; the same values whatever the mesh."""
    import jax

    keys = iter(jax.random.split(jax.random.key(1), 3))

    def live(w):
        return jax.device_put(0.05 * jax.random.normal(next(keys), w.shape, w.dtype), w.sharding)

    blocks = {**params["blocks"], "attn_proj": live(params["blocks"]["attn_proj"]),
              "mlp_proj": live(params["blocks"]["mlp_proj"])}
    return {**params, "blocks": blocks, "lm_head": live(params["lm_head"]), "smear_lambda": params["smear_lambda"] + 0.5}


def step_once(devices, config, step_config, hp, tokens_MBT, micro_steps):
    """Parameters after one step on a mesh of `devices`, the batch regrouped into `micro_steps`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nanochat_jax import optim, sharding, train

    groups = hp.groups()
    groups["matrix"] = dataclasses.replace(groups["matrix"], weight_decay=0.0)
    optimizer = optim.build_optimizer(groups, optim.param_labels, ortho_dtype=jnp.dtype(step_config.dtype), **hp.schedules())
    mesh = sharding.make_mesh(devices=devices)
    params, opt_state, opt_shardings = train.init_train_state(step_config, optimizer, mesh, jax.random.key(0))
    params = live_weights(params)
    rows = tokens_MBT.shape[0] * tokens_MBT.shape[1]
    batch = tokens_MBT.reshape(micro_steps, rows // micro_steps, -1)
    placed = jax.device_put(batch, sharding.batch_sharding(mesh, ndim=3, batch_axis=1))
    step = train.make_train_step(step_config, optimizer, mesh, opt_shardings)
    params, _, loss = step(params, opt_state, placed[..., :-1], placed[..., 1:])
    return jax.tree.map(np.asarray, params), float(loss)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m launch.mesh_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--device-batch-size", type=int, default=4, help="rows per device on the full mesh")
    p.add_argument("--dtype", default="float32", help="compute dtype of the check (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest relative error allowed per parameter")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from nanochat_jax import optim, train
    from nanochat_jax.attention import default_backend
    from nanochat_jax.config import config_from_depth

    devices = jax.devices()
    n = len(devices)
    config = config_from_depth(args.depth, sequence_len=args.max_seq_len)
    rows = args.device_batch_size * n
    hp = optim.derive_hyperparameters(args.depth, sequence_len=args.max_seq_len,
                                      total_batch_size=rows * args.max_seq_len, num_iterations=100)
    # float32 goes through the xla attention (cuDNN's flash attention is bf16/fp16 only).
    backend = "xla" if args.dtype == "float32" else default_backend()
    step_config = train.StepConfig(model=config, dtype=args.dtype, attention_backend=backend)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, rows, args.max_seq_len + 1), dtype=np.int32)
    print(f"d{args.depth}, {rows} x {args.max_seq_len} tokens, {args.dtype}: {n} x {devices[0].device_kind} "
          f"in one micro-step against 1 device in {n}", flush=True)
    full, loss_full = step_once(devices, config, step_config, hp, tokens, 1)
    one, loss_one = step_once(devices[:1], config, step_config, hp, tokens, n)

    errors = {}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(full)):
        a, b = a.astype(np.float64), b.astype(np.float64)
        errors[jax.tree_util.keystr(path)] = float(np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-30))
    worst = sorted(errors.items(), key=lambda kv: -kv[1])
    for name, err in worst[:8]:
        print(f"  {err:.2e}  {name}")
    ok = worst[0][1] <= args.tolerance and abs(loss_full - loss_one) <= args.tolerance * abs(loss_one)
    print(f"loss {loss_one:.6f} (1 device) vs {loss_full:.6f} ({n} devices); worst parameter error {worst[0][1]:.2e}: "
          f"{'PASS' if ok else 'FAIL'} (tolerance {args.tolerance:g})")
    print(json.dumps({"check": "mesh", "depth": args.depth, "devices": n, "dtype": args.dtype, "loss_one": loss_one,
                      "loss_all": loss_full, "worst_error": worst[0][1], "worst_param": worst[0][0], "pass": ok}))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
