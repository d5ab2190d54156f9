"""Language-model pre-training objective on packed rows (decoding goes through `jaxllm.serve.Engine`).

A packed batch is a dict of [B, T] arrays: `tokens`, `segment_ids` (documents packed in one
row never attend to each other), `positions` (restart at 0 in each document) and `loss_mask`
(1 on scored target tokens: 0 on padding and on the first token of every segment, which nothing
in its segment predicts; see `jaxllm.data.packing`).
"""
from __future__ import annotations

from jaxllm.model import llama
from jaxllm.objectives.lm import nll_loss


def lm_loss_fn(cfg: llama.LlamaConfig):
    """`loss_fn(params, batch, rng) -> ({"nll": (numerator, denominator)}, aux)`: token-mean NLL
    over the scored tokens of the whole (accumulated) batch, in the train-step contract."""
    model = llama.Llama(cfg)

    def loss_fn(params, batch, rng):
        del rng  # the model has no dropout
        logits_BTV = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
        return {"nll": nll_loss(logits_BTV, batch["tokens"], batch["loss_mask"])}, {}

    return loss_fn
