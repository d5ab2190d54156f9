"""Inference: paged KV cache, ragged-pass scheduling, the engine, sampling and LogitsFn transforms."""
from jaxllm.serve.cache import BlockManager, KVPool, KVSpec, RaggedBatch, copy_blocks, init_kv_pool, write_kv
from jaxllm.serve.engine import Completion, Engine, TokenEvent, llama_logits_fn
from jaxllm.serve.paged_attention import AttentionFn, PagedKVCache, paged_attention
from jaxllm.serve.sampling import (LogitsFn, ProxyTriple, SamplingParams, SamplingRows, combine_proxy_logits,
                                   map_logits, process_logits, proxy_tuned, sample, sampling_rows,
                                   suppress_tokens)
from jaxllm.serve.scheduler import Scheduler, SchedulerConfig, Sequence, Status, StepPlan

__all__ = [
    "BlockManager", "KVPool", "KVSpec", "RaggedBatch", "copy_blocks", "init_kv_pool", "write_kv",
    "Completion", "Engine", "TokenEvent", "llama_logits_fn",
    "AttentionFn", "PagedKVCache", "paged_attention",
    "LogitsFn", "ProxyTriple", "SamplingParams", "SamplingRows", "combine_proxy_logits", "map_logits",
    "process_logits", "proxy_tuned", "sample", "sampling_rows", "suppress_tokens",
    "Scheduler", "SchedulerConfig", "Sequence", "Status", "StepPlan",
]
