"""In-process Local-SGD training (`run`) and the parameter servers, on a small regression MLP.

References: plain optax (AdamW with optax's warm-up/cosine schedule, `optax.sgd(nesterov=True)`)
driving the ordinary train step, float64 NumPy sums of the per-shard schedule, and the spec's
invariant that async + delayed Nesterov with equal speeds reproduces synchronous DiLoCo.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.methods.local_sgd import LocalSGDConfig, simulate
from jaxllm.methods.local_sgd.runner import run
from jaxllm.methods.local_sgd.server import DONE, WAIT, AsyncServer, ReplayServer, SyncServer
from jaxllm.methods.local_sgd.task import ArrayShard, EvalLoss, ShardSchedule, WorkerTask
from jaxllm.methods.local_sgd.worker import InnerWorker
from jaxllm.train.state import init_state
from jaxllm.train.step import make_train_step

SCHEDULE = ShardSchedule(peak=1e-2, final=1e-3, warmup=4, total=40)
ADAMW = functools.partial(optax.adamw, b1=0.9, b2=0.95, weight_decay=0.1)


def mlp_loss(params, batch, rng):
    del rng
    pred_B1 = jnp.tanh(batch["x"] @ params["w1"] + params["b1"]) @ params["w2"]
    return jnp.mean((pred_B1 - batch["y"]) ** 2), {}


def _data(seed, rows):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6)).astype(np.float32)
    return {"x": x, "y": np.sin(x @ np.linspace(-1, 1, 6))[:, None].astype(np.float32)}


def mlp_task(num_shards, schedule=SCHEDULE, inner=ADAMW):
    shards = [ArrayShard(_data(100 + i, 48), batch_size=8, seed=i) for i in range(num_shards)]
    return WorkerTask(mlp_loss, inner, schedule, shards)


def mlp_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w1": (0.5 * rng.normal(size=(6, 16))).astype(np.float32), "b1": np.zeros(16, np.float32),
            "w2": (0.5 * rng.normal(size=(16, 1))).astype(np.float32)}


EVAL = EvalLoss(mlp_loss, [_data(7, 64)])


def _cfg(**overrides):
    base = dict(mode="async", num_workers=3, local_steps=5, total_local_steps=60, outer="delayed_nesterov",
                outer_lr=0.7, seconds_per_step=(0.5, 1.0, 1.5), grace_period=0.25)
    return LocalSGDConfig(**(base | overrides))


def _assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol),
                 actual, expected)


def _assert_trees_equal(actual, expected):
    jax.tree.map(lambda a, e: np.testing.assert_array_equal(np.asarray(a), np.asarray(e)), actual, expected)


# --- run -----------------------------------------------------------------------------------------

def test_sync_one_worker_equals_inner_steps_then_outer_nesterov():
    """Each round: H ordinary AdamW steps (optax's own warm-up/cosine schedule, state carried over
    rounds), then one optax Nesterov step on θ_start − θ_local."""
    H, rounds, lr, beta = 6, 3, 0.7, 0.9
    cfg = _cfg(mode="sync", num_workers=1, local_steps=H, total_local_steps=H * rounds, outer="nesterov",
               outer_lr=lr, outer_momentum=beta, seconds_per_step=(1.0,))
    task = mlp_task(1)
    params, history = run(cfg, mlp_params(), task, EVAL)

    schedule = optax.warmup_cosine_decay_schedule(0.0, SCHEDULE.peak, SCHEDULE.warmup, SCHEDULE.total,
                                                  SCHEDULE.final)
    inner = ADAMW(schedule)
    step = make_train_step(mlp_loss, inner, donate=False)
    theta = jax.tree.map(jnp.asarray, mlp_params())
    state = init_state(theta, inner, jax.random.fold_in(jax.random.key(cfg.seed), 0))
    outer = optax.sgd(lr, momentum=beta, nesterov=True)
    outer_state = outer.init(theta)
    expected_losses = [EVAL(theta)]
    for r in range(rounds):
        state = state.replace(params=theta)
        for i in range(H):
            state, _ = step(state, task.shards[0](r * H + i))
        pseudo_grad = jax.tree.map(jnp.subtract, theta, state.params)
        updates, outer_state = outer.update(pseudo_grad, outer_state, theta)
        theta = optax.apply_updates(theta, updates)
        expected_losses.append(EVAL(theta))
    _assert_trees_close(params, theta)
    np.testing.assert_allclose(history.eval_loss, expected_losses, rtol=1e-5)
    assert history.version == [0, 1, 2, 3] and history.local_steps == [0, H, 2 * H, 3 * H]
    np.testing.assert_allclose(history.time, [0.0, H, 2 * H, 3 * H])
    assert not np.allclose(expected_losses[0], expected_losses[-1], rtol=1e-3)  # it trained


@pytest.mark.parametrize("grace", [0.0, 0.4])
def test_async_delayed_nesterov_with_equal_speeds_equals_sync(grace):
    """Spec invariant 10: equal speeds, fixed shards, DN (N = k, c = 0): every window of k arrivals
    reproduces one synchronous DiLoCo round, at the parameter level."""
    k, H, rounds = 3, 4, 3
    common = dict(num_workers=k, local_steps=H, total_local_steps=k * H * rounds, seconds_per_step=(1.0,) * k,
                  shard_assignment="fixed", outer_lr=0.7, grace_period=grace)
    task = mlp_task(k)
    sync_params, sync_hist = run(_cfg(mode="sync", outer="nesterov", **common), mlp_params(), task, EVAL)
    async_params, async_hist = run(_cfg(mode="async", outer="delayed_nesterov", **common), mlp_params(), task,
                                   EVAL, eval_every=k)
    _assert_trees_close(async_params, sync_params)
    assert async_hist.version == [0, 3, 6, 9] and sync_hist.version == [0, 1, 2, 3]
    np.testing.assert_allclose(async_hist.eval_loss, sync_hist.eval_loss, rtol=1e-5)
    assert async_hist.local_steps == sync_hist.local_steps
    naive_params, _ = run(_cfg(mode="async", outer="nesterov", **common), mlp_params(), task)
    assert not np.allclose(naive_params["w1"], sync_params["w1"], atol=1e-4)  # per-arrival Nesterov differs


def test_run_is_deterministic_and_seeded():
    cfg = _cfg(dylu=True)
    task = mlp_task(3)
    params_a, hist_a = run(cfg, mlp_params(), task, EVAL, eval_every=2)
    params_b, hist_b = run(cfg, mlp_params(), task, EVAL, eval_every=2)
    _assert_trees_equal(params_a, params_b)
    assert hist_a == hist_b
    assert hist_a.local_steps[-1] == cfg.total_local_steps and hist_a.version[-1] == len(simulate(cfg))
    assert [a.version_after for a in hist_a.arrivals] == list(range(1, len(simulate(cfg)) + 1))
    params_c, _ = run(dataclasses.replace(cfg, seed=1), mlp_params(), task)
    assert not np.allclose(params_c["w1"], params_a["w1"])


def test_jobs_use_their_shard_steps_and_per_shard_learning_rate():
    """With SGD on loss Σw (gradient 1) a job's pseudo-gradient is Σ_i lr_shard(shard_step + i),
    a float64 sum of the spec's schedule; the per-worker train step compiles once."""

    def linear_loss(params, batch, rng):
        del rng
        return jnp.sum(params["w"]) + 0.0 * jnp.sum(batch["x"]), {}

    cfg = _cfg(total_local_steps=120, dylu=True)
    shards = [ArrayShard({"x": np.zeros((5, 1), np.float32)}, batch_size=2) for _ in range(3)]
    task = WorkerTask(linear_loss, optax.sgd, SCHEDULE, shards)
    workers = [InnerWorker(task, w) for w in range(3)]
    params = {"w": np.zeros(4, np.float32)}
    shard_steps = {s: 0 for s in range(3)}
    for e in simulate(cfg):
        assert e.shard_step == shard_steps[e.shard]
        shard_steps[e.shard] += e.steps
        pseudo_grad, _ = workers[e.worker].run_job(params, e.shard, e.shard_step, e.steps)
        expected = math.fsum(SCHEDULE(e.shard_step + i) for i in range(e.steps))
        np.testing.assert_allclose(pseudo_grad["w"], np.full(4, expected), rtol=1e-5)
    assert all(w.step._cache_size() == 1 for w in workers)


