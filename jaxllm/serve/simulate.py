"""Discrete-event simulation of the engine's scheduling policies under a roofline pass cost.

SplitFuse's gain (DeepSpeed-FastGen, arXiv 2401.08671) rests on the cost curve of one forward
pass: on an accelerator a pass costs about the same from one token up to the ridge point (weights
are streamed from HBM once per pass whatever the token count), so fusing prompt chunks into
decode passes is almost free. On a small CPU a pass costs about linearly in its tokens. This
module replays the *real* `Scheduler` (every policy, admission, chunking, preemption and bucket
padding as the engine runs them) in simulated time, with each pass priced by a roofline model, so
the policies can be compared where the premise holds without the hardware.

Cost of one pass (`pass_cost`), for a Llama on `devices` tensor-parallel chips:
- FLOPs: 2 x block matmul parameters per (padded) token, 2 x d_model x vocab per row for the LM
  head (one row per sequence), and attention 2 x 2 x H x K per (query, key) pair of each layer:
  a row of n new tokens after c cached ones has n c + n (n + 1) / 2 pairs.
- HBM bytes: every matmul weight once, the K/V of every row's keys read (c + n tokens) and the
  new K/V written (n tokens). Activations are not counted.
- Collectives: two all-reduces of [T, d_model] activations per layer (Megatron tensor
  parallelism), ring cost 2 (p - 1) / p x bytes per device over the link.
- time = max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth) + collectives + a fixed
  per-pass overhead (kernel launches, host planning, collective latencies).
Weights and K/V are split evenly over the devices.
"""
from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Sequence

import numpy as np

