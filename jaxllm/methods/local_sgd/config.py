"""`LocalSGDConfig`: one frozen description of a Local-SGD arm (sync DiLoCo or async variants)."""

import dataclasses
from typing import Literal

import numpy as np
import optax

from jaxllm import configs
from jaxllm.methods.local_sgd.dylu import dylu_steps, step_microseconds, to_microseconds
from jaxllm.methods.local_sgd.outer import check_outer_hyperparams, delayed_nesterov, outer_nesterov

MODES = ("sync", "async")
OUTER_KINDS = ("nesterov", "delayed_nesterov", "sgd")
SPEED_DISTRIBUTIONS = ("geometric", "log_uniform")
SHARD_ASSIGNMENTS = ("sampled", "fixed")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LocalSGDConfig:
    """Timing, data and outer-optimizer settings of one Local-SGD arm.

    mode: "sync" (DiLoCo rounds with a barrier, one outer step on the mean pseudo-gradient of the
      round) or "async" (one outer step per arrival; free workers restart from the latest model).
    num_workers: k. local_steps: H, the local steps of the fastest worker (of every worker
      without DyLU). total_local_steps: t_max, the budget of local steps summed over all workers
      and jobs; equal across arms so that they are compared at equal compute.
    outer: "nesterov" (naive per-arrival Nesterov in async mode), "delayed_nesterov", or "sgd"
      (outer Nesterov with β = 0). outer_lr: ε. outer_momentum: β.
    buffer_size: N of delayed Nesterov (None → num_workers). activation: c ∈ [0, 1/N].
    dylu: local steps ∝ worker speed (`dylu_steps`), floored at min_local_steps.
    grace_period: seconds the server waits after an arrival for further arrivals before
      restarting the free workers (async only).
    seconds_per_step: explicit per-worker step time; when empty the times are drawn from
      speed_distribution: "geometric" gives s_w = base_seconds_per_step · speed_ratio^(w/(k−1))
      (deterministic), "log_uniform" gives s_w = base_seconds_per_step · speed_ratio^u_w with
      u_w ~ U(0, 1) from `seed`. speed_ratio ρ ≥ 1 bounds max/min step time (ρ = 1: equal speeds).
    comm_time: seconds added to every job to send its pseudo-gradient.
    shard_sizes: relative data-shard sizes (() → num_workers equal shards).
    shard_assignment: "sampled" (progress-balanced draw when a worker becomes free) or "fixed"
      (worker w always trains shard w; needs one shard per worker); None → "fixed" in sync mode,
      "sampled" in async mode.
    seed: seeds the speed draw and the shard draws (independent streams).
    Times are quantised to integer microseconds so that ties are exact.
    """

    mode: Literal["sync", "async"]
    num_workers: int
    local_steps: int
    total_local_steps: int
    outer: Literal["nesterov", "delayed_nesterov", "sgd"]
    outer_lr: float
    outer_momentum: float = 0.9
    buffer_size: int | None = None
    activation: float = 0.0
    dylu: bool = False
    min_local_steps: int = 1
    grace_period: float = 0.0
    seconds_per_step: tuple[float, ...] = ()
    speed_distribution: Literal["geometric", "log_uniform"] = "geometric"
    base_seconds_per_step: float = 1.0
    speed_ratio: float = 1.0
    comm_time: float = 0.0
    shard_sizes: tuple[int, ...] = ()
    shard_assignment: Literal["sampled", "fixed"] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        if self.outer not in OUTER_KINDS:
            raise ValueError(f"outer={self.outer!r} must be one of {OUTER_KINDS}")
        if self.speed_distribution not in SPEED_DISTRIBUTIONS:
            raise ValueError(f"speed_distribution={self.speed_distribution!r} must be one of {SPEED_DISTRIBUTIONS}")
        if self.shard_assignment not in SHARD_ASSIGNMENTS + (None,):
            raise ValueError(f"shard_assignment={self.shard_assignment!r} must be one of {SHARD_ASSIGNMENTS} or None")
        _check_int("num_workers", self.num_workers, 1)
        _check_int("local_steps", self.local_steps, 1)
        _check_int("total_local_steps", self.total_local_steps, 1)
        _check_int("min_local_steps", self.min_local_steps, 1)
        _check_int("seed", self.seed, 0)
        if self.min_local_steps > self.local_steps:
            raise ValueError(f"min_local_steps={self.min_local_steps} exceeds local_steps={self.local_steps}")
        check_outer_hyperparams(self.outer_lr, self.outer_momentum, self.resolved_buffer_size, self.activation)
        to_microseconds(self.grace_period, "grace_period")
        to_microseconds(self.comm_time, "comm_time")
        if self.seconds_per_step and len(self.seconds_per_step) != self.num_workers:
            raise ValueError(
                f"seconds_per_step has {len(self.seconds_per_step)} entries for num_workers={self.num_workers}"
            )
        if not (np.isfinite(self.base_seconds_per_step) and self.base_seconds_per_step > 0):
            raise ValueError(f"base_seconds_per_step={self.base_seconds_per_step} must be > 0")
        if not (np.isfinite(self.speed_ratio) and self.speed_ratio >= 1):
            raise ValueError(f"speed_ratio={self.speed_ratio} must be >= 1")
        step_microseconds(self.worker_seconds_per_step())
        for i, size in enumerate(self.shard_sizes):
            _check_int(f"shard_sizes[{i}]", size, 1)
        if self.resolved_shard_assignment == "fixed" and len(self.resolved_shard_sizes) != self.num_workers:
            raise ValueError(
                f"fixed shard assignment needs one shard per worker: {len(self.resolved_shard_sizes)} shards "
                f"for num_workers={self.num_workers}"
            )

    @classmethod
    def from_dict(cls, d) -> "LocalSGDConfig":
        """From a mapping (e.g. an ml_collections ConfigDict's `to_dict()`) through the one config
        bridge (`jaxllm.configs`): sequences become tuples, unknown fields raise ValueError naming them."""
        return configs.from_mapping(cls, d)

    @property
    def resolved_buffer_size(self) -> int:
        """N of delayed Nesterov: buffer_size, or num_workers when unset."""
        return self.num_workers if self.buffer_size is None else self.buffer_size

    @property
    def resolved_shard_sizes(self) -> tuple[int, ...]:
        return self.shard_sizes or (1,) * self.num_workers

    @property
    def resolved_shard_assignment(self) -> str:
        if self.shard_assignment is not None:
            return self.shard_assignment
        return "fixed" if self.mode == "sync" else "sampled"

    def worker_seconds_per_step(self) -> tuple[float, ...]:
        """Step time of each worker in seconds (explicit, or drawn from the speed distribution)."""
        if self.seconds_per_step:
            return tuple(float(s) for s in self.seconds_per_step)
        k = self.num_workers
        if self.speed_distribution == "geometric":
            exponents = np.arange(k) / max(k - 1, 1)
        else:
            exponents = np.random.default_rng([self.seed, 0]).uniform(0.0, 1.0, size=k)
        return tuple(float(s) for s in self.base_seconds_per_step * self.speed_ratio**exponents)

    def worker_local_steps(self) -> np.ndarray:
        """Local steps per job of each worker: DyLU counts, or H for every worker."""
        if self.dylu:
            return dylu_steps(self.worker_seconds_per_step(), self.local_steps, self.min_local_steps)
        return np.full(self.num_workers, self.local_steps, dtype=np.int64)

    @property
    def outer_settings(self) -> tuple:
        """(outer, outer_lr, outer_momentum, N, activation): all that defines the outer transform."""
        return (self.outer, self.outer_lr, self.outer_momentum, self.resolved_buffer_size, self.activation)

    def outer_optimizer(self) -> optax.GradientTransformation:
        """The outer transform, fed one pseudo-gradient per outer update (per arrival / sync round)."""
        return make_outer_optimizer(*self.outer_settings)


def make_outer_optimizer(outer: str, outer_lr: float, outer_momentum: float, buffer_size: int,
                         activation: float) -> optax.GradientTransformation:
    """The outer transform named by `outer` ("nesterov", "delayed_nesterov", or "sgd": β = 0)."""
    if outer == "delayed_nesterov":
        return delayed_nesterov(outer_lr, outer_momentum, buffer_size, activation)
    if outer not in OUTER_KINDS:
        raise ValueError(f"outer={outer!r} must be one of {OUTER_KINDS}")
    return outer_nesterov(outer_lr, outer_momentum if outer == "nesterov" else 0.0)
