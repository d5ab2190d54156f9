"""Packed rows from the data layer give every example the same loss as running it alone."""
import grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.data import packing
from jaxllm.model import llama, presets
from jaxllm.objectives import lm

CFG = presets.get("tiny", vocab_size=64, n_layers=1)


def test_packed_rows_give_per_example_losses_of_unpacked_examples():
    rng = np.random.default_rng(0)
    examples = [rng.integers(4, CFG.vocab_size, size=n).astype(np.int32) for n in (5, 9, 3, 7, 6, 4)]
    ds = grain.MapDataset.source([{"tokens": e, "loss_mask": np.ones_like(e)} for e in examples]).to_iter_dataset()
    rows = list(packing.pack(ds, seq_len=16, packing="first_fit", num_bins=2))
    params = llama.init_params(CFG, jax.random.key(0))
    forward = jax.jit(lambda t, p, s: llama.forward(CFG, params, t, p, s))
    packed_losses = {}
    for row in rows:
        tokens, seg, pos, mask = (jnp.asarray(row[k])[None] for k in ("tokens", "segment_ids", "positions", "loss_mask"))
        logp = np.asarray(lm.token_logprobs(forward(tokens, pos, seg), tokens))[0]
        for s in set(np.asarray(seg[0]).tolist()) - {0}:
            where = np.asarray(seg[0]) == s
            key = tuple(np.asarray(tokens[0])[where].tolist())
            packed_losses[key] = -np.sum(logp[where] * np.asarray(mask[0])[where])
    assert len(packed_losses) == len(examples) and len(rows) < len(examples)
    for e in examples:
        toks = jnp.asarray(e)[None]
        logits = forward(toks, jnp.arange(len(e))[None], jnp.ones_like(toks))
        alone = -float(lm.sequence_logprobs(logits, toks, jnp.ones_like(toks))[0])
        np.testing.assert_allclose(packed_losses[tuple(e.tolist())], alone, rtol=1e-5)
