"""Inference: paged KV cache, ragged-pass scheduling, the engine, sampling and LogitsFn transforms.

Serving over HTTP (FastAPI) lives in `jaxllm.serve.api_server` and `jaxllm.serve.engine_loop`,
imported on their own."""
from jaxllm.serve.cache import BlockManager, KVPool, KVSpec, RaggedBatch, copy_blocks, init_kv_pool, write_kv
from jaxllm.serve.detokenize import IncrementalText
from jaxllm.serve.engine import Engine
from jaxllm.serve.outputs import Completion, TokenEvent
from jaxllm.serve.paged_attention import AttentionFn, PagedKVCache, paged_attention
from jaxllm.serve.sampling import (MAX_LOGPROBS, LogitAdjust, LogitsFn, ProxyTriple, SamplingParams, SamplingRows,
                                   adjust_logits, combine_proxy_logits, logit_adjust, map_logits, process_logits,
                                   proxy_tuned, sample, sample_with_top_logprobs, sampling_rows, suppress_tokens)
from jaxllm.serve.scheduler import Scheduler, SchedulerConfig
from jaxllm.serve.sequence import Sequence, Status, StepPlan
from jaxllm.serve.step import llama_logits_fn

__all__ = [
    "BlockManager", "KVPool", "KVSpec", "RaggedBatch", "copy_blocks", "init_kv_pool", "write_kv",
    "IncrementalText", "Completion", "Engine", "TokenEvent", "llama_logits_fn",
    "AttentionFn", "PagedKVCache", "paged_attention",
    "MAX_LOGPROBS", "LogitAdjust", "LogitsFn", "ProxyTriple", "SamplingParams", "SamplingRows", "adjust_logits",
    "combine_proxy_logits", "logit_adjust", "map_logits", "process_logits", "proxy_tuned", "sample",
    "sample_with_top_logprobs", "sampling_rows", "suppress_tokens",
    "Scheduler", "SchedulerConfig", "Sequence", "Status", "StepPlan",
]
