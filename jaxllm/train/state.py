"""The training state pytree: everything a step reads and writes, and all a checkpoint must hold
besides the data-iterator position."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def init_state(params, optimizer: optax.GradientTransformation, rng) -> TrainState:
    """A step-0 state; the optimizer state is created next to (and sharded like) the params."""
    opt_state = jax.jit(optimizer.init)(params)
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=opt_state,
                      rng=jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng)
