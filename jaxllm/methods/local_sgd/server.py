"""Parameter servers: the outer side of Local-SGD, independent of how workers are run.

A server owns the global model and the outer optimizer. Workers talk to it with three calls:

  request_job(worker) -> (Job, params) | WAIT | DONE
      the worker's next job and the global model it must start from (the same job again if the
      worker asks while its job is open; WAIT: ask again later; DONE: stop).
  push(worker, job_id, pseudo_grad, train_loss) -> bool
      the job's pseudo-gradient g = θ_start − θ_local. Accepted only if the job is that worker's
      open job (stale, duplicate and cancelled jobs are refused), the tree matches the params
      (paths and shapes) and every value is finite; a refused push never touches the model and
      its job counts as abandoned.
  worker_lost(worker, replaced) -> None
      the worker died: its open job is abandoned; unless a replacement takes its index, it gets
      no further jobs.

Three schedules decide when jobs start and which arrivals form one outer update:

  ReplayServer(cfg, params, events)   the simulator's events (`simulate(cfg)`), exactly: jobs
      start from their recorded version, arrivals are applied in event order whatever order
      they come in, and events sharing version_after form one update on their mean. Results
      do not depend on real timing, so they equal the in-process `runner.run` bit for bit.
  AsyncServer(cfg, params)            real arrival order: every accepted push is one outer
      update; a free worker starts from the latest model once the grace period after the
      first arrival of the open window has passed (arXiv 2401.09135 Alg. 2).
  SyncServer(cfg, params)             DiLoCo rounds: all live workers get a job from the same
      version; the round's accepted pseudo-gradients form one update on their mean.

Abandoned jobs (lost worker, refused push): the live servers return their steps to the budget,
so the run still trains total_local_steps synced steps; the replay server re-issues the job to
the replacement worker (a replacement is required there, since the schedule names every worker).
"""

import abc
import collections
import functools
import math
import time
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax

from jaxllm.methods.local_sgd.config import LocalSGDConfig, make_outer_optimizer
from jaxllm.methods.local_sgd.history import Arrival, History, Job, Rejection
from jaxllm.methods.local_sgd.outer import check_pseudo_gradient
from jaxllm.methods.local_sgd.planner import JobPlanner, PlannedJob
from jaxllm.methods.local_sgd.simulator import Event, simulate, version_times

WAIT = None
DONE = "done"
EvalFn = Callable[[Any], float]


def make_outer_step(tx: optax.GradientTransformation):
    """Jitted `(params, outer_state, [g, ...]) -> (params, outer_state)`: one update of the outer
    optimizer `tx` on the mean of the given pseudo-gradients (summed in list order)."""

    @jax.jit
    def outer_step(params, outer_state, pseudo_grads):
        mean = jax.tree.map(lambda *gs: sum(gs) / len(gs), *pseudo_grads)
        updates, outer_state = tx.update(mean, outer_state, params)
        return optax.apply_updates(params, updates), outer_state

    return outer_step


