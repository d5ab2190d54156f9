"""Named model sizes: real Llama-family shapes and tiny ones for CPU tests and experiments.

Mistral-7B's 4096-token sliding window is not modelled (full causal attention): outputs match the
real model for sequences up to 4096 tokens only.
"""
from __future__ import annotations

import dataclasses

from jaxllm.model import rope
from jaxllm.model.llama import LlamaConfig


def _llama(vocab, d, layers, heads, kv_heads, ff, max_len, base=10_000.0, **kw) -> LlamaConfig:
    head_dim = d // heads
    return LlamaConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                       head_dim=head_dim, d_ff=ff, rope=rope.default(head_dim, base), max_len=max_len, **kw)


PRESETS = {
    "tiny": lambda: _llama(512, 64, 2, 4, 2, 192, 512),
    "small": lambda: _llama(4096, 256, 4, 8, 4, 768, 1024),
    "llama2_7b": lambda: _llama(32000, 4096, 32, 32, 32, 11008, 4096),
    "llama2_13b": lambda: _llama(32000, 5120, 40, 40, 40, 13824, 4096),
    "llama2_70b": lambda: _llama(32000, 8192, 80, 64, 8, 28672, 4096),
    "llama3_8b": lambda: _llama(128256, 4096, 32, 32, 8, 14336, 8192, base=500_000.0),
    "mistral_7b": lambda: _llama(32000, 4096, 32, 32, 8, 14336, 32768, base=10_000.0),
}


def get(name: str, **overrides) -> LlamaConfig:
    """The preset `name` with dataclass fields replaced by `overrides` (head_dim follows d_model /
    n_heads and the RoPE spec follows head_dim unless given explicitly)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(LlamaConfig)}
    if unknown:
        raise ValueError(f"unknown LlamaConfig fields {sorted(unknown)} for preset {name!r}")
    if ("d_model" in overrides or "n_heads" in overrides) and "head_dim" not in overrides:
        overrides["head_dim"] = overrides.get("d_model", cfg.d_model) // overrides.get("n_heads", cfg.n_heads)
    if "head_dim" in overrides and "rope" not in overrides:
        overrides["rope"] = rope.default(overrides["head_dim"], cfg.rope.base)
    return dataclasses.replace(cfg, **overrides)
