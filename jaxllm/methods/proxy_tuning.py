"""Proxy-tuning (arXiv 2401.08565) through the engine: steer a base model at decoding time with a
small tuned expert and its untuned anti-expert, logits = base + α·(expert − anti).

The combination itself is the LogitsFn transform `jaxllm.serve.proxy_tuned` (the *logits* seam);
this module puts three Llamas behind it in one `Engine`, each member with its own paged KV pool,
and builds per-member prompts: the expert may see its chat template while base and anti-expert
see the raw text. The engine left-pads shorter member prompts inside the cache (masked, never
attended), so every member reaches its prompt's end in the same pass; each sampled token is then
appended to all three contexts, at each member's own next position.

    engine = proxy_engine(ProxyTriple(base_cfg, small_cfg, small_cfg),
                          ProxyTriple(base_params, expert_params, anti_params), alpha=1.0)
    prompts = proxy_prompts(texts, ProxyPrompts(base=plain(tok), expert=chat(tok), anti=plain(tok)))
    completions = engine.generate(prompts, SamplingParams(max_tokens=256, stop_tokens=(tok.eos_id,)))
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from jaxllm.data.tokenizer import Tokenizer
from jaxllm.model.llama import LlamaConfig
from jaxllm.serve.cache import KVSpec
from jaxllm.serve.engine import Engine
from jaxllm.serve.step import llama_logits_fn
from jaxllm.serve.sampling import ProxyTriple, proxy_tuned

Encoder = Callable[[str], list[int]]


def plain(tokenizer: Tokenizer, *, bos: bool = True) -> Encoder:
    """Raw text → ids (what the base model and the anti-expert see)."""
    return lambda text: tokenizer.encode(text, bos=bos)


def chat(tokenizer: Tokenizer, *, system: str | None = None) -> Encoder:
    """Text as one user turn of the chat template, ending with the assistant header."""
    def encode(text: str) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tokenizer.apply_chat(messages, add_generation_prompt=True)[0]

    return encode


@dataclasses.dataclass(frozen=True)
class ProxyPrompts:
    """How each member turns a prompt text into token ids."""
    base: Encoder
    expert: Encoder
    anti: Encoder


def proxy_prompts(texts: Sequence[str], formats: ProxyPrompts) -> list[ProxyTriple]:
    """One ProxyTriple of token lists per text: the engine's per-member prompt streams."""
    return [ProxyTriple(formats.base(t), formats.expert(t), formats.anti(t)) for t in texts]


def check_vocabularies(base: Tokenizer, expert: Tokenizer, anti: Tokenizer, *, vocab_size: int) -> None:
    """ValueError naming the first id below `vocab_size` (or special id) whose piece differs
    between the base tokenizer and a member's, or a member with fewer than `vocab_size` ids."""
    for name, tok in (("expert", expert), ("anti", anti)):
        if tok.vocab_size < vocab_size or base.vocab_size < vocab_size:
            raise ValueError(f"vocab_size {vocab_size} exceeds a tokenizer: base has {base.vocab_size}, "
                             f"{name} has {tok.vocab_size}")
        for attr in ("bos_id", "eos_id", "unk_id", "pad_id"):
            if getattr(tok, attr) != getattr(base, attr):
                raise ValueError(f"{name} tokenizer {attr} {getattr(tok, attr)} differs from the base's "
                                 f"{getattr(base, attr)}")
        for i in range(vocab_size):
            if tok.id_to_piece(i) != base.id_to_piece(i):
                raise ValueError(f"token id {i} is {tok.id_to_piece(i)!r} for the {name} but "
                                 f"{base.id_to_piece(i)!r} for the base")


def proxy_engine(configs: ProxyTriple, params: ProxyTriple, alpha: float = 1.0, *, vocab_size: int | None = None,
                 **engine_kwargs) -> Engine:
    """An Engine decoding base + α·(expert − anti) with three Llamas (configs and params given as
    ProxyTriples). Members must share their vocabulary size unless `vocab_size` names the shared
    leading ids (every member's logits are sliced to it); ValueError otherwise."""
    configs, params = ProxyTriple(*configs), ProxyTriple(*params)
    bad = [c for c in configs if not isinstance(c, LlamaConfig)]
    if bad:
        raise ValueError(f"proxy members must be LlamaConfigs, got {type(bad[0]).__name__}")
    sizes = tuple(c.vocab_size for c in configs)
    if vocab_size is None:
        if len(set(sizes)) != 1:
            raise ValueError(f"proxy members have different vocabulary sizes (base, expert, anti) = {sizes}; "
                             "pass vocab_size to use their shared leading ids")
        vocab_size = sizes[0]
    elif vocab_size > min(sizes):
        raise ValueError(f"vocab_size {vocab_size} exceeds a member's vocabulary (base, expert, anti) = {sizes}")
    fn = proxy_tuned(*(llama_logits_fn(c) for c in configs), alpha, vocab_size=vocab_size)
    engine_kwargs.setdefault("max_model_len", min(c.max_len for c in configs))
    return Engine(fn, params, kv_spec=ProxyTriple(*(KVSpec.of(c) for c in configs)), vocab_size=vocab_size,
                  **engine_kwargs)
