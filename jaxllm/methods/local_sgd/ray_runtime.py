"""Distributed Local-SGD on Ray: one actor per worker, one parameter-server actor.

Needs the `distributed` extra (`pip install 'jaxllm[distributed]'`, i.e. Ray).

Each worker actor is its own process with its own devices (give it GPUs/TPUs through Ray
resources, e.g. `worker_options={"num_gpus": 1}`). It loops: ask the server for a job (the latest
global params, or the version a replayed schedule names), run its local (DyLU) steps with an
`InnerWorker`, push the pseudo-gradient. The server actor wraps a `ParameterServer`
(`server.py`): it validates every push (open job of that worker, matching tree, finite values)
and applies the outer optimizer as pseudo-gradients arrive.

The same code runs on one machine and on a cluster: `RayRuntime.start()` calls `ray.init()` when
Ray is not initialised yet, which starts a local Ray or joins the cluster named by RAY_ADDRESS
(or call `ray.init(address=...)` first). The task and eval_fn are pickled to the actors: the
worker processes must be able to import jaxllm and any module the functions live in (on a
cluster, install the project on every node or pass a `runtime_env` to `ray.init`).

Schedules: "live" trains in real arrival order (async arrivals or sync rounds by cfg.mode);
"replay" follows `simulate(cfg)` exactly, with workers still running in parallel wherever the
schedule allows, and gives the same model as the in-process `runner.run`.

Losing and replacing workers. When a worker actor dies (process crash, node loss, `ray.kill`),
`join` notices its loop failing and tells the server, which abandons the worker's open job and
returns its steps to the budget; the global model is never touched by a job that did not push a
valid pseudo-gradient, and training goes on with the other workers. With
`replace_lost_workers=True` (default) a fresh actor takes the dead one's index at once (fresh
inner optimizer state: inner states are never communicated, so they cannot be recovered); with
False the index is retired and the others finish the budget (a replayed schedule always needs
the replacement). To replace a worker by hand, e.g. to move it to another node, call
`runtime.replace_worker(w, **actor_options)` before or after `join` (not while `join` is running
in another thread): it kills the old actor, tells the server, and starts the new one.
Pushes from a worker the server already counts as lost are refused as stale.

Restarting the server. The server actor is not replicated: losing it ends `join`. With a
`checkpoint_dir` it checkpoints as it goes (`server_checkpoint`: params, outer optimizer state,
history, open jobs, schedule position); `runtime.restart_server()` starts a new server actor
from the newest checkpoint and points the workers at it, and a new `RayRuntime` with the same
`checkpoint_dir` resumes there too.
"""

import math
import time
from typing import Any

import jax

from jaxllm.methods.local_sgd.config import LocalSGDConfig
from jaxllm.methods.local_sgd.history import History
from jaxllm.methods.local_sgd.server import DONE, WAIT, EvalFn, Schedule, make_server
from jaxllm.methods.local_sgd.server_checkpoint import restore_server, save_server
from jaxllm.methods.local_sgd.task import WorkerTask
from jaxllm.methods.local_sgd.worker import InnerWorker
from jaxllm.train.checkpoint import Checkpointer

_JAX_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
_DEFAULT_OPTIONS = {"num_cpus": 1}


def require_ray():
    """The `ray` module, or ImportError naming the extra to install."""
    try:
        import ray  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError("the Ray runtime of Local-SGD needs Ray, which is not installed: "
                          "pip install 'jaxllm[distributed]'") from e
    return ray


def _jax_settings() -> dict[str, Any]:
    """This process's compilation-cache settings, so that worker processes share the cache."""
    return {name: getattr(jax.config, name) for name in _JAX_SETTINGS if getattr(jax.config, name) is not None}


def _apply_jax_settings(settings: dict[str, Any]) -> None:
    for name, value in settings.items():
        jax.config.update(name, value)


