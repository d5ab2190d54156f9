"""Hooks of the one loop (`jaxllm.train.loop.fit`): things done at record steps besides logging.

`sample_hook` decodes a continuation of a prompt at the last step through the one sampler,
`jaxllm.serve.Engine`, and puts the text into the record (metrics.jsonl holds it next to the loss).
"""
from __future__ import annotations

import math

import jax
from jax.experimental import multihost_utils

from jaxllm.data.tokenizer import Tokenizer
from jaxllm.model.llama import LlamaConfig
from jaxllm.serve.engine import Engine
from jaxllm.serve.sampling import SamplingParams


def host_params(params):
    """Params as host numpy arrays on every process (a gather of sharded arrays): what an `Engine`
    on one device decodes with, whatever mesh training used."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    return multihost_utils.process_allgather(params, tiled=True)


def complete_text(model_cfg: LlamaConfig, params, tokenizer: Tokenizer, prompt: str, max_tokens: int, *,
                  temperature: float = 0.0, seed: int = 0) -> str:
    """`prompt` and its continuation of up to `max_tokens` tokens (cut before EOS), decoded by an
    `Engine` sized for this one request: greedy at temperature 0, else sampled."""
    prompt_ids = tokenizer.encode(prompt, bos=True)
    length = len(prompt_ids) + max_tokens
    if length > model_cfg.max_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens + {max_tokens} new tokens exceeds the model's "
                         f"max_len {model_cfg.max_len}")
    block_size = 16
    engine = Engine(model_cfg, params, block_size=block_size, num_blocks=math.ceil(length / block_size) + 1,
                    max_seqs=1, max_model_len=length)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                              stop_tokens=(tokenizer.eos_id,))
    tokens = engine.generate([prompt_ids], sampling)[0].tokens
    if tokenizer.eos_id in tokens:
        tokens = tokens[:tokens.index(tokenizer.eos_id)]
    return tokenizer.decode(prompt_ids + tokens)


def sample_hook(model_cfg: LlamaConfig, tokenizer: Tokenizer, prompt: str, max_tokens: int, *, at_step: int,
                temperature: float = 0.0, seed: int = 0, verbose: bool = True):
    """A `fit` hook that, at step `at_step` (e.g. the last of the run), adds {"sample": text} to the
    record: `prompt` continued by the trained params (`complete_text`), also printed if `verbose`."""

    def hook(step, state, record):
        del record
        if step != at_step:
            return None
        text = complete_text(model_cfg, host_params(state.params), tokenizer, prompt, max_tokens,
                             temperature=temperature, seed=seed)
        if verbose:
            print(f"sample after step {step}:\n{text}", flush=True)
        return {"sample": text}

    return hook
