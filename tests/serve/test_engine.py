"""Engine on a tiny Llama: greedy parity with sequential dense-cache decoding under every policy
(chunked prompts, preemption), with HF transformers `generate`, seeded sampling, proxy-tuning
through the engine, prefix caching, compile counts, and bad input failing alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.methods.proxy_tuning import check_vocabularies, proxy_engine
from jaxllm.model import hf, llama, presets
from jaxllm.serve import Engine, ProxyTriple, SamplingParams, combine_proxy_logits

CFG = presets.get("tiny")  # vocab 512, d_model 64, 2 layers, 4 heads / 2 kv heads
PARAMS = llama.init_params(CFG, jax.random.key(0))
V = CFG.vocab_size
# 20 blocks of 4 tokens hold one maximal request (40 + 16 - 1 tokens) but not 8 running ones:
# preemption. Budget 16 < 40-token prompts: SplitFuse chunks them. The non-chunking policies need
# budget >= prompt + max_tokens - 1 (recompute after preemption).
COMMON = dict(block_size=4, num_blocks=20, max_seqs=8)
POLICIES = {
    "splitfuse": dict(policy="splitfuse", token_budget=16, buckets=(8, 16)),
    "prefill_first": dict(policy="prefill_first", token_budget=64, buckets=(64,)),
    "static": dict(policy="static", token_budget=64, buckets=(64,)),
}


@pytest.fixture(scope="module")
def engines():
    return {name: Engine(CFG, PARAMS, **COMMON, **kw) for name, kw in POLICIES.items()}


def random_prompts(n, seed, max_len=40):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, V, int(rng.integers(1, max_len + 1)))] for _ in range(n)]


_dense_step = jax.jit(lambda params, tok_B1, cache: llama.Llama(CFG).apply({"params": params}, tok_B1, None,
                                                                            cache=cache))


DENSE_ROWS, DENSE_LEN = 64, 64  # one shape for every reference run: one compile


def dense_greedy(prompts, max_tokens, params=PARAMS):
    """Exact sequential greedy decoding with the dense KV cache, one token per step; row b feeds
    its prompt, then its own greedy tokens. Returns (tokens, log-softmax of each) per prompt."""
    steps = max(len(p) + m for p, m in zip(prompts, max_tokens)) - 1
    assert len(prompts) <= DENSE_ROWS and steps <= DENSE_LEN
    cache = llama.init_cache(CFG, DENSE_ROWS, DENSE_LEN)
    outs, logps = [[] for _ in prompts], [[] for _ in prompts]
    for t in range(steps):
        feed = [p[t] if t < len(p) else (outs[b][t - len(p)] if t - len(p) < len(outs[b]) else 0)
                for b, p in enumerate(prompts)]
        feed += [0] * (DENSE_ROWS - len(prompts))
        logits_B1V, cache = _dense_step(params, jnp.asarray(feed, jnp.int32)[:, None], cache)
        logp_BV = np.asarray(jax.nn.log_softmax(logits_B1V[:, 0]))
        for b, p in enumerate(prompts):
            if t >= len(p) - 1 and len(outs[b]) < max_tokens[b]:
                outs[b].append(int(logp_BV[b].argmax()))
                logps[b].append(float(logp_BV[b].max()))
    return outs, logps


@pytest.mark.parametrize("policy", list(POLICIES))
def test_greedy_equals_sequential_dense_decoding(engines, policy):
    prompts = random_prompts(50, seed=1)
    max_tokens = [int(m) for m in np.random.default_rng(2).integers(1, 17, len(prompts))]
    engine = engines[policy]
    preemptions = engine.scheduler.num_preemptions
    out = engine.generate(prompts, [SamplingParams(max_tokens=m) for m in max_tokens])
    ref_tokens, ref_logps = dense_greedy(prompts, max_tokens)
    assert [c.tokens for c in out] == ref_tokens
    for c, want in zip(out, ref_logps):
        np.testing.assert_allclose(c.logprobs, want, atol=2e-5)
    assert all(c.finish_reason == "length" for c in out)
    assert engine.scheduler.num_preemptions > preemptions  # the small pool forced recompute
    assert not engine.has_unfinished() and engine.scheduler.blocks.num_free_blocks == COMMON["num_blocks"]


def test_greedy_matches_hf_generate(engines, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf.save(str(tmp_path), CFG, PARAMS)
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    prompts, n = random_prompts(8, seed=3, max_len=24), 12
    ours = engines["splitfuse"].generate(prompts, SamplingParams(max_tokens=n))
    exact = 0
    for prompt, completion in zip(prompts, ours):
        with torch.no_grad():
            res = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        theirs = res.sequences[0, len(prompt):].tolist()
        if theirs == completion.tokens:
            exact += 1
            continue
        # Near-tie divergence: each side's token must be in the other's top 5 at that step.
        i = next(i for i, (a, b) in enumerate(zip(theirs, completion.tokens)) if a != b)
        hf_top5 = torch.topk(res.scores[i][0], 5).indices.tolist()
        our_logits = llama.forward(CFG, PARAMS, jnp.asarray([prompt + completion.tokens[:i]]))[0, -1]
        assert completion.tokens[i] in hf_top5 and theirs[i] in np.argsort(-np.asarray(our_logits))[:5].tolist()
    assert exact >= len(prompts) - 1


def test_seeded_sampling_is_reproducible_across_runs_and_policies(engines):
    prompts = random_prompts(12, seed=4)
    params = SamplingParams(max_tokens=8, temperature=0.9, top_k=50, top_p=0.9, seed=7, n=2)
    runs = [engines["splitfuse"].generate(prompts, params), engines["splitfuse"].generate(prompts, params),
            engines["prefill_first"].generate(prompts, params)]
    tokens = [[c.tokens for c in run] for run in runs]
    assert tokens[0] == tokens[1] == tokens[2]
    for run in runs[1:]:
        np.testing.assert_allclose([c.logprobs for c in run], [c.logprobs for c in runs[0]], atol=1e-5)
    assert sum(a != b for a, b in zip(tokens[0][::2], tokens[0][1::2])) >= 10  # the two samples differ
    other_seed = engines["splitfuse"].generate(prompts, SamplingParams(**{**vars(params), "seed": 8}))
    assert sum(a.tokens != b for a, b in zip(other_seed, tokens[0])) >= 20
    assert all(np.all(np.asarray(c.logprobs) <= 0) for c in runs[0])


def test_prefix_cache_reuse_and_reset_on_new_weights(engines):
    engine = engines["splitfuse"]
    rng = np.random.default_rng(5)
    prefix = [int(t) for t in rng.integers(0, V, 24)]  # 6 full blocks of 4
    prompts = [prefix + [int(t) for t in rng.integers(0, V, k)] for k in (3, 7, 1)]
    first = engine.generate(prompts[:1], SamplingParams(max_tokens=6))
    later = engine.generate(prompts[1:], SamplingParams(max_tokens=6))
    assert first[0].num_cached_tokens == 0 and all(c.num_cached_tokens == 24 for c in later)
    want, _ = dense_greedy(prompts, [6] * 3)
    assert [c.tokens for c in first + later] == want

    # New weights: the cached prefix K/V are stale, so set_params drops them.
    params2 = llama.init_params(CFG, jax.random.key(1))
    engine.set_params(params2)
    try:
        again = engine.generate(prompts, SamplingParams(max_tokens=6))
        assert again[0].num_cached_tokens == 0
        assert [c.tokens for c in again] == dense_greedy(prompts, [6] * 3, params2)[0]
    finally:
        engine.set_params(PARAMS)


# ---- proxy-tuning through the engine ---------------------------------------------------------
MEMBERS = ProxyTriple(PARAMS, llama.init_params(CFG, jax.random.key(2)), llama.init_params(CFG, jax.random.key(3)))
PROXY_KW = dict(block_size=4, num_blocks=48, max_seqs=8, token_budget=16, buckets=(16,))


@pytest.fixture(scope="module")
def proxy():
    return proxy_engine(ProxyTriple(CFG, CFG, CFG), MEMBERS, alpha=1.5, **PROXY_KW)


def test_proxy_invariants_reduce_to_the_base_model(engines, proxy):
    prompts = random_prompts(10, seed=6, max_len=30)
    params = SamplingParams(max_tokens=8)
    base = engines["splitfuse"].generate(prompts, params)

    alpha0 = proxy_engine(ProxyTriple(CFG, CFG, CFG), MEMBERS, alpha=0.0, **PROXY_KW).generate(prompts, params)
    assert [c.tokens for c in alpha0] == [c.tokens for c in base]
    np.testing.assert_allclose([c.logprobs for c in alpha0], [c.logprobs for c in base], atol=2e-5)

    for members in (ProxyTriple(PARAMS, MEMBERS.expert, MEMBERS.expert), ProxyTriple(PARAMS, PARAMS, PARAMS)):
        proxy.set_params(members)  # expert == anti, then three identical models: the base
        out = proxy.generate(prompts, params)
        assert [c.tokens for c in out] == [c.tokens for c in base]
    proxy.set_params(MEMBERS)
    assert [c.tokens for c in proxy.generate(prompts, params)] != [c.tokens for c in base]


_member_step = jax.jit(lambda params, tok_11, cache: llama.Llama(CFG).apply({"params": params}, tok_11, None,
                                                                             cache=cache))


def dense_proxy_greedy(streams, alpha, max_tokens):
    """Sequential proxy-tuned greedy decoding: each member prefilled on its own prompt (one token
    per step) in its own dense cache, logits combined, the token appended to all three."""
    caches, logits = [], []
    for params, prompt in zip(MEMBERS, streams):
        assert len(prompt) + max_tokens <= DENSE_LEN
        cache = llama.init_cache(CFG, 1, DENSE_LEN)
        for t in prompt:
            out, cache = _member_step(params, jnp.asarray([[t]], jnp.int32), cache)
        caches.append(cache)
        logits.append(out[:, 0])
    tokens = []
    for _ in range(max_tokens):
        tokens.append(int(jnp.argmax(combine_proxy_logits(*logits, alpha)[0])))
        for m, params in enumerate(MEMBERS):
            out, caches[m] = _member_step(params, jnp.asarray([[tokens[-1]]], jnp.int32), caches[m])
            logits[m] = out[:, 0]
    return tokens


def test_proxy_with_chat_formatted_expert_prompt_matches_sequential(proxy):
    template_head, template_tail = [1, 17, 23, 5], [9, 4]  # stands in for the chat template's ids
    texts = random_prompts(6, seed=7, max_len=20)
    prompts = [ProxyTriple(t, template_head + t + template_tail, t) for t in texts]
    prompts[0] = ProxyTriple(texts[0], texts[0], texts[0])  # one shared stream among them
    out = proxy.generate(prompts, SamplingParams(max_tokens=6))
    assert [c.tokens for c in out] == [dense_proxy_greedy(p, 1.5, 6) for p in prompts]
    # the same requests again hit the prefix cache under keys naming all three streams
    again = proxy.generate(prompts[1:], SamplingParams(max_tokens=6))
    assert [c.tokens for c in again] == [c.tokens for c in out[1:]]
    assert any(c.num_cached_tokens > 0 for c in again)


def test_proxy_vocabulary_checks():
    wide = presets.get("tiny", vocab_size=520)
    with pytest.raises(ValueError, match=r"\(512, 520, 512\)"):
        proxy_engine(ProxyTriple(CFG, wide, CFG), MEMBERS)
    with pytest.raises(ValueError, match="vocab_size 600"):
        proxy_engine(ProxyTriple(CFG, wide, CFG), MEMBERS, vocab_size=600)

    class Tok:
        bos_id, eos_id, unk_id, pad_id, vocab_size = 1, 2, 0, 3, 8

        def __init__(self, pieces):
            self.pieces = pieces

        def id_to_piece(self, i):
            return self.pieces[i]

    base = Tok([f"p{i}" for i in range(8)])
    check_vocabularies(base, Tok(list(base.pieces)), base, vocab_size=8)
    with pytest.raises(ValueError, match="token id 5"):
        check_vocabularies(base, base, Tok(base.pieces[:5] + ["x"] + base.pieces[6:]), vocab_size=8)


# ---- bad input and compile counts -------------------------------------------------------------
def test_bad_requests_fail_alone(engines):
    engine = engines["splitfuse"]
    ok = SamplingParams(max_tokens=4)
    for prompt, match in [([], "empty prompt"), ([1, V], f"invalid token id {V}"),
                          ([3, -1], "invalid token id -1"), ([1] * 510, "max_model_len 512"),
                          ([1] * 81, "whole cache has 20")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request(prompt, ok)
    for kwargs, match in [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 4, "temperature": -1.0}, "-1.0"),
                          ({"max_tokens": 4, "top_p": 0.0}, "top_p"), ({"max_tokens": 4, "top_p": 1.5}, "1.5")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="request 2: invalid token id 9999"):
        engine.generate([[1, 2], [3], [4, 9999]], ok)
    assert not engine.has_unfinished()

    # In flight: a rejected request leaves the others to complete exactly.
    prompts = random_prompts(4, seed=8)
    ids = [engine.add_request(p, ok) for p in prompts[:2]]
    engine.step()
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request([], ok)
    ids += [engine.add_request(p, ok) for p in prompts[2:]]
    while engine.has_unfinished():
        engine.step()
    assert [engine.completions(i)[0].tokens for i in ids] == dense_greedy(prompts, [4] * 4)[0]
    with pytest.raises(ValueError, match="not finished"):
        engine.completions(ids[0])


def test_compiles_once_per_bucket_over_200_requests(engines):
    engine = engines["splitfuse"]
    rng = np.random.default_rng(9)
    prompts = random_prompts(200, seed=10, max_len=12)
    engine.generate(prompts, [SamplingParams(max_tokens=int(m)) for m in rng.integers(1, 5, len(prompts))])
    # every earlier test of this engine included: one trace per (token bucket, table width) used
    assert engine.num_compiles <= len(POLICIES["splitfuse"]["buckets"])
    assert engines["prefill_first"].num_compiles <= 1
