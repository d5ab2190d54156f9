"""Inference: paged KV cache, ragged-pass scheduling, sampling and LogitsFn transforms."""
from jaxllm.serve.cache import BlockManager, KVPool, PagedKVCache, RaggedBatch, copy_blocks, init_kv_pool, write_kv
from jaxllm.serve.sampling import (LogitsFn, ProxyTriple, SamplingParams, SamplingRows, combine_proxy_logits,
                                   map_logits, process_logits, proxy_tuned, sample, sampling_rows,
                                   suppress_tokens)
from jaxllm.serve.scheduler import Scheduler, SchedulerConfig, Sequence, Status, StepPlan

__all__ = [
    "BlockManager", "KVPool", "PagedKVCache", "RaggedBatch", "copy_blocks", "init_kv_pool", "write_kv",
    "LogitsFn", "ProxyTriple", "SamplingParams", "SamplingRows", "combine_proxy_logits", "map_logits",
    "process_logits", "proxy_tuned", "sample", "sampling_rows", "suppress_tokens",
    "Scheduler", "SchedulerConfig", "Sequence", "Status", "StepPlan",
]
