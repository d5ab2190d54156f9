"""Asynchronous Local-SGD with delayed Nesterov and dynamic local updates (arXiv 2401.09135).

Everything here is host-side Python/NumPy or a pure optax transform; a trainer composes it with
the ordinary jitted inner train step.

Outer optimizers (`outer.py`), optax `GradientTransformation`s fed with one pseudo-gradient
g = θ_start − θ_local per call and returning the update to *add* (θ ← optax.apply_updates(θ, u)):
  outer_nesterov(learning_rate, momentum=0.9)            m ← βm + g; u = −ε(g + βm)
  delayed_nesterov(learning_rate, momentum=0.9, buffer_size=4, activation=0.0)
      momentum updated every N arrivals; see its docstring for the update rule.
  check_pseudo_gradient(pseudo_grad, params)             ValueError naming a tree mismatch.

Dynamic local updates (`dylu.py`) and shards (`shards.py`):
  dylu_steps(seconds_per_step, base_steps, min_steps=1)  steps_w = max(min, ⌊H·s_min/s_w⌋)
  shard_probabilities(shard_sizes, consumed), sample_shard(rng, shard_sizes, consumed)
  shard_learning_rate(shard_step, peak=, final=, warmup=, total=)   per-shard warm-up + cosine

Configuration and simulation (`config.py`, `simulator.py`):
  LocalSGDConfig(mode=, num_workers=, local_steps=, total_local_steps=, outer=, outer_lr=, ...)
      .outer_optimizer(), .worker_seconds_per_step(), .worker_local_steps()
  simulate(cfg) -> list[Event]       deterministic per config; timing only
  version_times(events), utilisation(events, num_workers)

Training a model (`task.py`, `worker.py`, `server.py`, `runner.py`, `ray_runtime.py`, `lm_task.py`):
  WorkerTask(loss_fn, inner_optimizer, lr_schedule: ShardSchedule, shards, grad_accum=1)
      what every worker needs; shards[i](shard_step) -> batch (e.g. ArrayShard(arrays, batch_size, seed)).
  run(cfg, params, task, eval_fn=None, eval_every=1, outer_optimizer=None) -> (params, History)
      in-process replay of simulate(cfg) with real inner steps; History.time is simulated.
      outer_optimizer: any optax transform (e.g. optax.chain(clip, delayed_nesterov(...)));
      None builds the preset the config names (cfg.outer_optimizer()). The servers and
      RayRuntime take the same argument.
  RayRuntime(cfg, params, task, eval_fn, schedule="live"|"replay", ...).start().join()
  run_ray(cfg, params, task, eval_fn, timeout=None, **options) -> (params, History)
      one Ray actor per worker + a parameter-server actor (extra `jaxllm[distributed]`).
  InnerWorker (one worker's inner loop), ReplayServer / AsyncServer / SyncServer (outer side,
      push validation), EvalLoss(loss_fn, batches) (exact token-mean evaluation).
  lm_task: the embedded-corpus LM setup shared by launch/local_sgd.py and experiments/local_sgd.

Replaying events with a model (what `run` does):
  tx = cfg.outer_optimizer(); outer_state = tx.init(θ); params_at = {0: θ}
  for each group of consecutive events with the same version_after (in list order):
      for e in group:
          start from params_at[e.version_start]; run e.steps inner steps with worker e.worker's
          own inner optimizer state (kept per worker, never reset, kept across shards); step i
          uses batch e.shard_step + i of shard e.shard and inner learning rate
          shard_learning_rate(e.shard_step + i, ...) of that shard's schedule;
          g_e = params_at[e.version_start] − θ_local
      u, outer_state = tx.update(mean of the group's g_e, outer_state, θ); θ = apply_updates(θ, u)
      params_at[version_after] = θ (keep a version only while a later event still starts from it)
Each worker's events appear in the list in the order of its jobs, so per-worker inner states can
be advanced while walking the list. Simulated time of version v: version_times(events)[v].
"""

from jaxllm.methods.local_sgd.config import LocalSGDConfig
from jaxllm.methods.local_sgd.dylu import dylu_steps
from jaxllm.methods.local_sgd.outer import (
    DelayedNesterovState,
    OuterNesterovState,
    check_pseudo_gradient,
    delayed_nesterov,
    outer_nesterov,
)
from jaxllm.methods.local_sgd.ray_runtime import RayRuntime, run_ray
from jaxllm.methods.local_sgd.runner import run
from jaxllm.methods.local_sgd.history import History, Job
from jaxllm.methods.local_sgd.server import AsyncServer, ParameterServer, ReplayServer, SyncServer, make_server
from jaxllm.methods.local_sgd.shards import sample_shard, shard_learning_rate, shard_probabilities
from jaxllm.methods.local_sgd.simulator import Event, simulate, utilisation, version_times
from jaxllm.methods.local_sgd.task import ArrayShard, EvalLoss, ShardSchedule, WorkerTask
from jaxllm.methods.local_sgd.worker import InnerWorker

__all__ = [
    "ArrayShard",
    "AsyncServer",
    "DelayedNesterovState",
    "EvalLoss",
    "Event",
    "History",
    "InnerWorker",
    "Job",
    "LocalSGDConfig",
    "OuterNesterovState",
    "ParameterServer",
    "RayRuntime",
    "ReplayServer",
    "ShardSchedule",
    "SyncServer",
    "WorkerTask",
    "check_pseudo_gradient",
    "delayed_nesterov",
    "dylu_steps",
    "make_server",
    "outer_nesterov",
    "run",
    "run_ray",
    "sample_shard",
    "shard_learning_rate",
    "shard_probabilities",
    "simulate",
    "utilisation",
    "version_times",
]