class ServerActor:
    """Ray actor around a ParameterServer; params travel as host (NumPy) arrays. With
    `checkpoint_dir` it resumes from the newest checkpoint there (if any) and checkpoints after
    every `checkpoint_every` outer updates (`server_checkpoint`)."""

    def __init__(self, cfg: LocalSGDConfig, params, schedule: Schedule, eval_fn: EvalFn | None, eval_every: int,
                 jax_settings: dict[str, Any], outer_optimizer=None, checkpoint_dir: str | None = None,
                 checkpoint_every: int = 1):
        _apply_jax_settings(jax_settings)
        self.server = make_server(cfg, params, schedule, eval_fn=eval_fn, eval_every=eval_every,
                                  outer_optimizer=outer_optimizer)
        self.checkpointer, self.checkpoint_every = None, checkpoint_every
        if checkpoint_dir is not None:
            self.checkpointer = Checkpointer(checkpoint_dir, keep=2)
            restore_server(self.server, self.checkpointer)
        self.saved_version = self.server.version

    def _checkpoint_if_due(self) -> None:
        if self.checkpointer is not None and self.server.version >= self.saved_version + self.checkpoint_every:
            save_server(self.server, self.checkpointer)
            self.saved_version = self.server.version

    def request_job(self, worker: int):
        reply = self.server.request_job(worker)
        if isinstance(reply, tuple):
            job, params = reply
            return job, jax.device_get(params)
        return reply

    def push(self, worker: int, job_id: int, pseudo_grad, train_loss: float) -> bool:
        accepted = self.server.push(worker, job_id, pseudo_grad, train_loss)
        self._checkpoint_if_due()
        return accepted

    def worker_lost(self, worker: int, replaced: bool) -> None:
        self.server.worker_lost(worker, replaced)
        self._checkpoint_if_due()

    def status(self) -> dict:
        return self.server.status()

    def result(self):
        if self.checkpointer is not None:
            self.checkpointer.wait()
        params, history = self.server.result()
        return jax.device_get(params), history

    def outer_state(self):
        return jax.device_get(self.server.outer_state)


class WorkerActor:
    """Ray actor around an InnerWorker; `loop` runs jobs until the server says DONE."""

    def __init__(self, task: WorkerTask, worker: int, seed: int, jax_settings: dict[str, Any]):
        _apply_jax_settings(jax_settings)
        self.worker = worker
        self.inner = InnerWorker(task, worker, seed)

    def loop(self, server, poll_seconds: float, seconds_per_step: float) -> int:
        """Jobs until DONE; returns how many were pushed. `seconds_per_step` > 0 pads every job
        to that many real seconds per step (to emulate a slower device)."""
        ray = require_ray()
        jobs = 0
        while True:
            reply = ray.get(server.request_job.remote(self.worker))
            if reply == DONE:
                return jobs
            if reply is WAIT:
                time.sleep(poll_seconds)
                continue
            job, params = reply
            started = time.monotonic()
            pseudo_grad, train_loss = self.inner.run_job(params, job.shard, job.shard_step, job.steps)
            pseudo_grad = jax.device_get(pseudo_grad)
            time.sleep(max(0.0, job.steps * seconds_per_step - (time.monotonic() - started)))
            ray.get(server.push.remote(self.worker, job.job_id, pseudo_grad, train_loss))
            jobs += 1


