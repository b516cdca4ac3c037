"""The jitted, sharded training step: forward + backward over micro-batches, then one optimizer update.

A global batch arrives as (micro_steps, rows, T) token and target arrays with rows split over the
mesh's "data" axis. Gradients are accumulated in float32 inside one `lax.scan` (one compiled
micro-step, whatever the accumulation count), constrained to the parameters' shardings so each
device keeps only its shard (the reduce-scatter of ZeRO/FSDP). The loss is the mean over every
counted target of the whole global batch, so splitting a batch into more micro-steps or over more
devices changes nothing but float rounding (the reference averages per micro-batch means, which
differs only when micro-batches hold different numbers of ignored targets).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from nanochat_jax import model
from nanochat_jax.config import GPTConfig
from nanochat_jax.sharding import batch_sharding, param_shardings, replicated, state_shardings


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the compiled step depends on besides array shapes."""

    model: GPTConfig
    dtype: str = "float32"
    attention_backend: str = "xla"
    loss_chunk_len: int = 0  # > 0: the head and loss run chunk by chunk (see model.loss_sum)


def loss_and_grads(params, tokens_MBT, targets_MBT, step_config: StepConfig, grad_shardings=None):
    """Mean loss over all counted targets of the global batch and its float32 gradients."""
    count = jnp.maximum(jnp.sum(targets_MBT != model.IGNORE_INDEX), 1)

    def micro_loss(p, tokens_BT, targets_BT):
        total, _ = model.loss_sum(p, tokens_BT, targets_BT, step_config.model, dtype=step_config.dtype,
                                  attention_backend=step_config.attention_backend,
                                  chunk_len=step_config.loss_chunk_len)
        return total / count

    def constrain(grads):
        if grad_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, grad_shardings)

    def micro_step(carry, batch):
        loss_acc, grads_acc = carry
        loss, grads = jax.value_and_grad(micro_loss)(params, *batch)
        return (loss_acc + loss, constrain(jax.tree.map(jnp.add, grads_acc, grads))), None

    zeros = constrain(jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(micro_step, (jnp.zeros((), jnp.float32), zeros), (tokens_MBT, targets_MBT))
    return loss, grads


def make_loss_and_grads(step_config: StepConfig, mesh):
    """`loss_and_grads` jitted for `mesh`: params sharded per `param_shardings`, rows over "data"."""
    p_shard = param_shardings(step_config.model, mesh)
    b_shard = batch_sharding(mesh, ndim=3, batch_axis=1)
    fn = functools.partial(loss_and_grads, step_config=step_config, grad_shardings=p_shard)
    return jax.jit(fn, in_shardings=(p_shard, b_shard, b_shard), out_shardings=(replicated(mesh), p_shard))


def make_train_step(step_config: StepConfig, optimizer: optax.GradientTransformation, mesh, opt_shardings):
    """One optimizer step, jitted; params and optimizer state are donated and come back in place.

    `opt_shardings` is the optimizer state's sharding tree (see `init_train_state`), kept fixed
    from step to step so the state never silently becomes replicated.
    """
    p_shard = param_shardings(step_config.model, mesh)
    b_shard = batch_sharding(mesh, ndim=3, batch_axis=1)

    def step(params, opt_state, tokens_MBT, targets_MBT):
        loss, grads = loss_and_grads(params, tokens_MBT, targets_MBT, step_config, p_shard)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, in_shardings=(p_shard, opt_shardings, b_shard, b_shard),
                   out_shardings=(p_shard, opt_shardings, replicated(mesh)), donate_argnums=(0, 1))


def init_train_state(step_config: StepConfig, optimizer: optax.GradientTransformation, mesh, key):
    """Parameters initialised directly into their shards, the optimizer state sharded like them
    (see `sharding.state_shardings`), and the state's shardings for `make_train_step`."""
    p_shard = param_shardings(step_config.model, mesh)
    params = jax.jit(model.init_params, static_argnums=0, out_shardings=p_shard)(step_config.model, key)
    opt_shardings = state_shardings(jax.eval_shape(optimizer.init, params), p_shard, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    return params, opt_state, opt_shardings
