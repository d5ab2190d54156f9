"""Discrete-event simulation of the scheduler and the roofline pass cost, against hand-computed
schedules and costs; serving metrics against pandas' EMA."""

import numpy as np
import pandas as pd
import pytest

from jaxllm.model import presets
from jaxllm.serve import sla
from jaxllm.serve.scheduler import SchedulerConfig
from jaxllm.serve.simulate import Hardware, ModelCost, SimRequest, pass_cost, plan_cost, poisson_requests, simulate

# vocab 10, d 8, 1 layer, 2 heads / 1 kv head of dim 4, d_ff 16: block matmul params
# 8·4·(2·2 + 2·1) + 3·8·16 = 192 + 384 = 576; LM head 8·10 = 80.
TINY = ModelCost(presets.get("tiny", vocab_size=10, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16),
                 weight_bytes=2, kv_bytes=2, act_bytes=2)
# One row, 3 new tokens after 5 cached, padded to 4 tokens:
# FLOPs = 2·576·4 + 2·80·1 + 4·1 layer·2 heads·4 dims·(3·5 + 3·4/2) = 4608 + 160 + 672 = 5440.
# bytes = (576 + 80)·2 + K/V per token (2·1·1·4·2 = 16)·(5 + 2·3) = 1312 + 176 = 1488.
FLOPS, BYTES = 5440.0, 1488.0


def test_pass_cost_compute_bound():
    hw = Hardware("slow-alu", peak_flops=1000.0, hbm_bandwidth=1e9, pass_overhead_s=0.5)
    cost = pass_cost(TINY, hw, 4, [3], [5])
    assert (cost.flops, cost.hbm_bytes) == (FLOPS, BYTES)
    assert cost.bound == "compute"
    np.testing.assert_allclose(cost.seconds, FLOPS / 1000.0 + 0.5, rtol=1e-12)


def test_pass_cost_memory_bound_with_efficiency():
    hw = Hardware("slow-hbm", peak_flops=1e12, hbm_bandwidth=100.0, memory_efficiency=0.5)
    cost = pass_cost(TINY, hw, 4, [3], [5])
    assert cost.bound == "memory"
    np.testing.assert_allclose(cost.seconds, BYTES / 50.0, rtol=1e-12)


def test_pass_cost_tensor_parallel():
    # 2 devices: work halves; 2 all-reduces of 4·8·2 = 64 bytes per layer, ring factor 2·1/2 = 1:
    # 128 bytes per device over a 10 B/s link = 12.8 s.
    hw = Hardware("tp2", peak_flops=1000.0, hbm_bandwidth=1e9, devices=2, link_bandwidth=10.0)
    cost = pass_cost(TINY, hw, 4, [3], [5])
    np.testing.assert_allclose(cost.seconds, FLOPS / 2000.0 + 12.8, rtol=1e-12)
    assert cost.link_bytes == 256.0


def test_pass_cost_ridge_point():
    """Below the ridge a decode pass costs the weights' streaming time whatever its rows; above it
    the cost grows with tokens (the premise of SplitFuse)."""
    model = ModelCost(presets.get("llama2_70b"))
    hw = Hardware("a100x4", 312e12, 2.039e12, devices=4, link_bandwidth=300e9)
    one, eight = (pass_cost(model, hw, n, [1] * n, [100] * n) for n in (1, 8))
    assert one.bound == eight.bound == "memory"
    assert eight.seconds / one.seconds < 1.01
    big = pass_cost(model, hw, 2048, [2048], [0])
    assert big.bound == "compute" and big.seconds > 5 * one.seconds


def test_pass_cost_rejects_bad_rows():
    hw = Hardware("x", 1.0, 1.0)
    with pytest.raises(ValueError, match="num_tokens 2"):
        pass_cost(TINY, hw, 2, [3], [0])
    with pytest.raises(ValueError, match="pair per row"):
        pass_cost(TINY, hw, 4, [0], [0])
    with pytest.raises(ValueError, match="link_bandwidth"):
        Hardware("x", 1.0, 1.0, devices=2)


# Request A (prompt 6, 2 tokens) at t=0, B (prompt 2, 2 tokens) at t=0.5; a pass costs
# 0.5 + 0.125 per scheduled token.
TWO = [SimRequest(0.0, 6, 2), SimRequest(0.5, 2, 2)]
BY_HAND = {
    # A's first 4-token chunk [0, 1]; A's last 2 + B's 2 fused [1, 2]; both decode [2, 2.75].
    "splitfuse": ([2.0, 2.75], [2.0, 2.75]),
    # A's whole prompt [0, 1.25]; B's prompt alone, A paused [1.25, 2]; both decode [2, 2.75].
    "prefill_first": ([1.25, 2.75], [2.0, 2.75]),
    # A alone: prompt [0, 1.25], decode [1.25, 1.875]; then B: [1.875, 2.625], [2.625, 3.25].
    "static": ([1.25, 1.875], [2.625, 3.25]),
}


