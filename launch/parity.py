"""Reproduce the reference's golden outputs from their inputs (the `../shared/golden` contract).

    python -m launch.parity model IN.npz OUT.npz     # OUT: logits, loss

The command computes and writes; it never reads the expected values from IN. Comparing is the
caller's job (the tests do it), so any file of the same format can be checked the same way.
"""

import argparse
import os
import sys


def _force_cpu_float32():
    # Parity is defined in float32; pin it before jax picks a backend or a compute dtype.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["NANOCHAT_DTYPE"] = "float32"


def parity_model(in_path: str, out_path: str) -> None:
    _force_cpu_float32()
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from nanochat_jax import convert, model

    with np.load(in_path) as f:
        config = convert.config_from_json(str(f["config"]))
        state = {k.removeprefix("param/"): f[k] for k in f.files if k.startswith("param/")}
        idx, targets = f["idx"], f["targets"]
    params = convert.from_reference(state, config)
    logits = jax.jit(model.forward, static_argnums=2)(params, idx, config)
    loss = jax.jit(model.loss_fn, static_argnums=3)(params, idx, targets, config)
    np.savez(out_path, logits=np.asarray(logits, np.float32), loss=np.asarray(loss, np.float64))
    print(f"wrote {out_path}: logits {tuple(logits.shape)}, loss {float(loss):.6f}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m launch.parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("model", help="logits and loss of a reference model on its inputs")
    p.add_argument("inp", metavar="IN.npz")
    p.add_argument("out", metavar="OUT.npz")
    args = parser.parse_args(argv)
    try:
        if args.what == "model":
            parity_model(args.inp, args.out)
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"parity {args.what}: {e}")


if __name__ == "__main__":
    main()
