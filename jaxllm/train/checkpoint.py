"""Checkpoints of a training run: TrainState + data-iterator position, saved with orbax.

Each checkpoint is one orbax step directory holding three items:
- `state`: the `TrainState` pytree (params, optimizer state, step, rng), written asynchronously
  (training continues while the host writes) and restored directly onto given shardings, so a
  run can resume on a different mesh;
- `data`: the grain iterator's position (`get_state()` as JSON), one file per process
  (`process_{i}-of-{n}.json`, grain's orbax handler), since every host reads its own shard. The
  position is captured when `save` is called; the file is written in the background. A plain
  iterator resumes with the same process count only; a `jaxllm.data.shards.ShardedBatches` reads
  every process's file and resumes with any process count that divides its shard count;
- `meta`: JSON with the step and a fingerprint of every array of `state`.

Writes are atomic (orbax writes a temporary directory and renames it when complete; half-written
temporary directories are ignored and cleaned up), and keep-N deletes old checkpoints only after a
newer one has been committed, so a failed save never removes the last good one. A failed write
(a full disk: tensorstore's RESOURCE_EXHAUSTED ValueError, raised by orbax at the next save or
wait) surfaces as one OSError (errno ENOSPC for a full disk) naming the step and the intact newest
checkpoint.

Restores are verified: orbax does not checksum array data, and a flipped byte in a compressed
chunk restores silently as different numbers. The fingerprint (two wrapping uint32 sums over each
array's raw bits, one of them position-weighted) is recomputed after restoring and compared. A
latest checkpoint that fails to read or to verify is moved aside to `<step>.corrupt` with a
logged warning and the previous one is tried; if none is good, a ValueError lists every step and
why it failed. Nothing is ever restored unverified.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxllm.data import shards
from jaxllm.train.state import TrainState

log = logging.getLogger(__name__)

_GOLDEN = np.uint32(2654435761)  # Knuth's multiplicative-hash constant
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_fingerprint(x):
    """[Σ bits, Σ bits · (i · golden + 1)] of an array's raw bits, as wrapping uint32. The second
    sum changes when elements move, so swapped or shifted data does not go unnoticed."""
    flat = x.reshape(-1)
    if flat.dtype == jnp.bool_:
        bits = flat.astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(flat, _UINT[flat.dtype.itemsize]).astype(jnp.uint32)
    weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * _GOLDEN + jnp.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


@jax.jit
def _fingerprints(leaves):
    return [_leaf_fingerprint(x) for x in leaves]


def fingerprint(tree) -> dict[str, list[int]]:
    """{array path: [sum of bits, position-weighted sum of bits]} (uint32, wrapping). Integer sums
    do not depend on reduction order, so the value is the same on any mesh or sharding."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get(_fingerprints([leaf for _, leaf in paths_leaves]))
    return {jax.tree_util.keystr(path): [int(v) for v in s] for (path, _), s in zip(paths_leaves, sums)}


def abstract_like(state: TrainState) -> TrainState:
    """ShapeDtypeStructs with the shardings of `state`: what `restore` should produce."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _summary(err: Exception) -> str:
    """First line of an error (tensorstore appends a long spec dump)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


