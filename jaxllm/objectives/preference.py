"""Preference objectives: DPO (arXiv 2305.18290) and CPO (ALMA-R, arXiv 2401.08417) with their variants.

Two layers:

* `dpo_loss` / `cpo_loss`: pure, jittable maps from per-example sequence log-probs (float32, shape [B])
  to per-example losses and per-example metrics. The formulas follow TRL 1.16
  (`trl.experimental.cpo.CPOTrainer.cpo_loss`, `trl.DPOTrainer._compute_loss`). One deliberate difference:
  TRL's `DPOTrainer` ignores `label_smoothing` for the `sigmoid` loss; here DPO `sigmoid` uses the
  conservative-DPO form −(1−ε)·log σ(βh) − ε·log σ(−βh), exactly as TRL's CPO `sigmoid`, so that DPO with
  equal reference log-probs is CPO's preference term for every ε.
* `preference_objective` / `make_preference_loss`: the full training objective over a pair batch
  (mean preference loss + NLL on the chosen response) in the loss_fn contract of `jaxllm.train.step`:
  {term: (numerator, denominator)}, so gradient accumulation over micro-batches is exact.

Variants live in two registries (`DPO_LOSSES`, `CPO_LOSSES`) of small functions `delta_B -> losses_B`;
each entry says whether it expects length-normalised (token-mean) log-probs. `beta`, `label_smoothing`,
`simpo_gamma` and `alpha` are Python floats (static under `jax.jit`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from jaxllm.objectives import lm


@dataclasses.dataclass(frozen=True)
class LossHyper:
    """Scalar hyper-parameters shared by the variant functions."""

    beta: float
    label_smoothing: float
    simpo_gamma: float


def _sigmoid(delta_B, hp: LossHyper):
    """−(1−ε)·log σ(β·δ) − ε·log σ(−β·δ): DPO / CPO eq. 3, conservative with label smoothing ε.

    Uses summed (not length-normalised) log-probs."""
    eps = hp.label_smoothing
    return -(1.0 - eps) * jax.nn.log_sigmoid(hp.beta * delta_B) - eps * jax.nn.log_sigmoid(-hp.beta * delta_B)


def _hinge(delta_B, hp: LossHyper):
    """relu(1 − β·δ) (SLiC). Uses summed log-probs; label smoothing does not enter."""
    return jax.nn.relu(1.0 - hp.beta * delta_B)


def _ipo(delta_B, hp: LossHyper):
    """(δ − 1/(2β))² (IPO eq. 17, β plays τ). Length-normalised: δ from token-mean log-probs (as TRL);
    label smoothing does not enter."""
    return (delta_B - 1.0 / (2.0 * hp.beta)) ** 2


def _robust(delta_B, hp: LossHyper):
    """(−(1−ε)·log σ(β·δ) + ε·log σ(−β·δ)) / (1 − 2ε): robust DPO, ε = probability that a label is flipped
    (unbiased under flips; requires ε < 0.5). Uses summed log-probs."""
    eps = hp.label_smoothing
    clean_B = -(1.0 - eps) * jax.nn.log_sigmoid(hp.beta * delta_B)
    flipped_B = -eps * jax.nn.log_sigmoid(-hp.beta * delta_B)
    return (clean_B - flipped_B) / (1.0 - 2.0 * eps)


def _simpo(delta_B, hp: LossHyper):
    """Sigmoid loss on δ − γ/β, i.e. −log σ(β·δ − γ) at ε = 0 (SimPO; with NLL weight > 0, CPO-SimPO).
    Length-normalised: δ from token-mean log-probs. Label smoothing enters as in `sigmoid`."""
    return _sigmoid(delta_B - hp.simpo_gamma / hp.beta, hp)


@dataclasses.dataclass(frozen=True)
class LossVariant:
    """One preference loss: `fn(delta_B, hp) -> losses_B` and whether its log-probs are token means."""

    fn: Callable[[jax.Array, LossHyper], jax.Array]
    length_normalised: bool


DPO_LOSSES: Mapping[str, LossVariant] = {
    "sigmoid": LossVariant(_sigmoid, length_normalised=False),
    "hinge": LossVariant(_hinge, length_normalised=False),
    "ipo": LossVariant(_ipo, length_normalised=True),
    "robust": LossVariant(_robust, length_normalised=False),
}

CPO_LOSSES: Mapping[str, LossVariant] = {
    "sigmoid": LossVariant(_sigmoid, length_normalised=False),
    "hinge": LossVariant(_hinge, length_normalised=False),
    "ipo": LossVariant(_ipo, length_normalised=True),
    "simpo": LossVariant(_simpo, length_normalised=True),
}

_REGISTRIES = {"dpo": DPO_LOSSES, "cpo": CPO_LOSSES}


def _variant(kind: str, loss_type: str) -> LossVariant:
    registry = _REGISTRIES[kind]
    if loss_type not in registry:
        raise ValueError(f"unknown {kind} loss_type {loss_type!r}; known: {sorted(registry)}")
    return registry[loss_type]


def _check_scalars(loss_type: str, beta: float, label_smoothing: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing}")
    if loss_type == "robust" and label_smoothing == 0.5:
        raise ValueError("label_smoothing must be < 0.5 for the 'robust' loss, got 0.5")


def _check_pair(chosen_B, rejected_B, what: str):
    chosen_B, rejected_B = jnp.asarray(chosen_B, jnp.float32), jnp.asarray(rejected_B, jnp.float32)
    if chosen_B.ndim != 1 or chosen_B.shape != rejected_B.shape:
        raise ValueError(
            f"{what} chosen and rejected log-probs must be 1-D of equal batch size, "
            f"got shapes {chosen_B.shape} and {rejected_B.shape}"
        )
    return chosen_B, rejected_B


def _reward_metrics(chosen_rewards_B, rejected_rewards_B):
    """Per-example metrics; rewards carry no gradient (logging only)."""
    chosen_rewards_B = jax.lax.stop_gradient(chosen_rewards_B)
    rejected_rewards_B = jax.lax.stop_gradient(rejected_rewards_B)
    return {
        "rewards/chosen": chosen_rewards_B,
        "rewards/rejected": rejected_rewards_B,
        "margin": chosen_rewards_B - rejected_rewards_B,
        "accuracy": (chosen_rewards_B > rejected_rewards_B).astype(jnp.float32),
    }


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
):
    """DPO losses from policy and frozen-reference sequence log-probs, all shape [B].

    h = (π_c − ref_c) − (π_r − ref_r); loss = DPO_LOSSES[loss_type](h). Pass summed log-probs, or token-mean
    log-probs (policy and reference alike) for the length-normalised variants (`ipo`); `make_preference_loss`
    does this. Returns (losses_B, metrics) with per-example `rewards/chosen` = β·(π_c − ref_c),
    `rewards/rejected`, `margin`, `accuracy`, on the log-probs given (so per token for `ipo`, as TRL's CPO;
    TRL's DPOTrainer logs summed rewards there).
    """
    variant = _variant("dpo", loss_type)
    _check_scalars(loss_type, beta, label_smoothing)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("DPO needs reference log-probs: ref_chosen_logps / ref_rejected_logps is None")
    policy_chosen_B, policy_rejected_B = _check_pair(policy_chosen_logps, policy_rejected_logps, "policy")
    ref_chosen_B, ref_rejected_B = _check_pair(ref_chosen_logps, ref_rejected_logps, "reference")
    if ref_chosen_B.shape != policy_chosen_B.shape:
        raise ValueError(f"reference shape {ref_chosen_B.shape} != policy shape {policy_chosen_B.shape}")
    chosen_logratios_B = policy_chosen_B - ref_chosen_B
    rejected_logratios_B = policy_rejected_B - ref_rejected_B
    hp = LossHyper(beta, label_smoothing, simpo_gamma=0.0)
    losses_B = variant.fn(chosen_logratios_B - rejected_logratios_B, hp)
    return losses_B, _reward_metrics(beta * chosen_logratios_B, beta * rejected_logratios_B)


def alphapo_reward(logps_B, alpha: float):
    """AlphaPO reward r = (1 − p^(−α))/α with p = exp(logps), written as −expm1(−α·logps)/α (same value,
    no underflow of p); r → logps as α → 0."""
    return -jnp.expm1(-alpha * logps_B) / alpha


def cpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
):
    """CPO preference losses (reference = uniform, so it cancels) from policy sequence log-probs, shape [B].

    Δ = r(π_c) − r(π_r) with r the identity, or `alphapo_reward` when alpha ≠ 0; loss = CPO_LOSSES[loss_type](Δ).
    Pass summed log-probs for `sigmoid`/`hinge`, token-mean log-probs for the length-normalised `ipo`/`simpo`
    (as TRL). The NLL term of the full CPO objective is added by `preference_objective`. Returns
    (losses_B, metrics) with per-example `rewards/chosen` = β·r(π_c), `rewards/rejected`, `margin`, `accuracy`.
    """
    variant = _variant("cpo", loss_type)
    _check_scalars(loss_type, beta, label_smoothing)
    chosen_B, rejected_B = _check_pair(policy_chosen_logps, policy_rejected_logps, "policy")
    if alpha != 0.0:
        chosen_B, rejected_B = alphapo_reward(chosen_B, alpha), alphapo_reward(rejected_B, alpha)
    hp = LossHyper(beta, label_smoothing, simpo_gamma)
    losses_B = variant.fn(chosen_B - rejected_B, hp)
    return losses_B, _reward_metrics(beta * chosen_B, beta * rejected_B)


NLL_REDUCTIONS = ("batch_token_mean", "sequence_sum")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """What `preference_objective` optimises.

    kind: "cpo" (no reference) or "dpo" (reference log-probs precomputed in the batch).
    nll_weight: weight of the NLL on the chosen response (TRL `cpo_alpha`); None means 1.0 for CPO and 0.0
      for DPO (set it > 0 for DPO + NLL).
    nll_reduction: "batch_token_mean" (ALMA-R / TRL code: Σ NLL over all chosen tokens of the global batch /
      their count) or "sequence_sum" (the paper's equation: mean over examples of the summed chosen NLL).
    alpha: AlphaPO reward exponent (CPO only).
    """

    kind: str = "cpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    alpha: float = 0.0
    nll_weight: float | None = None
    nll_reduction: str = "batch_token_mean"

    def __post_init__(self):
        if self.kind not in _REGISTRIES:
            raise ValueError(f"unknown preference kind {self.kind!r}; known: {sorted(_REGISTRIES)}")
        _variant(self.kind, self.loss_type)
        _check_scalars(self.loss_type, self.beta, self.label_smoothing)
        if self.kind == "dpo" and self.alpha != 0.0:
            raise ValueError(f"alpha (AlphaPO) applies to CPO only, got alpha={self.alpha} with kind='dpo'")
        if self.nll_reduction not in NLL_REDUCTIONS:
            raise ValueError(f"unknown nll_reduction {self.nll_reduction!r}; known: {list(NLL_REDUCTIONS)}")
        if self.nll_weight is None:
            object.__setattr__(self, "nll_weight", 1.0 if self.kind == "cpo" else 0.0)
        if self.nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight}")


def _check_batch(batch, *, needs_reference: bool) -> None:
    required = ["chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask"]
    if needs_reference:
        required += ["ref_chosen_logps", "ref_rejected_logps"]
    missing = [k for k in required if batch.get(k) is None]
    if missing:
        raise ValueError(f"pair batch lacks {missing}; it has {sorted(batch)}")
    chosen_B, rejected_B = batch["chosen_tokens"].shape[0], batch["rejected_tokens"].shape[0]
    if chosen_B != rejected_B:
        raise ValueError(f"chosen batch size {chosen_B} != rejected batch size {rejected_B}")


def preference_objective(chosen_logits_BTV, rejected_logits_BTV, batch, cfg: PreferenceConfig):
    """Loss terms and metrics of a pair batch, given the policy's logits on both halves.

    Batch keys: `chosen_tokens` / `rejected_tokens` [B, T] int, `chosen_mask` / `rejected_mask` [B, T]
    (1 on response tokens incl. EOS, 0 on prompt and padding); for DPO also `ref_chosen_logps` /
    `ref_rejected_logps` [B]: the frozen reference's *summed* response log-probs (divided by the response
    lengths here for length-normalised variants).

    Returns ({"prefer": (Σ_b loss_b, B), "nll": (w·Σ chosen-token NLL, #chosen tokens)}, aux); with
    `sequence_sum` the NLL term is (w·Σ_b summed chosen NLL_b, B); it is absent when the weight is 0.
    aux holds batch means of the metrics plus `prefer_loss`, `nll_loss` (unweighted, same reduction),
    `logps/chosen`, `logps/rejected`, `length/chosen`, `length/rejected`.
    """
    _check_batch(batch, needs_reference=cfg.kind == "dpo")
    variant = _variant(cfg.kind, cfg.loss_type)
    chosen_tokens_BT, chosen_mask_BT, rejected_tokens_BT, rejected_mask_BT = (
        jnp.asarray(batch[k]) for k in ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask"))
    average = variant.length_normalised
    chosen_B = lm.sequence_logprobs(chosen_logits_BTV, chosen_tokens_BT, chosen_mask_BT, average=average)
    rejected_B = lm.sequence_logprobs(rejected_logits_BTV, rejected_tokens_BT, rejected_mask_BT, average=average)
    chosen_len_B = jnp.sum(chosen_mask_BT[:, 1:], axis=-1).astype(jnp.float32)
    rejected_len_B = jnp.sum(rejected_mask_BT[:, 1:], axis=-1).astype(jnp.float32)

    hyper = dict(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
    if cfg.kind == "dpo":
        ref_chosen_B = jnp.asarray(batch["ref_chosen_logps"], jnp.float32)
        ref_rejected_B = jnp.asarray(batch["ref_rejected_logps"], jnp.float32)
        if average:
            ref_chosen_B = ref_chosen_B / jnp.maximum(chosen_len_B, 1.0)
            ref_rejected_B = ref_rejected_B / jnp.maximum(rejected_len_B, 1.0)
        losses_B, metrics = dpo_loss(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, **hyper)
    else:
        losses_B, metrics = cpo_loss(chosen_B, rejected_B, simpo_gamma=cfg.simpo_gamma, alpha=cfg.alpha, **hyper)

    batch_size = jnp.float32(losses_B.shape[0])
    terms = {"prefer": (jnp.sum(losses_B), batch_size)}
    if cfg.nll_reduction == "batch_token_mean":
        nll = lm.nll_loss(chosen_logits_BTV, chosen_tokens_BT, chosen_mask_BT)
    else:
        nll = (-jnp.sum(lm.sequence_logprobs(chosen_logits_BTV, chosen_tokens_BT, chosen_mask_BT)), batch_size)
    if cfg.nll_weight != 0.0:
        terms["nll"] = (cfg.nll_weight * nll[0], nll[1])

    aux = {name: jnp.mean(value_B) for name, value_B in metrics.items()}
    aux.update({
        "prefer_loss": jnp.mean(losses_B),
        "nll_loss": jax.lax.stop_gradient(nll[0] / nll[1]),
        "logps/chosen": jax.lax.stop_gradient(jnp.mean(chosen_B)),
        "logps/rejected": jax.lax.stop_gradient(jnp.mean(rejected_B)),
        "length/chosen": jnp.mean(chosen_len_B),
        "length/rejected": jnp.mean(rejected_len_B),
    })
    return terms, aux


ForwardFn = Callable[..., jax.Array]
"""A batch forward, `(params, tokens_BT, positions_BT, segment_ids_BT) -> logits_BTV`: every
position's logits of a padded batch (unlike the engine's `jaxllm.serve.LogitsFn`, one row per
sequence of a ragged pass with a KV cache)."""


def _pair_logits(logits_fn: ForwardFn, params, batch):
    """One forward over [chosen; rejected] stacked along the batch axis; returns both halves' logits.

    `chosen_positions`/`chosen_segment_ids` (and the rejected ones) are used when present, else None."""
    chosen_BT, rejected_BT = batch["chosen_tokens"], batch["rejected_tokens"]
    if chosen_BT.shape != rejected_BT.shape:
        raise ValueError(
            f"chosen_tokens {chosen_BT.shape} and rejected_tokens {rejected_BT.shape} must share one padded "
            "shape (see jaxllm.data.preference.collate_pairs)"
        )

    def stacked(name):
        chosen, rejected = batch.get(f"chosen_{name}"), batch.get(f"rejected_{name}")
        return None if chosen is None or rejected is None else jnp.concatenate([jnp.asarray(chosen), jnp.asarray(rejected)])

    both_logits_BTV = logits_fn(params, stacked("tokens"), stacked("positions"), stacked("segment_ids"))  # B = 2 × pairs
    return jnp.split(both_logits_BTV, 2, axis=0)


def make_preference_loss(logits_fn: ForwardFn, cfg: PreferenceConfig):
    """loss_fn(params, batch, rng) -> ({term: (num, den)}, aux) for `jaxllm.train.step.make_train_step`.

    `logits_fn(params, tokens_BT, positions_BT, segment_ids_BT) -> logits_BTV` is any causal LM, e.g.
    `lambda p, t, pos, seg: Llama(cfg).apply({"params": p}, t, pos, seg)`. The rng is unused: preference
    training runs with dropout off (as TRL). Batch keys: see `preference_objective`.
    """

    def loss_fn(params, batch, rng):
        del rng
        _check_batch(batch, needs_reference=cfg.kind == "dpo")
        chosen_logits_BTV, rejected_logits_BTV = _pair_logits(logits_fn, params, batch)
        return preference_objective(chosen_logits_BTV, rejected_logits_BTV, batch, cfg)

    return loss_fn


def make_reference_logps(logits_fn: ForwardFn):
    """ref_fn(ref_params, batch) -> {"ref_chosen_logps", "ref_rejected_logps"}: the frozen reference's summed
    response log-probs [B], to be merged into the batch before DPO training (no gradient flows)."""

    def ref_fn(ref_params, batch):
        _check_batch(batch, needs_reference=False)
        chosen_logits_BTV, rejected_logits_BTV = _pair_logits(logits_fn, jax.lax.stop_gradient(ref_params), batch)
        return {
            f"ref_{side}_logps": lm.sequence_logprobs(
                logits_BTV, jnp.asarray(batch[f"{side}_tokens"]), jnp.asarray(batch[f"{side}_mask"]))
            for side, logits_BTV in (("chosen", chosen_logits_BTV), ("rejected", rejected_logits_BTV))
        }

    return ref_fn
