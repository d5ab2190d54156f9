"""`WorkerTask`: everything a Local-SGD worker needs to train, in one picklable value.

The same task drives the in-process replay (`runner.run`) and the Ray workers
(`ray_runtime`), which receive it by pickling: its functions and shards must pickle (cloudpickle
handles closures; shards should hold arrays or load them lazily from paths every worker can read).
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import optax

from jaxllm.methods.local_sgd.shards import shard_learning_rate
from jaxllm.train.step import LossFn, loss_terms

Batch = Any
Shard = Callable[[int], Batch]


@dataclasses.dataclass(frozen=True)
class ShardSchedule:
    """Per-shard inner learning rate (arXiv 2401.09135 Eq. 3): `shard_learning_rate` with these
    settings, indexed by the local steps taken on one shard so far."""

    peak: float
    final: float
    warmup: int
    total: int

    def __post_init__(self):
        shard_learning_rate(0, peak=self.peak, final=self.final, warmup=self.warmup, total=self.total)

    def __call__(self, shard_step: int) -> float:
        return shard_learning_rate(shard_step, peak=self.peak, final=self.final, warmup=self.warmup,
                                   total=self.total)


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayShard:
    """Random-access batches over equal-length rows: batch i holds rows i·B … i·B + B − 1 of an
    endless stream that visits the S rows in a fresh seeded permutation every epoch.

    arrays: {name: [S, ...]} with a shared leading row axis (e.g. tokens/positions/segment_ids/
    loss_mask rows of a packed LM corpus). Batch i depends only on (arrays, seed, i), so any
    worker in any process reads the same data for the same shard step.
    """

    arrays: Mapping[str, np.ndarray]
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        if not self.arrays:
            raise ValueError("ArrayShard needs at least one array, got none")
        rows = {name: np.shape(a)[0] if np.ndim(a) else None for name, a in self.arrays.items()}
        if None in rows.values() or len(set(rows.values())) != 1 or 0 in rows.values():
            raise ValueError(f"ArrayShard arrays must share a non-empty leading row axis, got rows {rows}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be an integer >= 1")

    @property
    def num_rows(self) -> int:
        return int(np.shape(next(iter(self.arrays.values())))[0])

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"batch index {index!r} must be an integer >= 0")
        epoch, offset = np.divmod(int(index) * self.batch_size + np.arange(self.batch_size), self.num_rows)
        rows = np.empty(self.batch_size, dtype=np.int64)
        for e in np.unique(epoch):
            order = np.random.default_rng([self.seed, int(e)]).permutation(self.num_rows)
            rows[epoch == e] = order[offset[epoch == e]]
        return {name: np.asarray(a)[rows] for name, a in self.arrays.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class WorkerTask:
    """The model-side half of a Local-SGD run (the timing half is `LocalSGDConfig`).

    loss_fn: the train-step contract `loss_fn(params, batch, rng) -> (loss, aux)`.
    inner_optimizer: `inner_optimizer(learning_rate=lr) -> GradientTransformation`, e.g.
      `functools.partial(optax.adamw, b1=0.9, b2=0.95, weight_decay=0.1)`; workers wrap it in
      `optax.inject_hyperparams` and set the per-shard rate before every step.
    lr_schedule: the per-shard learning-rate schedule.
    shards: shards[i](shard_step) is the batch of shard i at that shard step.
    grad_accum: micro-batches per inner step (exact, see `jaxllm.train.step`).
    """

    loss_fn: LossFn
    inner_optimizer: Callable[..., optax.GradientTransformation]
    lr_schedule: ShardSchedule
    shards: Sequence[Shard]
    grad_accum: int = 1

    def __post_init__(self):
        if not self.shards:
            raise ValueError("WorkerTask needs at least one shard, got none")
        if isinstance(self.grad_accum, bool) or not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ValueError(f"grad_accum={self.grad_accum!r} must be an integer >= 1")

    def check_config(self, num_shards: int) -> None:
        """ValueError when the timing config plans more shards than the task has."""
        if num_shards != len(self.shards):
            raise ValueError(f"the config plans {num_shards} shards but the task has {len(self.shards)}")


@functools.lru_cache(maxsize=16)
def _loss_terms_fn(loss_fn: LossFn):
    """Jitted {name: (numerator, denominator)} of one batch; one per loss function."""
    return jax.jit(lambda params, batch: loss_terms(loss_fn(params, batch, jax.random.key(0))[0]))


@dataclasses.dataclass(frozen=True, eq=False)
class EvalLoss:
    """`eval_fn(params) -> float`: the loss of `loss_fn` over fixed batches, exact for token-mean
    terms: every {name: (numerator, denominator)} term is summed over all batches before the
    division (a scalar loss counts as (loss, 1) per batch, i.e. the mean over batches)."""

    loss_fn: LossFn
    batches: Sequence[Batch]

    def __post_init__(self):
        if not self.batches:
            raise ValueError("EvalLoss needs at least one batch, got none")

    def __call__(self, params) -> float:
        terms_fn = _loss_terms_fn(self.loss_fn)
        sums = None
        for batch in self.batches:
            terms = terms_fn(params, batch)
            sums = terms if sums is None else jax.tree.map(lambda a, b: a + b, sums, terms)
        sums = jax.device_get(sums)
        return float(sum(num / max(den, 1e-9) for num, den in sums.values()))
