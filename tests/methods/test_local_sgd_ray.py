"""Local-SGD on Ray (loopback only): same model as the in-process `run`, survives a killed worker.

One local Ray instance (2 CPUs, fractional actors) is shared by the module; every run has a timeout.
"""

import sys
import time

import jax
import numpy as np
import pytest

from jaxllm.methods.local_sgd.ray_runtime import RayRuntime, require_ray, run_ray
from jaxllm.methods.local_sgd.runner import run
from tests.methods.test_local_sgd_run import EVAL, _assert_trees_equal, _cfg, mlp_params, mlp_task

ACTOR = {"num_cpus": 0.25}
TIMEOUT_S = 180


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'jaxllm\[distributed\]'"):
        require_ray()


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # workers inherit conftest's env
    yield ray
    ray.shutdown()


def _ray_run(cfg, **kwargs):
    return run_ray(cfg, mlp_params(), mlp_task(len(cfg.resolved_shard_sizes)), EVAL, timeout=TIMEOUT_S,
                   worker_options=ACTOR, server_options=ACTOR, **kwargs)


def test_replayed_schedule_on_ray_equals_in_process_run(ray_local):
    """Three worker processes in parallel, heterogeneous DyLU schedule: bit-identical to `run`."""
    cfg = _cfg(dylu=True)
    expected_params, expected = run(cfg, mlp_params(), mlp_task(3), EVAL)
    params, history = _ray_run(cfg, schedule="replay")
    _assert_trees_equal(params, expected_params)
    assert history.eval_loss == expected.eval_loss and history.time == expected.time
    assert [(a.job_id, a.worker, a.version_after) for a in history.arrivals] == \
           [(a.job_id, a.worker, a.version_after) for a in expected.arrivals]


@pytest.mark.slow  # a Ray run; the replayed-schedule test covers the runtime in the default suite
def test_live_sequential_arrivals_on_ray_equal_in_process_run(ray_local):
    """One worker arrives sequentially, so live arrival order is deterministic: equal to `run`."""
    cfg = _cfg(num_workers=1, seconds_per_step=(1.0,), shard_sizes=(1, 1), total_local_steps=20)
    expected_params, expected = run(cfg, mlp_params(), mlp_task(2), EVAL)
    params, history = _ray_run(cfg, schedule="live")
    _assert_trees_equal(params, expected_params)
    assert history.eval_loss == expected.eval_loss and history.local_steps == expected.local_steps


def _wait_for(runtime, predicate):
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate(status := runtime.status()):
        assert time.monotonic() < deadline, f"timed out waiting; status {status}"
        time.sleep(0.02)
    return status


def _kill_mid_job(ray, cfg, replace: bool, emulate_speed: float):
    """Start a live run, kill worker 1 while it holds an open job, join; (params, history, job id)."""
    runtime = RayRuntime(cfg, mlp_params(), mlp_task(cfg.num_workers), EVAL, worker_options=ACTOR,
                         server_options=ACTOR, replace_lost_workers=replace, emulate_speed=emulate_speed,
                         eval_every=5).start()
    try:
        status = _wait_for(runtime, lambda s: s["version"] >= 1 and 1 in s["open_jobs"])
        ray.kill(runtime.workers[1], no_restart=True)
        params, history = runtime.join(TIMEOUT_S)
    finally:
        runtime.shutdown()
    killed_job = status["open_jobs"][1]
    assert all(np.isfinite(v).all() for v in params.values())
    assert killed_job not in [a.job_id for a in history.arrivals]
    assert history.local_steps[-1] == cfg.total_local_steps  # the killed job's steps were refunded
    assert np.isfinite(history.eval_loss).all() and history.eval_loss[-1] < history.eval_loss[0]
    return history, killed_job


@pytest.mark.slow  # a Ray run; the replayed-schedule test covers the runtime in the default suite
def test_killing_a_worker_mid_job_leaves_the_others_training(ray_local):
    """Worker 1 is killed while it holds an open job and is not replaced: the job never reaches the
    model, the other workers sync the whole budget and the model stays finite."""
    # worker 1 is padded to 40 s of real time a step (200 s a job), so the kill lands inside its job
    # however loaded the machine is (a 2 s job finished between the status read and the kill on a
    # busy CPU); the run does not wait for it: the others finish the budget
    cfg = _cfg(total_local_steps=90, grace_period=0.0, seconds_per_step=(0.5, 1000.0, 1.5))
    history, killed_job = _kill_mid_job(ray_local, cfg, False, 0.04)
    assert {a.worker for a in history.arrivals if a.job_id > killed_job} == {0, 2}


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_trains_again(ray_local):
    """With replacement, a fresh actor takes index 1 and pushes again. Worker 0 is slowed to 1 s a
    step so that the budget outlasts the replacement's start-up (a new process importing JAX)."""
    cfg = _cfg(num_workers=2, seconds_per_step=(1.0, 0.1), total_local_steps=40, grace_period=0.0)
    history, killed_job = _kill_mid_job(ray_local, cfg, True, 1.0)
    assert 1 in {a.worker for a in history.arrivals if a.job_id > killed_job}


@pytest.mark.slow
def test_a_restarted_server_keeps_its_outer_state_and_the_run_finishes(ray_local, tmp_path):
    """The server actor checkpoints after every update; killed mid-run and restarted from the
    checkpoint, it continues with the same version, delayed-Nesterov state (its arrival count equals
    the version: a fresh state would count 0) and history, and the workers finish the budget."""
    cfg = _cfg(total_local_steps=90, grace_period=0.0)
    runtime = RayRuntime(cfg, mlp_params(), mlp_task(3), EVAL, worker_options=ACTOR, server_options=ACTOR,
                         emulate_speed=0.3, checkpoint_dir=str(tmp_path)).start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while runtime.status()["version"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        version = runtime.restart_server()
        assert 1 <= version <= runtime.status()["version"]
        state = runtime.ray.get(runtime.server.outer_state.remote())
        counts = [int(x) for x in jax.tree.leaves(state) if np.ndim(x) == 0]
        assert counts == [version]
        _, history = runtime.join(TIMEOUT_S)
    finally:
        runtime.shutdown()
    assert history.local_steps[-1] == cfg.total_local_steps and len(history.arrivals) > version
    assert [a.version_after for a in history.arrivals] == list(range(1, len(history.arrivals) + 1))
    assert history.version[0] == 0 and history.version[-1] == len(history.arrivals)
