"""Muon + AdamW over the parameter tree, the reference's schedules, and the depth dial's
optimization hyperparameters (horizon, batch size, learning rates, weight decay).

Groups, as the reference assigns them: every matrix under `blocks` (ve_gate included) is Muon;
lm_head, wte, value_embeds, resid_lambdas, x0_lambdas and {smear_gate, smear_lambda,
backout_lambda} are six AdamW groups with their own lr, betas and weight decay. One Optax
transformation (`optax.partition` of the groups, under `optax.inject_hyperparams`) updates them all.

Muon works on stacks: each leaf under `blocks` is (L, m, n), and every Muon operation is per
matrix (norms and matmuls over the last two axes), so one batched update per leaf is the same as
the reference's per-shape groups. In the reference's order, per matrix:

    Nesterov momentum (lerp form) -> MuonEq row equilibration -> Polar Express orthogonalization
    -> Muon+ renormalization to sqrt(min(m, n)) -> NorMuon factored second moment
    -> cautious weight decay and the update

What changes every step (the lr multiplier, the Muon momentum, the Muon weight-decay multiplier)
lives in the optimizer state as traced scalars, either set by hand or computed from the step count
by the schedules below, so a new value never recompiles and a restored state resumes exactly.

Every piece of state is elementwise or per matrix, so it is sharded exactly like its parameter
(`sharding.state_shardings`): one code path for one device and many.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanochat_jax.config import compute_dtype, config_from_depth
from nanochat_jax.model import param_counts

# Polar Express (Amsel et al. 2025, arXiv:2505.16932): the reference's five (a, b, c) triples for
# X <- a X + (b A + c A^2) X with A = X X^T, tuned for 5 iterations, safety factor 2e-2, cushion 2.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
MATRIX_GROUP = "matrix"  # the label of every Muon leaf


# --- Muon -------------------------------------------------------------------------------------

def _frobenius(x):
    """Norm of each matrix of a stack, in float32, keeping the matrix axes for broadcasting."""
    x32 = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x32 * x32, axis=(-2, -1), keepdims=True))


def _transpose(x):
    return jnp.swapaxes(x, -1, -2)


def row_equilibrate(x_Lmn):
    """MuonEq: scale every row to the matrix's mean row norm, so the spectrum entering the
    orthogonalization is better conditioned. Scales are computed in float32."""
    m = x_Lmn.shape[-2]
    target = _frobenius(x_Lmn) / math.sqrt(m)
    x32 = x_Lmn.astype(jnp.float32)
    row_norm = jnp.maximum(jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True)), 1e-6)
    return x_Lmn * (target / row_norm).astype(x_Lmn.dtype)


def polar_express(x_Lmn, ns_steps: int = 5):
    """Approximately the orthogonal polar factor U V^T of each matrix (singular values pushed
    towards 1), in x's dtype. The iteration runs on the smaller Gram matrix: X^T X for tall
    matrices, X X^T otherwise."""
    # Dividing by 1.01 ||X||_F puts every singular value safely inside (0, 1), where the
    # coefficients were tuned.
    x = x_Lmn / (_frobenius(x_Lmn) * 1.01 + 1e-6).astype(x_Lmn.dtype)
    tall = x.shape[-2] > x.shape[-1]
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if tall:
            gram = _transpose(x) @ x
            x = a * x + x @ (b * gram + c * (gram @ gram))
        else:
            gram = x @ _transpose(x)
            x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x


def _variance_axis(shape) -> int:
    """NorMuon keeps one second-moment entry per row of a tall-or-square matrix (averaging over
    its columns) and one per column of a wide one."""
    return -1 if shape[-2] >= shape[-1] else -2


def _second_moment_shape(shape) -> tuple:
    axis = _variance_axis(shape)
    return shape[:-2] + ((shape[-2], 1) if axis == -1 else (1, shape[-1]))


def normuon_scale(u_Lmn, v, beta2):
    """NorMuon variance reduction: divide by the root of the factored second moment, then restore
    each matrix's Frobenius norm. Returns (scaled update, new second moment)."""
    axis = _variance_axis(u_Lmn.shape)
    count = u_Lmn.shape[axis]
    u32 = u_Lmn.astype(jnp.float32)
    v_mean = jnp.mean(u32 * u32, axis=axis, keepdims=True)
    norm = jnp.sqrt(jnp.sum(v_mean, axis=(-2, -1), keepdims=True) * count)
    v = v + (1 - beta2) * (v_mean - v)
    step = jax.lax.rsqrt(jnp.maximum(v, 1e-10))
    norm_after = jnp.sqrt(jnp.sum(v_mean * count * step * step, axis=(-2, -1), keepdims=True))
    return u_Lmn * (step * (norm / jnp.maximum(norm_after, 1e-10))).astype(u_Lmn.dtype), v


