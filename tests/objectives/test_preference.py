"""DPO / CPO losses against TRL 1.x, closed forms, the loss_fn contract and bad-input errors."""
import functools
import math
import os
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.objectives import preference as pref

RTOL, ATOL = 2e-5, 2e-6


@pytest.fixture(scope="module")
def trl_losses():
    """TRL's CPO and DPO trainer classes (the reference), or a skip when TRL cannot be imported."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch = pytest.importorskip("torch", reason="TRL parity needs torch")
    cpo = pytest.importorskip("trl.experimental.cpo", reason="TRL parity needs `trl` (pip install trl)")
    trl = pytest.importorskip("trl", reason="TRL parity needs `trl` (pip install trl)")
    return types.SimpleNamespace(torch=torch, CPOTrainer=cpo.CPOTrainer, DPOTrainer=trl.DPOTrainer)


def _accelerator():
    identity = lambda x: x  # noqa: E731  single process: gather is the identity
    return types.SimpleNamespace(device="cpu", gather=identity, gather_for_metrics=identity)


def _cpo_namespace(trl_losses, *, loss_type, beta, label_smoothing, simpo_gamma=0.5, alpha=0.0, cpo_alpha=1.0):
    """The attributes `CPOTrainer.cpo_loss` / `get_batch_loss_metrics` read, on a plain namespace."""
    cls = trl_losses.CPOTrainer
    ns = types.SimpleNamespace(
        loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, alpha=alpha,
        cpo_alpha=cpo_alpha, accelerator=_accelerator(), is_encoder_decoder=False, pad_token_id=0,
        aux_loss_enabled=False, concatenated_inputs=cls.concatenated_inputs, get_batch_logps=cls.get_batch_logps,
    )
    ns.cpo_loss = functools.partial(cls.cpo_loss, ns)
    ns.concatenated_forward = functools.partial(cls.concatenated_forward, ns)
    return ns


def _trl_cpo_loss(trl_losses, chosen_B, rejected_B, **hyper):
    torch = trl_losses.torch
    ns = _cpo_namespace(trl_losses, **hyper)
    out = trl_losses.CPOTrainer.cpo_loss(ns, torch.tensor(np.asarray(chosen_B)), torch.tensor(np.asarray(rejected_B)))
    return [t.numpy() for t in out]


def _trl_dpo_compute_loss(trl_losses, per_token_logps_ST, input_ids_ST, completion_mask_ST, ref_chosen_B,
                          ref_rejected_B, *, loss_type, beta, label_smoothing):
    """`DPOTrainer._compute_loss` with precomputed reference log-probs and a stub policy whose fused LM head
    returns the given per-token log-probs ([2B, T-1], chosen rows first). Returns (mean loss, metrics)."""
    torch = trl_losses.torch
    S, T = input_ids_ST.shape
    ns = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    outputs = types.SimpleNamespace(
        log_probs=torch.tensor(np.asarray(per_token_logps_ST, np.float32)),
        entropy=torch.zeros(S, T - 1), mean_logits=torch.zeros(S, T - 1),
        is_top1=torch.zeros(S, T - 1, dtype=torch.bool),
    )
    inputs = {
        "input_ids": torch.tensor(np.asarray(input_ids_ST, np.int64)),
        "attention_mask": torch.ones(S, T, dtype=torch.int64),
        "completion_mask": torch.tensor(np.asarray(completion_mask_ST, np.int64)),
        "ref_chosen_logps": torch.tensor(np.asarray(ref_chosen_B, np.float32)),
        "ref_rejected_logps": torch.tensor(np.asarray(ref_rejected_B, np.float32)),
    }
    loss = trl_losses.DPOTrainer._compute_loss(ns, lambda **kw: outputs, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in ns._metrics["train"].items()}


def _random_logps(seed, B=16, low=-40.0, high=-1.0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(low, high, B).astype(np.float32) for _ in range(4)]


# ------------------------------------------------------------------------------------------------ CPO vs TRL

@pytest.mark.parametrize("loss_type", sorted(pref.CPO_LOSSES))
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_cpo_loss_matches_trl(trl_losses, loss_type, label_smoothing, alpha):
    if pref.CPO_LOSSES[loss_type].length_normalised:  # token-mean log-probs are O(1)
        chosen_B, rejected_B = (x / 20.0 for x in _random_logps(0)[:2])
    else:
        chosen_B, rejected_B = _random_logps(0)[:2]
    hyper = dict(loss_type=loss_type, beta=0.3, label_smoothing=label_smoothing, simpo_gamma=0.7, alpha=alpha)
    want_losses, want_chosen, want_rejected = _trl_cpo_loss(trl_losses, chosen_B, rejected_B, **hyper)
    losses_B, metrics = jax.jit(functools.partial(pref.cpo_loss, **hyper))(chosen_B, rejected_B)
    np.testing.assert_allclose(losses_B, want_losses, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["rewards/chosen"], want_chosen, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["rewards/rejected"], want_rejected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["margin"], want_chosen - want_rejected, rtol=RTOL, atol=1e-5)
    np.testing.assert_array_equal(metrics["accuracy"], (want_chosen > want_rejected).astype(np.float32))


# ------------------------------------------------------------------------------------------------ DPO vs TRL

def _trl_dpo_per_example(trl_losses, pc, pr, rc, rr, nc, nr, **hyper):
    """TRL's DPO loss and rewards for one pair whose summed policy log-probs (pc, pr) are spread evenly over
    nc / nr completion tokens (the lengths TRL's IPO divides by)."""
    T = 1 + max(nc, nr)
    completion_mask = np.zeros((2, T), np.int64)
    completion_mask[0, 1:1 + nc] = 1
    completion_mask[1, 1:1 + nr] = 1
    per_token = completion_mask[:, 1:] * np.array([[pc / nc], [pr / nr]], np.float32)
    loss, metrics = _trl_dpo_compute_loss(trl_losses, per_token, np.ones((2, T)), completion_mask, [rc], [rr],
                                          **hyper)
    return loss, metrics["rewards/chosen"], metrics["rewards/rejected"]


# TRL 1.x DPOTrainer drops label_smoothing from sigmoid: that case is test_dpo_sigmoid_smoothing_*.
@pytest.mark.parametrize("loss_type,label_smoothing", [
    (loss_type, eps) for loss_type in sorted(pref.DPO_LOSSES) for eps in (0.0, 0.2)
    if not (loss_type == "sigmoid" and eps)])
def test_dpo_loss_matches_trl_dpo_trainer(trl_losses, loss_type, label_smoothing):
    pc, pr, rc, rr = _random_logps(1, B=6)
    lengths = np.random.default_rng(2).integers(1, 9, size=(2, 6))
    hyper = dict(loss_type=loss_type, beta=0.2, label_smoothing=label_smoothing)
    want = np.array([
        _trl_dpo_per_example(trl_losses, *(float(x[b]) for x in (pc, pr, rc, rr)), *lengths[:, b], **hyper)
        for b in range(6)
    ])
    if pref.DPO_LOSSES[loss_type].length_normalised:
        nc, nr = lengths.astype(np.float32)
        got_losses, metrics = pref.dpo_loss(pc / nc, pr / nr, rc / nc, rr / nr, **hyper)
    else:
        got_losses, metrics = pref.dpo_loss(pc, pr, rc, rr, **hyper)
        np.testing.assert_allclose(metrics["rewards/chosen"], want[:, 1], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(metrics["rewards/rejected"], want[:, 2], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_losses, want[:, 0], rtol=RTOL, atol=ATOL)


def test_dpo_sigmoid_smoothing_is_conservative_dpo(trl_losses):
    """With ε > 0 the DPO sigmoid loss is cDPO, i.e. TRL's CPO sigmoid formula on the reference-corrected
    log-ratios (TRL 1.x DPOTrainer drops ε from its sigmoid loss; TRL's CPO keeps it)."""
    pc, pr, rc, rr = _random_logps(3)
    losses_B, metrics = pref.dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.2)
    want_losses, want_chosen, want_rejected = _trl_cpo_loss(
        trl_losses, pc - rc, pr - rr, loss_type="sigmoid", beta=0.2, label_smoothing=0.2)
    np.testing.assert_allclose(losses_B, want_losses, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["rewards/chosen"], want_chosen, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["rewards/rejected"], want_rejected, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------ full objectives

def _pair_batch(seed, B=3, T=9, V=13):
    """Random logits for [chosen; rejected] and a pair batch: prompts of 2-4 tokens, responses to a random end."""
    rng = np.random.default_rng(seed)
    logits_STV = rng.normal(0.0, 2.0, (2 * B, T, V)).astype(np.float32)
    tokens_ST = rng.integers(0, V, (2 * B, T)).astype(np.int32)
    mask_ST = np.zeros((2 * B, T), np.int32)
    for s in range(2 * B):
        start, end = rng.integers(2, 5), rng.integers(6, T + 1)
        mask_ST[s, start:end] = 1
    batch = {"chosen_tokens": tokens_ST[:B], "chosen_mask": mask_ST[:B],
             "rejected_tokens": tokens_ST[B:], "rejected_mask": mask_ST[B:]}
    return logits_STV, batch


def _np_token_logps(logits_STV, tokens_ST):
    """float64 NumPy: log p(tokens[t] | < t) at index t, 0 at index 0."""
    logits = logits_STV.astype(np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, tokens_ST[:, 1:, None], -1)[..., 0]
    return np.pad(picked, ((0, 0), (1, 0)))


def _total(terms):
    return sum(float(num) / float(den) for num, den in terms.values())


def _total_jnp(terms):
    return sum(num / den for num, den in terms.values())


@pytest.mark.parametrize("loss_type", sorted(pref.CPO_LOSSES))
def test_cpo_objective_matches_trl_batch_loss(trl_losses, loss_type):
    """Whole CPO objective (prefer + cpo_alpha·token-mean chosen NLL) vs CPOTrainer.get_batch_loss_metrics."""
    torch = trl_losses.torch
    logits_STV, batch = _pair_batch(4)
    cfg = pref.PreferenceConfig(kind="cpo", beta=0.5, loss_type=loss_type, label_smoothing=0.1, nll_weight=0.7)
    terms, aux = pref.preference_objective(logits_STV[:3], logits_STV[3:], batch, cfg)

    ns = _cpo_namespace(trl_losses, loss_type=loss_type, beta=0.5, label_smoothing=0.1, cpo_alpha=0.7)
    trl_batch = {}
    for side in ("chosen", "rejected"):
        tokens = torch.tensor(batch[f"{side}_tokens"].astype(np.int64))
        trl_batch[f"{side}_input_ids"] = tokens
        trl_batch[f"{side}_attention_mask"] = torch.ones_like(tokens)
        trl_batch[f"{side}_labels"] = tokens.masked_fill(torch.tensor(batch[f"{side}_mask"]) == 0, -100)
    model = lambda *args, **kwargs: types.SimpleNamespace(logits=torch.tensor(logits_STV))  # noqa: E731
    want_loss, want_metrics = trl_losses.CPOTrainer.get_batch_loss_metrics(ns, model, trl_batch)

    np.testing.assert_allclose(_total(terms), float(want_loss), rtol=RTOL)
    for ours, theirs in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("margin", "rewards/margins"), ("accuracy", "rewards/accuracies"),
                         ("nll_loss", "nll_loss"), ("logps/chosen", "logps/chosen")]:
        np.testing.assert_allclose(float(aux[ours]), want_metrics[theirs], rtol=RTOL, atol=ATOL, err_msg=ours)


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0),
                                                       ("robust", 0.0), ("robust", 0.3)])
