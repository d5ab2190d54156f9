"""Progress-balanced shard sampling (Eq. 2) and per-shard learning-rate schedules (Eq. 3).

Workers draw a data shard each time they become free, favouring shards that are behind their
share of the data; each shard keeps its own learning-rate schedule indexed by the local steps
taken on it so far (arXiv 2401.09135).
"""

import math
from typing import Sequence

import numpy as np


def _as_counts(values: Sequence[int], name: str, minimum: int) -> list[int]:
    counts = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name}[{i}]={value!r} must be an integer >= {minimum}")
        counts.append(int(value))
    return counts


def shard_probabilities(shard_sizes: Sequence[int], consumed: Sequence[int]) -> np.ndarray:
    """Probability of drawing each shard: p_i ∝ max(|D_i|/Σ|D| − n_i/Σn, 0).

    n_i counts what was consumed from shard i (any unit proportional to examples, e.g. local
    steps at a fixed batch size). When nothing was consumed yet or no shard is behind its share
    (every p_i = 0), the draw is uniform over the shards with the smallest n_i/|D_i| — in both
    cases every shard.
    """
    sizes = _as_counts(shard_sizes, "shard_sizes", 1)
    used = _as_counts(consumed, "consumed", 0)
    if not sizes:
        raise ValueError("shard_sizes is empty: give at least one shard")
    if len(used) != len(sizes):
        raise ValueError(f"consumed has {len(used)} entries but there are {len(sizes)} shards")
    total_size, total_used = sum(sizes), sum(used)
    # |D_i|/Σ|D| − n_i/Σn scaled by Σ|D|·Σn, exact in integers.
    deficits = [max(size * total_used - n * total_size, 0) for size, n in zip(sizes, used)]
    if sum(deficits) == 0:
        # Nothing consumed yet, or no shard behind its share: the unclipped deficits sum to 0, so
        # all are 0 and every n_i/|D_i| is equal; the least-visited shards are all shards.
        deficits = [1] * len(sizes)
    total = sum(deficits)
    return np.asarray([d / total for d in deficits], dtype=np.float64)


def sample_shard(rng: np.random.Generator, shard_sizes: Sequence[int], consumed: Sequence[int]) -> int:
    """Draw one shard index with `shard_probabilities` using the given seeded generator."""
    probs = shard_probabilities(shard_sizes, consumed)
    return int(rng.choice(len(probs), p=probs))


def shard_learning_rate(shard_step: int, *, peak: float, final: float, warmup: int, total: int) -> float:
    """Inner learning rate at local step `shard_step` of one shard's own schedule.

    Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to `final` > 0 at step
    `total`; progress is clamped to [0, 1], so training past `total` continues at `final`.
    Same values as `optax.warmup_cosine_decay_schedule(0, peak, warmup, total, final)`.
    """
    if isinstance(shard_step, bool) or not isinstance(shard_step, (int, np.integer)) or shard_step < 0:
        raise ValueError(f"shard_step={shard_step!r} must be an integer >= 0")
    if not peak > 0:
        raise ValueError(f"peak={peak} must be > 0")
    if not 0 < final <= peak:
        raise ValueError(f"final={final} must lie in (0, peak={peak}]")
    if not (isinstance(total, (int, np.integer)) and total >= 1):
        raise ValueError(f"total={total!r} must be an integer >= 1")
    if not (isinstance(warmup, (int, np.integer)) and 0 <= warmup < total):
        raise ValueError(f"warmup={warmup!r} must be an integer in [0, total={total})")
    if shard_step < warmup:
        return peak * shard_step / warmup
    progress = min((shard_step - warmup) / (total - warmup), 1.0)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