class MuonState(NamedTuple):
    momentum: Any  # like the params
    second_moment: Any  # per leaf (..., m, 1) or (..., 1, n): see _variance_axis


def muon(learning_rate, momentum, weight_decay, *, beta2: float = 0.9, ns_steps: int = 5,
         ortho_dtype=jnp.float32) -> optax.GradientTransformation:
    """Muon for leaves that are stacks of same-shape matrices (..., m, n); returns the full update
    (weight decay included), so `optax.apply_updates` finishes the step. `learning_rate`,
    `momentum` and `weight_decay` may be traced scalars."""

    def init_fn(params):
        return MuonState(
            momentum=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            second_moment=jax.tree.map(lambda p: jnp.zeros(_second_moment_shape(p.shape), jnp.float32), params),
        )

    def leaf_update(g, buf, v, p):
        m, n = g.shape[-2:]
        g = g.astype(jnp.float32)
        buf = buf + (1 - momentum) * (g - buf)
        g = g + momentum * (buf - g)  # Nesterov: look ahead along the updated buffer
        # Orthogonalize in ortho_dtype (bf16 on accelerators, like the reference), the rest in f32.
        u = polar_express(row_equilibrate(g.astype(ortho_dtype)), ns_steps).astype(jnp.float32)
        # Muon+: an exactly semi-orthogonal m x n matrix has Frobenius norm sqrt(min(m, n)); snapping
        # to it corrects for the iteration's under-convergence.
        u = u * (math.sqrt(min(m, n)) / jnp.maximum(_frobenius(u), 1e-6))
        u, v = normuon_scale(u, v, beta2)
        # Tall matrices take a larger step, by sqrt(m / n).
        lr = learning_rate * math.sqrt(max(1.0, m / n))
        # Cautious weight decay: only decay coordinates the update is already shrinking.
        decay = jnp.where(u * p >= 0, p, 0.0)
        return -(lr * u + lr * weight_decay * decay), buf, v

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("muon needs the params (cautious weight decay reads them)")
        out = jax.tree.map(leaf_update, updates, state.momentum, state.second_moment, params)
        new_updates, bufs, vs = jax.tree.transpose(jax.tree.structure(updates), jax.tree.structure((0, 0, 0)), out)
        return new_updates, MuonState(momentum=bufs, second_moment=vs)

    return optax.GradientTransformation(init_fn, update_fn)


# --- the combined optimizer -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Group:
    """One of the reference's parameter groups. `lr` and, for Muon, `weight_decay` are base values
    that the per-step multipliers scale."""

    kind: str  # "adamw" or "muon"
    lr: float
    weight_decay: float = 0.0
    betas: tuple = (0.8, 0.95)  # AdamW
    eps: float = 1e-10  # AdamW
    beta2: float = 0.9  # Muon: NorMuon's second-moment decay
    ns_steps: int = 5  # Muon: Polar Express iterations

    def __post_init__(self):
        if self.kind not in ("adamw", "muon"):
            raise ValueError(f"group kind must be 'adamw' or 'muon', got {self.kind!r}")


