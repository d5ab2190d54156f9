"""Scheduler with a mock model whose next-token logits are a fixed function of the whole history.

The mock stores every fed token id and position in a paged pool through `write_kv` at the
scheduler's slot mapping, and reads each sampling row's history back through its block table
(tokens cached by earlier passes) and the pass's slot mapping (its own tokens). Its outputs therefore equal exact sequential decoding only if chunking,
block tables, slot mappings, prefix-cache hits and recompute after preemption are all right.
"""
import collections
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.serve.cache import write_kv
from jaxllm.serve.sampling import SamplingParams, sample, sampling_rows
from jaxllm.serve.scheduler import Scheduler, SchedulerConfig
from jaxllm.serve.sequence import Status
from jaxllm.serve.step import default_context_buckets

V = 16
sample_jit = jax.jit(sample)
write_jit = jax.jit(write_kv)


def mock_logits(history):
    """Next-token logits: a pseudo-random vector seeded by the exact token history."""
    seed = zlib.crc32(np.asarray(history, np.int64).tobytes())
    return (2.0 * np.random.default_rng(seed).normal(size=V)).astype(np.float32)


class MockModel:
    """Paged 'KV' of token ids (as K) and positions (as V)."""

    def __init__(self, num_blocks, block_size):
        self.P = block_size
        self.k = jnp.full((num_blocks, block_size, 1, 1), -1.0, jnp.float32)
        self.v = jnp.full((num_blocks, block_size, 1, 1), -1.0, jnp.float32)

    def __call__(self, batch):
        feats = lambda x: jnp.asarray(x, jnp.float32)[:, None, None]  # noqa: E731
        self.k, self.v = write_jit(self.k, self.v, feats(batch.tokens_T), feats(batch.positions_T),
                                   batch.slot_mapping_T)
        k, v = np.asarray(self.k).reshape(-1), np.asarray(self.v).reshape(-1)
        logits_SV = np.zeros((len(batch.context_len_S), V), np.float32)
        for s in np.flatnonzero(batch.last_index_S >= 0):
            ctx, last = int(batch.context_len_S[s]), int(batch.last_index_S[s])
            first = int(np.flatnonzero(batch.slot_T == s)[0])
            start = ctx - (last - first + 1)  # history: through the block table; this pass: its slots
            table = batch.block_tables_SW[s, :-(-start // self.P)]
            slots = (table[:, None] * self.P + np.arange(self.P)).reshape(-1)[:start]
            slots = np.concatenate([slots, batch.slot_mapping_T[first:last + 1]]).astype(np.int64)
            np.testing.assert_array_equal(v[slots], np.arange(ctx))  # every position cached in place
            assert k[slots[-1]] == batch.tokens_T[batch.last_index_S[s]]
            logits_SV[s] = mock_logits(k[slots].astype(np.int64))
        return logits_SV

    def copy(self, copies):
        """The device half of forks: whole blocks src -> dst."""
        for src, dst in copies:
            self.k, self.v = self.k.at[dst].set(self.k[src]), self.v.at[dst].set(self.v[src])


def reference(prompt, params, request_index, sample_index):
    """Exact sequential decoding with the mock model and the same per-token keys."""
    history, out, logprobs = list(prompt), [], []
    for t in range(params.max_tokens):
        rows = sampling_rows([params], [request_index], [sample_index], [t], 1)
        token, logprob = sample_jit(mock_logits(history)[None], rows)
        token = int(token[0])
        history.append(token)
        out.append(token)
        logprobs.append(float(logprob[0]))
        if token in params.stop_tokens:
            return out, logprobs, "stop"
    return out, logprobs, "length"


Row = collections.namedtuple("Row", "request sample seq_id start n status sample_flag num_tokens num_prompt")


def check_pass(sched, plan):
    """Invariants of one planned pass (checked before the pass runs)."""
    cfg, batch = sched.cfg, plan.batch
    used = plan.num_scheduled_tokens
    T = len(batch.tokens_T)
    assert used <= cfg.token_budget and len(plan.seqs) <= cfg.max_seqs
    assert T == min(b for b in cfg.buckets if b >= used)
    np.testing.assert_array_equal(batch.slot_T[used:], -1)
    np.testing.assert_array_equal(batch.slot_mapping_T[used:], -1)
    t = 0
    for s, (seq, n) in enumerate(zip(plan.seqs, plan.num_tokens)):
        start = seq.num_computed
        np.testing.assert_array_equal(batch.tokens_T[t:t + n], seq.token_ids[start:start + n])
        np.testing.assert_array_equal(batch.positions_T[t:t + n], np.arange(start, start + n))
        assert (batch.slot_T[t:t + n] == s).all() and batch.last_index_S[s] == t + n - 1
        assert batch.sample_S[s] == (start + n == seq.num_tokens) and batch.context_len_S[s] == start + n
        t += n
    assert (batch.last_index_S[len(plan.seqs):] == -1).all()

    # Decode first: decode rows precede prompt rows, and every running decode is in a pass that
    # has any decode (prefill-only passes of the non-chunking policies pause all of them).
    kinds = [seq.status is Status.DECODE for seq in plan.seqs]
    assert kinds == sorted(kinds, reverse=True)
    running_decodes = [s for s in sched.running if s.status is Status.DECODE]
    if cfg.policy == "splitfuse" or any(kinds):
        assert [s for s, d in zip(plan.seqs, kinds) if d] == running_decodes
    if cfg.policy != "splitfuse":
        assert all(kinds) or not any(kinds)  # never mixed
        assert batch.sample_S[:len(plan.seqs)].all()  # whole prompts: nothing chunked

    # Block accounting: tables cover each running sequence exactly (a paused decode has no block
    # for its pending token yet); ref counts = owners; free list = the rest.
    owners = collections.Counter()
    for seq in sched.running:
        table = sched.blocks.block_table(seq.seq_id)
        want = seq.num_tokens if seq in plan.seqs or seq.status is Status.PREFILL else seq.num_computed
        want = seq.max_kv_tokens if cfg.reserve == "prompt_plus_max_new" else want
        assert len(table) == sched.blocks.blocks_for(want)
        owners.update(table)
    refs = sched.blocks.ref_counts
    assert all(refs[b] == c for b, c in owners.items()) and refs.sum() == sum(owners.values())
    assert sched.blocks.num_free_blocks == cfg.num_blocks - len(owners)


Pass = collections.namedtuple("Pass", "rows admitted paused finished")


def run(cfg, requests, *, arrivals=None, max_passes=3000):
    """Drive the scheduler to completion. `arrivals[i]` is the pass before which request i is
    added (default: all at once). Returns outputs per (request, sample), one `Pass` record per
    pass (rows, admitted request ids, running decodes left out, requests finished), and the
    scheduler."""
    sched = Scheduler(cfg)
    model = MockModel(cfg.num_blocks, cfg.block_size)
    arrivals = arrivals or [0] * len(requests)
    pending = sorted(range(len(requests)), key=lambda i: arrivals[i])
    trace, outputs, step = [], {}, 0
    while pending or sched.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            sched.add(i, *requests[i])
        plan = sched.schedule()
        step += 1
        assert step < max_passes, "no progress"
        if plan is None:
            continue
        check_pass(sched, plan)
        rows = [Row(s.request_index, s.sample_index, s.seq_id, s.num_computed, n, s.status,
                    bool(plan.batch.sample_S[i]), s.num_tokens, s.num_prompt_tokens)
                for i, (s, n) in enumerate(zip(plan.seqs, plan.num_tokens))]
        admitted = {s.request_index for s in sched.running}
        paused = sum(s.status is Status.DECODE and s not in plan.seqs for s in sched.running)
        tokens, logprobs = sample_jit(model(plan.batch), plan.sampling_rows())
        finished = sched.update(plan, np.asarray(tokens), np.asarray(logprobs))
        model.copy(sched.take_copies())
        for seq in finished:
            outputs[seq.request_index, seq.sample_index] = (seq.output, seq.logprobs, seq.finish_reason)
        trace.append(Pass(rows, admitted, paused, {s.request_index for s in finished}))
    assert sched.blocks.num_free_blocks == cfg.num_blocks and not sched.blocks.ref_counts.any()  # no leak
    return outputs, trace, sched


def workload(n=18, seed=0):
    """Mixed prompts (1-22 tokens, some sharing an 9-token prefix), 1-8 new tokens, greedy and
    sampled rows, a few stop tokens."""
    rng = np.random.default_rng(seed)
    shared = [int(t) for t in rng.integers(0, V, 9)]
    requests = []
    for i in range(n):
        prompt = [int(t) for t in rng.integers(0, V, int(rng.integers(1, 23)))]
        if i % 4 == 1:
            prompt = shared + prompt[:10]
        params = SamplingParams(max_tokens=int(rng.integers(1, 9)), temperature=[0.0, 1.0, 0.7][i % 3],
                                top_k=[0, 0, 5][i % 3], top_p=[1.0, 0.9, 1.0][i % 3],
                                stop_tokens=(3,) if i % 5 == 0 else (), seed=100 + i, n=2 if i == 7 else 1)
        requests.append((prompt, params))
    return requests


def assert_matches_reference(requests, outputs):
    want_keys = {(i, j) for i, (_, p) in enumerate(requests) for j in range(p.n)}
    assert set(outputs) == want_keys
    for (i, j), (out, logprobs, reason) in outputs.items():
        ref_out, ref_logprobs, ref_reason = reference(requests[i][0], requests[i][1], i, j)
        assert out == ref_out and reason == ref_reason, (i, j)
        np.testing.assert_allclose(logprobs, ref_logprobs, rtol=1e-5, atol=1e-6)


CONFIGS = {
    # budget 8 < prompts of up to 22 tokens: chunking; 12 blocks of 4 for ~18 requests: preemption
    "splitfuse": SchedulerConfig(num_blocks=12, block_size=4, token_budget=8, max_seqs=4, buckets=(4, 8)),
    "prefill_first": SchedulerConfig(num_blocks=12, block_size=4, policy="prefill_first", token_budget=32,
                                     max_seqs=4, buckets=(8, 16, 32)),
    "static": SchedulerConfig(num_blocks=10, block_size=4, policy="static", token_budget=32, max_seqs=4,
                              buckets=(8, 16, 32)),
}


@pytest.mark.parametrize("policy", list(CONFIGS))
def test_policy_equals_sequential_decoding_under_chunking_and_preemption(policy):
    requests = workload()
    outputs, trace, sched = run(CONFIGS[policy], requests)
    assert_matches_reference(requests, outputs)
    assert sched.num_preemptions > 0
    # some preempted sequence recomputed its generated tokens along with its prompt
    assert any(r.status is Status.PREFILL and r.num_tokens > r.num_prompt for p in trace for r in p.rows)
    # prompts are first scheduled in arrival order
    first = []
    for p in trace:
        first += [r.request for r in p.rows if r.request not in first]
    assert first == sorted(first)


@pytest.mark.parametrize("policy", list(CONFIGS))
def test_progress_when_the_pool_fits_only_one_maximal_request(policy):
    # 4 blocks of 4 = 16 KV slots; request 0 needs all of them (14 prompt + 3 new - 1).
    # The others (3-token prompts, 8 new tokens) are admitted together and then run out of blocks.
    requests = [(list(range(14)), SamplingParams(max_tokens=3))]
    requests += [([i, i + 1, i + 2], SamplingParams(max_tokens=8, temperature=0.5 * (i % 2), seed=i))
                 for i in range(1, 6)]
    cfg = SchedulerConfig(num_blocks=4, block_size=4, policy=policy, token_budget=16, max_seqs=4, buckets=(8, 16))
    outputs, _, sched = run(cfg, requests)
    assert_matches_reference(requests, outputs)
    assert sched.num_preemptions > 0


def test_preemption_evicts_the_most_recently_admitted():
    cfg = SchedulerConfig(num_blocks=4, block_size=2, token_budget=8, max_seqs=4, buckets=(8,))
    sched, model = Scheduler(cfg), MockModel(4, 2)
    (a,), (b,) = sched.add(0, [1, 2], SamplingParams(max_tokens=6)), sched.add(1, [3, 4], SamplingParams(max_tokens=6))
    plans = []
    while (plan := sched.schedule()) is not None:
        plans.append(plan)
        if len(plans) == 4:
            # a's 5th token needs a third block while b holds the other two: b (newer) is preempted
            assert plan.seqs == (a,) and b.status is Status.WAITING and sched.waiting[0] is b
            assert b.num_preemptions == 1 and a.num_preemptions == 0
        tokens, logprobs = sample_jit(model(plan.batch), plan.sampling_rows())
        sched.update(plan, np.asarray(tokens), np.asarray(logprobs))
    assert [p.seqs for p in plans[:3]] == [(a, b)] * 3
    assert a.output == reference([1, 2], a.params, 0, 0)[0] and b.output == reference([3, 4], b.params, 1, 0)[0]


def test_splitfuse_chunks_long_prompts_and_fuses_short_ones():
    prompt_long = [int(t) for t in np.random.default_rng(1).integers(0, V, 21)]
    requests = [([1, 2], SamplingParams(max_tokens=6)), (prompt_long, SamplingParams(max_tokens=2)),
                ([4, 5, 6], SamplingParams(max_tokens=2))]
    cfg = SchedulerConfig(num_blocks=16, block_size=4, token_budget=8, max_seqs=4, buckets=(4, 8))
    outputs, trace, _ = run(cfg, requests)
    assert_matches_reference(requests, outputs)
    # pass 0 fuses request 0's whole prompt with the first 6 tokens of the long one
    assert [(r.request, r.start, r.n, r.sample_flag) for r in trace[0].rows] == [(0, 0, 2, True), (1, 0, 6, False)]
    # then: request 0 decodes first, the long prompt continues in chunks filling the budget
    assert [(r.request, r.start, r.n, r.sample_flag) for r in trace[1].rows] == [(0, 2, 1, True), (1, 6, 7, False)]
    chunks = [(r.start, r.n, r.sample_flag) for p in trace for r in p.rows if r.request == 1 and r.start < 21]
    assert chunks == [(0, 6, False), (6, 7, False), (13, 7, False), (20, 1, True)]
    # the short prompt is fused into the pass that finishes the long one
    assert [(r.request, r.n) for r in trace[3].rows] == [(0, 1), (1, 1), (2, 3)]


def test_policies_agree_with_each_other_and_reserving_never_preempts():
    requests = workload(n=12, seed=5)
    results = {name: run(cfg, requests)[0] for name, cfg in CONFIGS.items()}
    assert results["splitfuse"] == results["prefill_first"] == results["static"]
    cfg = SchedulerConfig(num_blocks=12, block_size=4, token_budget=8, max_seqs=4, buckets=(4, 8),
                          reserve="prompt_plus_max_new")
    outputs, _, sched = run(cfg, requests)
    assert sched.num_preemptions == 0 and outputs == results["splitfuse"]


def test_prefill_first_pauses_decodes_and_static_admits_groups():
    requests = workload(n=12, seed=2)
    _, trace, _ = run(CONFIGS["prefill_first"], requests, arrivals=[2 * i for i in range(12)])
    assert any(p.paused and all(r.status is Status.PREFILL for r in p.rows) for p in trace)

    _, trace, _ = run(CONFIGS["static"], requests, arrivals=list(range(12)))
    finished, group, groups = set(), set(), 0
    for p in trace:
        if group <= finished:  # previous group done: a new one may start
            group, groups = p.admitted, groups + 1
        assert p.admitted <= group
        finished |= p.finished
    assert groups > 1


def test_no_request_starves_under_continuous_arrivals():
    """A long prompt arriving behind a stream of short requests is served in arrival order."""
    rng = np.random.default_rng(3)
    requests = [([int(t) for t in rng.integers(0, V, 3)], SamplingParams(max_tokens=4)) for _ in range(40)]
    requests[5] = ([int(t) for t in rng.integers(0, V, 20)], SamplingParams(max_tokens=3))
    cfg = SchedulerConfig(num_blocks=10, block_size=4, token_budget=6, max_seqs=3, buckets=(6,))
    outputs, trace, _ = run(cfg, requests, arrivals=list(range(40)))
    assert_matches_reference(requests, outputs)
    first_pass = {}
    for i, p in enumerate(trace):
        for r in p.rows:
            first_pass.setdefault(r.request, i)
    assert all(first_pass[5] <= first_pass[i] for i in range(6, 40))


def test_prefix_cache_reuses_blocks_and_reset_clears_it():
    rng = np.random.default_rng(4)
    prefix = [int(t) for t in rng.integers(0, V, 12)]  # 3 full blocks of 4
    a = (prefix + [1], SamplingParams(max_tokens=8))
    b = (prefix + [2, 3], SamplingParams(max_tokens=3, temperature=1.0, seed=5))
    cfg = SchedulerConfig(num_blocks=16, block_size=4, token_budget=8, max_seqs=4, buckets=(8,))
    sched = Scheduler(cfg)
    model = MockModel(cfg.num_blocks, cfg.block_size)

    def step():
        plan = sched.schedule()
        tokens, logprobs = sample_jit(model(plan.batch), plan.sampling_rows())
        return plan, sched.update(plan, np.asarray(tokens), np.asarray(logprobs))

    (seq_a,) = sched.add(0, *a)
    step(), step()  # a's 13-token prompt computed: its 3 full blocks are cached
    (seq_b,) = sched.add(1, *b)
    plan, _ = step()
    row = plan.seqs.index(seq_b)
    assert plan.batch.positions_T[plan.batch.last_index_S[row]] == 13 and plan.num_tokens[row] == 2
    table_a, table_b = sched.blocks.block_table(seq_a.seq_id), sched.blocks.block_table(seq_b.seq_id)
    assert table_a[:3] == table_b[:3] and set(table_a[3:]).isdisjoint(table_b[3:])
    assert [sched.blocks.ref_counts[x] for x in table_a[:3]] == [2, 2, 2]
    while sched.has_unfinished():
        step()
    # tokens exactly, log-probs to float32 rounding: both sides run the same jitted sampler on the
    # same logits, so they differ at most by XLA's choice of fusion between the two calls
    assert_matches_reference([a, b], {(0, 0): (seq_a.output, seq_a.logprobs, seq_a.finish_reason),
                                      (1, 0): (seq_b.output, seq_b.logprobs, seq_b.finish_reason)})
    assert sched.blocks.num_free_blocks == 16 and sched.blocks.num_cached_blocks >= 3

    sched.reset_prefix_cache()
    assert sched.blocks.num_cached_blocks == 0
    (seq_c,) = sched.add(2, *b)
    plan, _ = step()
    assert plan.seqs == (seq_c,) and plan.num_tokens == (8,) and seq_c.num_computed == 8  # recomputed from 0


def test_scheduling_is_deterministic():
    requests = workload(n=10, seed=6)
    _, trace1, _ = run(CONFIGS["splitfuse"], requests)
    _, trace2, _ = run(CONFIGS["splitfuse"], requests)
    key = lambda trace: [[(r.seq_id, r.start, r.n) for r in p.rows] for p in trace]  # noqa: E731
    assert key(trace1) == key(trace2)


def test_bad_requests_fail_alone():
    cfg = SchedulerConfig(num_blocks=4, block_size=4, token_budget=8, max_seqs=4, buckets=(8,), vocab_size=V,
                          max_model_len=20)
    sched = Scheduler(cfg)
    ok = SamplingParams(max_tokens=2)
    for prompt, params, match in [([], ok, "empty prompt"), (list(range(15)) + [1] * 2, ok, "whole cache has 4"),
                                  ([1, V], ok, f"token id {V}"), ([1, -2], ok, "token id -2"),
                                  ([1, 2], SamplingParams(max_tokens=19), "max_model_len 20"),
                                  ([1, 2], {"max_tokens": 2}, "SamplingParams")]:
        with pytest.raises(ValueError, match=match):
            sched.add(9, prompt, params)
    with pytest.raises(ValueError, match="max_tokens must be a positive integer, got 0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="token_budget 8"):
        Scheduler(SchedulerConfig(num_blocks=8, block_size=4, policy="prefill_first", token_budget=8,
                                  buckets=(8,))).add(0, list(range(9)), ok)
    assert not sched.has_unfinished()

    # a rejected request leaves the others untouched
    requests = [([1, 2, 3], SamplingParams(max_tokens=5)), ([], ok), ([4, 5], SamplingParams(max_tokens=3))]
    model = MockModel(cfg.num_blocks, cfg.block_size)
    for i, req in enumerate(requests):
        if i == 1:
            with pytest.raises(ValueError):
                sched.add(i, *req)
        else:
            sched.add(i, *req)
    done = {}
    while (plan := sched.schedule()) is not None:
        tokens, logprobs = sample_jit(model(plan.batch), plan.sampling_rows())
        done.update({s.request_index: s.output for s in sched.update(plan, np.asarray(tokens), np.asarray(logprobs))})
    assert done == {0: reference(*requests[0], 0, 0)[0], 2: reference(*requests[2], 2, 0)[0]}


def test_config_validation():
    for kwargs, match in [({"policy": "fifo"}, "fifo"), ({"reserve": "all"}, "all"), ({"token_budget": 0}, "0"),
                          ({"buckets": (16, 8)}, r"\(16, 8\)"), ({"buckets": (8,), "token_budget": 16}, "16")]:
        with pytest.raises(ValueError, match=match):
            SchedulerConfig(num_blocks=4, **kwargs)


def test_block_tables_are_as_wide_as_the_longest_history_bucket():
    cfg = SchedulerConfig(num_blocks=16, block_size=4, token_budget=32, max_seqs=4, buckets=(32,),
                          max_model_len=40, context_buckets=(8, 20))
    assert cfg.table_widths == (2, 5, 10)
    requests = [(list(range(20)), SamplingParams(max_tokens=3))]
    outputs, _, sched = run(cfg, requests)  # the mock checks every slot it reads and writes
    assert_matches_reference(requests, outputs)
    sched = Scheduler(cfg)
    sched.add(0, *requests[0])
    widths = []
    while (plan := sched.schedule()) is not None:
        widths.append(plan.batch.block_tables_SW.shape[1])
        S = len(plan.batch.context_len_S)
        sched.update(plan, np.zeros(S, np.int32), np.zeros(S, np.float32))
    # fresh prompt: no history, narrowest tables; decodes after 20 and 21 cached tokens: 5 and 6
    # blocks (position 20 starts block 5, which only the slot mapping addresses)
    assert widths == [2, 5, 10]


def test_default_context_buckets_keep_tables_under_twice_the_history():
    """With the engine's default context buckets a growing sequence's table is the narrowest width
    holding its history and at most 2x it (or the 64-token floor), and decoding across every width
    change matches sequential decoding (the mock checks every slot it reads)."""
    cfg = SchedulerConfig(num_blocks=64, block_size=4, token_budget=32, max_seqs=4, buckets=(32,),
                          max_model_len=200, context_buckets=default_context_buckets(200))
    requests = [(list(range(10)), SamplingParams(max_tokens=180))]
    outputs, _, _ = run(cfg, requests)
    assert_matches_reference(requests, outputs)
    sched = Scheduler(cfg)
    sched.add(0, *requests[0])
    seen = set()
    while (plan := sched.schedule()) is not None:
        history = sched.running[0].num_computed
        width = plan.batch.block_tables_SW.shape[1] * cfg.block_size
        assert history <= width <= max(64, 2 * history), (history, width)
        seen.add(width)
        S = len(plan.batch.context_len_S)
        sched.update(plan, np.zeros(S, np.int32), np.zeros(S, np.float32))
    assert len(seen) >= 3, seen  # the test crossed width changes


@pytest.mark.parametrize("max_seqs, prompt_len, want_fork", [(4, 10, True), (4, 9, True), (1, 10, False)])
def test_samples_fork_from_one_prefill(max_seqs, prompt_len, want_fork):
    """n=3 samples (best_of 4) are forked from one prefill (a partial last block copied, or none
    when the shared tokens end on a block boundary) and decode exactly as sequential decoding;
    without room in the running set they are queued and prefilled on their own."""
    rng = np.random.default_rng(11)
    prompt = [int(t) for t in rng.integers(0, V, prompt_len)]
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=3, n=3, best_of=4)
    cfg = SchedulerConfig(num_blocks=16, block_size=4, token_budget=8, max_seqs=max_seqs, buckets=(4, 8),
                          prefix_caching=False)
    outputs, _, sched = run(cfg, [(prompt, params)])
    for j in range(4):
        want_out, want_logprobs, _ = reference(prompt, params, 0, j)
        assert outputs[0, j][0] == want_out
        np.testing.assert_allclose(outputs[0, j][1], want_logprobs, rtol=1e-5, atol=1e-6)
    assert sched.num_prompt_tokens_computed == (prompt_len + 3 if want_fork else 4 * prompt_len)
