"""Objective-seam contract: every loss is exact under gradient accumulation.

For each objective of `jaxllm.objectives` (and the pre-training LM loss built on it), the loss and
gradients of one batch of 8 rows equal those of 4 micro-batches of 2 (`jaxllm.train.step.
accumulated_grads`), with masks of very different lengths per row, so a loss that averaged per
micro-batch instead of over the whole batch would fail.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model import llama, presets
from jaxllm.objectives import contrastive, lm
from jaxllm.objectives import preference as pref
from jaxllm.train.lm import lm_loss_fn
from jaxllm.train.step import accumulated_grads

B, T, V, D = 8, 10, 17, 6


def _masks(rng, rows, T):
    """Rows whose scored spans range from 1 token to the whole row."""
    mask = np.zeros((rows, T), np.int32)
    for r in range(rows):
        start = rng.integers(1, T - 1)
        mask[r, start:rng.integers(start + 1, T + 1)] = 1
    mask[0, 1:] = 1
    return mask


def _bigram(params, tokens_BT, positions_BT, segment_ids_BT):
    return params["table"][tokens_BT] + params["pos"][positions_BT][..., None]


def _bigram_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"table": jnp.asarray(rng.normal(size=(V, V)), jnp.float32),
            "pos": jnp.asarray(rng.normal(size=(T,)), jnp.float32)}


def _pair_batch(seed=1):
    rng = np.random.default_rng(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        batch[f"{side}_tokens"] = rng.integers(0, V, (B, T)).astype(np.int32)
        batch[f"{side}_mask"] = _masks(rng, B, T)
        batch[f"{side}_positions"] = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    batch["ref_chosen_logps"] = rng.normal(-20, 3, B).astype(np.float32)
    batch["ref_rejected_logps"] = rng.normal(-20, 3, B).astype(np.float32)
    return batch


def _assert_exact_under_accumulation(loss_fn, params, batch):
    one_loss, one_grads, _ = accumulated_grads(loss_fn, params, batch, jax.random.key(0), grad_accum=1)
    acc_loss, acc_grads, _ = accumulated_grads(loss_fn, params, batch, jax.random.key(0), grad_accum=4)
    np.testing.assert_allclose(acc_loss, one_loss, rtol=2e-6)
    assert any(float(jnp.max(jnp.abs(g))) > 1e-3 for g in jax.tree.leaves(one_grads))  # a real gradient
    for acc, one in zip(jax.tree.leaves(acc_grads), jax.tree.leaves(one_grads)):
        np.testing.assert_allclose(acc, one, rtol=1e-4, atol=1e-6)


PREFERENCE_CASES = (
    [pref.PreferenceConfig(kind="dpo", loss_type=t, label_smoothing=0.1 if t == "robust" else 0.0)
     for t in pref.DPO_LOSSES]
    + [pref.PreferenceConfig(kind="dpo", nll_weight=0.5)]
    + [pref.PreferenceConfig(kind="cpo", loss_type=t, nll_reduction=r)
       for t, r in itertools.product(pref.CPO_LOSSES, pref.NLL_REDUCTIONS)]
    + [pref.PreferenceConfig(kind="cpo", alpha=0.25)]  # AlphaPO
)


@pytest.mark.parametrize("cfg", PREFERENCE_CASES,
                         ids=lambda c: f"{c.kind}-{c.loss_type}-{c.nll_reduction}-nll{c.nll_weight}-a{c.alpha}")
def test_preference_losses(cfg):
    _assert_exact_under_accumulation(pref.make_preference_loss(_bigram, cfg), _bigram_params(), _pair_batch())


def test_masked_nll():
    rng = np.random.default_rng(2)
    batch = {"tokens": rng.integers(0, V, (B, T)).astype(np.int32), "mask": _masks(rng, B, T)}

    def loss_fn(params, batch, rng):
        positions = jnp.broadcast_to(jnp.arange(T), (batch["tokens"].shape[0], T))
        return {"nll": lm.nll_loss(_bigram(params, batch["tokens"], positions, None), batch["tokens"],
                                   batch["mask"])}, {}

    _assert_exact_under_accumulation(loss_fn, _bigram_params(), batch)


def test_packed_lm_loss_of_the_model():
    cfg = presets.get("tiny", vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, d_ff=48, n_layers=1, max_len=T)
    rng = np.random.default_rng(3)
    segments = np.sort(rng.integers(1, 4, (B, T)), axis=1).astype(np.int32)
    batch = {"tokens": rng.integers(0, 64, (B, T)).astype(np.int32), "loss_mask": _masks(rng, B, T),
             "segment_ids": segments,
             "positions": np.stack([np.concatenate([np.arange(np.sum(r == s)) for s in np.unique(r)])
                                    for r in segments]).astype(np.int32)}
    _assert_exact_under_accumulation(lm_loss_fn(cfg), llama.init_params(cfg, jax.random.key(0)), batch)


def test_info_nce_with_hard_negatives():
    """With explicit hard negatives each query's candidates do not depend on the micro-batch split
    except for the in-batch contexts; with `context_ids_B` marking every row as one passage the
    in-batch columns are masked out, and the loss (a mean over equal-size micro-batches) is exact.
    (In-batch negatives are, by definition, the other rows of the *micro*-batch: that loss
    changes with the split, and accumulating it is a different objective.)"""
    rng = np.random.default_rng(4)
    batch = {"x": rng.normal(size=(B, D)).astype(np.float32), "c": rng.normal(size=(B, D)).astype(np.float32),
             "neg": rng.normal(size=(B, 3, D)).astype(np.float32), "ids": np.zeros(B, np.int32)}

    def loss_fn(params, batch, rng):
        query_BD = jnp.tanh(batch["x"] @ params["w"])
        loss, _ = contrastive.info_nce_loss(query_BD, batch["c"], temperature=0.5, negatives_BND=batch["neg"],
                                            context_ids_B=batch["ids"])
        return loss, {}

    params = {"w": jnp.asarray(np.random.default_rng(5).normal(size=(D, D)), jnp.float32)}
    _assert_exact_under_accumulation(loss_fn, params, batch)
