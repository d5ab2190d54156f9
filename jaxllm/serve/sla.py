"""Serving SLA metrics by DeepSpeed-FastGen's methodology (arXiv 2401.08671; DeepSpeedExamples
`benchmarks/inference/mii/src/{utils,plot_effective_throughput}.py`).

A run is a list of request records `{"arrival": s, "prompt_len": n, "times": [s, ...]}`: when the
request was sent and when each of its output tokens arrived, on one clock (wall or simulated).

- TTFT: arrival -> first token. TPOT: (last - first token) / (tokens - 1) per request.
- ITL: every gap between consecutive tokens of a request, pooled over requests after dropping the
  first and last request by arrival (FastGen's rule).
- Throughput: requests (output tokens) / (last token - first arrival).
- SLA: a request meets it iff TTFT <= prompt_len / prefill_rate and the exponential moving average
  of its ITLs (pandas `ewm(span=16)`, bias-adjusted) stays below the ITL limit 1 / r at every token
  (FastGen: prefill_rate 512 tokens/s, r in {2, 4, 6} tokens/s). Effective throughput =
  throughput x fraction of requests meeting the SLA.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def ema_exceeds(itls: np.ndarray, limit: float, span: int = 16) -> bool:
    """Whether the bias-adjusted EMA (pandas ewm(span)) of the ITLs ever reaches `limit`."""
    w, num, den = 1.0 - 2.0 / (span + 1), 0.0, 0.0
    for x in itls:
        num, den = x + w * num, 1.0 + w * den
        if num / den >= limit:
            return True
    return False


def tokens_per_s(records: list[dict]) -> float:
    """Output tokens over the time from the first arrival to the last token."""
    first = min(r["arrival"] for r in records)
    return sum(len(r["times"]) for r in records) / (max(r["times"][-1] for r in records) - first)


def summarize(records: list[dict], prefill_rate: float, itl_limits: Mapping[str, float]) -> dict:
    """Throughput, TTFT/TPOT/ITL statistics (seconds) and, per `itl_limits` entry (label -> ITL
    limit in s), the fraction meeting the SLA (`sla_<label>`) and effective requests/s
    (`eff_req_s_<label>`)."""
    if not records or any(not r["times"] for r in records):
        raise ValueError("every request record needs at least one token time")
    if prefill_rate <= 0:
        raise ValueError(f"prefill_rate must be positive, got {prefill_rate}")
    first = min(r["arrival"] for r in records)
    makespan = max(r["times"][-1] for r in records) - first
    ttft = np.array([r["times"][0] - r["arrival"] for r in records])
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in records if len(r["times"]) > 1]
    by_start = sorted(records, key=lambda r: r["arrival"])[1:-1]
    itl = np.concatenate([np.diff(r["times"]) for r in by_start] + [np.zeros(0)])
    out = {"requests": len(records), "req_s": len(records) / makespan,
           "tok_s": sum(len(r["times"]) for r in records) / makespan, "makespan_s": makespan,
           "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p95": float(np.percentile(ttft, 95)),
           "tpot_mean": float(np.mean(tpot)) if tpot else float("nan")}
    for q in (50, 90, 95, 99):
        out[f"itl_p{q}"] = float(np.percentile(itl, q)) if len(itl) else float("nan")
    for label, limit in itl_limits.items():
        ok = [r["times"][0] - r["arrival"] <= r["prompt_len"] / prefill_rate
              and not ema_exceeds(np.diff(r["times"]), limit) for r in records]
        out[f"sla_{label}"] = float(np.mean(ok))
        out[f"eff_req_s_{label}"] = out["req_s"] * out[f"sla_{label}"]
    return out
