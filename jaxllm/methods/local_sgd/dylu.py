"""Dynamic local updates (DyLU, arXiv 2401.09135 Eq. 6): local steps proportional to worker speed."""

from typing import Sequence

import numpy as np

MICROSECONDS_PER_SECOND = 1_000_000


def to_microseconds(seconds: float, name: str) -> int:
    """Quantise a duration to integer microseconds (exact tie handling in the simulator).

    `name` identifies the value in the error raised when it is not finite or negative.
    """
    if not np.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name}={seconds} must be a finite duration >= 0 seconds")
    return int(round(seconds * MICROSECONDS_PER_SECOND))


def step_microseconds(seconds_per_step: Sequence[float]) -> np.ndarray:
    """Per-worker step time in integer microseconds; ValueError naming a worker whose speed is ≤ 0."""
    times_us = []
    for worker, seconds in enumerate(seconds_per_step):
        if not np.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"seconds_per_step[{worker}]={seconds} of worker {worker} must be > 0")
        step_us = to_microseconds(seconds, f"seconds_per_step[{worker}]")
        if step_us < 1:
            raise ValueError(
                f"seconds_per_step[{worker}]={seconds} of worker {worker} is below the 1 µs time resolution"
            )
        times_us.append(step_us)
    if not times_us:
        raise ValueError("seconds_per_step is empty: give one step time per worker")
    return np.asarray(times_us, dtype=np.int64)


def dylu_steps(seconds_per_step: Sequence[float], base_steps: int, min_steps: int = 1) -> np.ndarray:
    """Local steps per worker so that every worker finishes a round in about the fastest one's time.

    steps_w = max(min_steps, ⌊v_w / max_w′ v_w′ · H⌋) with speed v = 1 / seconds_per_step and
    H = base_steps, the fastest worker's count. Step times are quantised to microseconds first (as
    in the simulator) and the floor is taken in integer arithmetic, so decimal speeds give exact
    results (e.g. 0.1 s vs 0.3 s with H = 30 gives 10 steps, never 9).
    """
    if isinstance(base_steps, bool) or not isinstance(base_steps, (int, np.integer)) or base_steps < 1:
        raise ValueError(f"base_steps={base_steps!r} must be an integer >= 1")
    if isinstance(min_steps, bool) or not isinstance(min_steps, (int, np.integer)) or min_steps < 1:
        raise ValueError(f"min_steps={min_steps!r} must be an integer >= 1")
    step_us = step_microseconds(seconds_per_step)
    return np.maximum(min_steps, (int(base_steps) * step_us.min()) // step_us)
