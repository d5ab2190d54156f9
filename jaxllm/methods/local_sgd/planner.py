"""`JobPlanner`: hands out Local-SGD jobs (shard, step count, timing) against a global step budget.

Shared by the event simulator and the live parameter server, so both pick shards, local-step
counts (H or DyLU) and budget truncation by the same rules.
"""

from typing import NamedTuple

import numpy as np

from jaxllm.methods.local_sgd.config import LocalSGDConfig
from jaxllm.methods.local_sgd.dylu import step_microseconds, to_microseconds
from jaxllm.methods.local_sgd.shards import sample_shard


class PlannedJob(NamedTuple):
    """One job as planned: who, when (simulated µs), how many steps, which data, from which version."""

    worker: int
    start_us: int
    end_us: int
    steps: int
    shard: int
    shard_step: int
    version_start: int


class JobPlanner:
    """Starts jobs: picks the shard, the step count, and charges the global step budget.

    Shards are fixed (worker w trains shard w) or drawn by progress-balanced sampling from a
    generator seeded by cfg.seed; `consumed[i]` counts the local steps planned on shard i, so a
    shard's jobs use consecutive shard steps. `remaining` is what is left of total_local_steps.
    """

    def __init__(self, cfg: LocalSGDConfig):
        self.step_us = step_microseconds(cfg.worker_seconds_per_step())
        self.comm_us = to_microseconds(cfg.comm_time, "comm_time")
        self.steps = cfg.worker_local_steps()
        self.shard_sizes = cfg.resolved_shard_sizes
        self.fixed = cfg.resolved_shard_assignment == "fixed"
        self.rng = np.random.default_rng([cfg.seed, 1])
        self.consumed = [0] * len(self.shard_sizes)
        self.remaining = cfg.total_local_steps

    def launch(self, worker: int, start_us: int, version: int) -> PlannedJob | None:
        """A job for `worker`, truncated to the remaining budget; None once the budget is spent."""
        steps = int(min(self.steps[worker], self.remaining))
        if steps == 0:
            return None
        shard = worker if self.fixed else sample_shard(self.rng, self.shard_sizes, self.consumed)
        end_us = start_us + steps * int(self.step_us[worker]) + self.comm_us
        job = PlannedJob(worker, start_us, end_us, steps, shard, self.consumed[shard], version)
        self.consumed[shard] += steps
        self.remaining -= steps
        return job

    def refund(self, steps: int) -> None:
        """Return an abandoned job's steps to the budget (its shard steps stay consumed: later jobs
        on that shard go on with fresh data rather than reusing the abandoned batches)."""
        self.remaining += steps
