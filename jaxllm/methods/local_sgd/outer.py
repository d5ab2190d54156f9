"""Outer optimizers for Local-SGD: optax transforms fed with one pseudo-gradient at a time.

The "gradient" each transform receives is a pseudo-gradient g = θ_start − θ_local (the model a
worker copied minus the model it trained), a descent direction. As in optax, the returned update u
is *added* to the global params: θ ← optax.apply_updates(θ, u). Both transforms chain with other
optax transforms (e.g. `optax.chain(optax.clip_by_global_norm(1.0), delayed_nesterov(...))`).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class OuterNesterovState(NamedTuple):
    """Momentum buffer m of outer Nesterov (same tree as the params)."""

    momentum: optax.Params


class DelayedNesterovState(NamedTuple):
    """Delayed Nesterov state: arrivals so far, momentum m, and the sum Δ of the open window."""

    count: jax.Array
    momentum: optax.Params
    buffer: optax.Params


def check_pseudo_gradient(pseudo_grad: Any, reference: Any, reference_name: str = "params") -> None:
    """Raise ValueError naming the first difference between a pseudo-gradient and its params tree.

    Compares leaf paths and shapes (static, so this also works on tracers under `jax.jit`).
    """
    grad_leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(pseudo_grad)}
    ref_leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(reference)}
    missing = sorted(ref_leaves.keys() - grad_leaves.keys())
    unexpected = sorted(grad_leaves.keys() - ref_leaves.keys())
    if missing or unexpected:
        raise ValueError(
            f"pseudo-gradient tree does not match the {reference_name}: missing leaves {missing}, "
            f"unexpected leaves {unexpected}"
        )
    for path, ref in ref_leaves.items():
        if jnp.shape(grad_leaves[path]) != jnp.shape(ref):
            raise ValueError(
                f"pseudo-gradient leaf {path} has shape {jnp.shape(grad_leaves[path])}, "
                f"but the {reference_name} leaf has shape {jnp.shape(ref)}"
            )
    grad_def = jax.tree_util.tree_structure(pseudo_grad)
    ref_def = jax.tree_util.tree_structure(reference)
    if grad_def != ref_def:
        raise ValueError(
            f"pseudo-gradient tree structure {grad_def} does not match the {reference_name} structure {ref_def}"
        )


def check_outer_hyperparams(
    learning_rate: float, momentum: float, buffer_size: int = 1, activation: float = 0.0
) -> None:
    """ValueError naming the bad value: ε ≥ 0, β ∈ [0, 1), integer N ≥ 1, c ∈ [0, 1/N]."""
    if not learning_rate >= 0.0:
        raise ValueError(f"learning_rate={learning_rate} must be >= 0")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum} must lie in [0, 1)")
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
        raise ValueError(f"buffer_size={buffer_size!r} must be an integer >= 1")
    if not 0.0 <= activation <= 1.0 / buffer_size:
        raise ValueError(f"activation={activation} must lie in [0, 1/buffer_size] = [0, {1.0 / buffer_size}]")


def _check_update_inputs(pseudo_grad: Any, momentum: Any, params: Any) -> None:
    check_pseudo_gradient(pseudo_grad, momentum, "optimizer state (params given to init)")
    if params is not None:
        check_pseudo_gradient(pseudo_grad, params, "params")


def outer_nesterov(learning_rate: float, momentum: float = 0.9) -> optax.GradientTransformation:
    """Outer Nesterov applied once per pseudo-gradient g (DiLoCo's outer optimizer).

    m ← βm + g;  u = −ε(g + βm). Identical to `optax.sgd(ε, momentum=β, nesterov=True)`; with
    β = 0 it is plain outer SGD (u = −εg). Kept here so that every outer optimizer validates its
    pseudo-gradient against the params tree.
    """
    check_outer_hyperparams(learning_rate, momentum)

    def init_fn(params):
        return OuterNesterovState(momentum=jax.tree.map(jnp.zeros_like, params))

    def update_fn(pseudo_grad, state, params=None):
        _check_update_inputs(pseudo_grad, state.momentum, params)
        new_m = jax.tree.map(lambda m, g: momentum * m + g, state.momentum, pseudo_grad)
        updates = jax.tree.map(lambda g, m: -learning_rate * (g + momentum * m), pseudo_grad, new_m)
        return updates, OuterNesterovState(momentum=new_m)

    return optax.GradientTransformation(init_fn, update_fn)


def delayed_nesterov(
    learning_rate: float, momentum: float = 0.9, buffer_size: int = 4, activation: float = 0.0
) -> optax.GradientTransformation:
    """Delayed Nesterov (arXiv 2401.09135, Alg. 3): momentum is updated every `buffer_size` arrivals.

    With ε = learning_rate, β = momentum, N = buffer_size, c = activation, on arrival t of g_t:
      Δ ← Δ + g_t
      if (t + 1) mod N == 0:  m ← βm + Δ/N;  u = −ε[(1 − cN + c)βm + g_t/N];  Δ ← 0
      else:                   u = −ε[cβm + g_t/N]                          (m unchanged)
    With c = 0 a window of N arrivals moves (θ, m) exactly like one Nesterov step on their mean;
    c ∈ (0, 1/N] spends part of the momentum between milestones (c = 1/N spreads it evenly).
    The milestone branch is a `jnp.where` on `count`, so a jitted update compiles once.
    """
    check_outer_hyperparams(learning_rate, momentum, buffer_size, activation)
    n = buffer_size
    milestone_weight = (1.0 - activation * n + activation) * momentum
    between_weight = activation * momentum

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return DelayedNesterovState(count=jnp.zeros([], jnp.int32), momentum=zeros, buffer=zeros)

    def update_fn(pseudo_grad, state, params=None):
        _check_update_inputs(pseudo_grad, state.momentum, params)
        milestone = (state.count + 1) % n == 0
        window_sum = jax.tree.map(jnp.add, state.buffer, pseudo_grad)
        new_m = jax.tree.map(
            lambda m, s: jnp.where(milestone, momentum * m + s / n, m), state.momentum, window_sum
        )
        weight = jnp.where(milestone, milestone_weight, between_weight)
        updates = jax.tree.map(lambda g, m: -learning_rate * (weight * m + g / n), pseudo_grad, new_m)
        new_buffer = jax.tree.map(lambda s: jnp.where(milestone, jnp.zeros_like(s), s), window_sum)
        return updates, DelayedNesterovState(count=state.count + 1, momentum=new_m, buffer=new_buffer)

    return optax.GradientTransformation(init_fn, update_fn)