class _PositionSnapshot:
    """An iterator's state frozen at `save` time. Grain's handler calls `get_state()` from orbax's
    background thread, when the live iterator has already moved on; this returns the position
    of the moment of the save, as the JSON bytes grain's handler writes for non-dataset iterators."""

    def __init__(self, iterator: grain.DatasetIterator):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """Keep-N asynchronous checkpoints of (TrainState, grain iterator position) in `directory`."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._writing: int | None = None  # step of the asynchronous write that may still be running

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState, iterator: grain.DatasetIterator, *, layout: dict | None = None) -> bool:
        """Starts writing a checkpoint of `state` and the current position of `iterator` at
        `state.step` (returns once the arrays are on the host); False if that step exists.
        `iterator`: a grain iterator, or any object with `get_state() -> JSON-able` and
        `set_state(bytes)` / `start_prefetch()` for restore. `layout`: JSON describing the
        state's tree when it varies between checkpoints, handed back to `restore`."""
        step = int(state.step)
        if step in self._manager.all_steps():
            return False
        meta = {"step": step, "fingerprint": fingerprint(state), **({"layout": layout} if layout is not None else {})}
        with self._write_errors(step):  # orbax first waits for the previous write, raising its error
            started = self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_PositionSnapshot(iterator)),
                meta=ocp.args.JsonSave(meta)), force=True)
        self._writing = step
        return started

    def wait(self) -> None:
        """Blocks until pending asynchronous writes are committed; OSError if one failed."""
        with self._write_errors(None):
            self._manager.wait_until_finished()
        self._writing = None

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        """Turns a failed write (a full disk, a lost mount: orbax and tensorstore raise ValueError
        and others, with pages of spec) into one OSError naming the step, the directory, the cause
        and the newest complete checkpoint, which the failure left intact (writes are atomic)."""
        try:
            yield
        except Exception as err:
            self._manager.reload()
            unfinished = self._writing is not None and self._writing not in self._manager.all_steps()
            failed = self._writing if unfinished else step
            self._writing = None
            text = str(err)
            code = errno.ENOSPC if "No space left on device" in text or "os_error_code='28'" in text else None
            cause = "No space left on device" if code == errno.ENOSPC else _summary(err)
            latest = self._manager.latest_step()
            kept = ("no complete checkpoint was written before it" if latest is None
                    else f"the newest complete checkpoint, step {latest}, is intact")
            message = f"checkpoint of step {failed} in {self.directory} could not be written: {cause}; {kept}"
            raise (OSError(code, message) if code else OSError(message)) from err

    def close(self) -> None:
        self._manager.close()

    def restore(self, step: int, abstract_state: TrainState, iterator: grain.DatasetIterator) -> TrainState:
        """The state of checkpoint `step`, verified against its fingerprint, with `iterator`
        moved to the saved position; raises if it cannot be read or does not verify.
        `abstract_state` may be a function of the `layout` given to `save` (None if none was)
        returning the abstract state, for states whose tree varies between checkpoints."""
        items = {}
        if hasattr(iterator, "set_global_state"):  # takes every process's position: any layout that divides it
            iterator.set_global_state(self._positions(step))
        else:
            self.check_process_layout(step)
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        if callable(abstract_state):
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            abstract_state = abstract_state(meta.get("layout"))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore(), **items))
        state, meta = restored.state, restored.meta
        if meta.get("step") != step or int(state.step) != step:
            raise ValueError(f"step mismatch: directory {step}, metadata {meta.get('step')}, "
                             f"state {int(state.step)}")
        expected, actual = meta["fingerprint"], fingerprint(state)
        bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
        if bad:
            raise ValueError(f"array contents differ from the fingerprint written at save time: {bad[:5]}")
        return state

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            source = self.directory / str(step)
            target = self.directory / f"{step}.corrupt"
            suffix = 0
            while target.exists():
                suffix += 1
                target = self.directory / f"{step}.corrupt{suffix}"
            os.replace(source, target)
            log.warning("moved unreadable checkpoint %s to %s", source, target)
        multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self._manager.reload()

    def check_process_layout(self, step: int) -> None:
        """ProcessLayoutError if checkpoint `step` holds data positions written by a different
        number of processes than this job has, for an iterator that reads one shard per process
        (a `ShardedBatches` takes any layout that divides its shard count; the arrays take any
        layout: `restore_params`)."""
        data = self.directory / str(step) / "data"
        written = sorted(p.name for p in data.glob("process_*-of-*.json")) if data.is_dir() else []
        mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if written and mine not in written:
            raise shards.ProcessLayoutError(
                f"checkpoint step {step} in {self.directory} was written by a job of a different process count "
                f"(data positions {written}); this job has {jax.process_count()} process(es) and needs {mine}. "
                "Resume with the same process count, or read the weights alone (restore_params / load_model)")

    def _positions(self, step: int) -> list:
        """Every process's saved data position of checkpoint `step`, in process order."""
        found = {}
        for path in (self.directory / str(step) / "data").glob("process_*-of-*.json"):
            index, count = map(int, re.fullmatch(r"process_(\d+)-of-(\d+)\.json", path.name).groups())
            found[index] = (count, path)
        counts = {count for count, _ in found.values()}
        if len(counts) != 1 or sorted(found) != list(range(next(iter(counts)))):
            raise ValueError(f"data positions of checkpoint step {step} are incomplete: "
                             f"{sorted(path.name for _, path in found.values())}")
        return [json.loads(found[index][1].read_text()) for index in sorted(found)]

    def restore_latest(self, abstract_state: TrainState, iterator: grain.DatasetIterator) -> TrainState | None:
        """The state of the newest good checkpoint, arrays placed as in `abstract_state`
        (ShapeDtypeStructs with shardings, e.g. `abstract_like(fresh_state)`), with `iterator`
        moved to its saved position; None (iterator untouched) if the directory holds no
        checkpoint. Unreadable newer checkpoints are set aside with a warning; ValueError if none
        is readable."""
        failures = []
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(step, abstract_state, iterator)
            except shards.ProcessLayoutError:
                raise  # readable, but by another process count: not corrupt, so not set aside
            except Exception as err:  # orbax/tensorstore raise many types; each means "unreadable"
                log.warning("checkpoint step %d in %s is unreadable (%s); trying the previous one",
                            step, self.directory, _summary(err))
                failures.append((step, err))
                continue
            for bad_step, _ in failures:
                self._set_aside(bad_step)
            return restored
        if failures:
            listing = "; ".join(f"step {s}: {_summary(e)}" for s, e in failures)
            raise ValueError(f"no readable checkpoint in {self.directory}: {listing}")
        return None


def restore_params(directory: str | os.PathLike, abstract_params):
    """The params alone of the newest checkpoint a `Checkpointer` wrote in `directory` (the optimizer
    state is not read), restored onto the shapes, dtypes and shardings of `abstract_params`
    (ShapeDtypeStructs; no sharding: the default device) and verified against the fingerprint."""
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    manager = ocp.CheckpointManager(directory)
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        item = {"params": abstract_params}
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                         restore_args=ocp.checkpoint_utils.construct_restore_args(item)),
            meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    params = restored.state["params"]
    expected = restored.meta["fingerprint"]
    actual = {".params" + name: value for name, value in fingerprint(params).items()}
    bad = sorted(k for k in actual if expected.get(k) != actual[k])
    if bad:
        raise ValueError(f"params of checkpoint step {step} in {directory} do not match its fingerprint "
                         f"(different model config, or corrupt): {bad[:5]}")
    return params