# Our top-level leaf -> the reference's AdamW group.
_ADAMW_LABELS = {
    "lm_head": "lm_head",
    "wte": "wte",
    "value_embeds": "value_embeds",
    "resid_lambdas": "resid",
    "x0_lambdas": "x0",
    "smear_gate": "smear",
    "smear_lambda": "smear",
    "backout_lambda": "smear",
}


def param_labels(params) -> dict:
    """The group of every leaf: MATRIX_GROUP for all of `blocks`, else its AdamW group."""

    def label(path, _):
        top = path[0].key
        if top == "blocks":
            return MATRIX_GROUP
        if top not in _ADAMW_LABELS:
            raise KeyError(f"parameter {top!r} has no optimizer group")
        return _ADAMW_LABELS[top]

    return jax.tree_util.tree_map_with_path(label, params)


def reference_groups(model_dim: int, *, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02,
                     weight_decay=0.0, scalar_lr=0.5) -> dict[str, Group]:
    """The reference's `setup_optimizer` groups (same arguments, same defaults), keyed like
    `param_labels`."""
    # The embedding and unembedding LRs were tuned at width 768 and shrink as 1/sqrt(width).
    dmodel_scale = (model_dim / 768) ** -0.5
    return {
        "lm_head": Group("adamw", unembedding_lr * dmodel_scale, 0.01, betas=(0.8, 0.96)),
        "wte": Group("adamw", embedding_lr * dmodel_scale, 0.001, betas=(0.8, 0.995)),
        "value_embeds": Group("adamw", embedding_lr * dmodel_scale * 0.5, 0.01, betas=(0.8, 0.995)),
        "resid": Group("adamw", scalar_lr * 0.01, 0.05, betas=(0.8, 0.95)),
        "x0": Group("adamw", scalar_lr, 0.0, betas=(0.96, 0.95)),
        "smear": Group("adamw", 0.2, 0.0, betas=(0.8, 0.95)),
        MATRIX_GROUP: Group("muon", matrix_lr, weight_decay),
    }


def build_optimizer(groups: dict[str, Group], labels, *, lr_multiplier=1.0, muon_momentum=0.95,
                    muon_wd_multiplier=1.0, ortho_dtype=None) -> optax.GradientTransformation:
    """Muon + AdamW over a parameter tree: `labels` (a tree like the params, or a function of
    them) names each leaf's group in `groups`.

    The three keyword hyperparameters are floats (kept in the state; overwrite
    `state.hyperparams[name]` to change one) or functions of the step count (see `schedules`).
    Every group's lr is its base lr times `lr_multiplier`; every Muon group uses `muon_momentum`
    and its base weight decay times `muon_wd_multiplier`; AdamW weight decays are fixed.
    `ortho_dtype` is the dtype of the orthogonalization, the compute dtype by default.
    """
    ortho_dtype = compute_dtype() if ortho_dtype is None else jnp.dtype(ortho_dtype)

    def factory(lr_multiplier, muon_momentum, muon_wd_multiplier):
        transforms = {}
        for name, g in groups.items():
            lr = g.lr * lr_multiplier
            if g.kind == "adamw":
                # Decoupled decay from the pre-step weights; eps after the root, like the reference.
                transforms[name] = optax.adamw(lr, b1=g.betas[0], b2=g.betas[1], eps=g.eps, weight_decay=g.weight_decay)
            else:
                transforms[name] = muon(lr, muon_momentum, g.weight_decay * muon_wd_multiplier,
                                        beta2=g.beta2, ns_steps=g.ns_steps, ortho_dtype=ortho_dtype)
        return optax.partition(transforms, labels)

    return optax.inject_hyperparams(factory)(
        lr_multiplier=lr_multiplier, muon_momentum=muon_momentum, muon_wd_multiplier=muon_wd_multiplier)


