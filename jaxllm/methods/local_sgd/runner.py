"""`run`: train a real model by replaying the simulator's events in one process.

Every worker is an `InnerWorker` (the ordinary jitted train step with its own inner state) and the
server a `ReplayServer`; events are processed in list order, which is each worker's job order and
always finds a job's start version available. Timing comes only from the simulator, so an arm is
exactly reproducible from its `LocalSGDConfig`, whatever the machine's real speed.
"""

import optax

from jaxllm.methods.local_sgd.config import LocalSGDConfig
from jaxllm.methods.local_sgd.history import History
from jaxllm.methods.local_sgd.server import EvalFn, ReplayServer
from jaxllm.methods.local_sgd.simulator import simulate
from jaxllm.methods.local_sgd.task import WorkerTask
from jaxllm.methods.local_sgd.worker import InnerWorker


def run(cfg: LocalSGDConfig, params, task: WorkerTask, eval_fn: EvalFn | None = None, *,
        eval_every: int = 1, outer_optimizer: optax.GradientTransformation | None = None) -> tuple[object, History]:
    """(final global params, History) of one arm.

    params: the initial global model (version 0). eval_fn(params) -> float is called at version
    0, every `eval_every` outer updates and at the end; History.time holds simulated seconds.
    Worker w's train-step rng is derived from cfg.seed and w. `outer_optimizer`: any optax
    transform (None: the preset `cfg` names; see `ParameterServer`).
    """
    task.check_config(len(cfg.resolved_shard_sizes))
    events = simulate(cfg)
    server = ReplayServer(cfg, params, events, eval_fn=eval_fn, eval_every=eval_every, outer_optimizer=outer_optimizer)
    workers = [InnerWorker(task, w, cfg.seed) for w in range(cfg.num_workers)]
    for event in events:
        job, start = server.request_job(event.worker)
        pseudo_grad, train_loss = workers[event.worker].run_job(start, job.shard, job.shard_step, job.steps)
        server.push(event.worker, job.job_id, pseudo_grad, train_loss)
    return server.result()
