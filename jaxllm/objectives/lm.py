"""Token and sequence log-probabilities and the masked NLL, the building blocks of every objective.

Convention: logits at index t predict token t + 1. A mask marks the tokens that are *scored*
(targets), so index 0 of a row is never scored and prompt/padding tokens carry mask 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BTV, tokens_BT):
    """log p(tokens[:, t] | tokens[:, :t]) at index t (float32); index 0 holds 0."""
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    picked_BT = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked_BT, ((0, 0), (1, 0)))


def sequence_logprobs(logits_BTV, tokens_BT, mask_BT, average: bool = False):
    """Sum (or, with `average`, mask-mean) of token log-probs over the scored tokens of each row."""
    mask_BT = jnp.asarray(mask_BT, jnp.float32).at[:, 0].set(0.0)
    total_B = jnp.sum(token_logprobs(logits_BTV, tokens_BT) * mask_BT, axis=-1)
    if average:
        return total_B / jnp.maximum(jnp.sum(mask_BT, axis=-1), 1.0)
    return total_B


def nll_loss(logits_BTV, tokens_BT, mask_BT):
    """Token-mean NLL as (numerator, denominator) = (−Σ masked log-probs, number of scored tokens),
    so micro-batches can be accumulated exactly (see `jaxllm.train.step`)."""
    mask_BT = jnp.asarray(mask_BT, jnp.float32).at[:, 0].set(0.0)
    numerator = -jnp.sum(token_logprobs(logits_BTV, tokens_BT) * mask_BT)
    return numerator, jnp.sum(mask_BT)
