"""The loss's one-pass kernel (kernels/cross_entropy.py) on a GPU against what XLA runs for the
same work (a log-sum-exp pass, then a gradient pass) and against the memory floor (reading and
writing the logits once, as a plain XLA pass), over the bf16 logits of one 32 x 2048-token
micro-step: each row's log-sum-exp and the gradient at the logits.

    python -m kernels.bench_loss --json out.json

Prints a table (with the largest differences between the two), writes JSON.
"""

import argparse

import jax
import jax.numpy as jnp

from kernels import cross_entropy
from kernels.bench import markdown_table, time_ms, write_rows
from nanochat_jax import model

TOKENS = (32, 2048)


def measure(vocab: int):
    keys = jax.random.split(jax.random.key(0), 2)
    z = (3 * jax.random.normal(keys[0], (*TOKENS, vocab))).astype(jnp.bfloat16)
    targets = jax.random.randint(keys[1], TOKENS, 0, vocab)
    coef = jnp.ones(TOKENS, jnp.float32)

    xla = jax.jit(lambda z: model._softcapped_cross_entropy_grad_xla(z, targets, coef, vocab))
    ours = jax.jit(lambda z: cross_entropy.softcapped_cross_entropy_grad(z, targets, coef, vocab,
                                                                         softcap=model.SOFTCAP))
    want_dz, want_lse = xla(z)
    got_dz, got_lse = ours(z)
    floor = jax.jit(lambda z: z * 2)  # one read and one write of the logits
    diff = jnp.abs(got_dz.astype(jnp.float32) - want_dz.astype(jnp.float32))
    return {"vocab": vocab, "tokens": TOKENS[0] * TOKENS[1], "ms_ours": time_ms(ours, z), "ms_xla": time_ms(xla, z),
            "ms_floor": time_ms(floor, z), "lse_max_abs_diff": float(jnp.max(jnp.abs(got_lse - want_lse))),
            "grad_max_abs_diff": float(jnp.max(diff)), "grad_max_abs": float(jnp.max(jnp.abs(want_dz)))}


def table(rows):
    header = ["vocab", "ours ms", "XLA ms", "ours / XLA", "floor ms", "lse max diff", "grad max diff"]
    return markdown_table(header, [
        [r["vocab"], f"{r['ms_ours']:.3f}", f"{r['ms_xla']:.3f}", f"{r['ms_ours'] / r['ms_xla']:.2f}x",
         f"{r['ms_floor']:.3f}", f"{r['lse_max_abs_diff']:.1e}",
         f"{r['grad_max_abs_diff']:.1e} (of {r['grad_max_abs']:.1e})"]
        for r in rows])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--vocab", default="32768,16384", help="comma-separated vocabulary sizes (powers of two "
                    f"up to {cross_entropy.MAX_ROW})")
    args = ap.parse_args()
    try:
        vocabs = [int(v) for v in args.vocab.split(",")]
    except ValueError:
        ap.error(f"--vocab takes integers; got {args.vocab!r}")
    if bad := [v for v in vocabs if v <= 0 or v & (v - 1) or v > cross_entropy.MAX_ROW]:
        ap.error(f"vocabulary sizes must be powers of two up to {cross_entropy.MAX_ROW}; got {bad}")
    if jax.default_backend() != "gpu":
        raise SystemExit("kernels.bench_loss needs a GPU (the kernel lowers through Triton)")
    rows = [measure(v) for v in vocabs]
    print(table(rows))
    if args.json:
        write_rows(args.json, rows)


if __name__ == "__main__":
    main()