@functools.lru_cache(maxsize=32)
def outer_step_fn(*outer_settings):
    """`make_outer_step` of the preset `LocalSGDConfig.outer_settings` names; cached, so runs with
    the same preset share one compiled step."""
    return make_outer_step(make_outer_optimizer(*outer_settings))


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class ParameterServer(abc.ABC):
    """Global model, outer optimizer, validation and history; subclasses decide the schedule.

    `outer_optimizer`: any optax transform fed the mean pseudo-gradient of each outer update
    (e.g. `optax.chain(optax.clip_by_global_norm(1.0), delayed_nesterov(...))`); None builds the
    preset the config names (`cfg.outer_optimizer()`)."""

    def __init__(self, cfg: LocalSGDConfig, params, *, eval_fn: EvalFn | None = None, eval_every: int = 1,
                 clock: Callable[[], float] = time.monotonic,
                 outer_optimizer: optax.GradientTransformation | None = None):
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
            raise ValueError(f"eval_every={eval_every!r} must be an integer >= 1")
        if outer_optimizer is not None and not isinstance(outer_optimizer, optax.GradientTransformation):
            raise ValueError(f"outer_optimizer must be an optax.GradientTransformation, got "
                             f"{type(outer_optimizer).__name__}")
        self.cfg = cfg
        self.params = jax.tree.map(jnp.asarray, params)
        if outer_optimizer is None:
            self.outer_state = cfg.outer_optimizer().init(self.params)
            self._outer_step = outer_step_fn(*cfg.outer_settings)
        else:
            self.outer_state = outer_optimizer.init(self.params)
            self._outer_step = make_outer_step(outer_optimizer)
        self.version = 0
        self.local_steps = 0
        self.open: dict[int, Job] = {}
        self.history = History()
        self.eval_fn, self.eval_every = eval_fn, eval_every
        self.clock, self.start_time = clock, clock()
        self._recorded_version = -1
        self._record()

    # --- worker calls -----------------------------------------------------------------------

    def request_job(self, worker: int):
        self._check_worker(worker)
        if worker in self.open:
            job = self.open[worker]
            return job, self._params_at(job.version_start)
        reply = self._issue(worker)
        if isinstance(reply, Job):
            self.open[worker] = reply
            return reply, self._params_at(reply.version_start)
        return reply

    def push(self, worker: int, job_id: int, pseudo_grad, train_loss: float = math.nan) -> bool:
        self._check_worker(worker)
        job = self.open.get(worker)
        if job is None or job.job_id != job_id:
            return self._refuse(worker, job_id, f"job {job_id} is not the open job of worker {worker} "
                                                f"(stale, duplicate or cancelled)", abandon=None)
        try:
            check_pseudo_gradient(pseudo_grad, self.params)
        except ValueError as e:
            return self._refuse(worker, job_id, str(e), abandon=job)
        pseudo_grad = jax.tree.map(lambda g, p: jnp.asarray(g, p.dtype), pseudo_grad, self.params)
        if not bool(_all_finite(pseudo_grad)):
            return self._refuse(worker, job_id, "pseudo-gradient has non-finite values", abandon=job)
        del self.open[worker]
        self._accept(job, pseudo_grad, float(train_loss))
        return True

    def worker_lost(self, worker: int, replaced: bool) -> None:
        self._check_worker(worker)
        self._lost(worker, self.open.pop(worker, None), replaced)
        self._record_if_due()

    # --- state -------------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def done(self) -> bool:
        """True once the whole budget is synced (no more jobs will be issued)."""

    def status(self) -> dict:
        return {"version": self.version, "local_steps": self.local_steps, "done": self.done,
                "open_jobs": {w: job.job_id for w, job in self.open.items()},
                "arrivals": len(self.history.arrivals), "rejections": len(self.history.rejections)}

    def result(self):
        return self.params, self.history

    # --- schedule hooks ----------------------------------------------------------------------

    @abc.abstractmethod
    def _issue(self, worker: int):
        """A new Job for a worker without an open one, or WAIT / DONE."""

    @abc.abstractmethod
    def _accept(self, job: Job, pseudo_grad, train_loss: float) -> None:
        """An accepted, validated pseudo-gradient (the job is no longer open)."""

    @abc.abstractmethod
    def _abandon(self, job: Job) -> None:
        """A job that will never be accepted (refused push, or lost worker not replaced)."""

    def _lost(self, worker: int, job: Job | None, replaced: bool) -> None:
        if job is not None:
            self._abandon(job)

    def _time(self, version: int) -> float:
        return self.clock() - self.start_time

    # --- shared mechanics --------------------------------------------------------------------

    def _params_at(self, version: int):
        return self.params

    def _check_worker(self, worker: int) -> None:
        if isinstance(worker, bool) or not isinstance(worker, int) or not 0 <= worker < self.cfg.num_workers:
            raise ValueError(f"worker={worker!r} must be an integer in [0, {self.cfg.num_workers})")

    def _refuse(self, worker: int, job_id: int, reason: str, abandon: Job | None) -> bool:
        self.history.rejections.append(Rejection(job_id, worker, reason))
        if abandon is not None:
            del self.open[worker]
            self._abandon(abandon)
            self._record_if_due()
        return False

    def _apply(self, accepted: list[tuple[Job, Any, float]]) -> None:
        """One outer update on the mean of `accepted` (job, g, loss) in list order; with nothing
        accepted the version still advances with the model unchanged."""
        if accepted:
            self.params, self.outer_state = self._outer_step(self.params, self.outer_state,
                                                             [g for _, g, _ in accepted])
        self.version += 1
        now = self._time(self.version)
        for job, _, loss in accepted:
            self.local_steps += job.steps
            self.history.arrivals.append(
                Arrival(job.job_id, job.worker, job.steps, job.version_start, self.version, now, loss))

    def _record_if_due(self) -> None:
        if self.version != self._recorded_version and (self.version % self.eval_every == 0 or self.done):
            self._record()

    def _record(self) -> None:
        h = self.history
        h.version.append(self.version)
        h.time.append(self._time(self.version))
        h.local_steps.append(self.local_steps)
        h.eval_loss.append(float(self.eval_fn(self.params)) if self.eval_fn is not None else math.nan)
        self._recorded_version = self.version


