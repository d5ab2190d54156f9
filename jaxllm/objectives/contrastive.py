"""InfoNCE for dual-encoder retrieval, with in-batch and hard negatives (DPR / Dragon recipe).

Query i is scored against every context of the batch (its own positive c_i and the others as
in-batch negatives) and against its own hard negatives n_i1..n_iN:

  L = −(1/B) Σ_i log [ exp(q_i·c_i/τ) / (Σ_{j valid for i} exp(q_i·c_j/τ) + Σ_m exp(q_i·n_im/τ)) ]

When `context_ids_B` is given, context j ≠ i with the same id as c_i is the same passage as i's
positive, so it is masked out of i's denominator instead of counting as a negative. The loss is the
mean over queries (not length-normalised: there are no tokens here).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def info_nce_logits(query_BD, context_BD, *, temperature: float = 1.0, negatives_BND=None, context_ids_B=None):
    """Candidate logits_BC (float32) of each query and the mask_BC of the candidates it may use.

    Columns 0..B-1 are the batch contexts (column i is query i's positive), columns B.. query i's own
    hard negatives. Masked entries are set to −inf-like so they never enter a softmax.
    """
    if query_BD.ndim != 2 or context_BD.shape != query_BD.shape:
        raise ValueError(f"query_BD {query_BD.shape} and context_BD {context_BD.shape} must both be [B, D]")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, D = query_BD.shape
    q_BD = query_BD.astype(jnp.float32)
    logits_BC = q_BD @ context_BD.astype(jnp.float32).T
    mask_BC = jnp.ones((B, B), bool)
    if context_ids_B is not None:
        if context_ids_B.shape != (B,):
            raise ValueError(f"context_ids_B has shape {context_ids_B.shape}, expected ({B},)")
        same_BB = context_ids_B[:, None] == context_ids_B[None, :]
        mask_BC = ~same_BB | jnp.eye(B, dtype=bool)
    if negatives_BND is not None:
        if negatives_BND.ndim != 3 or negatives_BND.shape[0] != B or negatives_BND.shape[2] != D:
            raise ValueError(f"negatives_BND has shape {negatives_BND.shape}, expected ({B}, N, {D})")
        neg_BN = jnp.einsum("bd,bnd->bn", q_BD, negatives_BND.astype(jnp.float32))
        logits_BC = jnp.concatenate([logits_BC, neg_BN], axis=1)
        mask_BC = jnp.concatenate([mask_BC, jnp.ones(neg_BN.shape, bool)], axis=1)
    logits_BC = jnp.where(mask_BC, logits_BC / temperature, jnp.finfo(jnp.float32).min)
    return logits_BC, mask_BC


def info_nce_loss(query_BD, context_BD, *, temperature: float = 1.0, negatives_BND=None, context_ids_B=None):
    """(loss, aux): mean InfoNCE over the B queries (see module docstring) and metrics —
    `accuracy` (positive scored above every valid candidate), `positive_score` and
    `negative_score` (mean raw dot products of positives / valid negatives)."""
    logits_BC, mask_BC = info_nce_logits(query_BD, context_BD, temperature=temperature,
                                         negatives_BND=negatives_BND, context_ids_B=context_ids_B)
    B = query_BD.shape[0]
    pos_B = jnp.diagonal(logits_BC[:, :B])
    loss = jnp.mean(jax.nn.logsumexp(logits_BC, axis=-1) - pos_B)
    neg_mask_BC = mask_BC.at[:, :B].set(mask_BC[:, :B] & ~jnp.eye(B, dtype=bool))
    aux = {
        "accuracy": jnp.mean(jnp.argmax(logits_BC, axis=-1) == jnp.arange(B)),
        "positive_score": jnp.mean(pos_B) * temperature,
        "negative_score": jnp.sum(jnp.where(neg_mask_BC, logits_BC, 0.0)) * temperature
        / jnp.maximum(jnp.sum(neg_mask_BC), 1),
    }
    return loss, aux
