"""ShardedBatches: the global batch does not depend on how many processes read the shards, and a
position saved by one process layout resumes in another (through the Checkpointer too)."""
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.data import shards
from jaxllm.train import checkpoint
from jaxllm.train.state import TrainState

EXAMPLES = 96


def open_shard(index, count, rows):
    """Batches of `rows` example ids of shard `index` of `count`, shuffled within the shard: the
    same shard rule as `sources.lm_batches`, small enough to check by value."""
    ds = grain.MapDataset.range(EXAMPLES)[index::count].shuffle(seed=7).repeat(None)
    return iter(ds.map(lambda i: {"id": np.asarray([i])}).batch(rows))


def take(iterator, n):
    return [next(iterator)["id"][:, 0].tolist() for _ in range(n)]


def as_process(monkeypatch, index, count):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


def test_global_batch_is_the_shards_batches_in_shard_order():
    stream = shards.ShardedBatches(open_shard, global_batch=8, shard_count=2)
    first, second = open_shard(0, 2, 4), open_shard(1, 2, 4)
    for batch in take(stream, 3):
        assert batch == next(first)["id"][:, 0].tolist() + next(second)["id"][:, 0].tolist()
    assert stream.shards == range(0, 2)


def test_two_processes_rows_concatenated_equal_one_process_reading_both_shards(monkeypatch):
    as_process(monkeypatch, 0, 2)
    p0 = shards.ShardedBatches(open_shard, global_batch=8)
    as_process(monkeypatch, 1, 2)
    p1 = shards.ShardedBatches(open_shard, global_batch=8)
    two = [a + b for a, b in zip(take(p0, 4), take(p1, 4))]
    as_process(monkeypatch, 0, 1)
    assert take(shards.ShardedBatches(open_shard, global_batch=8, shard_count=2), 4) == two
    assert p1.shards == range(1, 2) and len(two[0]) == 8


def test_positions_of_two_processes_resume_in_one_and_one_resumes_in_two(monkeypatch):
    as_process(monkeypatch, 0, 2)
    p0 = shards.ShardedBatches(open_shard, global_batch=8)
    as_process(monkeypatch, 1, 2)
    p1 = shards.ShardedBatches(open_shard, global_batch=8)
    take(p0, 3), take(p1, 3)
    saved = [json.loads(json.dumps(p0.get_state())), json.loads(json.dumps(p1.get_state()))]  # as written to disk
    expected = [a + b for a, b in zip(take(p0, 5), take(p1, 5))]

    as_process(monkeypatch, 0, 1)
    one = shards.ShardedBatches(open_shard, global_batch=8)  # would start a fresh 1-shard stream
    one.set_global_state(saved)
    assert one.shard_count == 2
    assert take(one, 2) == expected[:2]

    resaved = [json.loads(json.dumps(one.get_state()))]  # one process's file, holding both shards
    halves = []
    for index in (0, 1):
        as_process(monkeypatch, index, 2)
        again = shards.ShardedBatches(open_shard, global_batch=8)
        again.set_global_state(resaved)
        halves.append(take(again, 3))
    assert [a + b for a, b in zip(*halves)] == expected[2:]


def test_plain_per_process_positions_are_read_as_one_shard_per_process(monkeypatch):
    readers = [open_shard(p, 2, 4) for p in range(2)]
    for reader in readers:
        take(reader, 2)
    saved = [reader.get_state() for reader in readers]
    expected = [a + b for a, b in zip(take(readers[0], 2), take(readers[1], 2))]
    as_process(monkeypatch, 0, 1)
    one = shards.ShardedBatches(open_shard, global_batch=8)
    one.set_global_state(saved)
    assert take(one, 2) == expected


def test_bad_layouts_are_named(monkeypatch):
    as_process(monkeypatch, 1, 2)
    with pytest.raises(shards.ProcessLayoutError, match="3 data shards cannot be split over 2 process"):
        shards.ShardedBatches(open_shard, global_batch=6, shard_count=3)
    with pytest.raises(ValueError, match="global batch 6 is not divisible by the 4 data shards"):
        shards.ShardedBatches(open_shard, global_batch=6, shard_count=4)
    stream = shards.ShardedBatches(open_shard, global_batch=8)
    with pytest.raises(shards.ProcessLayoutError, match=r"no entry for shard\(s\) \[1\] of 2; it holds \['0'\]"):
        stream.set_state({"shard_count": 2, "positions": {"0": open_shard(0, 2, 4).get_state()}})
    with pytest.raises(ValueError, match="disagree on the shard count: 2 and 4"):
        stream.set_global_state([{"shard_count": 2, "positions": {}}, {"shard_count": 4, "positions": {}}])


def small_state(step):
    params = {"w": jnp.arange(12.0).reshape(3, 4) * step}
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=(), rng=jax.random.key_data(jax.random.key(0)))


def test_checkpointer_resumes_a_checkpoint_of_two_processes_in_one(tmp_path, monkeypatch):
    """The data files of a 2-process job are two `process_i-of-2.json`; one process reads both."""
    reference = shards.ShardedBatches(open_shard, global_batch=8, shard_count=2)
    take(reference, 3)
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    ckpt.save(small_state(3), reference)
    expected = take(reference, 2)
    data = tmp_path / "3" / "data"
    whole = json.loads((data / "process_0-of-1.json").read_text())
    (data / "process_0-of-1.json").unlink()
    for p in (0, 1):
        part = {"shard_count": 2, "positions": {str(p): whole["positions"][str(p)]}}
        (data / f"process_{p}-of-2.json").write_text(json.dumps(part))

    stream = shards.ShardedBatches(open_shard, global_batch=8)
    state = checkpoint.Checkpointer(tmp_path).restore_latest(checkpoint.abstract_like(small_state(0)), stream)
    np.testing.assert_array_equal(state.params["w"], small_state(3).params["w"])
    assert take(stream, 2) == expected

    # A plain iterator cannot take those positions: a clear error, and the checkpoint stays.
    plain = open_shard(0, 1, 8)
    with pytest.raises(shards.ProcessLayoutError, match=r"different process count.*needs process_0-of-1"):
        checkpoint.Checkpointer(tmp_path).restore_latest(checkpoint.abstract_like(small_state(0)), plain)
    assert (tmp_path / "3").is_dir()
    # Three processes cannot split two shards: the same error class, nothing set aside.
    ckpt = checkpoint.Checkpointer(tmp_path)
    as_process(monkeypatch, 0, 3)
    with pytest.raises(shards.ProcessLayoutError, match="2 data shards cannot be split over 3"):
        ckpt.restore_latest(checkpoint.abstract_like(small_state(0)), shards.ShardedBatches(open_shard, global_batch=9))
    assert (tmp_path / "3").is_dir()
