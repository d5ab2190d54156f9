"""PPO pieces for RL fine-tuning of a policy LM (ReFT, arXiv 2401.08967; PPO, arXiv 1707.06347;
GAE, arXiv 1506.02438), pure and jittable.

Every array is `[B, T]` over *response* positions: t = 0 is the first generated token, and
`mask_BT` is 1 on the valid response tokens (the sampled tokens up to and including the one that
ended the sample). Frozen quantities (old log-probs and values, reference log-probs) are computed
before the optimisation and travel in the batch (the objective seam of the README's seam table).

Reductions: `"sequence_mean"` averages each row over its valid tokens, then averages the rows (the
paper's code, lqtrung1998/mwp_ReFT `train_rl_reft.py`); `"token_mean"` averages over all valid
tokens of the batch. `masked_reduce` returns them as (numerator, denominator) so that the training
step's gradient accumulation stays exact (`jaxllm.train.step`).

Validation that needs values (a mask row without a valid token) runs when the arrays are concrete
(host side, or a call outside `jit`); under `jit` only shapes and hyperparameters are checked.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("sequence_mean", "token_mean")


def _check_shapes(**arrays_BT) -> None:
    shapes = {name: tuple(np.shape(a)) for name, a in arrays_BT.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected [B, T] arrays of one shape, got {shapes}")


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _check_clip(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_nonempty_rows(mask_BT) -> None:
    """ValueError naming the rows of a concrete mask that have no valid token (their per-row
    mean is undefined; an empty response must be dropped or given one token before the loss)."""
    if isinstance(mask_BT, jax.core.Tracer):
        return
    empty = np.flatnonzero(np.asarray(mask_BT).sum(axis=-1) == 0)
    if empty.size:
        raise ValueError(f"mask rows {empty.tolist()} have no valid token")


def masked_mean(x_BT, mask_BT):
    """Mean of `x` over the entries where `mask` is 1 (over the global array under a mesh)."""
    mask_BT = mask_BT.astype(jnp.float32)
    return jnp.sum(x_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)


def masked_reduce(x_BT, mask_BT, reduction: str = "sequence_mean"):
    """(numerator, denominator) of the masked reduction of per-token values `x_BT` (see module doc).
    `sequence_mean` counts a row only if it has a valid token."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; known: {REDUCTIONS}")
    mask_BT = mask_BT.astype(jnp.float32)
    if reduction == "token_mean":
        return jnp.sum(x_BT * mask_BT), jnp.sum(mask_BT)
    count_B = jnp.sum(mask_BT, axis=-1)
    row_mean_B = jnp.sum(x_BT * mask_BT, axis=-1) / jnp.maximum(count_B, 1.0)
    return jnp.sum(row_mean_B), jnp.sum((count_B > 0).astype(jnp.float32))


