"""The jitted training step: loss, exact gradient accumulation, optimizer update.

Loss-function contract (the objective seam of the README's seam table): `loss_fn(params, batch, rng) -> (loss, aux)`.
`loss` is a scalar or a dict `{name: (numerator, denominator)}` whose value is Σ num/den. With
gradient accumulation every term's numerator is summed over micro-batches and divided by the
denominator summed over the *whole* batch, so a token-mean loss over B/4 × 4 micro-batches equals
the loss over B rows exactly, whatever the masks. A scalar loss counts as (loss, 1) per
micro-batch, i.e. the mean over micro-batches. Denominators must not depend on the parameters
(they are counts and mask sums): they are evaluated first, and XLA drops the model compute that
they do not need.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxllm.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[Any, dict]]


def loss_terms(loss) -> dict:
    """Normalise a loss_fn's loss to {name: (numerator, denominator)}."""
    if isinstance(loss, dict):
        return loss
    return {"loss": (loss, jnp.ones((), jnp.float32))}


def total_loss(terms: dict):
    return sum(num / jnp.maximum(den, 1e-9) for num, den in terms.values())


def split_micro(batch: dict, grad_accum: int) -> dict:
    """[B, ...] leaves → [grad_accum, B / grad_accum, ...]."""
    def split(x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={grad_accum}")
        return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
    return jax.tree.map(split, batch)


def accumulated_grads(loss_fn: LossFn, params, batch: dict, rng, grad_accum: int = 1):
    """(loss, grads, aux) for the whole batch, computed over `grad_accum` micro-batches."""
    micro = split_micro(batch, grad_accum)
    rngs = jax.random.split(rng, grad_accum)

    def denominators(mb, r):
        return {k: den for k, (_, den) in loss_terms(loss_fn(params, mb, r)[0]).items()}

    dens = jax.tree.map(lambda d: jnp.sum(d, axis=0), jax.vmap(denominators)(micro, rngs))

    def weighted(p, mb, r):
        loss, aux = loss_fn(p, mb, r)
        terms = loss_terms(loss)
        return sum(num / jnp.maximum(dens[k], 1e-9) for k, (num, _) in terms.items()), aux

    grad_fn = jax.value_and_grad(weighted, has_aux=True)
    if grad_accum == 1:
        (loss, aux), grads = grad_fn(params, jax.tree.map(lambda x: x[0], micro), rngs[0])
        return loss, grads, aux

    def body(carry, xs):
        loss_acc, grads_acc = carry
        (loss, aux), grads = grad_fn(params, *xs)
        return (loss_acc + loss, jax.tree.map(jnp.add, grads_acc, grads)), aux

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), auxs = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), (micro, rngs))
    return loss, grads, jax.tree.map(lambda a: jnp.mean(a, axis=0), auxs)


def train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, state: TrainState, batch: dict,
               grad_accum: int = 1):
    """One optimizer step. A non-finite loss or gradient leaves the state untouched and reports
    `finite = 0`, so the caller can stop without having written garbage anywhere."""
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    step_rng = jax.random.fold_in(step_rng, state.step)
    loss, grads, aux = accumulated_grads(loss_fn, state.params, batch, step_rng, grad_accum)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + finite.astype(state.step.dtype), params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state), rng=jax.random.key_data(rng))
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32), **aux}
    return new_state, metrics


def on_mesh(sharding, mesh):
    """`sharding` if it lays an array out on `mesh`, else replication over `mesh` (for the step
    counter, the rng and optimizer scalars that were created on a single device)."""
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh:
        return sharding
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh=None, *, grad_accum: int = 1,
                    donate: bool = True, state_shardings=None, batch_sharding=None, rules=None):
    """A jitted `step(state, batch) -> (state, metrics)`.

    On a mesh the batch is split over the data-parallel axes (`batch_sharding`, default from the
    logical rules) and the state keeps the shardings it was created with (or `state_shardings`,
    which also makes the result a plain jitted function that `.lower()`s for ahead-of-time
    compilation), so params born sharded stay sharded. Activation constraints inside the model
    resolve through the same logical `rules`. The input state is donated.
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(lambda state, batch: train_step(loss_fn, optimizer, state, batch, grad_accum),
                       donate_argnums=donate_argnums)

    from jaxllm.parallel import rules as rules_lib

    rules = rules_lib.mesh_rules(rules or rules_lib.DEFAULT_RULES, mesh)
    # Leading (batch) dimension only, so [B] and [B, T, ...] leaves share one sharding.
    data_sharding = batch_sharding or rules_lib.logical_sharding(("batch",), mesh, rules)
    data_size = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)

    def step(state, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return train_step(loss_fn, optimizer, state, batch, grad_accum)

    def jitted(shardings):
        return jax.jit(step, in_shardings=(shardings, data_sharding), out_shardings=(shardings, None),
                       donate_argnums=donate_argnums)

    if state_shardings is not None:
        return jitted(state_shardings)


    compiled = {}

    def sharded_step(state, batch):
        rows = jax.tree.leaves(batch)[0].shape[0]
        if rows % (data_size * grad_accum):
            raise ValueError(f"batch size {rows} is not divisible by the data-parallel size {data_size} "
                             f"x grad_accum {grad_accum}")
        if "fn" not in compiled:
            compiled["fn"] = jitted(jax.tree.map(lambda x: on_mesh(x.sharding, mesh), state))
        return compiled["fn"](state, batch)

    return sharded_step
