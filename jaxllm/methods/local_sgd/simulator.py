"""Deterministic event simulator of heterogeneous Local-SGD workers (timing only, no model).

Replays arXiv 2401.09135 Alg. 2 (async, with grace period) and synchronous DiLoCo rounds on the
host. The resulting events say which worker trained which shard for how many steps, from which
global-model version, and which version its arrival produced; a trainer replays them with real
inner steps, so every arm is exactly reproducible.
"""

import dataclasses

import numpy as np

from jaxllm.methods.local_sgd.config import LocalSGDConfig
from jaxllm.methods.local_sgd.dylu import MICROSECONDS_PER_SECOND, to_microseconds
from jaxllm.methods.local_sgd.planner import JobPlanner, PlannedJob


@dataclasses.dataclass(frozen=True)
class Event:
    """One job of one worker, from copying the global model to its pseudo-gradient's arrival.

    worker: worker index. start_us / end_us: simulated start time and arrival time at the server
      in integer microseconds (end = start + steps · step time + comm time).
    steps: local (inner) steps of the job. shard: data shard it trained on. shard_step: the
      shard's local-step count when the job started; the job uses that shard's steps
      shard_step … shard_step + steps − 1 (batch positions and per-shard learning rate).
    version_start: global-model version the worker copied (0 = initial params).
    version_after: global-model version once this arrival is applied. Events sharing a
      version_after form one outer update on the mean of their pseudo-gradients (a sync round);
      in async mode every event has its own.
    """

    worker: int
    start_us: int
    end_us: int
    steps: int
    shard: int
    shard_step: int
    version_start: int
    version_after: int

    @property
    def start(self) -> float:
        return self.start_us / MICROSECONDS_PER_SECOND

    @property
    def end(self) -> float:
        return self.end_us / MICROSECONDS_PER_SECOND

    @property
    def staleness(self) -> int:
        """Outer updates applied between this job's copy and its own update."""
        return self.version_after - 1 - self.version_start


def _arrive(job: PlannedJob, version_after: int) -> Event:
    return Event(*job, version_after=version_after)


def _simulate_sync(cfg: LocalSGDConfig) -> list[Event]:
    launcher, events, version, now_us = JobPlanner(cfg), [], 0, 0
    while launcher.remaining > 0:
        jobs = [job for w in range(cfg.num_workers) if (job := launcher.launch(w, now_us, version))]
        version += 1
        events.extend(_arrive(job, version) for job in jobs)
        now_us = max(job.end_us for job in jobs)
    return events


def _simulate_async(cfg: LocalSGDConfig) -> list[Event]:
    launcher, events, version = JobPlanner(cfg), [], 0
    grace_us = to_microseconds(cfg.grace_period, "grace_period")
    running = {w: job for w in range(cfg.num_workers) if (job := launcher.launch(w, 0, 0))}
    window_start_us = None  # τ_sync: first arrival of the open grace window (None = ∞)
    synced = 0
    while synced < cfg.total_local_steps:
        nxt = min(running.values(), key=lambda job: (job.end_us, job.worker), default=None)
        if nxt is not None and (window_start_us is None or nxt.end_us <= window_start_us + grace_us):
            if window_start_us is None:
                window_start_us = nxt.end_us
            del running[nxt.worker]
            version += 1
            events.append(_arrive(nxt, version))
            synced += nxt.steps
        else:
            restart_us = window_start_us + grace_us
            for w in range(cfg.num_workers):
                if w not in running and (job := launcher.launch(w, restart_us, version)):
                    running[w] = job
            window_start_us = None
    return events


def simulate(cfg: LocalSGDConfig) -> list[Event]:
    """Events of one arm in the order the server applies them (non-decreasing version_after).

    sync: rounds start together; worker w runs its local steps on its shard; the round ends when
      the slowest pseudo-gradient arrives (start + max_w steps_w · s_w + comm); one outer update.
    async: every worker starts at 0; arrivals are applied one by one in order of arrival time
      (ties by worker index). After an arrival at τ the server waits `grace_period` and applies
      every arrival up to τ + grace, then restarts all free workers at τ + grace from the latest
      version (grace 0: a worker restarts the moment it arrives).
    Both: a job never exceeds the remaining budget of total_local_steps (workers are served in
    index order), so the events' steps sum exactly to total_local_steps. Deterministic per config.
    """
    return _simulate_sync(cfg) if cfg.mode == "sync" else _simulate_async(cfg)


def version_times(events: list[Event]) -> np.ndarray:
    """Simulated time in seconds at which each global version exists (index = version; 0 → 0.0)."""
    times_us = np.zeros(max((e.version_after for e in events), default=0) + 1, dtype=np.int64)
    for e in events:
        times_us[e.version_after] = max(times_us[e.version_after], e.end_us)
    return times_us / MICROSECONDS_PER_SECOND


def utilisation(events: list[Event], num_workers: int) -> float:
    """Busy worker time (compute + communication) / (num_workers · makespan), in [0, 1]."""
    makespan_us = max((e.end_us for e in events), default=0)
    if makespan_us == 0:
        return 0.0
    return sum(e.end_us - e.start_us for e in events) / (num_workers * makespan_us)
