"""Logits-seam contract: every LogitsFn transform passes the cache through.

Each wrapped model is a toy LogitsFn whose cache is a pytree it updates on every call (a running
sum of the tokens it saw and a call count), so the test can tell whether a transform returns the
model's *new* cache, the old one, or one of another member. Logits are checked against NumPy
applications of the transform; the transforms run under jit with the cache as an argument.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.serve import sampling
from jaxllm.serve.sampling import ProxyTriple

S, V = 3, 11


def toy_logits_fn(params, tokens_T, positions_T, cache):
    """One logits row per sequence slot: its last token's row of `params["table"]` plus the cache's
    running sum, so logits depend on the cache as an engine model's do."""
    last_S = tokens_T[-S:]
    logits_SV = params["table"][last_S] + cache["seen"][:, None] * params["scale"]
    new_cache = {"seen": cache["seen"] + last_S.astype(jnp.float32) + positions_T[-S:], "calls": cache["calls"] + 1}
    return logits_SV, new_cache


def _params(seed):
    rng = np.random.default_rng(seed)
    return {"table": jnp.asarray(rng.normal(size=(V, V)), jnp.float32), "scale": jnp.float32(rng.normal())}


def _cache(seed):
    return {"seen": jnp.asarray(np.random.default_rng(seed).normal(size=S), jnp.float32), "calls": jnp.int32(seed)}


TOKENS = jnp.asarray([4, 1, 7, 2, 9], jnp.int32)
POSITIONS = jnp.asarray([0, 1, 5, 2, 8], jnp.int32)
ROWS = dict(temperature_S=jnp.asarray([0.7, 1.0, 2.0]), top_k_S=jnp.asarray([3, 0, 5]),
            top_p_S=jnp.asarray([1.0, 0.8, 0.5]))


def _np_warp(logits_SV):
    """float64 NumPy temperature → top-k → top-p of `process_logits` (ties kept)."""
    out = []
    for row, t, k, p in zip(np.asarray(logits_SV, np.float64), *(np.asarray(v) for v in ROWS.values())):
        x = row / t
        if k:
            x = np.where(x >= np.sort(x)[::-1][k - 1], x, -np.inf)
        if p < 1:
            probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
            order = np.sort(probs)[::-1]
            cut = order[np.searchsorted(np.cumsum(order), p)]
            x = np.where(probs >= cut, x, -np.inf)
        out.append(x)
    return np.stack(out)


WRAPPED = {  # name -> (transform of a LogitsFn, NumPy reference on the model's logits)
    "warp": (lambda fn: sampling.map_logits(fn, lambda l: sampling.process_logits(l, **ROWS)), _np_warp),
    "suppress_tokens": (lambda fn: sampling.suppress_tokens(fn, [0, 5]),
                        lambda l: np.where(np.isin(np.arange(V), [0, 5]), -np.inf, l)),
}


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_single_model_transforms_return_the_models_new_cache(name):
    transform, reference = WRAPPED[name]
    params, cache = _params(0), _cache(1)
    want_logits, want_cache = toy_logits_fn(params, TOKENS, POSITIONS, cache)
    logits, new_cache = jax.jit(transform(toy_logits_fn))(params, TOKENS, POSITIONS, cache)
    jax.tree.map(np.testing.assert_array_equal, new_cache, want_cache)
    np.testing.assert_allclose(logits, reference(want_logits), rtol=1e-6)
    assert int(new_cache["calls"]) == 2  # the model ran once on the given cache


def test_proxy_tuned_returns_each_members_own_new_cache():
    alpha = 0.6
    params = ProxyTriple(_params(1), _params(2), _params(3))
    caches = ProxyTriple(_cache(4), _cache(5), _cache(6))
    streams = ProxyTriple(TOKENS, jnp.asarray([3, 3, 7, 2, 9], jnp.int32), TOKENS[::-1])  # own prompts
    fn = sampling.proxy_tuned(toy_logits_fn, toy_logits_fn, toy_logits_fn, alpha)
    logits, new_caches = jax.jit(fn)(params, streams, POSITIONS, caches)
    outs = [toy_logits_fn(p, t, POSITIONS, c) for p, t, c in zip(params, streams, caches)]
    assert isinstance(new_caches, ProxyTriple)
    for got, (_, want) in zip(new_caches, outs):
        jax.tree.map(np.testing.assert_array_equal, got, want)
    base, expert, anti = (np.asarray(l, np.float64) for l, _ in outs)
    np.testing.assert_allclose(logits, base + alpha * (expert - anti), rtol=1e-5, atol=1e-6)


def test_composed_transforms_still_pass_the_cache_through():
    """A proxy ensemble with a token suppressed and warped: the caches of all members survive."""
    params = ProxyTriple(_params(1), _params(2), _params(3))
    caches = ProxyTriple(_cache(4), _cache(5), _cache(6))
    fn = sampling.map_logits(sampling.suppress_tokens(sampling.proxy_tuned(
        toy_logits_fn, toy_logits_fn, toy_logits_fn, 1.0), [2]), lambda l: sampling.process_logits(l, **ROWS))
    _, new_caches = jax.jit(fn)(params, TOKENS, POSITIONS, caches)
    for got, p, c in zip(new_caches, params, caches):
        jax.tree.map(np.testing.assert_array_equal, got, toy_logits_fn(p, TOKENS, POSITIONS, c)[1])
