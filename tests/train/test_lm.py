"""LM objective on packed rows against float64 NumPy on unpacked documents; the KV-cache sampler
against exact sequential greedy decoding with the full forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model import llama, presets
from jaxllm.train import lm

CFG = presets.get("tiny")


@pytest.fixture(scope="module")
def params():
    return llama.init_params(CFG, jax.random.key(0))


def log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_packed_loss_equals_unpacked_float64_reference(params):
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, CFG.vocab_size, n) for n in (7, 5, 9, 3, 8)]
    rows = [[0, 1], [2, 3, 4]]  # documents per row; row 0 padded at the end
    T = 20
    batch = {k: np.zeros((2, T), dtype) for k, dtype in
             (("tokens", np.int32), ("segment_ids", np.int32), ("positions", np.int32), ("loss_mask", np.float32))}
    for r, doc_ids in enumerate(rows):
        at = 0
        for seg, d in enumerate(doc_ids, start=1):
            n = len(docs[d])
            batch["tokens"][r, at:at + n] = docs[d]
            batch["segment_ids"][r, at:at + n] = seg
            batch["positions"][r, at:at + n] = np.arange(n)
            batch["loss_mask"][r, at + 1:at + n] = 1.0  # the packing convention: first token unscored
            at += n
    terms, aux = lm.lm_loss_fn(CFG)(params, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0))
    num, den = terms["nll"]

    # Each document alone, right-padded to one length (one compile; causal attention keeps the
    # padding out of the logits of the real tokens).
    longest = max(len(d) for d in docs)
    alone = np.stack([np.pad(d, (0, longest - len(d))) for d in docs]).astype(np.int32)
    logp = log_softmax64(llama.forward(CFG, params, jnp.asarray(alone)))
    nll = -sum(logp[i, t - 1, doc[t]] for i, doc in enumerate(docs) for t in range(1, len(doc)))
    count = sum(len(d) - 1 for d in docs)
    assert float(den) == count and aux == {}
    np.testing.assert_allclose(float(num) / float(den), nll / count, rtol=2e-6)


def test_greedy_sample_equals_sequential_full_forward(params):
    prompt = np.array([[5, 17, 99, 3], [250, 8, 8, 41]], np.int32)
    got = np.asarray(lm.sample(CFG, params, prompt, 10))
    # One fixed-length buffer (one compile): causal attention makes the zeros after position t
    # invisible to the logits at t.
    T = prompt.shape[1]
    seq = np.zeros((2, T + 10), np.int32)
    seq[:, :T] = prompt
    forward = jax.jit(lambda tokens: llama.forward(CFG, params, tokens))
    for t in range(T, T + 10):
        seq[:, t] = np.asarray(forward(jnp.asarray(seq))[:, t - 1]).argmax(-1)
    np.testing.assert_array_equal(got, seq[:, T:])


def test_temperature_sampling_is_seeded_and_follows_the_distribution(params):
    prompt = np.array([[5, 17, 99, 3]], np.int32)
    a = lm.sample(CFG, params, prompt, 6, temperature=1.0, rng=jax.random.key(1))
    b = lm.sample(CFG, params, prompt, 6, temperature=1.0, rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    # Near-zero temperature concentrates all mass on the argmax.
    cold = lm.sample(CFG, params, prompt, 6, temperature=1e-4, rng=jax.random.key(2))
    np.testing.assert_array_equal(cold, lm.sample(CFG, params, prompt, 6))
    # The first sampled token's frequency over many rows matches its softmax probability.
    rows = np.repeat(prompt, 512, axis=0)
    first = np.asarray(lm.sample(CFG, params, rows, 1, temperature=1.0, rng=jax.random.key(3)))[:, 0]
    probs = np.exp(log_softmax64(llama.forward(CFG, params, jnp.asarray(prompt))[0, -1]))
    top = int(probs.argmax())
    assert abs(np.mean(first == top) - probs[top]) < 4 * np.sqrt(probs[top] * (1 - probs[top]) / len(first)) + 1e-3


def test_sample_rejects_bad_requests(params):
    with pytest.raises(ValueError, match="exceeds the model's max_len 512"):
        lm.sample(CFG, params, np.zeros((1, 500), np.int32), 13)
    with pytest.raises(ValueError, match="num_tokens must be >= 1, got 0"):
        lm.sample(CFG, params, np.zeros((1, 4), np.int32), 0)
    with pytest.raises(ValueError, match=r"\[B, T\] array .* shape \(4,\)"):
        lm.sample(CFG, params, np.zeros((4,), np.int32), 2)