from jaxllm.model.flops import matmul_params
from jaxllm.model.llama import LlamaConfig
from jaxllm.serve.sampling import SamplingParams
from jaxllm.serve.scheduler import Scheduler, SchedulerConfig
from jaxllm.serve.sequence import StepPlan


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One serving replica: `devices` chips, each with `peak_flops` (dense matmul FLOP/s at the
    compute dtype) and `hbm_bandwidth` (bytes/s), of which the `*_efficiency` fractions are
    achievable; `link_bandwidth` (bytes/s per chip, one direction) carries tensor-parallel
    all-reduces; `pass_overhead_s` is paid once per pass."""
    name: str
    peak_flops: float
    hbm_bandwidth: float
    devices: int = 1
    link_bandwidth: float = 0.0
    pass_overhead_s: float = 0.0
    compute_efficiency: float = 1.0
    memory_efficiency: float = 1.0

    def __post_init__(self):
        for name in ("peak_flops", "hbm_bandwidth", "devices"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Hardware.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("compute_efficiency", "memory_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"Hardware.{name} must be in (0, 1], got {getattr(self, name)!r}")
        if self.link_bandwidth < 0 or self.pass_overhead_s < 0:
            raise ValueError(f"link_bandwidth and pass_overhead_s must be >= 0, got {self.link_bandwidth!r}, "
                             f"{self.pass_overhead_s!r}")
        if self.devices > 1 and self.link_bandwidth == 0:
            raise ValueError(f"{self.devices} tensor-parallel devices need a link_bandwidth")


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """A Llama's shapes and the bytes it stores per weight, per K/V element and per activation
    (collectives); e.g. weight_bytes 1 for int8 weights with bfloat16 compute."""
    cfg: LlamaConfig
    weight_bytes: float = 2.0
    kv_bytes: float = 2.0
    act_bytes: float = 2.0

    def __post_init__(self):
        for name in ("weight_bytes", "kv_bytes", "act_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelCost.{name} must be positive, got {getattr(self, name)!r}")

    @property
    def kv_bytes_per_token(self) -> float:
        c = self.cfg
        return 2 * c.n_layers * c.n_kv_heads * c.head_dim * self.kv_bytes


@dataclasses.dataclass(frozen=True)
class PassCost:
    """Work of one pass (totals over devices) and its time; `bound` is "compute" or "memory"."""
    flops: float
    hbm_bytes: float
    link_bytes: float
    seconds: float
    bound: str


def pass_cost(model: ModelCost, hw: Hardware, num_tokens: int, new_R: Sequence[int],
              cached_R: Sequence[int]) -> PassCost:
    """Roofline cost of a pass of `num_tokens` (padded) tokens whose rows feed `new_R[r]` tokens
    after `cached_R[r]` already cached ones (module docstring)."""
    new_R, cached_R = np.asarray(new_R, np.float64), np.asarray(cached_R, np.float64)
    if new_R.shape != cached_R.shape or (new_R < 1).any() or (cached_R < 0).any():
        raise ValueError(f"need one (new >= 1, cached >= 0) pair per row, got {new_R.tolist()}, {cached_R.tolist()}")
    if num_tokens < new_R.sum():
        raise ValueError(f"num_tokens {num_tokens} is below the {int(new_R.sum())} tokens of the rows")
    c = model.cfg
    lm_head = c.d_model * c.vocab_size
    block = matmul_params(c) - lm_head
    pairs = float(np.sum(new_R * cached_R + new_R * (new_R + 1) / 2))
    flops = 2.0 * block * num_tokens + 2.0 * lm_head * len(new_R) + 4.0 * c.n_layers * c.n_heads * c.head_dim * pairs
    hbm = (block + lm_head) * model.weight_bytes + model.kv_bytes_per_token * float(np.sum(cached_R + 2 * new_R))
    p = hw.devices
    link = 2 * c.n_layers * 2 * (p - 1) / p * num_tokens * c.d_model * model.act_bytes  # per device
    compute_s = flops / (p * hw.peak_flops * hw.compute_efficiency)
    memory_s = hbm / (p * hw.hbm_bandwidth * hw.memory_efficiency)
    link_s = link / hw.link_bandwidth if p > 1 else 0.0
    return PassCost(flops, hbm, link * p, max(compute_s, memory_s) + link_s + hw.pass_overhead_s,
                    "compute" if compute_s >= memory_s else "memory")


def plan_cost(model: ModelCost, hw: Hardware, plan: StepPlan) -> PassCost:
    """`pass_cost` of a scheduler plan: its padded token count and per-row (new, cached) tokens."""
    new_R = np.asarray(plan.num_tokens)
    cached_R = np.asarray(plan.batch.context_len_S[:len(new_R)]) - new_R
    return pass_cost(model, hw, len(plan.batch.tokens_T), new_R, cached_R)


@dataclasses.dataclass(frozen=True)
class SimRequest:
    arrival: float
    prompt_len: int
    max_tokens: int


@dataclasses.dataclass(frozen=True)
class SimResult:
    """`records` in request order ({"arrival", "prompt_len", "times"}, as `jaxllm.serve.sla` reads them);
    per pass: its scheduled tokens, padded tokens and duration."""
    records: list[dict]
    pass_tokens: np.ndarray
    pass_padded: np.ndarray
    pass_seconds: np.ndarray
    num_preemptions: int


def simulate(cfg: SchedulerConfig, requests: Sequence[SimRequest], pass_time: Callable[[StepPlan], float], *,
             clients: int | None = None) -> SimResult:
    """Serve `requests` with a fresh `Scheduler(cfg)` in simulated time: each pass takes
    `pass_time(plan)` seconds, and its sampled tokens arrive at its end. Open loop by default
    (requests sent at their `arrival`); with `clients` = N, closed loop as FastGen's benchmark:
    N clients each send their next request (client c sends c, c + N, ...) when the previous one
    finishes, and `arrival` is ignored. Requests that arrive during a pass join before the next
    one. Output lengths are exact (no stop tokens). Deterministic."""
    if clients is not None and clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    sched = Scheduler(cfg)
    pending = ([(0.0, i) for i in range(min(clients, len(requests)))] if clients
               else sorted((r.arrival, i) for i, r in enumerate(requests)))
    heapq.heapify(pending)
    arrival = {}
    times: list[list[float]] = [[] for _ in requests]
    now, passes = 0.0, []
    while pending or sched.has_unfinished():
        if not sched.has_unfinished():
            now = max(now, pending[0][0])
        while pending and pending[0][0] <= now:
            t, i = heapq.heappop(pending)
            arrival[i] = t
            sched.add(i, [0] * requests[i].prompt_len, SamplingParams(max_tokens=requests[i].max_tokens))
        plan = sched.schedule()
        if plan is None:
            raise RuntimeError(f"the scheduler planned nothing with {len(sched.waiting)} requests waiting")
        dt = float(pass_time(plan))
        if not dt > 0:
            raise ValueError(f"pass_time must be positive, got {dt} for a pass of {plan.num_scheduled_tokens} tokens")
        now += dt
        passes.append((plan.num_scheduled_tokens, len(plan.batch.tokens_T), dt))
        S = len(plan.batch.sample_S)
        finished = sched.update(plan, np.zeros(S, np.int32), np.zeros(S, np.float32))
        for s, seq in enumerate(plan.seqs):
            if plan.batch.sample_S[s]:
                times[seq.request_index].append(now)
        for seq in finished:
            nxt = seq.request_index + (clients or 0)
            if clients and nxt < len(requests):
                heapq.heappush(pending, (now, nxt))
    records = [{"arrival": arrival[i], "prompt_len": r.prompt_len, "times": times[i]} for i, r in enumerate(requests)]
    tokens, padded, seconds = (np.asarray(x) for x in zip(*passes)) if passes else (np.zeros(0),) * 3
    return SimResult(records, tokens, padded, seconds, sched.num_preemptions)


def poisson_requests(rng: np.random.Generator, n: int, rate: float, prompt_mean: float, gen_mean: float,
                     prompt_cap: int) -> list[SimRequest]:
    """FastGen's synthetic workload: prompt and output lengths ~ Normal(mean, 0.3 mean), rounded,
    clipped to [1, prompt_cap] (prompts) and >= 1 (outputs); Poisson arrivals at `rate`/s (all at
    0 when rate is inf)."""
    if n < 1 or rate <= 0:
        raise ValueError(f"need n >= 1 and rate > 0, got n={n}, rate={rate}")
    prompts = np.clip(np.round(rng.normal(prompt_mean, 0.3 * prompt_mean, n)), 1, prompt_cap).astype(int)
    gens = np.maximum(np.round(rng.normal(gen_mean, 0.3 * gen_mean, n)), 1).astype(int)
    arrivals = np.zeros(n) if np.isinf(rate) else np.cumsum(rng.exponential(1.0 / rate, n))
    return [SimRequest(float(a), int(p), int(g)) for a, p, g in zip(arrivals, prompts, gens)]
