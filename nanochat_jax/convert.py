"""Reference (PyTorch nanochat) state-dict names <-> our parameter tree.

A reference checkpoint is a flat dict of arrays named like `transformer.h.3.attn.c_q.weight`. Ours
stacks the per-layer matrices along a leading axis; orientations are the same, so converting is
only renaming and stacking. Works both ways, so models move freely between the two projects.
"""

import json

import numpy as np

from nanochat_jax.config import GPTConfig
from nanochat_jax.model import param_shapes

# Per-layer reference names (inside transformer.h.{i}.) for each stacked block matrix.
_BLOCK_NAMES = {
    "attn_q": "attn.c_q.weight",
    "attn_k": "attn.c_k.weight",
    "attn_v": "attn.c_v.weight",
    "attn_proj": "attn.c_proj.weight",
    "mlp_fc": "mlp.c_fc.weight",
    "mlp_proj": "mlp.c_proj.weight",
}
_TOP_NAMES = {
    "wte": "transformer.wte.weight",
    "lm_head": "lm_head.weight",
    "resid_lambdas": "resid_lambdas",
    "x0_lambdas": "x0_lambdas",
    "smear_gate": "smear_gate.weight",
    "smear_lambda": "smear_lambda",
    "backout_lambda": "backout_lambda",
}
_COMPILED_PREFIX = "_orig_mod."  # torch.compile wraps module names with this


def config_from_json(text: str) -> GPTConfig:
    fields = json.loads(text)
    known = set(GPTConfig.__dataclass_fields__)
    return GPTConfig(**{k: v for k, v in fields.items() if k in known})


def stacked_names(config: GPTConfig) -> dict:
    """For each stacked leaf of our tree ('value_embeds' or 'blocks/<name>'), the reference names
    stacked into it, in order along the leading axis."""
    ve_layers = config.value_embedding_layers
    names = {f"blocks/{k}": [f"transformer.h.{i}.{v}" for i in range(config.n_layer)] for k, v in _BLOCK_NAMES.items()}
    names["blocks/ve_gate"] = [f"transformer.h.{i}.attn.ve_gate.weight" for i in ve_layers]
    names["value_embeds"] = [f"value_embeds.{i}.weight" for i in ve_layers]
    return names


def _get(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def from_reference(state: dict, config: GPTConfig) -> dict:
    """Reference state dict (name -> array) to our float32 parameter tree. Checks every name and shape."""
    state = {k.removeprefix(_COMPILED_PREFIX): v for k, v in state.items()}
    wanted = list(_TOP_NAMES.values()) + [n for ns in stacked_names(config).values() for n in ns]
    missing = [n for n in wanted if n not in state]
    if missing:
        raise KeyError(f"reference state dict lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    unused = sorted(set(state) - set(wanted))
    if unused:
        raise KeyError(f"reference state dict has names this config does not use: {unused[:5]}")

    def f32(name):
        return np.asarray(state[name], dtype=np.float32)

    params = {k: f32(name) for k, name in _TOP_NAMES.items()}
    params["blocks"] = {}
    for path, names in stacked_names(config).items():
        stacked = np.stack([f32(n) for n in names])
        if path.startswith("blocks/"):
            params["blocks"][path.removeprefix("blocks/")] = stacked
        else:
            params[path] = stacked
    shapes = param_shapes(config)
    for path in [*_TOP_NAMES, *stacked_names(config)]:
        if _get(params, path).shape != tuple(_get(shapes, path)):
            raise ValueError(f"{path}: shape {_get(params, path).shape} does not fit the config (expected {_get(shapes, path)})")
    return params


def to_reference(params: dict, config: GPTConfig) -> dict:
    """Our parameter tree to a reference state dict of numpy arrays."""
    state = {name: np.asarray(params[k]) for k, name in _TOP_NAMES.items()}
    for path, names in stacked_names(config).items():
        state.update(zip(names, np.asarray(_get(params, path))))
    return state


def reference_names(config: GPTConfig) -> dict:
    """For every leaf of our tree ('wte', 'blocks/attn_q', ...), the reference names it holds, in
    order along the leading axis for stacked leaves."""
    return {**{k: [name] for k, name in _TOP_NAMES.items()}, **stacked_names(config)}
