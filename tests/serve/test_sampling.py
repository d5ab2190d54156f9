"""Sampling: parameter validation, processed distribution vs HF warpers / float64 NumPy, seeded
determinism, reported log-probs, and LogitsFn transforms (proxy-tuning invariants)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.serve.sampling import (ProxyTriple, SamplingParams, combine_proxy_logits, process_logits, proxy_tuned,
                                   sample, sampling_rows, suppress_tokens)

sample_jit = jax.jit(sample)
process_jit = jax.jit(process_logits)

# (temperature, top_k, top_p) per row; every combination appears in one batch.
ROW_SETTINGS = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.6), (2.0, 3, 0.95), (1.0, 1, 1.0),
                (0.9, 0, 0.05), (1.0, 40, 0.9)]


def _rows(settings, seed=0, request=0, token_index=None):
    params = [SamplingParams(max_tokens=1, temperature=t, top_k=k, top_p=p, seed=seed) for t, k, p in settings]
    n = len(settings)
    token_index = list(range(n)) if token_index is None else token_index
    return sampling_rows(params, [request] * n, [0] * n, token_index, n)


def _np_processed(logits_V, temperature, top_k, top_p):
    """float64 reference of temperature -> top-k -> top-p (ties kept at both thresholds)."""
    x = logits_V.astype(np.float64) / (temperature if temperature > 0 else 1.0)
    if 0 < top_k < len(x):
        x = np.where(x >= np.sort(x)[::-1][top_k - 1], x, -np.inf)
    if top_p < 1.0:
        desc = np.sort(x)[::-1]
        probs = np.exp(desc - desc[0])
        cum = np.cumsum(probs / probs.sum())
        x = np.where(x >= desc[min(int(np.sum(cum < top_p)), len(x) - 1)], x, -np.inf)
    return x


def _np_log_softmax(x):
    finite = x[np.isfinite(x)]
    m = finite.max()
    return x - m - np.log(np.exp(finite - m).sum())


def _logits(S, V, seed=0, scale=2.0):
    return (scale * np.random.default_rng(seed).normal(size=(S, V))).astype(np.float32)


def test_sampling_params_validation_names_the_value():
    for kwargs, value in [({"max_tokens": 0}, "0"), ({"max_tokens": -3}, "-3"),
                          ({"max_tokens": 4, "temperature": -0.5}, "-0.5"),
                          ({"max_tokens": 4, "top_p": 0.0}, "0.0"), ({"max_tokens": 4, "top_p": 1.5}, "1.5"),
                          ({"max_tokens": 4, "top_k": -1}, "-1"), ({"max_tokens": 4, "n": 0}, "0"),
                          ({"max_tokens": 4, "seed": -2}, "-2"), ({"max_tokens": 4, "stop_tokens": [3, -7]}, "-7")]:
        with pytest.raises(ValueError, match=value):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_tokens=4, top_p=float("nan"))
    assert SamplingParams(max_tokens=2, stop_tokens=[5, np.int64(2)]).stop_tokens == (5, 2)


def test_processed_logits_match_hf_warpers():
    torch = pytest.importorskip("torch")
    generation = pytest.importorskip("transformers.generation.logits_process")
    V = 64
    logits = _logits(len(ROW_SETTINGS), V)
    rows = _rows(ROW_SETTINGS)
    got = np.asarray(process_jit(logits, rows.temperature_S, rows.top_k_S, rows.top_p_S))
    for s, (t, k, p) in enumerate(ROW_SETTINGS):
        scores = torch.tensor(logits[s:s + 1], dtype=torch.float64)
        scores = generation.TemperatureLogitsWarper(t)(None, scores)
        if k > 0:
            scores = generation.TopKLogitsWarper(k)(None, scores)
        if p < 1.0:
            scores = generation.TopPLogitsWarper(p)(None, scores)
        want = scores.numpy()[0]
        np.testing.assert_array_equal(np.isfinite(got[s]), np.isfinite(want), err_msg=f"row {s}")
        np.testing.assert_allclose(got[s][np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6)


def test_processed_logits_match_numpy_reference_with_ties():
    # Integer logits produce ties at the top-k and top-p thresholds: all tied entries are kept.
    V = 12
    logits = np.random.default_rng(3).integers(0, 4, size=(len(ROW_SETTINGS), V)).astype(np.float32)
    rows = _rows(ROW_SETTINGS)
    got = np.asarray(process_jit(logits, rows.temperature_S, rows.top_k_S, rows.top_p_S))
    for s, (t, k, p) in enumerate(ROW_SETTINGS):
        want = _np_processed(logits[s], t, k, p)
        np.testing.assert_array_equal(np.isfinite(got[s]), np.isfinite(want), err_msg=f"row {s}")
        np.testing.assert_allclose(got[s][np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6)


def test_sampled_frequencies_follow_the_processed_distribution():
    V, n = 10, 20000
    logits = np.tile(_logits(1, V, seed=4, scale=1.0), (n, 1))
    for t, k, p in [(1.0, 0, 1.0), (0.8, 4, 1.0), (1.5, 0, 0.7)]:
        rows = _rows([(t, k, p)] * n, seed=11)
        tokens, _ = sample_jit(logits, rows)
        want = np.exp(_np_log_softmax(_np_processed(logits[0], t, k, p)))
        freq = np.bincount(np.asarray(tokens), minlength=V) / n
        assert np.all(freq[want == 0] == 0), (t, k, p)
        np.testing.assert_allclose(freq, want, atol=0.015, err_msg=f"{(t, k, p)}")


def test_reported_logprobs_are_log_softmax_of_processed_logits():
    V = 32
    logits = _logits(len(ROW_SETTINGS), V, seed=5)
    tokens, logprobs = sample_jit(logits, _rows(ROW_SETTINGS, seed=3))
    for s, (t, k, p) in enumerate(ROW_SETTINGS):
        want = _np_log_softmax(_np_processed(logits[s], t, k, p))[int(tokens[s])]
        assert np.isfinite(want)
        np.testing.assert_allclose(float(logprobs[s]), want, atol=1e-5, err_msg=f"row {s}")


def test_greedy_takes_argmax_and_reports_raw_log_softmax():
    logits = _logits(4, 20, seed=6)
    rows = _rows([(0.0, 3, 0.5), (0.0, 0, 1.0), (0.0, 1, 1.0), (0.0, 0, 0.2)])
    tokens, logprobs = sample_jit(logits, rows)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    want = [_np_log_softmax(logits[s].astype(np.float64))[logits[s].argmax()] for s in range(4)]
    np.testing.assert_allclose(logprobs, want, atol=1e-6)


def test_fixed_seed_is_deterministic_and_independent_of_batching():
    V = 50
    logits = _logits(len(ROW_SETTINGS), V, seed=7, scale=0.5)
    rows = _rows(ROW_SETTINGS, seed=42, request=3)
    first = sample_jit(logits, rows)
    again = sample_jit(logits, rows)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])

    # Reversed rows plus greedy padding rows: each row's draw depends only on its own key.
    perm = np.arange(len(ROW_SETTINGS))[::-1]
    params = [SamplingParams(max_tokens=1, temperature=t, top_k=k, top_p=p, seed=42) for t, k, p in ROW_SETTINGS]
    padded = sampling_rows([params[i] for i in perm], [3] * len(perm), [0] * len(perm), list(perm), 12)
    tokens, logprobs = sample_jit(np.concatenate([logits[perm], np.zeros((4, V), np.float32)]), padded)
    np.testing.assert_array_equal(np.asarray(tokens)[:len(perm)], np.asarray(first[0])[perm])
    np.testing.assert_allclose(np.asarray(logprobs)[:len(perm)], np.asarray(first[1])[perm], rtol=1e-6)

    # Another seed, request or sample index changes the stream.
    flat = np.tile(logits[:1] * 0, (64, 1))  # uniform: 50 equally likely tokens
    base = sampling_rows([SamplingParams(max_tokens=1, temperature=1.0, seed=1)] * 64, [0] * 64, [0] * 64,
                         list(range(64)), 64)
    draws = np.asarray(sample_jit(flat, base)[0])
    for change in [{"seed_S": base.seed_S + 1}, {"request_S": base.request_S + 1},
                   {"sample_index_S": base.sample_index_S + 1}]:
        other = np.asarray(sample_jit(flat, type(base)(**{**base.__dict__, **change}))[0])
        assert (other != draws).sum() > 32, change


def _toy_members(S=3, V=9, seed=8):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(S, V)).astype(np.float32) for _ in range(3)]


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_proxy_combination_invariants():
    base, expert, anti = _toy_members()
    # alpha = 0 => base exactly
    np.testing.assert_array_equal(combine_proxy_logits(base, expert, anti, 0.0), base)
    # expert == anti => base for any alpha
    for alpha in (0.5, 1.0, 2.0):
        np.testing.assert_allclose(combine_proxy_logits(base, expert, expert, alpha), base, atol=1e-6)
    # base == anti, alpha = 1 => expert distribution
    np.testing.assert_allclose(_softmax(combine_proxy_logits(base, expert, base, 1.0)), _softmax(expert), atol=1e-6)
    # matches p_base * (p_expert / p_anti)^alpha, float64
    alpha = 1.7
    want = _softmax(base) * (_softmax(expert) / _softmax(anti)) ** alpha
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(_softmax(combine_proxy_logits(base, expert, anti, alpha)), want, atol=1e-6)
    # a constant (scalar or per-row) shift of any member changes nothing after softmax
    ref = _softmax(combine_proxy_logits(base, expert, anti, alpha))
    shift_S1 = np.array([[3.0], [-11.0], [0.25]], np.float32)
    for i in range(3):
        for shift in (5.0, shift_S1):
            members = [base, expert, anti]
            members[i] = members[i] + shift
            np.testing.assert_allclose(_softmax(combine_proxy_logits(*members, alpha)), ref, atol=1e-5)
    # raw logits and log-probs combine to the same distribution
    logp = [jax.nn.log_softmax(m, axis=-1) for m in (base, expert, anti)]
    np.testing.assert_allclose(_softmax(combine_proxy_logits(*logp, alpha)), ref, atol=1e-5)


def test_proxy_vocabulary_checks_and_slicing():
    base, expert, anti = _toy_members(V=9)
    wide = np.concatenate([expert, np.full((3, 2), 50.0, np.float32)], axis=-1)  # 2 extra trailing ids
    with pytest.raises(ValueError, match=r"\(9, 11, 9\)"):
        combine_proxy_logits(base, wide, anti)
    np.testing.assert_array_equal(combine_proxy_logits(base, wide, anti, vocab_size=9),
                                  combine_proxy_logits(base, expert, anti))
    with pytest.raises(ValueError, match="vocab_size 10"):
        combine_proxy_logits(base, wide, anti, vocab_size=10)


def _counting_member(offset):
    """Toy LogitsFn: logits = table[last token] + offset; its cache counts the tokens it has seen
    and sums them, so each member's private stream is visible in its cache."""
    def fn(params, tokens_T, positions_T, cache):
        logits_SV = params[tokens_T[-1:]] + offset + 0.0 * positions_T[-1]
        return logits_SV, {"seen": cache["seen"] + tokens_T.shape[0], "sum": cache["sum"] + tokens_T.sum()}
    return fn


