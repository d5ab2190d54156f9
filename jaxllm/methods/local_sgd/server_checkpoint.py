"""Checkpoints of a Local-SGD parameter server, in the training loop's checkpoint format.

A restarted server continues where the checkpointed one stood: global params, outer optimizer
state (e.g. delayed Nesterov's momentum, window sum and arrival count), version, synced steps,
history, open jobs, and its schedule's position (the job planner's shard counters, budget and
random generator; a replayed schedule's job queues, the older versions still to be handed out and
the pseudo-gradients that wait for the rest of their update; a sync round's accepted ones).
Workers that survive the restart push their open jobs to the new server as if nothing happened;
lost ones are reported with `worker_lost` as usual. So a replayed schedule restarted at any
point ends bit for bit where an uninterrupted run ends (tests/methods/test_local_sgd_restart.py).

Format: `jaxllm.train.checkpoint.Checkpointer` (atomic orbax writes, keep-N, fingerprint-verified
restores with fallback to the previous checkpoint). Its `TrainState` holds the arrays: `step` the
checkpoint number, `params` the global model, `opt_state` {"outer": outer optimizer state,
"kept": {version: params}, "grads": {job id: pseudo-gradient}}, `rng` unused (0); the schedule's
host state is JSON in the `data` item, and the `layout` names the kept versions and held jobs.
"""

import collections
import dataclasses
import json

import jax.numpy as jnp

from jaxllm.methods.local_sgd.history import History, Job
from jaxllm.methods.local_sgd.server import AsyncServer, ParameterServer, ReplayServer, SyncServer
from jaxllm.train.checkpoint import Checkpointer, abstract_like
from jaxllm.train.state import TrainState


class _HostState:
    """The JSON side of a checkpoint, in the shape the checkpointer's `data` item takes."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> dict:
        return self.state

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw)

    def start_prefetch(self) -> None:
        pass


def save_server(server: ParameterServer, checkpointer: Checkpointer) -> int:
    """Start writing a checkpoint of `server` (returns once its arrays are on the host; call
    `checkpointer.wait()` to await the write); returns the checkpoint's number."""
    number = (checkpointer.latest_step or 0) + 1
    host, kept, grads = _host_state(server)
    state = _arrays(server, number, kept, grads)
    checkpointer.save(state, _HostState(host), layout={"server": host["server"], "config": host["config"],
                                                       "kept": sorted(kept), "grads": sorted(grads)})
    return number


def restore_server(server: ParameterServer, checkpointer: Checkpointer) -> int | None:
    """Load the newest good checkpoint into `server`, a freshly built server of the same class
    and config (its params and outer optimizer give the arrays' shapes); returns the version it
    continues from, or None if there is no checkpoint (the server is left as built). ValueError
    if no checkpoint is readable, naming each one's problem (e.g. written by another kind of
    server or another config)."""
    host = _HostState()

    def abstract(layout: dict) -> TrainState:
        if layout["server"] != type(server).__name__:
            raise ValueError(f"the checkpoint is of a {layout['server']}, the server a {type(server).__name__}")
        mine = _config(server)
        if differ := sorted(k for k in mine.keys() | layout["config"].keys() if mine.get(k) != layout["config"].get(k)):
            raise ValueError("the checkpoint's config differs from the server's: " + ", ".join(
                f"{k}={layout['config'].get(k)!r} (server: {mine.get(k)!r})" for k in differ))
        kept = {v: server.params for v in layout["kept"]}
        grads = {j: server.params for j in layout["grads"]}
        return abstract_like(_arrays(server, 0, kept, grads))

    state = checkpointer.restore_latest(abstract, host)
    if state is None:
        return None
    saved = host.state
    arrays = state.opt_state
    server.params, server.outer_state = state.params, arrays["outer"]
    _load_host_state(server, saved, {int(v): p for v, p in arrays.get("kept", {}).items()},
                     {int(j): g for j, g in arrays.get("grads", {}).items()})
    return server.version


