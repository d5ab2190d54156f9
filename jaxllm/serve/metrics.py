"""Prometheus metrics of a serving loop, named like vLLM's (`vllm:` -> `jaxllm:`).

Each `ServerMetrics` has its own registry, so several servers (or tests) in one process do not
collide. `render()` is the Prometheus text exposition of all of them.
"""
from __future__ import annotations

import prometheus_client as prom

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


class ServerMetrics:
    """Counters, gauges and latency histograms of one engine loop."""

    def __init__(self):
        self.registry = prom.CollectorRegistry()
        self._state = {"running": 0, "waiting": 0, "kv_usage": 0.0}
        self._prefix = [0, 0]  # prompt tokens looked up, served from the cache
        r = self.registry
        for name, key, doc in [("num_requests_running", "running", "Requests with samples running."),
                               ("num_requests_waiting", "waiting", "Requests waiting to be admitted."),
                               ("kv_cache_usage_perc", "kv_usage",
                                "KV blocks held by live sequences over the pool (0-1).")]:
            prom.Gauge(f"jaxllm:{name}", doc, registry=r).set_function(lambda key=key: self._state[key])
        self._prefix_queries = prom.Counter("jaxllm:prefix_cache_queries", "Prompt tokens looked up.", registry=r)
        self._prefix_hits = prom.Counter("jaxllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                                         registry=r)
        prom.Gauge("jaxllm:prefix_cache_hit_rate", "Prefix-cache hits over prompt tokens looked up.",
                   registry=r).set_function(self._hit_rate)
        self.prompt_tokens = prom.Counter("jaxllm:prompt_tokens", "Prompt tokens received.", registry=r)
        self.generation_tokens = prom.Counter("jaxllm:generation_tokens", "Tokens generated.", registry=r)
        self.aborts = prom.Counter("jaxllm:request_aborts", "Requests aborted (client gone, timeout).",
                                   registry=r)
        self.time_to_first_token = prom.Histogram("jaxllm:time_to_first_token_seconds", "Time to first token.",
                                                  buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = prom.Histogram("jaxllm:inter_token_latency_seconds",
                                                  "Time between tokens of one sample.", buckets=LATENCY_BUCKETS,
                                                  registry=r)

    def set_state(self, *, running: int, waiting: int, kv_usage: float) -> None:
        self._state.update(running=running, waiting=waiting, kv_usage=kv_usage)

    def record_prefix(self, queries: int, hits: int) -> None:
        """One finished request's prompt tokens and how many of them the prefix cache served."""
        self._prefix[0] += queries
        self._prefix[1] += hits
        self._prefix_queries.inc(queries)
        self._prefix_hits.inc(hits)

    def _hit_rate(self) -> float:
        return self._prefix[1] / self._prefix[0] if self._prefix[0] else 0.0

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)
