"""The engine's device program: the model over one ragged pass through the paged KV cache, then
sampling, as pure functions (so the jitted step of `jaxllm.serve.Engine` and the ahead-of-time
lowering of `jaxllm.serve.aot` share them), and the static shapes it is compiled for."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.model.llama import Llama, LlamaConfig
from jaxllm.serve.cache import RaggedBatch
from jaxllm.serve.paged_attention import AttentionFn, PagedKVCache
from jaxllm.serve.sampling import LogitsFn, sample_with_top_logprobs


def llama_logits_fn(cfg: LlamaConfig) -> LogitsFn:
    """The LogitsFn of `Llama(cfg)` over a paged pass: the flat pass is one row [1, T], and the LM
    head runs only on each sequence's last token of the pass (`last_index_S`)."""
    model = Llama(cfg)

    def logits_fn(params, tokens_T, positions_T, cache):
        last_S = jnp.maximum(cache.batch.last_index_S, 0)
        logits_1SV, cache = model.apply({"params": params}, tokens_T[None], positions_T[None], cache=cache,
                                        logit_indices_BS=last_S[None])
        return logits_1SV[0], cache

    return logits_fn


def default_buckets(token_budget: int) -> tuple[int, ...]:
    """Token buckets: powers of two from 16 below the budget, then the budget."""
    sizes = [16]
    while sizes[-1] * 2 < token_budget:
        sizes.append(sizes[-1] * 2)
    return tuple(b for b in sizes if b < token_budget) + (token_budget,)


def default_context_buckets(max_model_len: int | None) -> tuple[int, ...]:
    """Context buckets: 64 tokens, then ×2, below `max_model_len` (the full width is added).

    A decode reads its whole block-table width, so attention costs ∝ the bucket, not the context:
    doubling keeps a table under 2× its longest history (×4 from 256 padded a context of 100 to
    256) at one compile per width, log2(max_model_len / 64) + 1 widths per token bucket."""
    sizes = []
    while max_model_len and (sizes[-1] * 2 if sizes else 64) < max_model_len:
        sizes.append(sizes[-1] * 2 if sizes else 64)
    return tuple(sizes)


def _is_leaf_cache(x) -> bool:
    return isinstance(x, PagedKVCache)



def device_step(logits_fn: LogitsFn, attention: AttentionFn, treedef, vocab_size: int, params, pools,
                batches: tuple[RaggedBatch, ...], offsets, rows, adjust=None):
    """The engine's device program: the LogitsFn on one pass with every member's paged cache (pool
    read-only; `treedef` arranges the members), then sampling (`adjust`: the pass's penalties and
    logit biases, None for none). Returns (tokens_S, logprobs_S, top_ids_SK, top_logprobs_SK, each
    member's pending K/V rows). Pure, so it also lowers ahead of time (`jaxllm.train.aot`)."""
    unflatten = lambda xs: jax.tree.unflatten(treedef, list(xs))  # noqa: E731
    caches = [PagedKVCache(pool, b, off, attention=attention) for pool, b, off in zip(pools, batches, offsets)]
    logits_SV, new_caches = logits_fn(params, unflatten(b.tokens_T for b in batches),
                                      unflatten(b.positions_T for b in batches), unflatten(caches))
    if logits_SV.shape[-1] != vocab_size:
        raise ValueError(f"the model returns {logits_SV.shape[-1]} logits per row, vocab_size is {vocab_size}")
    pending = tuple(c.pending for c in jax.tree.leaves(new_caches, is_leaf=_is_leaf_cache))
    return (*sample_with_top_logprobs(logits_SV, rows, adjust), pending)
