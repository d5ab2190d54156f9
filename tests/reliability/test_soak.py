"""Short version of the serving soak (`benchmarks/soak.py`): the HTTP server on a random-weight
tiny model under concurrent mixed traffic with a fifth of hostile requests. Every well-formed
answer must equal `Engine.generate` on its prompt alone, every hostile request must get its status
(or be aborted when its client leaves), /health must answer 200 throughout, and afterwards no
request may be running or waiting and no KV block held."""
import pytest

from benchmarks import soak


@pytest.mark.slow  # 1-2 min on 2 busy cores: compiling the server's buckets and the references dominates
def test_short_soak_serves_every_request_right_and_leaks_nothing():
    stats = soak.soak(requests=100, duration=0, clients=4, hostile_frac=0.2, seed=1, warmup=4)
    assert stats["failed"] == 0, stats["failures"]
    assert stats["requests"] >= 100 and stats["hostile"] >= 10 and stats["greedy_checked"] >= 20
    assert stats["health_polls"] >= 1 and stats["unhealthy_polls"] == 0 and stats["loop_alive"]
    metrics = stats["server_metrics"]
    assert metrics["num_requests_running"] == 0 and metrics["num_requests_waiting"] == 0
    assert metrics["kv_cache_usage_perc"] == 0 and stats["held_blocks"] == 0
