"""Model FLOPs of a Llama training step, by MaxText's convention.

Per token and layer the forward pass costs 2 × (matmul parameters) FLOPs for the q/k/v/o and MLP
projections plus causal attention 2 × 2 × (T/2) × H × K (scores and values against on average half
the sequence); the LM head adds 2 × D × V. A training step (forward + backward) is 3 × forward:
6 × (block matmul params + LM head) + 6 × L × T × H × K FLOPs per token. Embedding lookups, norms
and softmax are not counted.
"""
from __future__ import annotations

from jaxllm.model.llama import LlamaConfig


def matmul_params(cfg: LlamaConfig) -> int:
    """Parameters that take part in a matmul per token: blocks plus the LM head (not the lookup)."""
    D, F, K = cfg.d_model, cfg.d_ff, cfg.head_dim
    per_layer = D * K * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * D * F
    return cfg.n_layers * per_layer + D * cfg.vocab_size


def forward_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    attention = cfg.n_layers * 2 * 2 * (seq_len / 2) * cfg.n_heads * cfg.head_dim
    return 2.0 * matmul_params(cfg) + attention


def train_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Forward + backward: 3 × the forward FLOPs."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)
