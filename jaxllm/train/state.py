"""The training state pytree: everything a step reads and writes, and all a checkpoint must hold
besides the data-iterator position."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state, param_shardings, mesh):
    """Shardings for an optimizer state: moments laid out like their params, the rest (counts,
    scalars) replicated. XLA would otherwise replicate `zeros_like` outputs in full on every chip."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated)


def _param_mesh(params):
    meshes = {x.sharding.mesh for x in jax.tree.leaves(params) if isinstance(x.sharding, NamedSharding)}
    return meshes.pop() if len(meshes) == 1 else None


def init_state(params, optimizer: optax.GradientTransformation, rng) -> TrainState:
    """A step-0 state. When the params are laid out on a mesh, the optimizer state is created
    sharded like them and the step counter and rng are replicated over the same mesh."""
    rng = jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    step = jax.numpy.zeros((), jax.numpy.int32)
    mesh = _param_mesh(params)
    if mesh is None:
        return TrainState(step=step, params=params, opt_state=jax.jit(optimizer.init)(params), rng=rng)
    shardings = opt_state_shardings(optimizer, jax.eval_shape(optimizer.init, params),
                                    jax.tree.map(lambda x: x.sharding, params), mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(step=jax.device_put(step, replicated), params=params,
                      opt_state=jax.jit(optimizer.init, out_shardings=shardings)(params),
                      rng=jax.device_put(rng, replicated))