def _job(job_id: int, planned: PlannedJob | Event) -> Job:
    return Job(job_id, planned.worker, planned.shard, planned.shard_step, planned.steps, planned.version_start)


class ReplayServer(ParameterServer):
    """Replays `events` (from `simulate(cfg)`) exactly; see the module docstring."""

    def __init__(self, cfg: LocalSGDConfig, params, events: list[Event], **kwargs):
        if not events:
            raise ValueError("events is empty: nothing to replay")
        self.events = events
        self.queues = collections.defaultdict(collections.deque)
        for job_id, e in enumerate(events):
            if not 0 <= e.worker < cfg.num_workers:
                raise ValueError(f"event {job_id} names worker {e.worker}, outside num_workers={cfg.num_workers}")
            self.queues[e.worker].append(job_id)
        self.group_size = collections.Counter(e.version_after for e in events)
        self.pending = collections.defaultdict(dict)  # version_after -> {job_id: (job, g, loss) | None}
        self.uses = collections.Counter(e.version_start for e in events)  # jobs still needing a version
        self.last_version = max(self.group_size)
        self.times = version_times(events)
        super().__init__(cfg, params, **kwargs)
        self.kept = {0: self.params}

    @property
    def done(self) -> bool:
        return self.version == self.last_version

    def _time(self, version: int) -> float:
        return float(self.times[version])

    def _params_at(self, version: int):
        return self.kept[version]

    def _issue(self, worker: int):
        queue = self.queues[worker]
        if not queue:
            return DONE
        event = self.events[queue[0]]
        if event.version_start > self.version:
            return WAIT
        return _job(queue.popleft(), event)

    def _accept(self, job: Job, pseudo_grad, train_loss: float) -> None:
        self._settle(job, (job, pseudo_grad, train_loss))

    def _abandon(self, job: Job) -> None:
        self._settle(job, None)

    def worker_lost(self, worker: int, replaced: bool) -> None:
        if not replaced:
            raise ValueError(f"worker {worker} was lost without a replacement, but a replayed schedule needs "
                             f"every worker: replace it (or use a live schedule)")
        super().worker_lost(worker, replaced)

    def _lost(self, worker: int, job: Job | None, replaced: bool) -> None:
        if job is not None:
            self.queues[worker].appendleft(job.job_id)  # the replacement redoes the job

    def _settle(self, job: Job, outcome) -> None:
        self.pending[self.events[job.job_id].version_after][job.job_id] = outcome
        self.uses[job.version_start] -= 1
        while not self.done and len(self.pending[self.version + 1]) == self.group_size[self.version + 1]:
            group = self.pending.pop(self.version + 1)
            self._apply([group[i] for i in sorted(group) if group[i] is not None])
            self.kept[self.version] = self.params
            self.kept = {v: p for v, p in self.kept.items() if v == self.version or self.uses[v] > 0}
            self._record_if_due()