def test_proxy_tuned_logits_fn_keeps_per_member_streams_and_caches():
    V, alpha = 7, 0.6
    rng = np.random.default_rng(9)
    tables = ProxyTriple(*(jnp.asarray(rng.normal(size=(V, V)), jnp.float32) for _ in range(3)))
    members = [_counting_member(o) for o in (0.0, 1.0, -2.0)]
    fn = jax.jit(proxy_tuned(*members, alpha=alpha))
    empty = {"seen": jnp.int32(0), "sum": jnp.int32(0)}
    cache = ProxyTriple(empty, empty, empty)
    tokens = ProxyTriple(jnp.array([1, 2]), jnp.array([6, 5, 4, 3]), jnp.array([2]))  # own prompts
    positions = ProxyTriple(*(jnp.arange(len(t)) for t in tokens))
    logits, cache = fn(tables, tokens, positions, cache)
    want = combine_proxy_logits(*(m(p, t, x, empty)[0] for m, p, t, x in zip(members, tables, tokens, positions)),
                                alpha)
    np.testing.assert_allclose(logits, want, atol=1e-6)
    assert [int(c["seen"]) for c in cache] == [2, 4, 1] and [int(c["sum"]) for c in cache] == [3, 18, 2]

    # One shared stream: every member is fed the same tokens; caches keep advancing separately.
    logits, cache = fn(tables, jnp.array([3]), jnp.array([7]), cache)
    assert [int(c["seen"]) for c in cache] == [3, 5, 2]
    np.testing.assert_allclose(logits, tables.base[3:4] + alpha * (tables.expert[3:4] + 1.0 - tables.anti[3:4] + 2.0),
                               atol=1e-5)


