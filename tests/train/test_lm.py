"""LM objective on packed rows against float64 NumPy on unpacked documents."""
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