class AsyncServer(ParameterServer):
    """Live asynchronous schedule: one outer update per accepted arrival; see the module docstring."""

    def __init__(self, cfg: LocalSGDConfig, params, **kwargs):
        if cfg.mode != "async":
            raise ValueError(f"AsyncServer needs mode='async', got mode={cfg.mode!r}")
        self.planner = JobPlanner(cfg)
        self.window_end: float | None = None  # free workers restart at this time (τ_sync + grace)
        self.retired: set[int] = set()
        self.next_job_id = 0
        super().__init__(cfg, params, **kwargs)

    @property
    def done(self) -> bool:
        return self.planner.remaining == 0 and not self.open

    def _issue(self, worker: int):
        if worker in self.retired or self.done:
            return DONE
        if self.window_end is not None:
            if self.clock() < self.window_end:
                return WAIT
            self.window_end = None
        planned = self.planner.launch(worker, 0, self.version)
        if planned is None:
            return WAIT  # the budget is planned, but an open job may still be abandoned and refunded
        self.next_job_id += 1
        return _job(self.next_job_id - 1, planned)

    def _accept(self, job: Job, pseudo_grad, train_loss: float) -> None:
        self._apply([(job, pseudo_grad, train_loss)])
        if self.window_end is None:
            self.window_end = self.clock() + self.cfg.grace_period
        self._record_if_due()

    def _abandon(self, job: Job) -> None:
        self.planner.refund(job.steps)

    def _lost(self, worker: int, job: Job | None, replaced: bool) -> None:
        if not replaced:
            self.retired.add(worker)
        super()._lost(worker, job, replaced)


class SyncServer(ParameterServer):
    """Live synchronous DiLoCo rounds; see the module docstring."""

    def __init__(self, cfg: LocalSGDConfig, params, **kwargs):
        if cfg.mode != "sync":
            raise ValueError(f"SyncServer needs mode='sync', got mode={cfg.mode!r}")
        self.planner = JobPlanner(cfg)
        self.retired: set[int] = set()
        self.next_job_id = 0
        self.todo: dict[int, Job] = {}  # planned jobs of this round not yet issued
        self.outstanding: set[int] = set()  # job ids of this round not yet settled
        self.accepted: list[tuple[Job, Any, float]] = []
        super().__init__(cfg, params, **kwargs)
        self._start_round()

    @property
    def done(self) -> bool:
        return not self.outstanding

    def _start_round(self) -> None:
        for worker in range(self.cfg.num_workers):
            if worker not in self.retired and (planned := self.planner.launch(worker, 0, self.version)):
                self.todo[worker] = _job(self.next_job_id, planned)
                self.outstanding.add(self.next_job_id)
                self.next_job_id += 1

    def _issue(self, worker: int):
        if worker in self.todo:
            return self.todo.pop(worker)
        return DONE if self.done or worker in self.retired else WAIT

    def _accept(self, job: Job, pseudo_grad, train_loss: float) -> None:
        self.accepted.append((job, pseudo_grad, train_loss))
        self._settle(job)

    def _abandon(self, job: Job) -> None:
        self.planner.refund(job.steps)
        self._settle(job)

    def _lost(self, worker: int, job: Job | None, replaced: bool) -> None:
        # Retire first, so that a round completed by this loss plans nothing for the worker.
        if not replaced:
            self.retired.add(worker)
            if worker in self.todo:
                self._abandon(self.todo.pop(worker))
        super()._lost(worker, job, replaced)

    def _settle(self, job: Job) -> None:
        self.outstanding.discard(job.job_id)
        if self.outstanding:
            return
        accepted, self.accepted = sorted(self.accepted, key=lambda a: a[0].worker), []
        if accepted:
            self._apply(accepted)
        self._start_round()
        self._record_if_due()


Schedule = Literal["replay", "live"]


def make_server(cfg: LocalSGDConfig, params, schedule: Schedule, **kwargs) -> ParameterServer:
    """"replay": a ReplayServer of `simulate(cfg)`; "live": an AsyncServer or SyncServer by cfg.mode."""
    if schedule == "replay":
        return ReplayServer(cfg, params, simulate(cfg), **kwargs)
    if schedule == "live":
        return (AsyncServer if cfg.mode == "async" else SyncServer)(cfg, params, **kwargs)
    raise ValueError(f"schedule={schedule!r} must be 'replay' or 'live'")
