"""`InnerWorker`: one Local-SGD worker's inner loop, the ordinary jitted train step.

A job copies a global model, runs `steps` inner steps on consecutive batches of one shard with
that shard's learning rate, and returns the pseudo-gradient g = θ_start − θ_local. The inner
optimizer state lives here for the worker's lifetime: never reset, never communicated, kept
across shards (arXiv 2401.09135). The same class runs inside the in-process replay and inside
each Ray worker process.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.methods.local_sgd.task import WorkerTask
from jaxllm.train.state import TrainState, init_state
from jaxllm.train.step import make_train_step


@jax.jit
def _pseudo_gradient(start, local):
    return jax.tree.map(jnp.subtract, start, local)


def _with_learning_rate(opt_state: optax.InjectHyperparamsState, learning_rate: float):
    rate = jnp.asarray(learning_rate, opt_state.hyperparams["learning_rate"].dtype)
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": rate})


@functools.lru_cache(maxsize=16)
def _inner_step(loss_fn, inner_optimizer, grad_accum: int):
    """(inner transform with an injectable learning rate, its jitted train step), shared by all
    workers of a process that train the same task, so the step compiles once."""
    def with_rate(learning_rate):  # only the rate is injected; other settings stay Python values
        return inner_optimizer(learning_rate=learning_rate)

    tx = optax.inject_hyperparams(with_rate)(learning_rate=0.0)
    return tx, make_train_step(loss_fn, tx, grad_accum=grad_accum, donate=True)


class InnerWorker:
    """Worker `worker` of a run: `run_job` trains from a given global model and returns g.

    The train-step rng of worker w is `fold_in(key(seed), w)` (it only matters for stochastic
    losses). The inner state is created at the first job, from the first model the worker sees.
    """

    def __init__(self, task: WorkerTask, worker: int, seed: int = 0):
        self.task = task
        self.worker = worker
        self.tx, self.step = _inner_step(task.loss_fn, task.inner_optimizer, task.grad_accum)
        self.rng = jax.random.fold_in(jax.random.key(seed), worker)
        self.state: TrainState | None = None

    def run_job(self, start_params, shard: int, shard_step: int, steps: int):
        """(pseudo-gradient, mean inner loss) of `steps` steps from `start_params` on `shard`.

        Step i uses batch `shard_step + i` of that shard and its rate `lr_schedule(shard_step + i)`.
        """
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps={steps!r} must be an integer >= 1")
        if not 0 <= shard < len(self.task.shards):
            raise ValueError(f"shard={shard} is out of range for {len(self.task.shards)} shards")
        start = jax.tree.map(jnp.asarray, start_params)
        if self.state is None:
            self.state = init_state(start, self.tx, self.rng)
        # The step donates its input state; train on a copy so that `start` stays valid.
        state = self.state.replace(params=jax.tree.map(jnp.copy, start))
        losses = []
        for i in range(steps):
            opt_state = _with_learning_rate(state.opt_state, self.task.lr_schedule(shard_step + i))
            state, metrics = self.step(state.replace(opt_state=opt_state), self.task.shards[shard](shard_step + i))
            losses.append(metrics["loss"])
        self.state = state
        return _pseudo_gradient(start, state.params), float(np.mean(jax.device_get(losses)))
