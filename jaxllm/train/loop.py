"""`fit`: the one training loop, where the effects live (data, checkpoints, metrics, signals).

Every training run in the library — pre-training (`jaxllm.train.pretrain`), SFT, DPO/CPO, ChatQA's
stages, context-extension tuning, Local-SGD's inner steps — is a call

    fit(loss_fn, optimizer, batches, init_or_params, workdir, loop_config, hooks=...)

(the shape of Levanter's `Trainer(config, optimizer, loss_fn)`): an objective in the train-step
contract (`jaxllm.train.step`), any optax transform, a checkpointable batch iterator, the starting
params (or how to initialise them), and a frozen `LoopConfig`.

`fit` resumes from the newest good checkpoint in `workdir/checkpoints` (TrainState and
data-iterator position together, so the resumed run sees exactly the batches and random numbers
the uninterrupted one would have), writes a record every `log_every` steps (`jaxllm.train.metrics`:
window means of every step metric, learning rate, step time, tokens/s and MFU when the config
declares the FLOPs), checkpoints every `checkpoint_every` steps, at the end and on SIGTERM (then
returns with `preempted=True`, so a preemptible TPU VM loses nothing), and stops with
FloatingPointError at the first step whose loss or gradient is not finite, saving nothing after
the last good checkpoint.

The host runs one step ahead of the device: step k+1 is dispatched before step k's metrics are
read, so reading them does not stall the accelerator. Hooks run at record steps, where the loop
has caught up (`state` is the state after that step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.parallel import mesh as mesh_lib
from jaxllm.parallel import rules
from jaxllm.train import checkpoint, metrics, mfu
from jaxllm.train.state import TrainState
from jaxllm.train.step import LossFn, make_train_step

log = logging.getLogger(__name__)


class Batches(Protocol):
    """What `fit` reads: an iterator of {name: array [B, ...]} (this process's rows of each global
    batch: all of them with one process) whose position is a JSON-able `get_state()` that
    `set_state()` restores (grain's `DatasetIterator` contract; checkpointed with the state)."""

    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> Any: ...
    def set_state(self, state: Any) -> None: ...


Hook = Callable[[int, TrainState, dict], "dict | None"]
"""`hook(step, state, record) -> dict | None`, called at every record step after the record is
made and before it is written; a returned dict is merged into the record (metrics.jsonl and
`FitResult.history`; numbers also go to TensorBoard). `state` is donated to the next step: copy
what must outlive the call."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How `fit` runs: `steps` optimizer steps in total (a `until_step` call stops earlier, the run
    continues on the next call); `seed` draws the init and step random numbers; `mesh` is a
    `jaxllm.parallel.mesh` spec; each batch is split into `grad_accum` micro-batches (exact
    accumulation). A record every `log_every` steps, a checkpoint every `checkpoint_every` (the
    last `keep_checkpoints` kept; one always at the end and on SIGTERM).

    Accounting, for the record only: `learning_rate` is the optimizer's schedule, indexed by the
    optimizer step (None: not logged); `tokens_per_step` (global) gives tokens/s, and with
    `flops_per_token` (model FLOPs of a trained token, `jaxllm.model.flops`) the MFU, over
    `peak_flops` (FLOP/s of all devices; 0 = table peak for TPU/GPU, measured matmul peak for
    CPU). `verbose` prints a progress line per record.
    """

    steps: int
    seed: int = 0
    mesh: str = "fsdp:-1"
    grad_accum: int = 1
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    learning_rate: Callable[[int], Any] | None = None
    tokens_per_step: int = 0
    flops_per_token: float = 0.0
    peak_flops: float = 0.0
    verbose: bool = True

    def __post_init__(self):
        for name in ("steps", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("tokens_per_step", "flops_per_token", "peak_flops"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass
class FitResult:
    """What a `fit` call did: the final state, the loss of every step it ran ({step: loss}), one
    record per logged window (`history`, as written to metrics.jsonl, hook outputs included), and
    whether it stopped early on SIGTERM."""

    state: TrainState
    losses: dict[int, float]
    history: list[dict]
    preempted: bool


# ----------------------------------------------------------------------------- state

def shardings_like_params(tree, params, param_shardings, mesh):
    """Shardings for `tree` (e.g. abstract optimizer state) whose leaves mirror parameters: a leaf
    whose key path ends with a parameter's path and has its shape gets that parameter's sharding
    (Adam moments, momenta, anchors); anything else (counts, scalars) is replicated. XLA would
    replicate them: zeros do not inherit the sharding of the params they were shaped after."""
    by_path = {tuple(map(str, path)): (leaf.shape, sharding) for (path, leaf), sharding in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings))}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = tuple(map(str, path))
        for i in range(len(keys)):
            shape, sharding = by_path.get(keys[i:], (None, None))
            if shape == leaf.shape:
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def place_params(init_or_params, mesh, rng):
    """Params on `mesh`, every array born (or copied) sharded by its logical axes.

    A callable is an init `rng -> params` run under jit with the shardings its output's flax
    logical-axis boxes name (e.g. `lambda r: llama.init_params(cfg, r, boxed=True)`): no full copy
    ever lives on one device. A pytree is copied onto the mesh (the caller keeps its arrays; the
    train step donates its own): boxed leaves (`llama.box_params`) by their logical axes, plain
    arrays replicated."""
    mesh_rules = rules.mesh_rules(rules.DEFAULT_RULES, mesh)
    if callable(init_or_params):
        return rules.init_sharded(init_or_params, mesh, rules.DEFAULT_RULES, rng)[0]
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_rules):
        shardings = rules.param_shardings(init_or_params, mesh, mesh_rules)
    return jax.device_put(nn.meta.unbox(init_or_params), shardings, may_alias=False)