def test_array_shard_visits_every_row_once_per_epoch():
    shard = ArrayShard({"i": np.arange(10)}, batch_size=4, seed=3)
    rows = np.concatenate([shard(b)["i"] for b in range(5)])  # 20 rows = 2 epochs
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert not np.array_equal(rows[:10], rows[10:])
    np.testing.assert_array_equal(shard(3)["i"], ArrayShard({"i": np.arange(10)}, 4, seed=3)(3)["i"])


# --- servers ---------------------------------------------------------------------------------------

def _first_job(server, worker):
    reply = server.request_job(worker)
    assert isinstance(reply, tuple)
    return reply


def test_server_refuses_bad_pushes_and_keeps_the_model():
    cfg = _cfg(num_workers=2, seconds_per_step=(1.0, 1.0), total_local_steps=10, grace_period=0.0)
    server = AsyncServer(cfg, mlp_params())
    job0, start = _first_job(server, 0)
    job1, _ = _first_job(server, 1)
    assert server.request_job(0)[0] == job0  # asking again returns the open job
    zeros = jax.tree.map(np.zeros_like, start)
    before = jax.device_get(server.params)
    nan = dict(zeros, w1=np.full_like(zeros["w1"], np.nan))
    assert not server.push(0, job0.job_id, nan)
    assert not server.push(1, job1.job_id, {"w1": zeros["w1"], "b1": zeros["b1"]})
    assert not server.push(0, job0.job_id, zeros)  # its job was abandoned by the refused push
    assert not server.push(1, job0.job_id, zeros)  # another worker's job
    reasons = [r.reason for r in server.history.rejections]
    assert "non-finite" in reasons[0] and "['w2']" in reasons[1]
    assert "not the open job" in reasons[2] and "not the open job" in reasons[3]
    _assert_trees_equal(server.params, before)
    assert server.version == 0 and server.planner.remaining == cfg.total_local_steps  # steps refunded
    while not server.done:  # the budget is still trained in full
        for w in (0, 1):
            reply = server.request_job(w)
            if isinstance(reply, tuple):
                assert server.push(w, reply[0].job_id, zeros)
    assert server.local_steps == cfg.total_local_steps and server.request_job(0) == DONE


