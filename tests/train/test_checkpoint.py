"""Checkpointer: exact round trip, verified restore (corrupt / half-written / all-bad), resharding,
and a failed save that must not cost the last good checkpoint."""
import gc
import logging
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.train import checkpoint
from jaxllm.train.state import TrainState

# Reads of deliberately corrupted files leave orbax coroutines that are collected with an
# "exception ignored" note; the errors that matter are the ones restore_latest raises or logs.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def collect_aborted_reads():
    """Collects those coroutines while this module's warning filter applies."""
    yield
    gc.collect()


def make_state(step: int, seed: int = 0) -> TrainState:
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"w": jax.random.normal(k1, (64, 32)), "b": jax.random.normal(k2, (32,)),
              "scale": jnp.ones((16,), jnp.bfloat16)}
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=optax.adam(1e-3).init(params),
                      rng=jax.random.key_data(jax.random.key(seed + 100)))


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def data_iterator(position: int = 0):
    """A grain iterator over 0, 1, 2, ... that has yielded `position` elements."""
    iterator = iter(grain.MapDataset.range(1000).shuffle(seed=3).to_iter_dataset())
    for _ in range(position):
        next(iterator)
    return iterator


def saved(directory, *steps, keep=3):
    """Checkpoints at `steps`; at step s the data iterator has yielded 10 s elements."""
    ckpt = checkpoint.Checkpointer(directory, keep=keep)
    iterator, position = data_iterator(), 0
    for s in steps:
        for _ in range(10 * s - position):
            next(iterator)
        assert ckpt.save(make_state(s, seed=s), iterator)
        next(iterator)  # moves on while the write runs in the background: the saved position must not
        position = 10 * s + 1
    ckpt.wait()
    return ckpt


def restored_latest(directory):
    """(state, the next element the restored data iterator yields)."""
    iterator = data_iterator()
    state = checkpoint.Checkpointer(directory).restore_latest(checkpoint.abstract_like(make_state(0)), iterator)
    return state, next(iterator)


def element(position: int):
    iterator = data_iterator(position)
    return next(iterator)


def largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in p.as_posix()]
    return max(files, key=lambda p: p.stat().st_size)


def test_round_trip_is_exact_and_keeps_n(tmp_path):
    ckpt = saved(tmp_path, 1, 2, 3, 4, keep=2)
    assert ckpt.all_steps() == [3, 4]
    assert [p.name for p in (tmp_path / "4" / "data").glob("process_*")] == ["process_0-of-1.json"]
    state, following = restored_latest(tmp_path)
    assert_same(state, make_state(4, seed=4))
    assert following == element(40)
    assert not ckpt.save(make_state(4, seed=4), data_iterator()), "a step that exists must not be rewritten"
    ckpt.close()


def test_empty_directory_restores_nothing(tmp_path):
    iterator = data_iterator(5)
    assert checkpoint.Checkpointer(tmp_path).restore_latest(checkpoint.abstract_like(make_state(0)), iterator) is None
    assert next(iterator) == element(5)


