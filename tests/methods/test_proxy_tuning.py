"""Proxy-tuning through the engine with members of different sizes and per-member prompts:
greedy tokens equal a cache-free reference (each member's full forward over its whole context,
combined base + α·(expert − anti) in float64 NumPy, at every step); batched decoding under forced
chunking and preemption equals one-at-a-time decoding; bad α fails at construction."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.methods.proxy_tuning import proxy_engine
from jaxllm.model import llama, presets
from jaxllm.serve import ProxyTriple, SamplingParams

BASE = presets.get("tiny")  # d_model 64, 2 layers, vocab 512
SMALL = presets.get("tiny", d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
CONFIGS = ProxyTriple(BASE, SMALL, SMALL)
PARAMS = ProxyTriple(llama.init_params(BASE, jax.random.key(10)), llama.init_params(SMALL, jax.random.key(11)),
                     llama.init_params(SMALL, jax.random.key(12)))
V, ALPHA, REF_LEN = BASE.vocab_size, 1.5, 48
HEAD, TAIL = [1, 17, 23, 5, 40], [9, 4]  # stand in for the expert's chat template


def member_prompts(n, seed, max_len=24):
    """Per-member streams: base and anti see the text, the expert sees it inside a template (a
    longer prompt, so base and anti are left-padded in the cache); one request shares one stream."""
    rng = np.random.default_rng(seed)
    texts = [[int(t) for t in rng.integers(3, V, int(rng.integers(1, max_len + 1)))] for _ in range(n)]
    prompts = [ProxyTriple(t, HEAD + t + TAIL, t) for t in texts]
    prompts[1] = ProxyTriple(texts[1], texts[1], texts[1])
    return prompts


_full_forward = {cfg: jax.jit(lambda p, tokens_1T, cfg=cfg: llama.forward(cfg, p, tokens_1T)) for cfg in (BASE, SMALL)}


def reference_greedy(streams, alpha, max_tokens):
    """Cache-free proxy greedy decoding: at each step every member runs a full forward over its own
    prompt + the tokens so far (right-padded to one length; causal, so the last real position is
    exact), and the next token is argmax of base + α·(expert − anti) in float64."""
    out = []
    for _ in range(max_tokens):
        rows = []
        for cfg, params, prompt in zip(CONFIGS, PARAMS, streams):
            context = list(prompt) + out
            assert len(context) <= REF_LEN
            tokens = jnp.asarray([context + [0] * (REF_LEN - len(context))], jnp.int32)
            rows.append(np.asarray(_full_forward[cfg](params, tokens)[0, len(context) - 1], np.float64))
        base, expert, anti = rows
        out.append(int(np.argmax(base + alpha * (expert - anti))))
    return out


@pytest.fixture(scope="module")
def roomy():
    """Room for every request at once; a budget of 16 still chunks the longer prompts."""
    return proxy_engine(CONFIGS, PARAMS, alpha=ALPHA, block_size=4, num_blocks=96, max_seqs=8, token_budget=16,
                        buckets=(16,), max_model_len=64)


def test_engine_proxy_greedy_equals_cache_free_reference(roomy):
    prompts = member_prompts(6, seed=1)
    out = roomy.generate(prompts, SamplingParams(max_tokens=8))
    want = [reference_greedy(p, ALPHA, 8) for p in prompts]
    assert [c.tokens for c in out] == want
    # the members really disagree: the combination is not any single member's greedy decoding
    assert want != [reference_greedy(p, 0.0, 8) for p in prompts]


def test_batched_with_chunking_and_preemption_equals_one_at_a_time(roomy):
    # 18 blocks of 4 tokens hold about two requests (up to 5 + 24 + 2 + 10 tokens each): the batch
    # preempts; a token budget of 8 chunks every prompt longer than 8.
    prompts = member_prompts(8, seed=2)
    max_tokens = [int(m) for m in np.random.default_rng(3).integers(3, 11, len(prompts))]
    sampling = [SamplingParams(max_tokens=m) for m in max_tokens]
    small = proxy_engine(CONFIGS, PARAMS, alpha=ALPHA, block_size=4, num_blocks=18, max_seqs=8, token_budget=8,
                         buckets=(8,), max_model_len=64, prefix_caching=False)
    batched = small.generate(prompts, sampling)
    assert small.scheduler.num_preemptions > 0
    roomy.reset_prefix_cache()
    alone = [roomy.generate([p], [s])[0] for p, s in zip(prompts, sampling)]
    assert [c.tokens for c in batched] == [c.tokens for c in alone]
    assert [len(c.tokens) for c in batched] == max_tokens
    np.testing.assert_allclose(np.concatenate([c.logprobs for c in batched]),
                               np.concatenate([c.logprobs for c in alone]), atol=2e-5)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), "1.0", None])
def test_alpha_must_be_a_finite_number(alpha):
    with pytest.raises(ValueError, match=f"finite number, got {alpha!r}".replace("(", r"\(").replace(")", r"\)")):
        proxy_engine(CONFIGS, PARAMS, alpha=alpha)