@pytest.mark.parametrize("policy", sorted(BY_HAND))
def test_simulate_tiny_schedule_by_hand(policy):
    budget = 4 if policy == "splitfuse" else 8
    cfg = SchedulerConfig(num_blocks=16, policy=policy, token_budget=budget, block_size=4, buckets=(budget,),
                          prefix_caching=False)
    result = simulate(cfg, TWO, lambda plan: 0.5 + 0.125 * plan.num_scheduled_tokens)
    assert [r["times"] for r in result.records] == [list(t) for t in BY_HAND[policy]]
    assert [r["arrival"] for r in result.records] == [0.0, 0.5]


def test_simulate_closed_loop_by_hand():
    # One client: B is sent when A finishes. A's chunk [0, 1], A's last 2 tokens [1, 1.75], A's
    # decode [1.75, 2.375]; B sent at 2.375: prompt [2.375, 3.125], decode [3.125, 3.75].
    cfg = SchedulerConfig(num_blocks=16, policy="splitfuse", token_budget=4, block_size=4, buckets=(4,),
                          prefix_caching=False)
    result = simulate(cfg, TWO, lambda plan: 0.5 + 0.125 * plan.num_scheduled_tokens, clients=1)
    assert [r["times"] for r in result.records] == [[1.75, 2.375], [3.125, 3.75]]
    assert [r["arrival"] for r in result.records] == [0.0, 2.375]


def _roofline_run(policy, seed, num_blocks=64):
    model = ModelCost(presets.get("tiny"))
    hw = Hardware("toy", 1e9, 1e8, pass_overhead_s=1e-3)
    reqs = poisson_requests(np.random.default_rng(seed), 40, 50.0, 60, 12, prompt_cap=100)
    budget = 64 if policy == "splitfuse" else 256
    cfg = SchedulerConfig(num_blocks=num_blocks, policy=policy, token_budget=budget, max_seqs=16, block_size=8,
                          buckets=tuple(range(16, budget + 1, 16)), prefix_caching=False)
    return reqs, simulate(cfg, reqs, lambda plan: plan_cost(model, hw, plan).seconds)


@pytest.mark.parametrize("policy", ["splitfuse", "prefill_first", "static"])
def test_simulate_completes_every_request_and_is_deterministic(policy):
    # 24 blocks of 8 tokens hold one to three requests: admission waits and decodes preempt.
    reqs, a = _roofline_run(policy, 0, num_blocks=24)
    _, b = _roofline_run(policy, 0, num_blocks=24)
    assert [len(r["times"]) for r in a.records] == [r.max_tokens for r in reqs]
    assert all(r["times"][0] > r["arrival"] for r in a.records)
    assert all(np.all(np.diff(r["times"]) > 0) for r in a.records)
    assert a.records == b.records and np.array_equal(a.pass_seconds, b.pass_seconds)
    assert np.all(a.pass_tokens <= a.pass_padded)
    # every prompt token and every output token but the last is fed exactly once, plus recomputes
    fed = sum(r.prompt_len + r.max_tokens - 1 for r in reqs)
    assert a.pass_tokens.sum() >= fed and (a.pass_tokens.sum() == fed) == (a.num_preemptions == 0)


def test_simulate_splitfuse_budget_invariant():
    _, res = _roofline_run("splitfuse", 1)
    assert res.pass_tokens.max() <= 64 and set(res.pass_padded) <= set(range(16, 65, 16))


def test_ema_matches_pandas():
    rng = np.random.default_rng(0)
    itls = rng.exponential(0.2, 50)
    ema = pd.Series(itls).ewm(span=16).mean().to_numpy()
    for limit in (ema.max() * 0.999, ema.max() * 1.001, np.median(ema)):
        assert sla.ema_exceeds(itls, limit) == bool((ema >= limit).any())


def test_summarize_by_hand():
    records = [{"arrival": 0.0, "prompt_len": 10, "times": [1.0, 2.0, 4.0]},
               {"arrival": 1.0, "prompt_len": 100, "times": [1.5, 1.6]},
               {"arrival": 2.0, "prompt_len": 10, "times": [3.0, 3.5, 4.0, 5.0]}]
    s = sla.summarize(records, prefill_rate=10.0, itl_limits={"slow": 10.0, "fast": 0.7})
    assert s["req_s"] == 3 / 5.0 and s["tok_s"] == 9 / 5.0
    assert s["ttft_p50"] == 1.0 and s["tpot_mean"] == pytest.approx((1.5 + 0.1 + 2.0 / 3) / 3)
    assert s["itl_p50"] == pytest.approx(0.1)  # only the middle request's gap is pooled
    # TTFTs 1, 0.5, 1 against 1, 10, 1: all meet; EMA limit 0.7: request 0 (gaps 1, 2) fails
    assert s["sla_slow"] == 1.0 and s["sla_fast"] == pytest.approx(2 / 3)
    assert s["eff_req_s_fast"] == pytest.approx(0.6 * 2 / 3)
    with pytest.raises(ValueError, match="prefill_rate"):
        sla.summarize(records, 0.0, {})
