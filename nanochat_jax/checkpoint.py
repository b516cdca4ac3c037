"""Checkpoints: Orbax, async, keep-N, atomic, restorable onto any mesh.

A checkpoint directory holds numbered steps; each step has four items:

    params     the float32 parameter tree
    opt_state  the optimizer state (omitted by `save(..., opt_state=None)`, e.g. for exports)
    data       the data iterator's state (JSON), so the batch after a resume is the batch that
               would have come next
    meta       JSON: step, the model config, the run's flags, loop state (smoothed loss, best val
               bpb, training time), the seed

Orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save never leaves a step that loads half. Arrays are restored straight into the shardings
asked for, whatever mesh wrote them: resuming on another number of devices just works.
"""

import os

import jax
import orbax.checkpoint as ocp

from nanochat_jax.config import GPTConfig
from nanochat_jax.model import param_shapes


class Checkpoints:
    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params, opt_state, data_state, meta: dict) -> None:
        """Starts an asynchronous save; training goes on while it is written."""
        items = dict(params=ocp.args.StandardSave(params), data=ocp.args.JsonSave(data_state),
                     meta=ocp.args.JsonSave({**meta, "step": step}))
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def wait(self) -> None:
        """Blocks until the last save is on disk."""
        self.manager.wait_until_finished()

    def meta(self, step: int | None = None) -> dict:
        return self.manager.restore(self._step(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int | None, params_target, opt_state_target=None):
        """(params, opt_state, data_state, meta) of `step` (None: the latest), placed like the targets
        (trees of arrays or ShapeDtypeStructs carrying shardings). No optimizer target: opt_state None."""
        step = self._step(step)
        items = dict(params=ocp.args.StandardRestore(params_target), data=ocp.args.JsonRestore(),
                     meta=ocp.args.JsonRestore())
        if opt_state_target is not None:
            items["opt_state"] = ocp.args.StandardRestore(opt_state_target)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["params"], out.get("opt_state") if opt_state_target is not None else None, out["data"], out["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _step(self, step):
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            have = self.all_steps()
            raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step}; available: {have or 'none'}")
        return step


def abstract_params(config: GPTConfig, shardings=None):
    """ShapeDtypeStructs of the parameter tree, optionally carrying shardings (a matching tree)."""
    shapes = param_shapes(config)
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    if shardings is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, "float32"), shapes, is_leaf=is_shape)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, "float32", sharding=sh), shapes, shardings, is_leaf=is_shape)


def restore_params(directory: str, step: int | None = None, mesh=None):
    """(params, config) of a saved model, for inference and evaluation; replicated on the first
    device unless a mesh is given (then sharded like training)."""
    from nanochat_jax import sharding

    checkpoints = Checkpoints(directory)
    meta = checkpoints.meta(step)
    config = GPTConfig(**meta["model_config"])
    mesh = sharding.make_mesh(devices=jax.devices()[:1]) if mesh is None else mesh
    target = abstract_params(config, sharding.param_shardings(config, mesh))
    params, _, _, _ = checkpoints.restore(meta["step"], target)
    checkpoints.close()
    return params, config
