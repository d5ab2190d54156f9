"""Checkpointable batch iterators for the one loop: the seeded epoch batcher (endless batches over N
in-memory rows, a fresh permutation every epoch) and `DrawnBatches` (freshly sampled batches).

Used by every fine-tuning caller of the one loop (preference pairs, SFT rows, retriever pairs,
context-extension samples). Epoch e visits the rows in `default_rng([seed, e]).permutation(N)`,
`batch_size` at a time, dropping the incomplete last batch. The position is grain's iterator
contract (`get_state()` → {"epoch", "index"} JSON, `set_state`), which
`jaxllm.train.checkpoint.Checkpointer` saves with the TrainState, so a resumed run continues on
the very next batch. With several processes each yields its own slice of every global batch.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import grain
import jax
import numpy as np

Fetch = Callable[[np.ndarray, int], dict]
"""`fetch(rows_B, draw) -> batch`: the batch of row indices `rows_B`; `draw` counts the batches
drawn before this one (0-based), for per-batch randomness (e.g. negatives) that resumes exactly."""


def check_rows(data: Mapping[str, np.ndarray]) -> int:
    """The common leading size N of `data`'s arrays; ValueError naming the sizes when they differ."""
    if not data:
        raise ValueError("no arrays to batch")
    sizes = {k: np.shape(v)[0] for k, v in data.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"arrays disagree on the number of rows: {sizes}")
    return next(iter(sizes.values()))


class EpochBatches(grain.DatasetIterator):
    """Batches of `batch_size` (global) rows of `data` (dict of arrays with a leading N axis), or of
    N = `data` rows made by `fetch` (then `data` is the row count)."""

    def __init__(self, data: Mapping[str, np.ndarray] | int, batch_size: int, seed: int, *, fetch: Fetch | None = None):
        super().__init__()
        if isinstance(data, Mapping):
            self.data = {k: np.asarray(v) for k, v in data.items()}
            self.num_rows = check_rows(self.data)
            self.fetch = fetch or (lambda rows, draw: {k: v[rows] for k, v in self.data.items()})
        else:
            if fetch is None:
                raise ValueError(f"a row count ({data}) needs a fetch function")
            self.data, self.num_rows, self.fetch = None, int(data), fetch
        if not 1 <= batch_size <= self.num_rows:
            raise ValueError(f"batch_size {batch_size} must be in [1, number of rows {self.num_rows}]")
        if batch_size % jax.process_count():
            raise ValueError(f"batch_size {batch_size} is not divisible by the process count {jax.process_count()}")
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.index = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.batch_size

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index + self.batch_size > self.num_rows:
            self.epoch, self.index = self.epoch + 1, 0
        draw = self.epoch * self.batches_per_epoch + self.index // self.batch_size
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
        rows = order[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        per_process = self.batch_size // jax.process_count()
        return self.fetch(rows[jax.process_index() * per_process:][:per_process], draw)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: Mapping[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class DrawnBatches(grain.DatasetIterator):
    """Endless batches `draw(rng)` from one `np.random.default_rng(seed)` (synthetic tasks whose every
    batch is freshly sampled). The position is the generator's state (JSON), so a resumed run draws
    exactly the batches the uninterrupted one would have."""

    def __init__(self, draw: Callable[[np.random.Generator], dict], seed: int):
        super().__init__()
        self.draw, self.rng = draw, np.random.default_rng(seed)

    def __next__(self) -> dict[str, np.ndarray]:
        return self.draw(self.rng)

    def get_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: Mapping) -> None:
        self.rng.bit_generator.state = dict(state)


class IndexedBatches(grain.DatasetIterator):
    """Batches `batch_at(0)`, `batch_at(1)`, ... of a random-access source (e.g. a Local-SGD
    `ArrayShard`); the position is the next index."""

    def __init__(self, batch_at: Callable[[int], dict]):
        super().__init__()
        self.batch_at, self.index = batch_at, 0

    def __next__(self) -> dict[str, np.ndarray]:
        self.index += 1
        return self.batch_at(self.index - 1)

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: Mapping) -> None:
        self.index = int(state["index"])