def test_transforms_compose():
    V = 6
    table = jnp.asarray(np.random.default_rng(10).normal(size=(V, V)), jnp.float32)
    member = _counting_member(0.0)
    fn = suppress_tokens(proxy_tuned(member, member, member, alpha=3.0), [2, 4])
    empty = {"seen": jnp.int32(0), "sum": jnp.int32(0)}
    logits, _ = fn(ProxyTriple(table, table, table), jnp.array([1]), jnp.array([0]), ProxyTriple(empty, empty, empty))
    # three identical models reduce to the plain model; suppressed ids are never chosen
    want = np.asarray(table[1:2]).copy()
    want[:, [2, 4]] = -np.inf
    np.testing.assert_allclose(logits, want, atol=1e-6)
    with pytest.raises(ValueError, match="-1"):
        suppress_tokens(member, [-1])


def test_threshold_search_among_candidates_and_by_full_sort_match_numpy():
    # V > CANDIDATES: peaked rows with small k / nucleus are resolved among each row's largest
    # logits; a flat row with a wide nucleus, or k beyond the candidates, needs the full sort.
    V = 1000
    peaked = _logits(3, V, seed=12, scale=4.0)
    flat = _logits(3, V, seed=13, scale=0.1)
    for logits, settings in [(peaked, [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.0, 20, 0.5)]),
                             (flat, [(1.0, 0, 0.99), (1.0, 300, 1.0), (1.2, 0, 0.3)])]:
        rows = _rows(settings)
        got = np.asarray(process_jit(logits, rows.temperature_S, rows.top_k_S, rows.top_p_S))
        for s, (t, k, p) in enumerate(settings):
            want = _np_processed(logits[s], t, k, p)
            np.testing.assert_array_equal(np.isfinite(got[s]), np.isfinite(want), err_msg=f"{(t, k, p)}")
            np.testing.assert_allclose(got[s][np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6)