def init_train_state(init_or_params, optimizer: optax.GradientTransformation, mesh, seed: int) -> TrainState:
    """Step-0 state with every array on `mesh`: params by the logical rules (`place_params`, init
    from the first half of `key(seed)`), optimizer moments like their params, step and rng (the
    second half) replicated."""
    init_rng, state_rng = jax.random.split(jax.random.key(seed))
    params = place_params(init_or_params, mesh, init_rng)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = shardings_like_params(jax.eval_shape(optimizer.init, params), params, param_shardings, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                      opt_state=opt_state, rng=jax.device_put(jax.random.key_data(state_rng), replicated))


# ----------------------------------------------------------------------------- loop pieces

@contextlib.contextmanager
def sigterm_event():
    """An Event set when SIGTERM arrives (handler installed only on the main thread, restored after)."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        log.warning("fit runs outside the main thread: SIGTERM will not trigger a checkpoint")
        yield event
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _host_metrics(step: int, device_metrics, last_good: int | None) -> dict:
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if host["finite"] == 0.0:
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step} (loss {host['loss']}, grad norm {host['grad_norm']}); "
            f"training stopped, nothing saved after the last good checkpoint (step {last_good})")
    return host


def _global_batch(local: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def _window_record(window: list[dict], timed: int, elapsed: float, cfg: LoopConfig, step: int,
                   ideal_step_s: float | None) -> dict:
    """The record of the steps in `window`: the mean of every step metric, the learning rate, and
    the speed of the `timed` ones (None while only the compiling step ran). `ideal_step_s` is
    the step time at 100% MFU (None: FLOPs not declared)."""
    record = {k: float(np.mean([m[k] for m in window])) for k in window[0] if k != "finite"}
    if cfg.learning_rate is not None:
        record["learning_rate"] = float(cfg.learning_rate(step - 1))
    record.update(step_time_s=None, tokens_per_s=None, mfu=None)
    if timed:
        step_time = elapsed / timed
        record["step_time_s"] = step_time
        if cfg.tokens_per_step:
            record["tokens_per_s"] = cfg.tokens_per_step / step_time
        if ideal_step_s is not None:
            record["mfu"] = ideal_step_s / step_time
    return record


def _ideal_step_s(cfg: LoopConfig, devices) -> float | None:
    if not (cfg.flops_per_token and cfg.tokens_per_step):
        return None
    peak, source = (cfg.peak_flops, "declared") if cfg.peak_flops else mfu.peak_flops(devices)
    if cfg.verbose:
        print(f"{cfg.flops_per_token:.3g} FLOPs/token; peak {peak:.3g} FLOP/s ({source})", flush=True)
    return cfg.tokens_per_step * cfg.flops_per_token / peak


def fit(loss_fn: LossFn, optimizer: optax.GradientTransformation, batches: Batches | Iterator[dict],
        init_or_params, workdir: str | os.PathLike, loop_config: LoopConfig, *, hooks: Sequence[Hook] = (),
        devices: Sequence[jax.Device] | None = None, until_step: int | None = None) -> FitResult:
    """Trains `init_or_params` with `loss_fn` and `optimizer` on `batches` in `workdir` (created if
    missing), resuming from its newest good checkpoint.

    `loss_fn(params, batch, rng) -> (loss, aux)` as `jaxllm.train.step` documents; `init_or_params`
    is an init callable or a params pytree (`place_params`); `devices` (default: all) carry the
    mesh `loop_config.mesh`. `until_step` ends this call early, with a checkpoint, after that step
    (a time-sliced job; schedules still span `loop_config.steps`, so a later call continues the
    same run). Raises FloatingPointError naming the step at a non-finite loss, ValueError on a
    batch that does not split over the mesh, or when every checkpoint in workdir is unreadable.
    """
    cfg = loop_config
    last = cfg.steps if until_step is None else until_step
    if not 1 <= last <= cfg.steps:
        raise ValueError(f"until_step must be in [1, steps={cfg.steps}], got {until_step}")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    devices = list(jax.devices() if devices is None else devices)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)

    state = init_train_state(init_or_params, optimizer, mesh, cfg.seed)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    restored = ckpt.restore_latest(checkpoint.abstract_like(state), batches)
    if restored is not None:
        state = restored
        if cfg.verbose:
            print(f"resumed from step {int(state.step)} in {ckpt.directory}", flush=True)
    start = int(state.step)
    if cfg.verbose:
        num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
        print(f"{num_params:,} params on mesh {dict(mesh.shape)}; steps {start}->{last} of {cfg.steps}", flush=True)
    ideal_step_s = _ideal_step_s(cfg, devices)

    batch_sharding = rules.logical_sharding(("batch",), mesh)
    step_fn = make_train_step(loss_fn, optimizer, mesh, grad_accum=cfg.grad_accum, batch_sharding=batch_sharding)
    writer = metrics.MetricsWriter(workdir, start)
    losses: dict[int, float] = {}
    history: list[dict] = []
    window: list[dict] = []  # host metrics of the steps since the last record
    timed = 0  # steps in `window` that ran after the first (compiling) step
    window_start = None
    preempted = False

    def read(step, device_metrics):
        nonlocal timed
        window.append(_host_metrics(step, device_metrics, ckpt.latest_step))
        losses[step] = window[-1]["loss"]
        timed += window_start is not None

    try:
        with sigterm_event() as stop:
            pending = None
            for step in range(start + 1, last + 1):
                state, device_metrics = step_fn(state, _global_batch(next(batches), batch_sharding))
                if pending is not None:
                    read(*pending)
                pending = (step, device_metrics)
                stopping = stop.is_set()
                log_now = step % cfg.log_every == 0 or step == last
                save_now = step % cfg.checkpoint_every == 0 or step == last or stopping
                if not (log_now or save_now or window_start is None):
                    continue
                read(*pending)
                pending = None
                if window_start is None:
                    window_start = time.perf_counter()
                if log_now:
                    record = _window_record(window, timed, time.perf_counter() - window_start, cfg, step,
                                            ideal_step_s)
                    for hook in hooks:
                        record.update(hook(step, state, record) or {})
                    writer.write(step, record)
                    history.append({"step": step, **record})
                    if cfg.verbose:
                        print(metrics.progress_line(step, cfg.steps, record), flush=True)
                    window, timed, window_start = [], 0, time.perf_counter()
                if save_now:
                    save_start = time.perf_counter()
                    ckpt.save(state, batches)
                    window_start += time.perf_counter() - save_start  # saving is not step time
                if stopping:
                    ckpt.wait()
                    print(f"SIGTERM: checkpoint at step {step} saved in {ckpt.directory}; stopping", flush=True)
                    preempted = step < last
                    break
        ckpt.wait()
    finally:
        writer.close()
        ckpt.close()
    return FitResult(state=state, losses=losses, history=history, preempted=preempted)
