"""Supervised fine-tuning: the masked NLL over the target tokens of prompt/response rows.

A row is `tokens` [B, T] with `loss_mask` [B, T] = 1 on the scored (response) tokens: prompt and
padding carry 0, and index 0 is never scored (logits at t predict token t + 1; see
`jaxllm.objectives.lm`). Optional `positions` and `segment_ids` [B, T] pass to the model (packed rows).
The loss is the token mean over the scored tokens of the *whole* batch, returned as
(numerator, denominator), so gradient accumulation over micro-batches is exact
(`jaxllm.train.step`). Every SFT in the project trains this objective: ChatQA's two stages, the CPO
experiment's SFT arms, context-extension fine-tuning.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxllm.objectives import lm

SFT_KEYS = ("tokens", "loss_mask")


def sft_objective(logits_BTV, tokens_BT, mask_BT):
    """({"nll": (Σ scored-token NLL, number of scored tokens)}, aux): aux holds the batch's token-mean
    `nll_loss`, the mean summed response log-prob `logps` and the mean response `length`."""
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    numerator, denominator = lm.nll_loss(logits_BTV, tokens_BT, mask_BT)
    aux = {"nll_loss": jax.lax.stop_gradient(numerator / jnp.maximum(denominator, 1.0)),
           "logps": jax.lax.stop_gradient(jnp.mean(lm.sequence_logprobs(logits_BTV, tokens_BT, mask_BT))),
           "length": jnp.mean(jnp.sum(mask_BT[:, 1:], axis=-1))}
    return {"nll": (numerator, denominator)}, aux


def make_sft_loss(logits_fn: Callable[..., jax.Array]):
    """loss_fn(params, batch, rng) -> ({"nll": (num, den)}, aux) in the train-step contract.

    `logits_fn(params, tokens_BT, positions_BT, segment_ids_BT) -> logits_BTV` is any causal LM (e.g.
    `functools.partial(llama.forward, cfg)`); the rng is unused (no dropout). Batch: `tokens`,
    `loss_mask`, optional `positions` and `segment_ids`; ValueError naming a missing key."""

    def loss_fn(params, batch, rng):
        del rng
        missing = [k for k in SFT_KEYS if k not in batch]
        if missing:
            raise ValueError(f"SFT batch lacks {missing} (needs tokens and loss_mask [B, T]); it has {sorted(batch)}")
        tokens_BT = jnp.asarray(batch["tokens"])
        logits_BTV = logits_fn(params, tokens_BT, batch.get("positions"), batch.get("segment_ids"))
        return sft_objective(logits_BTV, tokens_BT, batch["loss_mask"])

    return loss_fn
