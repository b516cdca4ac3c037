"""The MLP's matmul-with-epilogue kernels (kernels/matmul_mgpu.py) on a Hopper GPU against what
XLA runs for the same work (cuBLAS's product, then ReLU² or its derivative as a pass of its own).

    python -m kernels.bench_matmul --json out.json

For each model shape (the MLP of a 32 x 2048-token micro-step): the error of both against the
float32 formula (max |error| / max |reference|), then the time of each, median of several batches
of calls after a warm-up (`kernels.bench.time_ms`). Prints a table, writes JSON.
"""

import argparse

import jax
import jax.numpy as jnp

from kernels import matmul_mgpu
from kernels.bench import markdown_table, time_ms, write_rows
from kernels.mosaic import on_hopper

TOKENS = (32, 2048)
SHAPES = {"d12": 768, "d20": 1280, "d26": 1664}  # model width D: the products are D -> 4D


def xla_relu_squared(x, w_NK):
    return jnp.square(jax.nn.relu(x @ w_NK.T))


def xla_relu_squared_grad(g, w, a):
    return (2 * (g @ w).astype(jnp.float32) * jnp.sqrt(a.astype(jnp.float32))).astype(a.dtype)


def max_rel(got, want):
    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))


def measure(name, D):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (*TOKENS, D), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (D, 4 * D)) * D ** -0.5).astype(jnp.bfloat16)
    a = jnp.square(jax.nn.relu(jax.random.normal(keys[2], (*TOKENS, 4 * D), jnp.bfloat16)))
    h = jnp.einsum("btk,kn->btn", x, w, preferred_element_type=jnp.float32)
    w_NK = w.T  # the forward's weight in the model's (out, in) orientation (an array of its own)
    cases = [("relu_squared", (x, w_NK), jnp.square(jax.nn.relu(h)), matmul_mgpu.relu_squared_matmul,
              xla_relu_squared),
             ("relu_squared_grad", (x, w, a), h * 2 * jnp.sqrt(a.astype(jnp.float32)),
              matmul_mgpu.relu_squared_grad_matmul, xla_relu_squared_grad)]
    tflop = 2 * TOKENS[0] * TOKENS[1] * D * 4 * D / 1e12
    rows = []
    for op, args, want, ours, xla in cases:
        ours, xla = jax.jit(ours), jax.jit(xla)
        row = {"shape": name, "op": op, "err_ours": max_rel(ours(*args), want),
               "err_xla": max_rel(xla(*args), want), "ms_ours": time_ms(ours, *args), "ms_xla": time_ms(xla, *args)}
        row["tflops_ours"], row["tflops_xla"] = tflop / row["ms_ours"] * 1e3, tflop / row["ms_xla"] * 1e3
        rows.append(row)
    return rows


def table(rows):
    header = ["shape", "op", "ours ms", "XLA ms", "ours / XLA", "ours TFLOP/s", "XLA TFLOP/s", "ours err", "XLA err"]
    return markdown_table(header, [
        [r["shape"], r["op"], f"{r['ms_ours']:.3f}", f"{r['ms_xla']:.3f}", f"{r['ms_ours'] / r['ms_xla']:.2f}x",
         f"{r['tflops_ours']:.0f}", f"{r['tflops_xla']:.0f}", f"{r['err_ours']:.1e}", f"{r['err_xla']:.1e}"]
        for r in rows])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--shapes", default="d20,d12", help=f"comma-separated, of {', '.join(SHAPES)}")
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        ap.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    if not on_hopper():
        raise SystemExit("kernels.bench_matmul needs a Hopper GPU (the kernels are Mosaic GPU)")
    rows = [r for s in shapes for r in measure(s, SHAPES[s])]
    print(table(rows))
    if args.json:
        write_rows(args.json, rows)


if __name__ == "__main__":
    main()