def test_dpo_objective_matches_trl_compute_loss(trl_losses, loss_type, label_smoothing):
    """DPO objective with precomputed (summed) reference log-probs vs DPOTrainer._compute_loss on the same
    logits: checks masks, shift-by-one and IPO's per-length normalisation of the reference."""
    logits_STV, batch = _pair_batch(5)
    rc, rr = np.random.default_rng(6).uniform(-30, -5, (2, 3)).astype(np.float32)
    batch.update(ref_chosen_logps=rc, ref_rejected_logps=rr)
    cfg = pref.PreferenceConfig(kind="dpo", beta=0.3, loss_type=loss_type, label_smoothing=label_smoothing)
    terms, aux = pref.preference_objective(logits_STV[:3], logits_STV[3:], batch, cfg)
    assert set(terms) == {"prefer"}  # DPO default: no NLL term

    tokens_ST = np.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    mask_ST = np.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    per_token = (_np_token_logps(logits_STV, tokens_ST) * mask_ST)[:, 1:]
    want_loss, want_metrics = _trl_dpo_compute_loss(
        trl_losses, per_token, tokens_ST, mask_ST, rc, rr, loss_type=loss_type, beta=0.3,
        label_smoothing=label_smoothing)
    np.testing.assert_allclose(_total(terms), want_loss, rtol=RTOL, atol=ATOL)
    if not pref.DPO_LOSSES[loss_type].length_normalised:
        for name in ("rewards/chosen", "rewards/rejected"):
            np.testing.assert_allclose(float(aux[name]), want_metrics[name], rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------ closed forms

@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.3), ("hinge", 0.0),
                                                       ("ipo", 0.0)])