# --- schedules --------------------------------------------------------------------------------

def _warmdown_steps(num_iterations: int, warmdown_ratio: float) -> int:
    return round(warmdown_ratio * num_iterations)


def lr_multiplier(step, num_iterations: int, *, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                  final_lr_frac: float = 0.05):
    """Linear warmup to 1 over `warmup_steps`, constant, then linear warmdown to `final_lr_frac`
    over the last `warmdown_ratio` of training. Traceable in `step`."""
    step = jnp.asarray(step, jnp.float32)
    warmdown = _warmdown_steps(num_iterations, warmdown_ratio)
    remaining = (num_iterations - step) / max(warmdown, 1)  # 1 at the warmdown's start, 0 at the end
    return jnp.where(step < warmup_steps, (step + 1) / warmup_steps,
                     jnp.where(step <= num_iterations - warmdown, 1.0,
                               remaining + (1 - remaining) * final_lr_frac))


def muon_momentum(step, num_iterations: int, *, warmdown_ratio: float = 0.65):
    """0.85 -> 0.97 over the first 400 steps, 0.97, then 0.97 -> 0.90 through the warmdown."""
    step = jnp.asarray(step, jnp.float32)
    warmdown = _warmdown_steps(num_iterations, warmdown_ratio)
    start = num_iterations - warmdown
    progress = (step - start) / max(warmdown, 1)
    return jnp.where(step < 400, 0.85 + (0.97 - 0.85) * step / 400,
                     jnp.where(step >= start, 0.97 + (0.90 - 0.97) * progress, 0.97))


def weight_decay_multiplier(step, num_iterations: int):
    """Cosine from 1 at step 0 to 0 at the end of training."""
    step = jnp.asarray(step, jnp.float32)
    return 0.5 * (1 + jnp.cos(jnp.pi * step / num_iterations))


def schedules(num_iterations: int, *, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
              final_lr_frac: float = 0.05) -> dict[str, Callable]:
    """The per-step hyperparameters of `build_optimizer` as functions of the step count."""
    return {
        "lr_multiplier": functools.partial(lr_multiplier, num_iterations=num_iterations, warmup_steps=warmup_steps,
                                           warmdown_ratio=warmdown_ratio, final_lr_frac=final_lr_frac),
        "muon_momentum": functools.partial(muon_momentum, num_iterations=num_iterations, warmdown_ratio=warmdown_ratio),
        "muon_wd_multiplier": functools.partial(weight_decay_multiplier, num_iterations=num_iterations),
    }


# --- the depth dial ---------------------------------------------------------------------------

REFERENCE_DEPTH = 12  # the depth where the reference tuned its hyperparameters
REFERENCE_BATCH = 2**19  # tokens; the measured optimum at d12
BATCH_EXPONENT = 0.383  # Power Lines (arXiv:2505.13738): B_opt grows as D^0.383


