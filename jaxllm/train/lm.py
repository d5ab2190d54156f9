"""Language-model pre-training objective on packed rows, and a short sampler to read what the
model has learnt.

A packed batch is a dict of [B, T] arrays: `tokens`, `segment_ids` (documents packed in one
row never attend to each other), `positions` (restart at 0 in each document) and `loss_mask`
(1 on scored target tokens: 0 on padding and on the first token of every segment, which nothing
in its segment predicts; see `jaxllm.data.packing`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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


@functools.partial(jax.jit, static_argnames=("cfg", "num_tokens"))
def _sample(cfg: llama.LlamaConfig, params, prompt_BT, rng, temperature, num_tokens: int):
    model = llama.Llama(cfg)
    B, T = prompt_BT.shape
    cache = llama.init_cache(cfg, B, T + num_tokens)
    logits_BTV, cache = model.apply({"params": params}, prompt_BT, cache=cache)

    def pick(logits_BV, key):
        sampled_B = jax.random.categorical(key, logits_BV / jnp.maximum(temperature, 1e-6), axis=-1)
        return jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)

    def body(carry, key):
        logits_BV, cache = carry
        token_B = pick(logits_BV, key)
        logits_B1V, cache = model.apply({"params": params}, token_B[:, None], cache=cache)
        return (logits_B1V[:, 0], cache), token_B

    _, tokens_NB = jax.lax.scan(body, (logits_BTV[:, -1], cache), jax.random.split(rng, num_tokens))
    return tokens_NB.T


def sample(cfg: llama.LlamaConfig, params, prompt_BT, num_tokens: int, *, temperature: float = 0.0, rng=None):
    """`num_tokens` continuation tokens [B, num_tokens] of equal-length prompts [B, T]: greedy at
    temperature 0, else sampled from softmax(logits / temperature). The prompt fills a dense KV
    cache in one call; the continuation is one `lax.scan`, each step feeding back one token."""
    prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
    if prompt_BT.ndim != 2 or prompt_BT.shape[1] < 1:
        raise ValueError(f"prompt must be a non-empty [B, T] array of token ids, got shape {prompt_BT.shape}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if prompt_BT.shape[1] + num_tokens > cfg.max_len:
        raise ValueError(f"prompt length {prompt_BT.shape[1]} + num_tokens {num_tokens} exceeds the model's "
                         f"max_len {cfg.max_len}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    rng = jax.random.key(0) if rng is None else rng
    return _sample(cfg, params, prompt_BT, rng, jnp.float32(temperature), num_tokens)