def test_dpo_with_equal_references_is_cpo_preference_term(loss_type, label_smoothing):
    pc, pr, ref, _ = _random_logps(7)
    hyper = dict(beta=0.25, loss_type=loss_type, label_smoothing=label_smoothing)
    dpo_B, _ = pref.dpo_loss(pc, pr, ref, ref, **hyper)
    cpo_B, _ = pref.cpo_loss(pc, pr, **hyper)
    np.testing.assert_allclose(dpo_B, cpo_B, rtol=1e-5, atol=1e-6)


def test_sigmoid_at_zero_margin_is_log2_and_gradient_closed_form():
    logps_B = jnp.asarray(_random_logps(8)[0])
    cpo_B, metrics = pref.cpo_loss(logps_B, logps_B, beta=0.4)
    dpo_B, _ = pref.dpo_loss(logps_B, logps_B, logps_B + 3.0, logps_B + 3.0, beta=0.4)
    np.testing.assert_allclose(cpo_B, math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(dpo_B, math.log(2.0), rtol=1e-6)
    np.testing.assert_array_equal(metrics["accuracy"], 0.0)

    delta_B = jnp.linspace(-20.0, 20.0, 9)
    grad_B = jax.vmap(jax.grad(lambda d: pref.cpo_loss(d[None], jnp.zeros(1), beta=0.4)[0][0]))(delta_B)
    np.testing.assert_allclose(grad_B, -0.4 * jax.nn.sigmoid(-0.4 * delta_B), rtol=1e-5, atol=1e-7)
    hinge_B, _ = pref.cpo_loss(delta_B, jnp.zeros(9), beta=0.4, loss_type="hinge")
    np.testing.assert_array_equal(np.asarray(hinge_B) == 0.0, np.asarray(delta_B) * 0.4 >= 1.0)


def test_cpo_total_minus_prefer_is_weighted_chosen_nll():
    logits_STV, batch = _pair_batch(9)
    token_logps = _np_token_logps(logits_STV[:3], batch["chosen_tokens"])
    mask = batch["chosen_mask"]
    token_mean_nll = -(token_logps * mask).sum() / mask.sum()
    sequence_nll = -(token_logps * mask).sum(-1).mean()

    for reduction, want_nll in [("batch_token_mean", token_mean_nll), ("sequence_sum", sequence_nll)]:
        cfg = pref.PreferenceConfig(nll_weight=0.6, nll_reduction=reduction)
        terms, aux = pref.preference_objective(logits_STV[:3], logits_STV[3:], batch, cfg)
        prefer = float(terms["prefer"][0]) / float(terms["prefer"][1])
        np.testing.assert_allclose(prefer, float(aux["prefer_loss"]), rtol=1e-6)
        np.testing.assert_allclose(_total(terms) - prefer, 0.6 * want_nll, rtol=1e-5)
        np.testing.assert_allclose(float(aux["nll_loss"]), want_nll, rtol=1e-5)

    # NLL on the chosen response only: rejected logits leave it unchanged; weight 0 removes the term.
    cfg = pref.PreferenceConfig(nll_weight=0.6)
    terms, _ = pref.preference_objective(logits_STV[:3], logits_STV[3:] * 3.0, batch, cfg)
    np.testing.assert_allclose(float(terms["nll"][0]) / float(terms["nll"][1]), 0.6 * token_mean_nll, rtol=1e-5)
    terms, _ = pref.preference_objective(logits_STV[:3], logits_STV[3:], batch, pref.PreferenceConfig(nll_weight=0))
    assert set(terms) == {"prefer"}


def test_terms_accumulate_exactly_over_micro_batches():
    """Σ numerators / Σ denominators over two micro-batches == the one-batch objective (token-mean NLL)."""
    logits_STV, batch = _pair_batch(10, B=4)
    cfg = pref.PreferenceConfig(nll_weight=1.0)
    full, _ = pref.preference_objective(logits_STV[:4], logits_STV[4:], batch, cfg)
    parts = [pref.preference_objective(logits_STV[idx], logits_STV[4:][idx],
                                       {k: v[idx] for k, v in batch.items()}, cfg)[0]
             for idx in (slice(0, 1), slice(1, 4))]
    for name in full:
        num, den = (sum(float(p[name][i]) for p in parts) for i in (0, 1))
        np.testing.assert_allclose(num / den, float(full[name][0]) / float(full[name][1]), rtol=1e-5)


def _bigram_logits_fn(params, tokens_BT, positions_BT, segment_ids_BT):
    """A causal toy LM: logits depend on the current token and its position only."""
    return params["table"][tokens_BT] + params["pos"][positions_BT][..., None]


def _loss_fn_batch(seed, pad=0, B=2):
    logits_STV, batch = _pair_batch(seed, B=B, T=8, V=11)
    if pad:
        batch = {k: np.pad(v, ((0, 0), (0, pad))) for k, v in batch.items()}
    T = batch["chosen_tokens"].shape[1]
    for side in ("chosen", "rejected"):
        batch[f"{side}_positions"] = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
        batch[f"{side}_segment_ids"] = np.ones((B, T), np.int32)
    params = {"table": jnp.asarray(np.random.default_rng(seed).normal(size=(11, 11)), jnp.float32),
              "pos": jnp.linspace(-1.0, 1.0, 16)}
    return params, batch


def test_make_preference_loss_runs_one_forward_and_is_padding_invariant():
    params, batch = _loss_fn_batch(11)
    cfg = pref.PreferenceConfig(kind="cpo", loss_type="simpo")
    loss_fn = jax.jit(pref.make_preference_loss(_bigram_logits_fn, cfg))
    terms, aux = loss_fn(params, batch, jax.random.key(0))

    chosen_logits = _bigram_logits_fn(params, batch["chosen_tokens"], batch["chosen_positions"], None)
    rejected_logits = _bigram_logits_fn(params, batch["rejected_tokens"], batch["rejected_positions"], None)
    want_terms, _ = pref.preference_objective(chosen_logits, rejected_logits, batch, cfg)
    np.testing.assert_allclose(_total(terms), _total(want_terms), rtol=1e-6)

    padded_terms, padded_aux = loss_fn(params, _loss_fn_batch(11, pad=3)[1], jax.random.key(0))
    np.testing.assert_allclose(_total(padded_terms), _total(terms), rtol=1e-6)
    for name in aux:
        np.testing.assert_allclose(float(padded_aux[name]), float(aux[name]), rtol=1e-6, err_msg=name)

    grads = jax.grad(lambda p: _total_jnp(loss_fn(p, batch, None)[0]))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("nll_reduction", ["batch_token_mean", "sequence_sum"])
def test_gradient_accumulation_matches_one_batch(nll_reduction):
    """Loss and gradients over 4 micro-batches of 1 pair == one batch of 4 (masks of different lengths)."""
    from jaxllm.train.step import accumulated_grads

    params, batch = _loss_fn_batch(14, B=4)
    loss_fn = pref.make_preference_loss(_bigram_logits_fn, pref.PreferenceConfig(nll_reduction=nll_reduction))
    one_loss, one_grads, _ = accumulated_grads(loss_fn, params, batch, jax.random.key(0), grad_accum=1)
    acc_loss, acc_grads, _ = accumulated_grads(loss_fn, params, batch, jax.random.key(0), grad_accum=4)
    np.testing.assert_allclose(acc_loss, one_loss, rtol=1e-5)
    np.testing.assert_allclose(acc_loss, _total(loss_fn(params, batch, None)[0]), rtol=1e-5)
    for acc, one in zip(jax.tree.leaves(acc_grads), jax.tree.leaves(one_grads)):
        np.testing.assert_allclose(acc, one, rtol=1e-4, atol=1e-6)


def test_reference_logps_of_the_policy_itself_give_zero_rewards():
    params, batch = _loss_fn_batch(12)
    ref = jax.jit(pref.make_reference_logps(_bigram_logits_fn))(params, batch)
    logits = _bigram_logits_fn(params, batch["chosen_tokens"], batch["chosen_positions"], None)
    want = (_np_token_logps(np.asarray(logits), batch["chosen_tokens"]) * batch["chosen_mask"]).sum(-1)
    np.testing.assert_allclose(ref["ref_chosen_logps"], want, rtol=1e-5)

    for loss_type in ("sigmoid", "ipo"):
        cfg = pref.PreferenceConfig(kind="dpo", loss_type=loss_type, beta=0.5)
        terms, aux = pref.make_preference_loss(_bigram_logits_fn, cfg)(params, {**batch, **ref}, None)
        np.testing.assert_allclose(float(aux["rewards/chosen"]), 0.0, atol=1e-5)
        want_loss = math.log(2.0) if loss_type == "sigmoid" else (1.0 / (2 * 0.5)) ** 2
        np.testing.assert_allclose(_total(terms), want_loss, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_inputs_raise_value_error():
    a_B, b_B = jnp.zeros(4), jnp.zeros(3)
    with pytest.raises(ValueError, match=r"unknown cpo loss_type 'bogus'.*hinge.*ipo.*sigmoid.*simpo"):
        pref.cpo_loss(a_B, a_B, loss_type="bogus")
    with pytest.raises(ValueError, match=r"unknown dpo loss_type 'simpo'.*robust"):
        pref.dpo_loss(a_B, a_B, a_B, a_B, loss_type="simpo")
    for beta in (0.0, -0.1):
        with pytest.raises(ValueError, match="beta must be > 0"):
            pref.cpo_loss(a_B, a_B, beta=beta)
        with pytest.raises(ValueError, match="beta must be > 0"):
            pref.dpo_loss(a_B, a_B, a_B, a_B, beta=beta)
    with pytest.raises(ValueError, match=r"\(4,\) and \(3,\)"):
        pref.cpo_loss(a_B, b_B)
    with pytest.raises(ValueError, match=r"\(4,\) and \(3,\)"):
        pref.dpo_loss(a_B, b_B, a_B, b_B)
    with pytest.raises(ValueError, match="reference log-probs"):
        pref.dpo_loss(a_B, a_B, None, a_B)
    with pytest.raises(ValueError, match="label_smoothing"):
        pref.dpo_loss(a_B, a_B, a_B, a_B, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        pref.cpo_loss(a_B, a_B, label_smoothing=0.7)
    with pytest.raises(ValueError, match="alpha"):
        pref.PreferenceConfig(kind="dpo", alpha=0.1)
    with pytest.raises(ValueError, match="nll_reduction"):
        pref.PreferenceConfig(nll_reduction="mean")
    with pytest.raises(ValueError, match="unknown preference kind"):
        pref.PreferenceConfig(kind="kto")


def test_loss_fn_rejects_bad_batches():
    params, batch = _loss_fn_batch(13)
    dpo_fn = pref.make_preference_loss(_bigram_logits_fn, pref.PreferenceConfig(kind="dpo"))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_fn(params, batch, None)
    cpo_fn = pref.make_preference_loss(_bigram_logits_fn, pref.PreferenceConfig())
    with pytest.raises(ValueError, match="chosen batch size 2 != rejected batch size 1"):
        cpo_fn(params, {**batch, "rejected_tokens": batch["rejected_tokens"][:1]}, None)
    with pytest.raises(ValueError, match="one padded shape"):
        cpo_fn(params, {**batch, "rejected_tokens": batch["rejected_tokens"][:, :-1]}, None)
