"""Host side of Local-SGD: DyLU, shard sampling, per-shard LR, config validation, event simulator."""

import collections
import dataclasses

import numpy as np
import optax
import pytest

from jaxllm.methods.local_sgd import (
    LocalSGDConfig,
    dylu_steps,
    sample_shard,
    shard_learning_rate,
    shard_probabilities,
    simulate,
    utilisation,
    version_times,
)

TOY_SPEEDS = (0.58, 0.75, 1.51, 3.33)  # seconds per step of the authors' toy example


def _cfg(**overrides):
    base = dict(mode="async", num_workers=4, local_steps=20, total_local_steps=800, outer="delayed_nesterov",
                outer_lr=0.7, seconds_per_step=TOY_SPEEDS)
    return LocalSGDConfig(**(base | overrides))


def _summary(events):
    return [(e.worker, e.start, e.end, e.steps, e.version_start, e.version_after) for e in events]


# --- DyLU -----------------------------------------------------------------------------------------

def test_dylu_steps_follow_floor_formula_on_toy_speeds():
    # ⌊20 · 0.58 / s_w⌋ = 20, ⌊15.47⌋, ⌊7.68⌋, ⌊3.48⌋
    np.testing.assert_array_equal(dylu_steps(TOY_SPEEDS, 20), [20, 15, 7, 3])
    np.testing.assert_array_equal(dylu_steps(TOY_SPEEDS, 20, min_steps=5), [20, 15, 7, 5])
    np.testing.assert_array_equal(dylu_steps((0.3, 0.1), 30), [10, 30])  # exact despite binary 0.1/0.3


def test_dylu_steps_are_proportional_to_speed():
    rng = np.random.default_rng(0)
    seconds = np.round(rng.uniform(0.01, 2.0, size=32), 6)
    steps = dylu_steps(seconds, 100, min_steps=3)
    fastest_round = 100 * seconds.min()
    assert steps[np.argmin(seconds)] == 100
    floored = 3 * seconds > fastest_round  # even min_steps outlast the fastest worker's round
    assert floored.any() and not floored.all() and np.all(steps[floored] == 3)
    free, fastest_round = ~floored, fastest_round + 1e-9  # the rest fill the round to within one step
    assert np.all(steps[free] * seconds[free] <= fastest_round)
    assert np.all((steps[free] + 1) * seconds[free] > fastest_round)


@pytest.mark.parametrize("seconds, match", [((1.0, 0.0), r"seconds_per_step\[1\]=0.0 of worker 1"),
                                            ((-2.0, 1.0), r"seconds_per_step\[0\]=-2.0 of worker 0"),
                                            ((1.0, float("nan")), r"seconds_per_step\[1\]=nan of worker 1")])
def test_dylu_rejects_non_positive_speed(seconds, match):
    with pytest.raises(ValueError, match=match):
        dylu_steps(seconds, 10)


# --- shard sampling and per-shard learning rate ---------------------------------------------------

def test_shard_probabilities_follow_eq2():
    sizes, consumed = [1, 2, 3, 4], [3, 1, 4, 2]
    deficit = np.maximum(np.array(sizes) / 10 - np.array(consumed) / 10, 0)
    np.testing.assert_allclose(shard_probabilities(sizes, consumed), deficit / deficit.sum(), rtol=1e-12)
    assert shard_probabilities(sizes, consumed).sum() == pytest.approx(1.0)


