"""The device mesh and where every array lives on it, declared as data.

One mesh with axes ("data", "model") covers one device, eight fake CPU devices, one GPU node and
many hosts alike: the same code path everywhere, only the mesh shape changes. Parameters (and so
the optimizer state, which follows them) are sharded FSDP-style: their model-width dimension is
split over "data"; heads, MLP hidden units and vocabulary may be split over "model" (tensor
parallelism) when that axis is larger than 1. Batches are split over "data". A dimension that a
mesh axis does not divide evenly stays whole rather than failing.
"""

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from nanochat_jax.config import GPTConfig
from nanochat_jax.model import param_shapes

# Logical name of each dimension of each parameter (None: never split).
PARAM_AXES = {
    "wte": ("vocab", "embed"),
    "lm_head": ("vocab", "embed"),
    "value_embeds": (None, "vocab", "embed"),
    "blocks": {
        "attn_q": ("layers", "heads", "embed"),
        "attn_k": ("layers", "kv_heads", "embed"),
        "attn_v": ("layers", "kv_heads", "embed"),
        "attn_proj": ("layers", "embed", "heads"),
        "mlp_fc": ("layers", "mlp", "embed"),
        "mlp_proj": ("layers", "embed", "mlp"),
        "ve_gate": (None, None, None),
    },
    "resid_lambdas": (None,),
    "x0_lambdas": (None,),
    "smear_gate": (None, None),
    "smear_lambda": (None,),
    "backout_lambda": (None,),
}

# Logical dimension -> mesh axis.
AXIS_RULES = {
    "embed": "data",
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "layers": None,
}


def make_mesh(model: int = 1, devices=None) -> jax.sharding.Mesh:
    """A (data, model) mesh over all devices (of every host); `model` devices per tensor-parallel group."""
    devices = jax.devices() if devices is None else devices
    if model < 1 or len(devices) % model:
        raise ValueError(f"model axis size {model} does not divide the {len(devices)} devices")
    return jax.make_mesh((len(devices) // model, model), ("data", "model"),
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def _spec(shape, logical_axes, mesh) -> P:
    axes = []
    for size, name in zip(shape, logical_axes):
        axis = AXIS_RULES.get(name) if name else None
        axes.append(axis if axis and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0 else None)
    return P(*axes)


def param_shardings(config: GPTConfig, mesh) -> dict:
    """NamedSharding for every parameter, in the parameter tree's structure."""
    shapes = param_shapes(config)
    return jax.tree.map(lambda shape, axes: NamedSharding(mesh, _spec(shape, axes, mesh)),
                        shapes, PARAM_AXES, is_leaf=lambda x: isinstance(x, tuple))


def state_shardings(state_shapes, param_shardings_tree, mesh):
    """Shardings for an optimizer state, ZeRO-style, without knowing its structure.

    A state leaf whose path ends with a parameter's path and that has the parameter's rank (Adam's
    moments, Muon's momentum and factored second moment) is split like the parameter, except along
    dimensions it has reduced to size 1; everything else (step counts, hyperparameters) is
    replicated. The same rule serves a 1-device mesh and a many-device one.
    """
    by_path = {tuple(path): s for path, s in jax.tree_util.tree_leaves_with_path(param_shardings_tree)}
    longest = max(map(len, by_path))

    def for_leaf(path, leaf):
        for n in range(min(longest, len(path)), 0, -1):
            param = by_path.get(tuple(path[-n:]))
            if param is not None and len(param.spec) <= leaf.ndim:
                spec = tuple(param.spec) + (None,) * (leaf.ndim - len(param.spec))
                return NamedSharding(mesh, P(*(a if size > 1 else None for a, size in zip(spec, leaf.shape))))
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(for_leaf, state_shapes)


def batch_sharding(mesh, ndim: int = 2, batch_axis: int = 0) -> NamedSharding:
    """Rows split over "data"; every other dimension whole."""
    axes = [None] * ndim
    axes[batch_axis] = "data"
    return NamedSharding(mesh, P(*axes))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Assemble one global array from each process's own rows (its slice of the batch axis)."""
    return jax.make_array_from_process_local_data(sharding, local_rows)