def gae(rewards_BT, values_BT, mask_BT, *, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimates and returns, (advantages_BT, returns_BT).

    δ_t = r_t + γ·V_{t+1} − V_t with V taken as 0 at masked positions (so the bootstrap after the
    last valid token is 0: the episode ends there); Â_t = Σ_l (γλ)^l δ_{t+l} within the valid span;
    R̂ = Â + V. Both outputs are 0 where the mask is 0. A reverse `lax.scan` over t.
    """
    _check_shapes(rewards_BT=rewards_BT, values_BT=values_BT, mask_BT=mask_BT)
    _check_unit("gamma", gamma)
    _check_unit("lam", lam)
    mask_TB = jnp.asarray(mask_BT, jnp.float32).T
    values_TB = jnp.asarray(values_BT, jnp.float32).T * mask_TB
    rewards_TB = jnp.asarray(rewards_BT, jnp.float32).T * mask_TB
    next_values_TB = jnp.concatenate([values_TB[1:], jnp.zeros_like(values_TB[:1])], axis=0)

    def step(next_adv_B, xs):
        reward_B, value_B, next_value_B, m_B = xs
        delta_B = reward_B + gamma * next_value_B - value_B
        adv_B = m_B * (delta_B + gamma * lam * next_adv_B)
        return adv_B, adv_B

    _, adv_TB = jax.lax.scan(step, jnp.zeros_like(values_TB[0]), (rewards_TB, values_TB, next_values_TB, mask_TB),
                             reverse=True)
    return adv_TB.T, (adv_TB + values_TB).T * mask_TB.T


def masked_whiten(x_BT, mask_BT, *, shift_mean: bool = True, eps: float = 1e-8):
    """(x − μ)/√(σ² + eps) with μ, σ² (population variance) over the masked entries; masked entries
    return 0; `shift_mean=False` adds μ back. The sums run over the whole array, so under `jit` with
    a batch sharded over devices the statistics are those of the global batch (the paper's
    `allgather_masked_whiten`), not of each device's shard."""
    _check_shapes(x_BT=x_BT, mask_BT=mask_BT)
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    x_BT = jnp.asarray(x_BT, jnp.float32)
    mean = masked_mean(x_BT, mask_BT)
    var = masked_mean(jnp.square(x_BT - mean), mask_BT)
    out_BT = (x_BT - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out_BT = out_BT + mean
    return out_BT * mask_BT


def last_valid_index(mask_BT):
    """Index of each row's last valid token ([B] int32; 0 for an empty row)."""
    T = mask_BT.shape[-1]
    valid_BT = jnp.asarray(mask_BT) > 0
    return jnp.max(jnp.where(valid_BT, jnp.arange(T), 0), axis=-1).astype(jnp.int32)


def kl_penalized_rewards(score_B, logp_BT, ref_logp_BT, mask_BT, *, kl_coef: float):
    """Per-token rewards −kl_coef·(logp − ref_logp) on every valid token (the k1 estimate of the KL
    to the reference on the sampled token), plus `score_B` at each row's last valid token (the
    action that emitted EOS, or the last token of a truncated sample). 0 where the mask is 0."""
    _check_shapes(logp_BT=logp_BT, ref_logp_BT=ref_logp_BT, mask_BT=mask_BT)
    if np.shape(score_B) != np.shape(mask_BT)[:1]:
        raise ValueError(f"score_B has shape {np.shape(score_B)}, expected ({np.shape(mask_BT)[0]},)")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")
    check_nonempty_rows(mask_BT)
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    kl_BT = jnp.asarray(logp_BT, jnp.float32) - jnp.asarray(ref_logp_BT, jnp.float32)
    terminal_BT = jax.nn.one_hot(last_valid_index(mask_BT), mask_BT.shape[-1]) * jnp.asarray(score_B, jnp.float32)[:, None]
    return (terminal_BT - kl_coef * kl_BT) * mask_BT


def policy_token_losses(logp_BT, old_logp_BT, advantages_BT, *, clip: float = 0.2):
    """Per-token clipped surrogate max(−Â·ρ, −Â·clip(ρ, 1−ε, 1+ε)) with ρ = exp(logp − old_logp),
    and where the clipped branch is the larger one (so its gradient is zero)."""
    _check_clip("clip", clip)
    ratio_BT = jnp.exp(logp_BT - old_logp_BT)
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * jnp.clip(ratio_BT, 1.0 - clip, 1.0 + clip)
    return jnp.maximum(unclipped_BT, clipped_BT), clipped_BT > unclipped_BT


def policy_loss(logp_BT, old_logp_BT, advantages_BT, mask_BT, *, clip: float = 0.2,
                reduction: str = "sequence_mean"):
    """Clipped PPO policy loss → (loss, aux) with aux = clip fraction (share of valid tokens where
    the clip is active), approximate KL (mean of old_logp − logp) and mean ratio, token means."""
    _check_shapes(logp_BT=logp_BT, old_logp_BT=old_logp_BT, advantages_BT=advantages_BT, mask_BT=mask_BT)
    check_nonempty_rows(mask_BT)
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    loss_BT, clipped_BT = policy_token_losses(logp_BT, old_logp_BT, advantages_BT, clip=clip)
    num, den = masked_reduce(loss_BT, mask_BT, reduction)
    aux = {"clip_frac": masked_mean(clipped_BT.astype(jnp.float32), mask_BT),
           "approx_kl": masked_mean(old_logp_BT - logp_BT, mask_BT),
           "ratio_mean": masked_mean(jnp.exp(logp_BT - old_logp_BT), mask_BT)}
    return num / jnp.maximum(den, 1.0), aux


def value_token_losses(values_BT, old_values_BT, returns_BT, *, clip: float = 0.2):
    """Per-token ½·max((V − R̂)², (clip(V, V_old − ε, V_old + ε) − R̂)²), and where the clipped
    branch is the larger one."""
    _check_clip("value clip", clip)
    clipped_values_BT = jnp.clip(values_BT, old_values_BT - clip, old_values_BT + clip)
    unclipped_BT = jnp.square(values_BT - returns_BT)
    clipped_BT = jnp.square(clipped_values_BT - returns_BT)
    return 0.5 * jnp.maximum(unclipped_BT, clipped_BT), clipped_BT > unclipped_BT


def value_loss(values_BT, old_values_BT, returns_BT, mask_BT, *, clip: float = 0.2,
               reduction: str = "sequence_mean"):
    """Clipped value loss → (loss, aux) with aux = value clip fraction, reduced like `policy_loss`."""
    _check_shapes(values_BT=values_BT, old_values_BT=old_values_BT, returns_BT=returns_BT, mask_BT=mask_BT)
    check_nonempty_rows(mask_BT)
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    loss_BT, clipped_BT = value_token_losses(values_BT, old_values_BT, returns_BT, clip=clip)
    num, den = masked_reduce(loss_BT, mask_BT, reduction)
    return num / jnp.maximum(den, 1.0), {"value_clip_frac": masked_mean(clipped_BT.astype(jnp.float32), mask_BT)}