def num_scaling_params(config) -> int:
    """The parameters the reference's scaling laws count: block matrices and lm_head."""
    counts = param_counts(config)
    return counts["transformer_matrices"] + counts["lm_head"]


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """Everything about optimization that the depth dial decides. LRs are after batch scaling
    (the arguments of `reference_groups`); `groups()` applies the per-group factors."""

    depth: int
    model_dim: int
    num_scaling_params: int
    target_tokens: int
    total_batch_size: int
    batch_lr_scale: float
    num_iterations: int
    unembedding_lr: float
    embedding_lr: float
    matrix_lr: float
    scalar_lr: float
    weight_decay: float  # Muon's, before the cosine schedule
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05

    def groups(self) -> dict[str, Group]:
        return reference_groups(self.model_dim, unembedding_lr=self.unembedding_lr, embedding_lr=self.embedding_lr,
                                matrix_lr=self.matrix_lr, weight_decay=self.weight_decay, scalar_lr=self.scalar_lr)

    def schedules(self) -> dict[str, Callable]:
        return schedules(self.num_iterations, warmup_steps=self.warmup_steps, warmdown_ratio=self.warmdown_ratio,
                         final_lr_frac=self.final_lr_frac)

    def __str__(self):
        rows = [
            ("depth / model dim", f"{self.depth} / {self.model_dim}"),
            ("scaling params", f"{self.num_scaling_params:,}"),
            ("target tokens", f"{self.target_tokens:,}"),
            ("total batch (tokens)", f"{self.total_batch_size:,}"),
            ("iterations", f"{self.num_iterations:,}"),
            ("batch lr scale", f"{self.batch_lr_scale:.6f}"),
            ("muon weight decay", f"{self.weight_decay:.6f}"),
            ("schedule", f"warmup {self.warmup_steps}, warmdown {self.warmdown_ratio:g} to {self.final_lr_frac:g}"),
        ]
        for name, g in self.groups().items():
            extra = f"betas {g.betas}" if g.kind == "adamw" else f"ns_steps {g.ns_steps}, beta2 {g.beta2}"
            rows.append((f"lr {name} ({g.kind})", f"{g.lr:.6g}  wd {g.weight_decay:.6g}  {extra}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def derive_hyperparameters(depth: int, *, vocab_size: int = 32768, sequence_len: int = 2048,
                           aspect_ratio: int = 64, head_dim: int = 128, target_param_data_ratio: float = 12,
                           total_batch_size: int | None = None, num_iterations: int | None = None,
                           embedding_lr: float = 0.3, unembedding_lr: float = 0.008, matrix_lr: float = 0.02,
                           scalar_lr: float = 0.5, weight_decay: float = 0.28, warmup_steps: int = 40,
                           warmdown_ratio: float = 0.65, final_lr_frac: float = 0.05) -> Hyperparameters:
    """The reference's horizon, batch size, LRs and weight decay for a depth (its base_train
    defaults). Tokens = ratio x scaling params; the batch grows from 2^19 at d12 as tokens^0.383,
    rounded to a power of two; LRs scale as sqrt(B / 2^19); the weight decay keeps
    B / (lr * wd * tokens) constant, so wd scales as sqrt(B / B_ref) * (D_ref / D)."""

    def scaling_params(d):
        return num_scaling_params(config_from_depth(d, vocab_size=vocab_size, sequence_len=sequence_len,
                                                    aspect_ratio=aspect_ratio, head_dim=head_dim))

    config = config_from_depth(depth, vocab_size=vocab_size, sequence_len=sequence_len,
                               aspect_ratio=aspect_ratio, head_dim=head_dim)
    n_params = scaling_params(depth)
    target_tokens = int(target_param_data_ratio * n_params)
    reference_tokens = target_param_data_ratio * scaling_params(REFERENCE_DEPTH)
    if total_batch_size is None:
        predicted = REFERENCE_BATCH * (target_tokens / reference_tokens) ** BATCH_EXPONENT
        total_batch_size = 2 ** round(math.log2(predicted))
    batch_lr_scale = (total_batch_size / REFERENCE_BATCH) ** 0.5
    if num_iterations is None:
        num_iterations = target_tokens // total_batch_size
    return Hyperparameters(
        depth=depth,
        model_dim=config.n_embd,
        num_scaling_params=n_params,
        target_tokens=target_tokens,
        total_batch_size=total_batch_size,
        batch_lr_scale=batch_lr_scale,
        num_iterations=num_iterations,
        unembedding_lr=unembedding_lr * batch_lr_scale,
        embedding_lr=embedding_lr * batch_lr_scale,
        matrix_lr=matrix_lr * batch_lr_scale,
        scalar_lr=scalar_lr * batch_lr_scale,
        weight_decay=weight_decay * batch_lr_scale * (reference_tokens / target_tokens),
        warmup_steps=warmup_steps,
        warmdown_ratio=warmdown_ratio,
        final_lr_frac=final_lr_frac,
    )
