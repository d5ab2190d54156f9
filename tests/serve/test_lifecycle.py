"""Request lifecycle and sampling features of the Engine on a tiny Llama with the shipped
tokenizer: abort, n/best_of forked from one prefill, stop strings across token boundaries, top
log-probs, penalties (against HF transformers' processor and float64 NumPy), logit bias, and
prompt log-probs for echo."""
import collections

import jax
import numpy as np
import pytest

from jaxllm.data.tokenizer import Tokenizer
from jaxllm.model import llama, presets
from jaxllm.serve import Engine, SamplingParams
from jaxllm.serve.detokenize import IncrementalText
from jaxllm.serve.sampling import adjust_logits, logit_adjust

TOKENIZER = Tokenizer.default()
CFG = presets.get("tiny", vocab_size=TOKENIZER.vocab_size)
PARAMS = llama.init_params(CFG, jax.random.key(0))
PROMPT = TOKENIZER.encode("def add(a, b):", bos=True)


@pytest.fixture(scope="module")
def engine():
    return Engine(CFG, PARAMS, token_budget=16, buckets=(8, 16), block_size=4, num_blocks=40, max_seqs=8,
                  prefix_caching=False, tokenizer=TOKENIZER)


def dense_logprobs(tokens):
    """float64 log-softmax of the model's next-token logits after each prefix of `tokens`."""
    logits = np.asarray(llama.Llama(CFG).apply({"params": PARAMS}, np.asarray([tokens], np.int32))[0], np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)


def test_abort_waiting_and_running_frees_blocks_and_spares_others():
    engine = Engine(CFG, PARAMS, token_budget=16, buckets=(8, 16), block_size=4, num_blocks=40, max_seqs=8)
    other = TOKENIZER.encode("import os", bos=True)
    (want,) = engine.generate([other], SamplingParams(max_tokens=6))
    long_prompt = PROMPT * 3  # 24 tokens: 3 full blocks enter the prefix cache while prefilling
    running = engine.add_request(long_prompt, SamplingParams(max_tokens=20, n=2))
    kept = engine.add_request(other, SamplingParams(max_tokens=6))
    engine.step(), engine.step()
    waiting = engine.add_request(PROMPT, SamplingParams(max_tokens=4))
    cached = engine.scheduler.blocks.num_cached_blocks
    assert cached >= 3 and engine.abort(running) and engine.abort(waiting)
    assert not engine.abort(running) and not engine.abort(12345)
    blocks = engine.scheduler.blocks  # ref counts: exactly the blocks of the request still running
    live = collections.Counter(b for seq in engine.scheduler.running for b in blocks.block_table(seq.seq_id))
    assert {b: int(c) for b, c in enumerate(blocks.ref_counts) if c} == dict(live) and live
    events = []
    while engine.has_unfinished():
        events += engine.step()
    assert {e.request_id for e in events} == {kept}
    assert engine.completions(kept)[0].tokens == want.tokens
    assert not engine.abort(kept)  # finished
    assert blocks.num_free_blocks == 40 and not blocks.ref_counts.any() and blocks.num_cached_blocks >= cached
    # the aborted prompt's cached blocks are reused, with exact outputs
    (again,) = engine.generate([long_prompt], SamplingParams(max_tokens=3))
    fresh = Engine(CFG, PARAMS, token_budget=16, buckets=(8, 16), block_size=4, num_blocks=40, max_seqs=8)
    (uncached,) = fresh.generate([long_prompt], SamplingParams(max_tokens=3))
    assert again.num_cached_tokens >= 12 and again.tokens == uncached.tokens