class RayRuntime:
    """One Local-SGD run on Ray. `start()`, then `join()` for (params, History); `shutdown()`.

    schedule: "live" or "replay" (module docstring). eval_fn/eval_every: as in `runner.run`,
      evaluated on the server actor. worker_options / server_options: Ray actor options
      (default {"num_cpus": 1}; e.g. {"num_cpus": 0.5} to pack several on one small machine,
      {"num_gpus": 1} for one accelerator per worker).
    replace_lost_workers: start a fresh actor for a worker that died (module docstring).
    emulate_speed: real seconds per simulated second; > 0 pads each worker's steps to
      cfg.worker_seconds_per_step() · emulate_speed, to show heterogeneous speeds on equal devices.
    poll_seconds: how long a worker waits before asking again after WAIT.
    outer_optimizer: any optax transform for the server (None: the preset `cfg` names); it
      travels to the server actor pickled, so it must be picklable by Ray (closures are).
    checkpoint_dir / checkpoint_every: the server checkpoints there after every
      `checkpoint_every` outer updates and starts from the newest checkpoint found there
      (a directory on storage the server's node can reach).
    """

    def __init__(self, cfg: LocalSGDConfig, params, task: WorkerTask, eval_fn: EvalFn | None = None, *,
                 schedule: Schedule = "live", eval_every: int = 1, worker_options: dict | None = None,
                 server_options: dict | None = None, replace_lost_workers: bool = True,
                 emulate_speed: float = 0.0, poll_seconds: float = 0.01, outer_optimizer=None,
                 checkpoint_dir: str | None = None, checkpoint_every: int = 1):
        self.ray = require_ray()
        if schedule not in ("live", "replay"):
            raise ValueError(f"schedule={schedule!r} must be 'live' or 'replay'")
        if not (math.isfinite(emulate_speed) and emulate_speed >= 0):
            raise ValueError(f"emulate_speed={emulate_speed} must be a finite number >= 0")
        if not (math.isfinite(poll_seconds) and poll_seconds > 0):
            raise ValueError(f"poll_seconds={poll_seconds} must be > 0")
        task.check_config(len(cfg.resolved_shard_sizes))
        self.cfg, self.params, self.task, self.eval_fn = cfg, params, task, eval_fn
        self.schedule, self.eval_every, self.outer_optimizer = schedule, eval_every, outer_optimizer
        self.worker_options = dict(_DEFAULT_OPTIONS if worker_options is None else worker_options)
        self.server_options = dict(_DEFAULT_OPTIONS if server_options is None else server_options)
        self.replace_lost_workers = replace_lost_workers
        self.step_seconds = [s * emulate_speed for s in cfg.worker_seconds_per_step()]
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every!r} must be an integer >= 1")
        self.poll_seconds = poll_seconds
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.server = None
        self.workers: list = []
        self._loops: dict = {}  # loop ObjectRef -> worker index

    def start(self) -> "RayRuntime":
        ray = self.ray
        if not ray.is_initialized():
            ray.init()
        self._worker_cls = ray.remote(WorkerActor)
        self._start_server()
        self.workers = [None] * self.cfg.num_workers
        for w in range(self.cfg.num_workers):
            self._spawn(w, self.worker_options)
        return self

    def _start_server(self) -> None:
        self.server = self.ray.remote(ServerActor).options(**self.server_options).remote(
            self.cfg, jax.device_get(self.params), self.schedule, self.eval_fn, self.eval_every, _jax_settings(),
            self.outer_optimizer, self.checkpoint_dir, self.checkpoint_every)

    def restart_server(self) -> int:
        """Kill the server actor and start a new one from the newest checkpoint in
        `checkpoint_dir` (updates after it are lost and their work redone); the workers go on
        with it. Returns the version it continues from. Not while `join` runs in another thread."""
        if self.checkpoint_dir is None:
            raise ValueError("restart_server needs a checkpoint_dir (RayRuntime(..., checkpoint_dir=...))")
        self.ray.kill(self.server, no_restart=True)
        self._start_server()
        # each worker's current loop fails on the dead server; the new loop runs after it
        self._loops = {w.loop.remote(self.server, self.poll_seconds, self.step_seconds[i]): i
                       for i, w in enumerate(self.workers)}
        return self.status()["version"]

    def _spawn(self, worker: int, options: dict) -> None:
        actor = self._worker_cls.options(**options).remote(self.task, worker, self.cfg.seed, _jax_settings())
        self.workers[worker] = actor
        self._loops[actor.loop.remote(self.server, self.poll_seconds, self.step_seconds[worker])] = worker

    def status(self) -> dict:
        """The server's status: version, synced local steps, open jobs, arrivals, rejections."""
        return self.ray.get(self.server.status.remote())

    def replace_worker(self, worker: int, **actor_options) -> None:
        """Kill worker `worker`'s actor (if alive) and start a fresh one (default options unless
        given) that takes over its index; the server abandons the old actor's open job."""
        if not 0 <= worker < self.cfg.num_workers:
            raise ValueError(f"worker={worker} must lie in [0, {self.cfg.num_workers})")
        self._loops = {ref: w for ref, w in self._loops.items() if w != worker}
        self.ray.kill(self.workers[worker], no_restart=True)
        self.ray.get(self.server.worker_lost.remote(worker, True))
        self._spawn(worker, actor_options or self.worker_options)

    def join(self, timeout: float | None = None) -> tuple[Any, History]:
        """Supervise until every worker loop has ended; (final params as NumPy, History).

        A dead worker is replaced or retired (`replace_lost_workers`); an exception raised in a
        worker's own code is re-raised here. TimeoutError when `timeout` seconds pass first;
        RuntimeError when every worker was lost before the budget was synced.
        """
        ray = self.ray
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._loops:
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(self._loops), num_returns=1, timeout=wait_s)
            if not ready:
                raise TimeoutError(f"Local-SGD on Ray did not finish within {timeout} s; status {self.status()}")
            worker = self._loops.pop(ready[0])
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError:
                if self.replace_lost_workers:
                    self.replace_worker(worker)
                else:
                    ray.get(self.server.worker_lost.remote(worker, False))
        status = self.status()
        if not status["done"]:
            raise RuntimeError(f"every worker was lost before the budget was synced; server status {status}")
        return ray.get(self.server.result.remote())

    def shutdown(self) -> None:
        """Kill the worker and server actors (Ray itself keeps running)."""
        for actor in self.workers + [self.server]:
            if actor is not None:
                self.ray.kill(actor, no_restart=True)
        self.workers, self.server, self._loops = [], None, {}


def run_ray(cfg: LocalSGDConfig, params, task: WorkerTask, eval_fn: EvalFn | None = None, *,
            timeout: float | None = None, **runtime_kwargs) -> tuple[Any, History]:
    """`RayRuntime(...).start().join(timeout)`, then shutdown; see `RayRuntime` for the options."""
    runtime = RayRuntime(cfg, params, task, eval_fn, **runtime_kwargs).start()
    try:
        return runtime.join(timeout)
    finally:
        runtime.shutdown()
