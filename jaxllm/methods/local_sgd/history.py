"""What a Local-SGD run records: the jobs handed to workers, the pseudo-gradients accepted
(`Arrival`) or refused (`Rejection`), and the evaluations of the global model (`History`)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of worker work: `steps` inner steps on `shard` from shard step `shard_step`,
    starting from global version `version_start`."""

    job_id: int
    worker: int
    shard: int
    shard_step: int
    steps: int
    version_start: int


@dataclasses.dataclass(frozen=True)
class Arrival:
    """An accepted pseudo-gradient: its job, the outer update it joined, when, and its mean
    inner loss. staleness = updates applied between the job's copy and its own update."""

    job_id: int
    worker: int
    steps: int
    version_start: int
    version_after: int
    time: float
    train_loss: float

    @property
    def staleness(self) -> int:
        return self.version_after - 1 - self.version_start


@dataclasses.dataclass(frozen=True)
class Rejection:
    job_id: int
    worker: int
    reason: str


@dataclasses.dataclass
class History:
    """Evaluations of the global model (at version 0, every `eval_every` outer updates and at
    the end): version, time in seconds (simulated for replayed events, wall-clock for live
    schedules), synced local steps so far, and eval loss (NaN without an eval_fn). Plus every
    accepted arrival and every refused push."""

    version: list[int] = dataclasses.field(default_factory=list)
    time: list[float] = dataclasses.field(default_factory=list)
    local_steps: list[int] = dataclasses.field(default_factory=list)
    eval_loss: list[float] = dataclasses.field(default_factory=list)
    arrivals: list[Arrival] = dataclasses.field(default_factory=list)
    rejections: list[Rejection] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able copy (arrivals and rejections as lists of dicts)."""
        return {**{k: list(getattr(self, k)) for k in ("version", "time", "local_steps", "eval_loss")},
                "arrivals": [dataclasses.asdict(a) for a in self.arrivals],
                "rejections": [dataclasses.asdict(r) for r in self.rejections]}

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        """Inverse of `to_dict`."""
        return cls(**{k: list(d[k]) for k in ("version", "time", "local_steps", "eval_loss")},
                   arrivals=[Arrival(**a) for a in d["arrivals"]], rejections=[Rejection(**r) for r in d["rejections"]])