def test_n_and_best_of_prefill_the_prompt_once(engine):
    (greedy,) = engine.generate([PROMPT], SamplingParams(max_tokens=6))
    before = engine.scheduler.num_prompt_tokens_computed
    out = engine.generate([PROMPT], SamplingParams(max_tokens=6, n=3))
    assert engine.scheduler.num_prompt_tokens_computed - before == len(PROMPT) + 2  # not 3 * len(PROMPT)
    assert [c.tokens for c in out] == [greedy.tokens] * 3
    sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=5, n=2, best_of=4)
    everything = engine.generate([PROMPT], SamplingParams(max_tokens=6, temperature=1.0, seed=5, n=4))
    best = engine.generate([PROMPT], sampled)
    ranked = sorted(everything, key=lambda c: -sum(c.logprobs))[:2]
    assert [c.tokens for c in best] == [c.tokens for c in ranked] and [c.sample_index for c in best] == [0, 1]
    assert not engine.scheduler.blocks.ref_counts.any()


def test_incremental_text_matches_full_decode_and_cuts_stop_strings():
    rng = np.random.default_rng(0)
    for _ in range(5):
        tokens = [int(t) for t in rng.integers(3, TOKENIZER.vocab_size, 30)]
        text = IncrementalText(TOKENIZER.decode)
        pieces = []
        for t in tokens:
            assert not text.append(t)
            pieces.append(text.take_delta(final=False))
        pieces.append(text.take_delta(final=True))
        assert text.text == "".join(pieces) == TOKENIZER.decode(tokens)
    tokens = TOKENIZER.encode("return a + b\nprint(result)")
    full = TOKENIZER.decode(tokens)
    stop = "b\npri"  # spans tokens
    text, pieces = IncrementalText(TOKENIZER.decode, [stop, "never"]), []
    for i, t in enumerate(tokens):
        if text.append(t):
            break
        pieces.append(text.take_delta(final=False))
        assert stop[0] not in "".join(pieces)[len(full[:full.find(stop)]):]  # held back, never sent
    pieces.append(text.take_delta(final=True))
    assert text.text == "".join(pieces) == full[:full.find(stop)]
    assert TOKENIZER.decode(tokens[:i + 1]).find(stop) >= 0 > TOKENIZER.decode(tokens[:i]).find(stop)


def test_stop_strings_end_a_sample_with_the_text_cut(engine):
    (plain,) = engine.generate([PROMPT], SamplingParams(max_tokens=12))
    assert plain.text == TOKENIZER.decode(plain.tokens)
    stop = plain.text[len(plain.text) // 2:len(plain.text) // 2 + 3]
    rid = engine.add_request(PROMPT, SamplingParams(max_tokens=12, stop=(stop,)))
    streamed = []
    while engine.has_unfinished():
        streamed += [e for e in engine.step() if e.request_id == rid]
    (cut,) = engine.completions(rid)
    assert cut.finish_reason == "stop" and streamed[-1].finish_reason == "stop"
    assert cut.text == plain.text[:plain.text.find(stop)] == "".join(e.text for e in streamed)
    assert cut.tokens == plain.tokens[:len(cut.tokens)] and len(cut.tokens) < 12
    with pytest.raises(ValueError, match="need an Engine with a tokenizer"):
        Engine(CFG, PARAMS, num_blocks=8).add_request(PROMPT, SamplingParams(max_tokens=2, stop=("x",)))


@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_top_logprobs_are_those_of_the_processed_distribution(engine, temperature):
    (c,) = engine.generate([PROMPT], SamplingParams(max_tokens=3, temperature=temperature, seed=2, logprobs=5))
    for i, top in enumerate(c.top_logprobs):
        ref = dense_logprobs(PROMPT + c.tokens[:i])[-1]
        if temperature:
            ref = ref / temperature
            ref = ref - np.log(np.exp(ref - ref.max()).sum()) - ref.max()
        order = np.argsort(-ref)[:5]
        assert [t for t, _ in top] == order.tolist()
        np.testing.assert_allclose([x for _, x in top], ref[order], atol=2e-4)
        np.testing.assert_allclose(c.logprobs[i], ref[c.tokens[i]], atol=2e-4)


def test_prompt_logprobs_equal_float64_reference(engine):
    got = engine.prompt_logprobs(PROMPT, num_top=3)
    ref = dense_logprobs(PROMPT)
    assert len(got) == len(PROMPT) - 1
    for i, (logprob, top) in enumerate(got):
        np.testing.assert_allclose(logprob, ref[i, PROMPT[i + 1]], atol=2e-4)
        assert [t for t, _ in top] == np.argsort(-ref[i])[:3].tolist()


def test_penalties_match_hf_and_openai_semantics():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(1)
    V, S = 50, 3
    logits = rng.normal(size=(S, V)).astype(np.float32) * 3
    prompts = [list(rng.integers(0, V, 6)) for _ in range(S)]
    outputs = [list(rng.integers(0, V, 8)) for _ in range(S)]
    params = [SamplingParams(max_tokens=1, repetition_penalty=1.7),
              SamplingParams(max_tokens=1, presence_penalty=0.6, frequency_penalty=-0.4, logit_bias={5: 3.0}),
              SamplingParams(max_tokens=1)]
    got = np.asarray(adjust_logits(logits, logit_adjust(params, prompts, outputs, S, V)))
    hf = transformers.RepetitionPenaltyLogitsProcessor(1.7)
    ids = torch.tensor([prompts[0] + outputs[0]])
    np.testing.assert_allclose(got[0], hf(ids, torch.tensor(logits[:1]))[0].numpy(), rtol=1e-6)
    counts = np.bincount(outputs[1], minlength=V).astype(np.float64)
    want = logits[1].astype(np.float64) - 0.6 * (counts > 0) + 0.4 * counts
    want[5] += 3.0
    np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[2], logits[2])


