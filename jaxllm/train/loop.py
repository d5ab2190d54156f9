"""`fit`: the pre-training loop, where the effects live (data, checkpoints, metrics, signals).

A run is a `TrainConfig` and a workdir. `fit` resumes from the newest good checkpoint in
`workdir/checkpoints` (TrainState and data-iterator position together, so the resumed run sees
exactly the batches and random numbers the uninterrupted one would have), writes metrics every
`log_every` steps (`jaxllm.train.metrics`), checkpoints every `checkpoint_every` steps, at the end
and on SIGTERM (then returns with `preempted=True`, so a preemptible TPU VM loses nothing), and
stops with FloatingPointError at the first step whose loss or gradient is not finite, saving
nothing after the last good checkpoint.

The host runs one step ahead of the device: step k+1 is dispatched before step k's metrics are
read, so reading them does not stall the accelerator.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import signal
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.data import builders, sources
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.model import flops, llama
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.parallel import rules
from jaxllm.train import checkpoint, lm, metrics, mfu, optim
from jaxllm.train.config import DataConfig, TrainConfig
from jaxllm.train.state import TrainState
from jaxllm.train.step import make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FitResult:
    """What a `fit` call did: the final state, the loss of every step it ran ({step: loss}), whether
    it stopped early on SIGTERM, and the decoded sample (None when not sampled)."""

    state: TrainState
    losses: dict[int, float]
    preempted: bool
    sample: str | None


def open_source(cfg: DataConfig) -> Sequence:
    """The random-access record source `cfg` names."""
    data_dir = cfg.data_dir or None
    if cfg.source == "corpus":
        return builders.corpus_dataset(data_dir)[cfg.split]
    if cfg.source == "jsonl":
        files = [f.strip() for f in cfg.files.split(",") if f.strip()]
        return builders.jsonl_dataset("jaxllm_jsonl", files, fields=(cfg.text_key,), data_dir=data_dir)[cfg.split]
    return sources.catalog_source(cfg.name, cfg.split, data_dir=data_dir)


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    return Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else Tokenizer.default()


def shardings_like_params(tree, params, param_shardings, mesh):
    """Shardings for `tree` (e.g. abstract optimizer state) whose leaves mirror parameters: a leaf
    whose key path ends with a parameter's path and has its shape gets that parameter's sharding
    (Adam moments); anything else (counts, scalars) is replicated. XLA would replicate them: zeros
    do not inherit the sharding of the params they were shaped after."""
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


def init_train_state(cfg: TrainConfig, mesh, optimizer) -> TrainState:
    """Step-0 state with every array born sharded: params by the logical rules, optimizer moments
    like their params, step and rng replicated."""
    init_rng, state_rng = jax.random.split(jax.random.key(cfg.seed))
    model = llama.Llama(cfg.model)
    variables, shardings = rules.init_sharded(
        lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32)), mesh, rules.DEFAULT_RULES, init_rng)
    params, param_shardings = variables["params"], shardings["params"]
    opt_shardings = shardings_like_params(jax.eval_shape(optimizer.init, params), params, param_shardings, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                      opt_state=opt_state, rng=jax.device_put(jax.random.key_data(state_rng), replicated))


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


def _window_record(window: list[dict], timed: int, elapsed: float, learning_rate: float, ideal_step_s: float,
                   tokens_per_step: int) -> dict:
    """The metrics record of the steps in `window`: mean loss and grad norm, and the speed of the
    `timed` ones (None while only the compiling step ran). `ideal_step_s` is the step time at
    100% MFU (model FLOPs per step / peak FLOP/s)."""
    record = {"loss": float(np.mean([m["loss"] for m in window])),
              "grad_norm": float(np.mean([m["grad_norm"] for m in window])),
              "learning_rate": learning_rate, "step_time_s": None, "tokens_per_s": None, "mfu": None}
    if timed:
        step_time = elapsed / timed
        record.update(step_time_s=step_time, tokens_per_s=tokens_per_step / step_time, mfu=ideal_step_s / step_time)
    return record


def sample_text(cfg: TrainConfig, tokenizer: Tokenizer, params) -> str:
    """`cfg.sample_prompt` and its continuation of up to `cfg.sample_tokens` tokens (cut at EOS)."""
    prompt = tokenizer.encode(cfg.sample_prompt, bos=True)
    tokens = lm.sample(cfg.model, params, np.asarray([prompt]), cfg.sample_tokens,
                       temperature=cfg.sample_temperature, rng=jax.random.key(cfg.seed))
    continuation = [int(t) for t in tokens[0]]
    if tokenizer.eos_id in continuation:
        continuation = continuation[:continuation.index(tokenizer.eos_id)]
    return tokenizer.decode(prompt + continuation)


def fit(cfg: TrainConfig, workdir: str | os.PathLike, *, devices: Sequence[jax.Device] | None = None,
        until_step: int | None = None) -> FitResult:
    """Trains `cfg` in `workdir` (created if missing), resuming from its newest good checkpoint.

    `devices` (default: all) are the devices `cfg.mesh` is laid over. `until_step` ends this call
    early, with a checkpoint, after that step (a time-sliced job; the schedule still spans
    `cfg.steps`, so a later call continues the same run). Returns a `FitResult`;
    raises FloatingPointError naming the step at a non-finite loss, ValueError on a config that
    does not fit the mesh or tokenizer, or when every checkpoint in workdir is unreadable.
    """
    last = cfg.steps if until_step is None else until_step
    if not 1 <= last <= cfg.steps:
        raise ValueError(f"until_step must be in [1, steps={cfg.steps}], got {until_step}")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    devices = list(jax.devices() if devices is None else devices)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    cfg.check_data_parallel(mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count())
    tokenizer = load_tokenizer(cfg.data)
    cfg.check_vocab(tokenizer.vocab_size)
    batches = sources.lm_batches(
        open_source(cfg.data), tokenizer, batch_size=cfg.batch_size // jax.process_count(), seq_len=cfg.seq_len,
        seed=cfg.seed, shuffle=cfg.data.shuffle, packing=cfg.data.packing, text_key=cfg.data.text_key,
        worker_count=cfg.data.worker_count)
    optimizer, schedule = optim.make_optimizer(cfg.optimizer, cfg.steps)

    state = init_train_state(cfg, mesh, optimizer)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    restored = ckpt.restore_latest(checkpoint.abstract_like(state), batches)
    if restored is not None:
        state = restored
        print(f"resumed from step {int(state.step)} in {ckpt.directory}", flush=True)
    start = int(state.step)

    peak, peak_source = (cfg.peak_flops, "declared") if cfg.peak_flops else mfu.peak_flops(devices)
    flops_per_token = flops.train_flops_per_token(cfg.model, cfg.seq_len)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    ideal_step_s = tokens_per_step * flops_per_token / peak
    print(f"{cfg.model.num_params():,} params on mesh {dict(mesh.shape)}; {flops_per_token:.3g} FLOPs/token; "
          f"peak {peak:.3g} FLOP/s ({peak_source}); steps {start}->{last} of {cfg.steps}", flush=True)

    batch_sharding = rules.logical_sharding(("batch",), mesh)
    step_fn = make_train_step(lm.lm_loss_fn(cfg.model), optimizer, mesh, grad_accum=cfg.grad_accum,
                              batch_sharding=batch_sharding)
    writer = metrics.MetricsWriter(workdir, start)
    losses: dict[int, float] = {}
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
                    record = _window_record(window, timed, time.perf_counter() - window_start, float(schedule(step - 1)),
                                            ideal_step_s, tokens_per_step)
                    writer.write(step, record)
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

    text = None
    if cfg.sample_tokens and int(state.step) == cfg.steps:
        text = sample_text(cfg, tokenizer, state.params)
        print(f"sample after step {int(state.step)}:\n{text}", flush=True)
    return FitResult(state=state, losses=losses, preempted=preempted, sample=text)
