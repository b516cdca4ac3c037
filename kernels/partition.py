"""Pallas kernels inside sharded programs.

XLA cannot look into a Pallas call, so inside a sharded program it runs one on the whole arrays:
it gathers the batch onto every device first. The kernels here work row by row (a batch element,
a head), so each device can run them on its own rows. `rows_parallel` says so with
`custom_partitioning`: the arrays stay split over the batch and the heads like the first
argument, every other dimension is whole on each device, and no collective is needed.
"""

import math

from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

# Dimension letters: b batch and h query heads follow the first argument's sharding, k (key/value
# heads) goes with h, any other letter (positions, channels, tables) is never split.
_SPLIT = {"b": "b", "h": "h", "k": "h"}


def _axis_size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def rows_parallel(local_fn, in_dims: tuple[str, ...], out_dims: tuple[str, ...]):
    """`local_fn(*arrays)` as a custom_partitioning function. `in_dims` and `out_dims` name each
    array's dimensions, one letter each ("bthd", "btkd", "bht", "td"). The batch and the heads
    are split as in the first argument; the heads stay whole unless every head dimension (query
    and key/value, which must move together under GQA) divides by their mesh axes."""
    fn = custom_partitioning(local_fn)

    def shardings(mesh, arg_shapes):
        first = tuple(arg_shapes[0].sharding.spec) + (None,) * len(in_dims[0])
        axes = {letter: first[in_dims[0].index(letter)] for letter in "bh" if letter in in_dims[0]}
        if axes.get("h") is not None:
            n = _axis_size(mesh, axes["h"])
            if any(a.shape[i] % n for a, dims in zip(arg_shapes, in_dims)
                   for i, letter in enumerate(dims) if letter in "hk"):
                axes["h"] = None

        def named(dims):
            return NamedSharding(mesh, P(*(axes.get(_SPLIT.get(letter)) for letter in dims)))

        outs = tuple(named(d) for d in out_dims)
        return tuple(named(d) for d in in_dims), outs if len(outs) > 1 else outs[0]

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[1]

    def partition(mesh, arg_shapes, result_shape):
        args, outs = shardings(mesh, arg_shapes)
        return mesh, local_fn, outs, args

    rule = ", ".join(map(" ".join, in_dims)) + " -> " + ", ".join(map(" ".join, out_dims))
    fn.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule)
    return fn
