"""A Local-SGD parameter server checkpointed and restarted (`server_checkpoint`) continues exactly:
the run ends bit for bit where an uninterrupted one ends (params, outer optimizer state, history),
whether the schedule is replayed (against `runner.run`) or live (against the same calls to one
server), with jobs open and pseudo-gradients held at the moment of the checkpoint."""
import shutil

import jax
import numpy as np
import pytest

from jaxllm.methods.local_sgd import simulate
from jaxllm.methods.local_sgd.outer import DelayedNesterovState
from jaxllm.methods.local_sgd.runner import run
from jaxllm.methods.local_sgd.server import WAIT, AsyncServer, ReplayServer, SyncServer
from jaxllm.methods.local_sgd.server_checkpoint import restore_server, save_server
from jaxllm.methods.local_sgd.worker import InnerWorker
from jaxllm.train.checkpoint import Checkpointer
from tests.methods.test_local_sgd_run import EVAL, _assert_trees_equal, _cfg, mlp_params, mlp_task


def _restart(server, make, directory):
    """Checkpoint `server`, then a brand-new server from `make()` restored from the checkpoint."""
    ckpt = Checkpointer(directory, keep=2)
    save_server(server, ckpt)
    ckpt.wait()
    fresh = make()
    version = restore_server(fresh, ckpt)
    ckpt.close()
    assert version == server.version
    _assert_trees_equal(fresh.outer_state, server.outer_state)
    return fresh


@pytest.mark.parametrize("overrides", [
    dict(),  # async arrivals, delayed Nesterov (momentum, window sum and count carried)
    dict(mode="sync", outer="nesterov"),  # DiLoCo rounds: several arrivals per update (held while pending)
])
def test_replayed_schedule_restarted_at_every_event_equals_the_uninterrupted_run(tmp_path, overrides):
    cfg = _cfg(**overrides)
    task = mlp_task(3)
    want_params, want_history = run(cfg, mlp_params(), task, EVAL)
    events = simulate(cfg)
    make = lambda: ReplayServer(cfg, mlp_params(), events, eval_fn=EVAL)  # noqa: E731
    server = make()
    workers = [InnerWorker(task, w, cfg.seed) for w in range(cfg.num_workers)]
    held = 0
    for i, event in enumerate(events):
        job, start = server.request_job(event.worker)
        server = _restart(server, make, tmp_path / str(i))  # the job is open at the checkpoint
        held += sum(g is not None for group in server.pending.values() for g in group.values())
        pseudo_grad, loss = workers[event.worker].run_job(start, job.shard, job.shard_step, job.steps)
        assert server.push(event.worker, job.job_id, pseudo_grad, loss)
    params, history = server.result()
    _assert_trees_equal(params, want_params)
    assert history == want_history
    if cfg.mode == "sync":
        assert held > 0  # some checkpoints held pseudo-gradients of an unfinished update


def _live(server, workers, now, restart_at=(), make=None, directory=None):
    """Workers take turns in a fixed order (0, 1, 2, 0, 0, 1, ...): push the job they hold or ask
    for one; the clock advances 0.3 s per turn. Restarts the server before the turns in `restart_at`."""
    held = {}
    order = [0, 1, 2, 0, 0, 1, 2, 2]
    turn = 0
    while not server.done:
        if turn in restart_at:
            server = _restart(server, make, directory / str(turn))
        w = order[turn % len(order)]
        if w in held:
            job, start = held.pop(w)
            pseudo_grad, loss = workers[w].run_job(start, job.shard, job.shard_step, job.steps)
            assert server.push(w, job.job_id, pseudo_grad, loss)
        elif (reply := server.request_job(w)) is not WAIT and isinstance(reply, tuple):
            held[w] = reply
        now[0] += 0.3
        turn += 1
    return server, turn


@pytest.mark.parametrize("server_cls, overrides", [(AsyncServer, dict(dylu=True)),
                                                   (SyncServer, dict(mode="sync", outer="nesterov"))])
def test_live_server_restarted_mid_run_equals_the_uninterrupted_one(tmp_path, server_cls, overrides):
    cfg = _cfg(shard_assignment="sampled", **overrides)
    task = mlp_task(3)

    def go(restart_at):
        now = [0.0]
        make = lambda: server_cls(cfg, mlp_params(), eval_fn=EVAL, clock=lambda: now[0])  # noqa: E731
        workers = [InnerWorker(task, w, cfg.seed) for w in range(cfg.num_workers)]
        return _live(make(), workers, now, restart_at, make, tmp_path / str(restart_at))

    want, turns = go(())
    assert want.version >= 4 and turns > 12
    got, _ = go(tuple(range(3, turns, 4)))
    _assert_trees_equal(got.params, want.params)
    _assert_trees_equal(got.outer_state, want.outer_state)
    assert got.history == want.history and got.local_steps == cfg.total_local_steps


def _delayed_nesterov(outer_state) -> DelayedNesterovState:
    found = [x for x in jax.tree.leaves(outer_state, is_leaf=lambda x: isinstance(x, DelayedNesterovState))
             if isinstance(x, DelayedNesterovState)]
    assert len(found) == 1
    return found[0]


def test_restore_checks_the_server_falls_back_past_a_corrupt_checkpoint_and_starts_empty(tmp_path):
    cfg = _cfg(grace_period=0.0)
    server = AsyncServer(cfg, mlp_params())
    ckpt = Checkpointer(tmp_path, keep=3)
    assert restore_server(AsyncServer(cfg, mlp_params()), ckpt) is None
    jobs = [server.request_job(w) for w in range(3)]
    for w, (job, start) in enumerate(jobs[:2]):
        server.push(w, job.job_id, jax.tree.map(lambda x: np.full_like(x, 0.1 * (w + 1)), start))
        assert save_server(server, ckpt) == w + 1
        if w == 0:
            first = jax.device_get((server.params, server.outer_state))
    ckpt.wait()
    buffer = _delayed_nesterov(first[1]).buffer
    assert np.all(buffer["w1"] == np.float32(0.1))  # delayed Nesterov's open window sum is part of the checkpoint
    with pytest.raises(ValueError, match="step 2: ValueError: the checkpoint is of a AsyncServer, the server a Sync"):
        restore_server(SyncServer(_cfg(mode="sync", outer="nesterov"), mlp_params()), ckpt)
    with pytest.raises(ValueError, match=r"config differs from the server's: outer_lr=0.7 \(server: 0.5\)"):
        restore_server(AsyncServer(_cfg(grace_period=0.0, outer_lr=0.5), mlp_params()), ckpt)
    shutil.rmtree(tmp_path / "2" / "state")  # the newest checkpoint is unreadable
    fresh = AsyncServer(cfg, mlp_params())
    assert restore_server(fresh, Checkpointer(tmp_path, keep=3)) == 1
    _assert_trees_equal((fresh.params, fresh.outer_state), first)
    assert sorted(fresh.open) == [1, 2] and fresh.planner.remaining == server.planner.remaining + 0
    assert fresh.push(1, jobs[1][0].job_id, jax.tree.map(np.zeros_like, jobs[1][1]))  # its open job is still open