def _arrays(server: ParameterServer, number: int, kept: dict, grads: dict) -> TrainState:
    opt_state = {"outer": server.outer_state}
    if kept:
        opt_state["kept"] = {str(v): p for v, p in kept.items()}
    if grads:
        opt_state["grads"] = {str(j): g for j, g in grads.items()}
    return TrainState(step=jnp.asarray(number, jnp.int32), params=server.params, opt_state=opt_state,
                      rng=jnp.zeros((), jnp.uint32))


def _config(server: ParameterServer) -> dict:
    """The server's LocalSGDConfig as JSON values."""
    return json.loads(json.dumps(dataclasses.asdict(server.cfg)))


def _planner_state(planner) -> dict:
    return {"rng": planner.rng.bit_generator.state, "consumed": list(planner.consumed), "remaining": planner.remaining}


def _load_planner(planner, d: dict) -> None:
    planner.rng.bit_generator.state = d["rng"]
    planner.consumed, planner.remaining = list(d["consumed"]), d["remaining"]


def _host_state(s: ParameterServer) -> tuple[dict, dict, dict]:
    """(JSON state, kept params by version, held pseudo-gradients by job id)."""
    host = {"server": type(s).__name__, "config": _config(s), "version": s.version, "local_steps": s.local_steps,
            "open": {str(w): dataclasses.asdict(job) for w, job in s.open.items()},
            "history": s.history.to_dict(), "recorded_version": s._recorded_version,
            "elapsed": s.clock() - s.start_time}
    kept, grads = {}, {}
    if isinstance(s, ReplayServer):
        pending = {}
        for version, group in s.pending.items():
            pending[str(version)] = {str(j): None if held is None else [dataclasses.asdict(held[0]), held[2]]
                                     for j, held in group.items()}
            grads |= {j: held[1] for j, held in group.items() if held is not None}
        kept = dict(s.kept)
        host |= {"queues": {str(w): list(q) for w, q in s.queues.items()}, "pending": pending,
                 "uses": {str(v): n for v, n in s.uses.items()}}
    elif isinstance(s, (AsyncServer, SyncServer)):
        host |= {"planner": _planner_state(s.planner), "retired": sorted(s.retired), "next_job_id": s.next_job_id}
        if isinstance(s, AsyncServer):
            host["window_left"] = None if s.window_end is None else s.window_end - s.clock()
        else:
            host |= {"todo": {str(w): dataclasses.asdict(job) for w, job in s.todo.items()},
                     "outstanding": sorted(s.outstanding),
                     "accepted": [[dataclasses.asdict(job), loss] for job, _, loss in s.accepted]}
            grads = {job.job_id: g for job, g, _ in s.accepted}
    else:
        raise ValueError(f"cannot checkpoint a {type(s).__name__}: only ReplayServer, AsyncServer and SyncServer")
    return host, kept, grads


def _load_host_state(s: ParameterServer, d: dict, kept: dict, grads: dict) -> None:
    s.version, s.local_steps, s._recorded_version = d["version"], d["local_steps"], d["recorded_version"]
    s.open = {int(w): Job(**job) for w, job in d["open"].items()}
    s.history = History.from_dict(d["history"])
    s.start_time = s.clock() - d["elapsed"]
    if isinstance(s, ReplayServer):
        s.queues = collections.defaultdict(collections.deque,
                                           {int(w): collections.deque(q) for w, q in d["queues"].items()})
        s.pending = collections.defaultdict(dict)
        for version, group in d["pending"].items():
            s.pending[int(version)] = {int(j): None if held is None else (Job(**held[0]), grads[int(j)], held[1])
                                       for j, held in group.items()}
        s.uses = collections.Counter({int(v): n for v, n in d["uses"].items()})
        s.kept = kept
        return
    _load_planner(s.planner, d["planner"])
    s.retired, s.next_job_id = set(d["retired"]), d["next_job_id"]
    if isinstance(s, AsyncServer):
        s.window_end = None if d["window_left"] is None else s.clock() + d["window_left"]
    else:
        s.todo = {int(w): Job(**job) for w, job in d["todo"].items()}
        s.outstanding = set(d["outstanding"])
        s.accepted = [(Job(**job), grads[job["job_id"]], loss) for job, loss in d["accepted"]]