def test_logit_bias_and_repetition_penalty_steer_greedy_decoding(engine):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    (forced,) = engine.generate([PROMPT], SamplingParams(max_tokens=4, logit_bias={42: 100.0}))
    assert forced.tokens == [42] * 4
    (penalised,) = engine.generate([PROMPT], SamplingParams(max_tokens=8, repetition_penalty=1.3))
    hf = transformers.RepetitionPenaltyLogitsProcessor(1.3)
    for i, token in enumerate(penalised.tokens):  # each step: argmax of HF's processor on the model's logits
        history = PROMPT + penalised.tokens[:i]
        logits = llama.Llama(CFG).apply({"params": PARAMS}, np.asarray([history], np.int32))[0, -1]
        want = hf(torch.tensor([history]), torch.tensor(np.asarray(logits, np.float32)[None]))[0]
        assert token == int(want.argmax())
    with pytest.raises(ValueError, match="logit_bias token id 99999"):
        engine.add_request(PROMPT, SamplingParams(max_tokens=2, logit_bias={99999: 1.0}))
    for kwargs, match in [({"presence_penalty": 3.0}, "presence_penalty"), ({"repetition_penalty": 0.0}, "repetition"),
                          ({"logprobs": 21}, "logprobs"), ({"n": 3, "best_of": 2}, "best_of"),
                          ({"stop": [""]}, "stop")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(max_tokens=2, **kwargs)


class FlakyTokenizer:
    """The shipped tokenizer, except that decoding token 42 raises."""

    def decode(self, ids):
        if 42 in ids:
            raise RuntimeError("cannot decode 42")
        return TOKENIZER.decode(ids)


def test_a_request_whose_bookkeeping_fails_is_aborted_alone(engine):
    (want,) = engine.generate([PROMPT], SamplingParams(max_tokens=4))
    engine.tokenizer = FlakyTokenizer()
    try:
        bad = engine.add_request(PROMPT, SamplingParams(max_tokens=4, n=2, logit_bias={42: 100.0}))
        good = engine.add_request(PROMPT, SamplingParams(max_tokens=4))
        events = []
        while engine.has_unfinished():
            events += engine.step()
    finally:
        engine.tokenizer = TOKENIZER
    failures = engine.take_failures()
    assert list(failures) == [bad] and "cannot decode 42" in str(failures[bad]) and not engine.take_failures()
    assert {e.request_id for e in events} == {good} and not engine.is_finished(bad)
    (c,) = engine.completions(good)
    assert c.tokens == want.tokens and c.text == want.text
    assert not engine.scheduler.blocks.ref_counts.any()