def test_flipped_bytes_in_latest_fall_back_to_previous(tmp_path, caplog):
    saved(tmp_path, 2, 4).close()
    target = largest_array_file(tmp_path / "4")
    data = bytearray(target.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING):
        state, following = restored_latest(tmp_path)
    assert_same(state, make_state(2, seed=2))
    assert following == element(20)
    assert any("step 4" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert (tmp_path / "4.corrupt").is_dir() and ckpt.all_steps() == [2]
    # The corrupt step's number is free again: a resumed run can save it.
    assert ckpt.save(make_state(4, seed=7), data_iterator(40))
    ckpt.wait()
    assert_same(restored_latest(tmp_path)[0], make_state(4, seed=7))
    ckpt.close()


def test_truncated_metadata_falls_back(tmp_path):
    saved(tmp_path, 2, 4).close()
    meta = tmp_path / "4" / "meta" / "metadata"
    meta.write_text(meta.read_text()[:10])
    state, following = restored_latest(tmp_path)
    assert int(state.step) == 2 and following == element(20)


def test_corrupt_data_position_falls_back(tmp_path):
    saved(tmp_path, 2, 4).close()
    (tmp_path / "4" / "data" / "process_0-of-1.json").write_text('{"next_index": ')
    state, following = restored_latest(tmp_path)
    assert int(state.step) == 2 and following == element(20)


def test_half_written_checkpoint_is_ignored(tmp_path):
    saved(tmp_path, 2).close()
    partial = tmp_path / "6.orbax-checkpoint-tmp-1700000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_text("{not json")
    assert checkpoint.Checkpointer(tmp_path).all_steps() == [2]
    state, _ = restored_latest(tmp_path)
    assert_same(state, make_state(2, seed=2))


def test_no_good_checkpoint_is_a_clear_error(tmp_path):
    saved(tmp_path, 2, 4).close()
    for step in (2, 4):
        target = largest_array_file(tmp_path / str(step))
        target.write_bytes(target.read_bytes()[:8])
    with pytest.raises(ValueError, match=r"no readable checkpoint.*step 4.*step 2"):
        restored_latest(tmp_path)
    assert (tmp_path / "4").is_dir() and (tmp_path / "2").is_dir(), "nothing is moved when nothing is good"


def test_failed_save_keeps_last_good(tmp_path, monkeypatch):
    """keep=1 and the next save fails in the background (disk full): step 2 must survive."""
    ckpt = saved(tmp_path, 2, keep=1)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", disk_full)
    with pytest.raises(OSError, match="checkpoint of step 4 in .*: No space left on device; "
                                      "the newest complete checkpoint, step 2, is intact"):
        ckpt.save(make_state(4, seed=4), data_iterator(40))
        ckpt.wait()
    ckpt.close()
    monkeypatch.undo()
    assert checkpoint.Checkpointer(tmp_path, keep=1).all_steps() == [2]
    state, following = restored_latest(tmp_path)
    assert_same(state, make_state(2, seed=2))
    assert following == element(20)


def test_full_tmpfs_is_one_oserror_naming_the_step_and_keeps_last_good(tmp_path):
    """A real full disk: tensorstore reports ENOSPC as ValueError('RESOURCE_EXHAUSTED: ...') with a
    page of spec; the caller must get one ENOSPC OSError naming the step and the intact checkpoint."""
    import errno
    import subprocess
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.decode().strip()}")

    def big_state(step):  # 1 MiB of random params (Adam's zero moments compress away): one fits in 1.5 MiB, not two
        params = {"w": jax.random.normal(jax.random.key(step), (256, 1024))}
        return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                          opt_state=optax.adam(1e-3).init(params), rng=jax.random.key_data(jax.random.key(step)))

    try:
        ckpt = checkpoint.Checkpointer(disk, keep=1)
        ckpt.save(big_state(1), data_iterator(10))
        ckpt.wait()
        with pytest.raises(OSError, match=r"checkpoint of step 2 in .*: No space left on device; "
                                          r"the newest complete checkpoint, step 1, is intact") as failure:
            ckpt.save(big_state(2), data_iterator(20))
            ckpt.wait()
        assert failure.value.errno == errno.ENOSPC
        ckpt.close()
        iterator = data_iterator()
        restored = checkpoint.Checkpointer(disk).restore_latest(checkpoint.abstract_like(big_state(0)), iterator)
        assert_same(restored, big_state(1))
        assert next(iterator) == element(10)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_restore_onto_another_mesh(tmp_path):
    saved(tmp_path, 3).close()
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = NamedSharding(mesh, PartitionSpec("fsdp"))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharded if x.ndim and
                                                           x.shape[0] % 8 == 0 else replicated), make_state(0))
    state = checkpoint.Checkpointer(tmp_path).restore_latest(abstract, data_iterator())
    assert state.params["w"].sharding == sharded
    assert_same(state, make_state(3, seed=3))


def test_fingerprint_sees_a_single_bit_and_a_swap():
    x = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
    base = checkpoint.fingerprint({"x": x})
    flipped = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(x, jnp.uint32).at[1, 2].add(1), jnp.float32)
    assert checkpoint.fingerprint({"x": flipped}) != base
    assert checkpoint.fingerprint({"x": x[::-1]})["['x']"][1] != base["['x']"][1]
    assert checkpoint.fingerprint({"x": x[::-1]})["['x']"][0] == base["['x']"][0]