def test_shard_probabilities_fall_back_to_least_visited_shards():
    # nothing consumed yet, or exact balance (every p_i = 0)
    np.testing.assert_array_equal(shard_probabilities([5, 7, 9], [0, 0, 0]), [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_array_equal(shard_probabilities([1, 2], [3, 6]), [0.5, 0.5])
    np.testing.assert_array_equal(shard_probabilities([3, 7, 10], [33, 77, 110]), [1 / 3, 1 / 3, 1 / 3])
    # otherwise only shards behind their share can be drawn
    assert shard_probabilities([1, 1], [0, 5]).tolist() == [1.0, 0.0]


def test_sampling_drains_shards_in_proportion_to_their_size():
    sizes = np.array([1, 2, 3, 4])
    rng, consumed = np.random.default_rng(0), np.zeros(4, dtype=np.int64)
    for _ in range(2000):
        consumed[sample_shard(rng, sizes, consumed)] += 1
    np.testing.assert_allclose(consumed / consumed.sum(), sizes / sizes.sum(), atol=5e-3)


def test_shard_sampling_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shard_sizes\[1\]=0"):
        shard_probabilities([1, 0], [0, 0])
    with pytest.raises(ValueError, match="consumed has 3 entries but there are 2 shards"):
        shard_probabilities([1, 1], [0, 0, 0])


def test_shard_learning_rate_matches_optax_warmup_cosine():
    peak, final, warmup, total = 4e-4, 4e-5, 10, 100
    reference = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, final)
    for step in [0, 1, 5, warmup, 37, 99, total, 2 * total]:
        assert shard_learning_rate(step, peak=peak, final=final, warmup=warmup, total=total) == pytest.approx(
            float(reference(step)), rel=1e-5)
    assert shard_learning_rate(2 * total, peak=peak, final=final, warmup=warmup, total=total) == final
    assert shard_learning_rate(warmup, peak=peak, final=final, warmup=warmup, total=total) == peak
    with pytest.raises(ValueError, match="final=0.0"):
        shard_learning_rate(0, peak=peak, final=0.0, warmup=warmup, total=total)


# --- config validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    ({"seconds_per_step": (0.5, 1.0, 0.0, 2.0)}, r"seconds_per_step\[2\]=0.0 of worker 2 must be > 0"),
    ({"seconds_per_step": (0.5, -1.0, 1.0, 2.0)}, r"seconds_per_step\[1\]=-1.0 of worker 1"),
    ({"seconds_per_step": (0.5, 1.0)}, "seconds_per_step has 2 entries for num_workers=4"),
    ({"buffer_size": 0}, "buffer_size=0"),
    ({"activation": 0.3}, r"activation=0.3 must lie in \[0, 1/buffer_size\] = \[0, 0.25\]"),
    ({"buffer_size": 2, "activation": 0.75}, "activation=0.75"),
    ({"mode": "semi"}, "mode='semi'"),
    ({"outer": "adam"}, "outer='adam'"),
    ({"total_local_steps": 0}, "total_local_steps=0"),
    ({"min_local_steps": 30}, "min_local_steps=30 exceeds local_steps=20"),
    ({"seconds_per_step": (), "speed_ratio": 0.5}, "speed_ratio=0.5"),
    ({"grace_period": -1.0}, "grace_period=-1.0"),
    ({"shard_assignment": "fixed", "shard_sizes": (1, 2)}, "2 shards for num_workers=4"),
])
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**overrides)


def test_config_generated_speeds():
    geometric = _cfg(seconds_per_step=(), base_seconds_per_step=0.5, speed_ratio=6.0)
    np.testing.assert_allclose(geometric.worker_seconds_per_step(), 0.5 * 6.0 ** (np.arange(4) / 3), rtol=1e-12)
    random = [_cfg(seconds_per_step=(), speed_distribution="log_uniform", speed_ratio=6.0, seed=s) for s in (0, 1)]
    assert random[0].worker_seconds_per_step() != random[1].worker_seconds_per_step()
    for cfg in random:
        assert all(1.0 <= s <= 6.0 for s in cfg.worker_seconds_per_step())


# --- simulator ------------------------------------------------------------------------------------

def test_simulator_is_deterministic_per_seed_and_varies_across_seeds():
    cfg = _cfg(seconds_per_step=(), speed_distribution="log_uniform", speed_ratio=3.0, dylu=True, grace_period=0.5)
    assert simulate(cfg) == simulate(dataclasses.replace(cfg))
    other = simulate(dataclasses.replace(cfg, seed=1))
    assert _summary(simulate(cfg)) != _summary(other)
    # with fixed speeds a different seed still changes the shard draws only
    fixed = _cfg(grace_period=0.5)
    a, b = simulate(fixed), simulate(dataclasses.replace(fixed, seed=1))
    assert _summary(a) == _summary(b) and [e.shard for e in a] != [e.shard for e in b]