def test_async_server_waits_out_the_grace_period():
    now = [0.0]
    cfg = _cfg(num_workers=2, seconds_per_step=(1.0, 1.0), total_local_steps=40, grace_period=0.5)
    server = AsyncServer(cfg, mlp_params(), clock=lambda: now[0])
    job0, start = _first_job(server, 0)
    _first_job(server, 1)
    now[0] = 2.0
    assert server.push(0, job0.job_id, jax.tree.map(np.zeros_like, start))
    now[0] = 2.4
    assert server.request_job(0) is WAIT
    now[0] = 2.5
    assert isinstance(server.request_job(0), tuple)


def test_sync_server_finishes_rounds_without_a_lost_worker():
    cfg = _cfg(mode="sync", outer="nesterov", num_workers=3, total_local_steps=30)
    server = SyncServer(cfg, mlp_params())
    jobs = {w: _first_job(server, w)[0] for w in range(3)}
    zeros = jax.tree.map(np.zeros_like, mlp_params())
    assert server.push(0, jobs[0].job_id, zeros) and server.request_job(0) is WAIT  # round still open
    server.worker_lost(1, replaced=False)
    assert server.version == 0
    assert server.push(2, jobs[2].job_id, zeros) and server.version == 1  # round closed without worker 1
    assert server.request_job(1) == DONE
    while not server.done:
        for w in (0, 2):
            reply = server.request_job(w)
            if isinstance(reply, tuple):
                server.push(w, reply[0].job_id, zeros)
    assert server.local_steps == cfg.total_local_steps
    assert {a.worker for a in server.history.arrivals} == {0, 2}


def test_replay_server_needs_replacements_and_reissues_the_job():
    cfg = _cfg()
    server = ReplayServer(cfg, mlp_params(), simulate(cfg))
    job, _ = _first_job(server, 1)
    server.worker_lost(1, replaced=True)
    assert _first_job(server, 1)[0] == job
    with pytest.raises(ValueError, match="worker 1 was lost without a replacement"):
        server.worker_lost(1, replaced=False)


@pytest.mark.parametrize("make, match", [
    (lambda: run(_cfg(), mlp_params(), mlp_task(2)), "the config plans 3 shards but the task has 2"),
    (lambda: AsyncServer(_cfg(), mlp_params(), eval_every=0), "eval_every=0"),
    (lambda: AsyncServer(_cfg(mode="sync", outer="nesterov"), mlp_params()), "mode='sync'"),
    (lambda: AsyncServer(_cfg(), mlp_params()).request_job(3), r"worker=3 must be an integer in \[0, 3\)"),
    (lambda: ShardSchedule(peak=1e-3, final=0.0, warmup=1, total=10), "final=0.0"),
    (lambda: ArrayShard({"a": np.zeros(3), "b": np.zeros(4)}, 2), "leading row axis"),
    (lambda: InnerWorker(mlp_task(1), 0).run_job(mlp_params(), 0, 0, 0), "steps=0"),
])
def test_bad_input_is_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()
