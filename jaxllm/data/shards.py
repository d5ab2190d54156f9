"""A batch stream cut into a fixed number of shards, read by however many processes a job has.

The global batch of every step is the concatenation, in shard order, of each shard's next batch,
so it does not depend on which process reads which shard: a run started by two processes can
resume in one (or four processes' run in two) and see exactly the batches it would have seen.
Each process reads a contiguous range of the shards. The shard count is fixed when a stream
starts (default: the job's process count, one shard per process, as a plain sharded reader does)
and travels with the position, so a resumed stream keeps it whatever the new process count.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

OpenShard = Callable[[int, int, int], Iterator[dict]]
"""`open_shard(shard_index, shard_count, rows)`: an iterator of batches of `rows` rows of that
shard, with grain's `get_state()` / `set_state()` (e.g. `sources.lm_batches`)."""


class ProcessLayoutError(ValueError):
    """A readable checkpoint whose data position this job's processes cannot take over; unlike a
    corrupt one, it must not be set aside (another process count can resume it)."""


class ShardedBatches:
    """This process's rows of every global batch of `global_batch` rows, drawn from the shards it
    owns; `get_state()` holds its shards' positions and the shard count. `set_global_state`
    restores from the positions every process of the saving job wrote, whatever their number."""

    def __init__(self, open_shard: OpenShard, *, global_batch: int, shard_count: int | None = None):
        self._open = open_shard
        self.global_batch = global_batch
        self._lay_out(jax.process_count() if shard_count is None else shard_count)

    def _lay_out(self, shard_count: int) -> None:
        processes, index = jax.process_count(), jax.process_index()
        if shard_count < 1 or shard_count % processes:
            raise ProcessLayoutError(f"a stream of {shard_count} data shards cannot be split over {processes} "
                                     f"process(es): use a process count that divides {shard_count}")
        if self.global_batch % shard_count:
            raise ValueError(f"global batch {self.global_batch} is not divisible by the {shard_count} data shards")
        per_process = shard_count // processes
        self.shard_count = shard_count
        self.shards = range(index * per_process, (index + 1) * per_process)
        self._iterators = {k: self._open(k, shard_count, self.global_batch // shard_count) for k in self.shards}

    def __iter__(self) -> ShardedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(self._iterators[k]) for k in self.shards]
        return parts[0] if len(parts) == 1 else {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def get_state(self) -> dict[str, Any]:
        return {"shard_count": self.shard_count,
                "positions": {str(k): it.get_state() for k, it in self._iterators.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to `state` (a `get_state()`, or several processes' merged), re-opening the shards
        if its shard count differs; ProcessLayoutError if it lacks a shard this process reads."""
        if state["shard_count"] != self.shard_count:
            self._lay_out(state["shard_count"])
        missing = [k for k in self.shards if str(k) not in state["positions"]]
        if missing:
            raise ProcessLayoutError(f"the saved data position has no entry for shard(s) {missing} of "
                                     f"{self.shard_count}; it holds {sorted(state['positions'], key=int)}")
        for k in self.shards:
            self._iterators[k].set_state(state["positions"][str(k)])

    def set_global_state(self, states: Sequence[dict[str, Any]]) -> None:
        """Restores from `states`, the `get_state()` every process of the saving job wrote, in
        process order. A state without a shard count is a plain sharded reader's position
        (process p of n reading shard p of n), as checkpoints held before shard counts were saved."""
        merged: dict[str, Any] = {"shard_count": None, "positions": {}}
        for p, state in enumerate(states):
            if "shard_count" not in state:
                state = {"shard_count": len(states), "positions": {str(p): state}}
            if merged["shard_count"] not in (None, state["shard_count"]):
                raise ValueError(f"saved data positions disagree on the shard count: "
                                 f"{merged['shard_count']} and {state['shard_count']}")
            merged["shard_count"] = state["shard_count"]
            merged["positions"].update(state["positions"])
        self.set_state(merged)