@pytest.mark.parametrize("overrides", [
    {}, {"dylu": True}, {"dylu": True, "min_local_steps": 5, "grace_period": 1.0, "comm_time": 0.3},
    {"mode": "sync", "outer": "nesterov"}, {"mode": "sync", "total_local_steps": 250},
    {"total_local_steps": 263, "dylu": True},
])
def test_simulator_respects_budget_and_event_semantics(overrides):
    cfg = _cfg(**overrides)
    events = simulate(cfg)
    assert sum(e.steps for e in events) == cfg.total_local_steps
    versions = [e.version_after for e in events]
    assert versions == sorted(versions) and versions[-1] == len(set(versions))
    step_time = dict(enumerate(cfg.worker_seconds_per_step()))
    by_worker = collections.defaultdict(list)
    for e in events:
        assert e.end == pytest.approx(e.start + e.steps * step_time[e.worker] + cfg.comm_time, abs=1e-6)
        assert e.version_start < e.version_after
        by_worker[e.worker].append(e)
    for jobs in by_worker.values():  # a worker runs one job at a time
        assert all(nxt.start_us >= prev.end_us for prev, nxt in zip(jobs, jobs[1:]))
    if cfg.mode == "async":  # a worker copies the latest model: every arrival up to its start
        ends = np.array([e.end_us for e in events])
        assert [e.version_start for e in events] == [int(np.sum(ends <= e.start_us)) for e in events]
    assert 0 < utilisation(events, cfg.num_workers) <= 1


def test_sync_rounds_wait_for_the_slowest_worker():
    cfg = _cfg(mode="sync", outer="nesterov", total_local_steps=240, comm_time=0.25)
    events = simulate(cfg)
    round_s = 20 * 3.33 + 0.25
    np.testing.assert_allclose(version_times(events), round_s * np.arange(4), rtol=1e-12)
    for r in range(3):
        round_events = events[4 * r: 4 * r + 4]
        assert [e.worker for e in round_events] == [e.shard for e in round_events] == [0, 1, 2, 3]
        assert [(e.start_us, e.steps, e.shard_step, e.version_start, e.version_after) for e in round_events] == [
            (r * 66_850_000, 20, 20 * r, r, r + 1)] * 4
    no_comm = simulate(dataclasses.replace(cfg, comm_time=0.0))
    assert utilisation(no_comm, 4) == pytest.approx(sum(TOY_SPEEDS) / (4 * 3.33))


def test_async_grace_period_by_hand():
    base = dict(num_workers=2, local_steps=10, total_local_steps=60, seconds_per_step=(1.0, 1.2))
    # grace 3 s: worker 1 (t=12) arrives inside worker 0's window (10 + 3), both restart at 13.
    wide = simulate(_cfg(grace_period=3.0, **base))
    assert _summary(wide) == [(0, 0, 10, 10, 0, 1), (1, 0, 12, 10, 0, 2), (0, 13, 23, 10, 2, 3),
                              (1, 13, 25, 10, 2, 4), (0, 26, 36, 10, 4, 5), (1, 26, 38, 10, 4, 6)]
    # grace 1 s: each arrival is alone in its window; the worker restarts 1 s later.
    narrow = simulate(_cfg(grace_period=1.0, **base))
    assert _summary(narrow) == [(0, 0, 10, 10, 0, 1), (1, 0, 12, 10, 0, 2), (0, 11, 21, 10, 1, 3),
                                (1, 13, 25, 10, 2, 4), (0, 22, 32, 10, 3, 5), (1, 26, 38, 10, 4, 6)]


@pytest.mark.parametrize("grace", [0.0, 0.5])
def test_async_with_equal_speeds_and_fixed_shards_reduces_to_sync(grace):
    common = dict(seconds_per_step=(1.0,) * 4, shard_assignment="fixed", total_local_steps=4 * 20 * 5)
    sync = simulate(_cfg(mode="sync", outer="nesterov", **common))
    asyn = simulate(_cfg(grace_period=grace, **common))
    assert [(e.worker, e.steps, e.shard, e.shard_step) for e in asyn] == [
        (e.worker, e.steps, e.shard, e.shard_step) for e in sync]
    assert [e.version_start for e in asyn] == [4 * e.version_start for e in sync]
    assert [e.version_after for e in asyn] == list(range(1, len(asyn) + 1))
    expected_starts = [(20 + grace) * e.version_start for e in sync]
    np.testing.assert_allclose([e.start for e in asyn], expected_starts, rtol=1e-12)


def test_simulated_async_run_drains_unequal_shards_evenly():
    cfg = _cfg(seconds_per_step=(), speed_distribution="log_uniform", speed_ratio=6.0, dylu=True,
               shard_sizes=(1, 2, 3, 4), total_local_steps=8000, grace_period=0.5)
    consumed = np.zeros(4)
    for e in simulate(cfg):
        consumed[e.shard] += e.steps
    np.testing.assert_allclose(consumed / consumed.sum(), np.array([1, 2, 3, 4]) / 10, atol=0.01)
