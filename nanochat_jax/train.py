"""The jitted, sharded training step: forward + backward over micro-batches, then one optimizer update.

A global batch arrives as (micro_steps, rows, T) token and target arrays with rows split over the
mesh's "data" axis. Gradients are accumulated in float32 by one compiled micro-step, constrained to
the parameters' shardings so each device keeps only its shard (the reduce-scatter of ZeRO/FSDP);
one compiled update applies the optimizer. The loss is the mean over every
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
    fp8: bool = False  # the linear layers' products in FP8 (nanochat_jax/fp8.py)


def _accumulate(params, acc, tokens_BT, targets_BT, count, weights_BT=None, *, step_config: StepConfig,
                grad_shardings):
    """acc + (this micro-batch's share of the mean loss, its gradients), in float32. With `weights_BT`
    each token's loss is weighted (see model.loss_sum); the mean is still over the counted targets.

    The embedding tables are differentiated through the rows the tokens look up: those rows'
    gradients are scatter-added into the accumulator in place (see `model.embedding_rows`)."""
    config = step_config.model
    tables = {k: params[k] for k in model.EMBEDDING_TABLES}
    rest = {k: v for k, v in params.items() if k not in tables}
    rows = model.embedding_rows(tables, tokens_BT, config, step_config.dtype)

    def micro_loss(rest, rows):
        total, _ = model.loss_sum(rest, tokens_BT, targets_BT, config, dtype=step_config.dtype,
                                  attention_backend=step_config.attention_backend,
                                  chunk_len=step_config.loss_chunk_len, weights_BT=weights_BT, rows=rows,
                                  fp8=step_config.fp8)
        return total / count

    loss, (rest_grads, row_grads) = jax.value_and_grad(micro_loss, argnums=(0, 1))(rest, rows)
    acc_loss, acc_grads = acc
    acc_grads = {**jax.tree.map(jnp.add, {k: acc_grads[k] for k in rest}, rest_grads),
                 **model.add_row_gradients({k: acc_grads[k] for k in tables}, row_grads, tokens_BT)}
    # Each device keeps only its shard of the sum: the reduce-scatter of ZeRO/FSDP.
    return acc_loss + loss, jax.lax.with_sharding_constraint(acc_grads, grad_shardings)


def make_loss_and_grads(step_config: StepConfig, mesh):
    """`fn(params, tokens_MBT, targets_MBT, weights_MBT=None) -> (loss, grads)`: the mean loss over
    every counted target of the global batch (each token's loss times its weight, when weights are
    given: RL's advantages) and its float32 gradients, sharded like the parameters."""
    p_shard = param_shardings(step_config.model, mesh)
    rows = batch_sharding(mesh, ndim=2)
    acc_shard = (replicated(mesh), p_shard)
    fn = functools.partial(_accumulate, step_config=step_config, grad_shardings=p_shard)
    accumulate = jax.jit(fn, in_shardings=(p_shard, acc_shard, rows, rows, replicated(mesh)),
                         out_shardings=acc_shard, donate_argnums=1)
    accumulate_weighted = jax.jit(fn, in_shardings=(p_shard, acc_shard, rows, rows, replicated(mesh), rows),
                                  out_shardings=acc_shard, donate_argnums=1)
    zeros = jax.jit(lambda p: (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, p)), out_shardings=acc_shard)
    count = jax.jit(lambda t: jnp.maximum(jnp.sum(t != model.IGNORE_INDEX), 1), out_shardings=replicated(mesh))

    def loss_and_grads(params, tokens_MBT, targets_MBT, weights_MBT=None):
        # A Python loop over one compiled micro-step, not a scan inside one program: dispatch is
        # asynchronous, so the device never waits, and the micro-step and the update compile as
        # separate, smaller programs (see docs/perf_notes.md for the measurement).
        n = count(targets_MBT)
        acc = zeros(params)
        for m in range(tokens_MBT.shape[0]):
            if weights_MBT is None:
                acc = accumulate(params, acc, tokens_MBT[m], targets_MBT[m], n)
            else:
                acc = accumulate_weighted(params, acc, tokens_MBT[m], targets_MBT[m], n, weights_MBT[m])
        return acc

    return loss_and_grads


def make_train_step(step_config: StepConfig, optimizer: optax.GradientTransformation, mesh, opt_shardings):
    """`step(params, opt_state, tokens_MBT, targets_MBT, weights_MBT=None) -> (params, opt_state, loss)`:
    one optimizer step (weights: see `make_loss_and_grads`); params, optimizer state and gradients are donated to the update and come back in place.

    `opt_shardings` is the optimizer state's sharding tree (see `init_train_state`), kept fixed
    from step to step so the state never silently becomes replicated.
    """
    p_shard = param_shardings(step_config.model, mesh)
    loss_and_grads = make_loss_and_grads(step_config, mesh)

    def apply(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    update = jax.jit(apply, in_shardings=(p_shard, opt_shardings, p_shard), out_shardings=(p_shard, opt_shardings),
                     donate_argnums=(0, 1, 2))

    def step(params, opt_state, tokens_MBT, targets_MBT, weights_MBT=None):
        loss, grads = loss_and_grads(params, tokens_MBT, targets_MBT, weights_MBT)
        params, opt_state = update(params, opt_state, grads)
        return params, opt_state, loss

    return step


def init_train_state(step_config: StepConfig, optimizer: optax.GradientTransformation, mesh, key):
    """Parameters initialised directly into their shards, the optimizer state sharded like them
    (see `sharding.state_shardings`), and the state's shardings for `make_train_step`."""
    p_shard = param_shardings(step_config.model, mesh)
    params = jax.jit(model.init_params, static_argnums=0, out_shardings=p_shard)(step_config.model, key)
    opt_shardings = state_shardings(jax.eval_shape(optimizer.init, params), p_shard, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    return params, opt_state, opt_shardings
