"""BERT-family bidirectional encoder (BERT, MiniLM) in flax.linen, and sentence embeddings from it.

Post-LN blocks as in BERT: embeddings (token + absolute position + token type) → LayerNorm, then per
layer: self-attention over the non-padding tokens → residual → LayerNorm, exact-erf GELU MLP →
residual → LayerNorm. No dropout (inference and deterministic fine-tuning). Parameters carry the
same logical axis names as the decoder (`vocab`, `embed`, `heads`, `mlp`), so one definition shards
on any mesh.

Sentence embeddings follow sentence-transformers: mean of the last hidden states over the attention
mask (or the [CLS] state), then L2 normalisation, so a dot product is a cosine similarity.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.model.attention import grouped_attention
from jaxllm.model.llama import DTYPES

POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture and numerics of a BERT-family encoder.

    `max_len` is the number of learned positions, `n_token_types` the segment vocabulary (2 in BERT).
    `dtype` is the compute dtype, `param_dtype` the storage dtype; LayerNorm and softmax run in float32.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_len: int = 512
    n_token_types: int = 2
    norm_eps: float = 1e-12
    pad_id: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len", "n_token_types"):
            if getattr(self, name) < 1:
                raise ValueError(f"BertConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; known: {sorted(DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def storage_dtype(self):
        return DTYPES[self.param_dtype]


def _param(module: nn.Module, name: str, shape, names, cfg: BertConfig, init=None):
    init = nn.initializers.normal(0.02) if init is None else init
    return module.param(name, nn.with_logical_partitioning(init, names), shape, cfg.storage_dtype)


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias, computed in float32."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x_BTD):
        D = x_BTD.shape[-1]
        scale_D = _param(self, "scale", (D,), (None,), self.cfg, nn.initializers.ones)
        bias_D = _param(self, "bias", (D,), (None,), self.cfg, nn.initializers.zeros)
        x = x_BTD.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps) * scale_D.astype(jnp.float32) + bias_D
        return y.astype(self.cfg.compute_dtype)


class Dense(nn.Module):
    """x @ kernel + bias over the trailing axis, with kernel/bias shapes given explicitly so that
    attention projections keep their head axis ([D, H, K] and [H, K, D])."""

    cfg: BertConfig
    kernel_shape: tuple[int, ...]
    kernel_names: tuple[str | None, ...]
    n_in: int = 1

    @nn.compact
    def __call__(self, x):
        dt = self.cfg.compute_dtype
        bias_shape = self.kernel_shape[self.n_in:]
        kernel = _param(self, "kernel", self.kernel_shape, self.kernel_names, self.cfg).astype(dt)
        bias = _param(self, "bias", bias_shape, self.kernel_names[self.n_in:], self.cfg, nn.initializers.zeros)
        in_axes = tuple(range(x.ndim - self.n_in, x.ndim))
        y = jnp.tensordot(x.astype(dt), kernel, axes=(in_axes, tuple(range(self.n_in))))
        return y + bias.astype(dt)


class Embeddings(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT, token_types_BT):
        cfg = self.cfg
        tok_VD = _param(self, "token", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        pos_PD = _param(self, "position", (cfg.max_len, cfg.d_model), (None, "embed"), cfg)
        typ_YD = _param(self, "token_type", (cfg.n_token_types, cfg.d_model), (None, "embed"), cfg)
        x_BTD = (jnp.take(tok_VD, tokens_BT, axis=0) + jnp.take(pos_PD, positions_BT, axis=0)
                 + jnp.take(typ_YD, token_types_BT, axis=0))
        return LayerNorm(cfg, name="norm")(x_BTD)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention; keys where mask_BT is 0 get no weight."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x_BTD, mask_BT):
        cfg = self.cfg
        D, H, K = cfg.d_model, cfg.n_heads, cfg.head_dim

        def proj(name):
            return Dense(cfg, (D, H, K), ("embed", "heads", None), name=name)(x_BTD)

        q_BTHK = (proj("q").astype(jnp.float32) * K ** -0.5).astype(cfg.compute_dtype)
        B, T = mask_BT.shape
        mask_BTC = jnp.broadcast_to(mask_BT[:, None, :] > 0, (B, T, T))
        out_BTHK = grouped_attention(q_BTHK, proj("k"), proj("v"), mask_BTC)
        return Dense(cfg, (H, K, D), ("heads", None, "embed"), n_in=2, name="o")(out_BTHK)


class Block(nn.Module):
    """One post-LN encoder layer: x = LN(x + Attn(x)); x = LN(x + Down(GELU(Up(x))))."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x_BTD, mask_BT):
        cfg = self.cfg
        x_BTD = LayerNorm(cfg, name="attn_norm")(x_BTD + Attention(cfg, name="attn")(x_BTD, mask_BT))
        h_BTF = Dense(cfg, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), name="up")(x_BTD)
        h_BTF = jax.nn.gelu(h_BTF, approximate=False)
        h_BTD = Dense(cfg, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), name="down")(h_BTF)
        x_BTD = LayerNorm(cfg, name="mlp_norm")(x_BTD + h_BTD)
        return nn.with_logical_constraint(x_BTD, ("batch", "length", None))


class BertEncoder(nn.Module):
    """`__call__(tokens_BT, mask_BT, token_types_BT=None, positions_BT=None) -> hidden_BTD`: the last
    hidden states (what HF `BertModel` returns as `last_hidden_state`). mask_BT is 1 on real tokens."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, tokens_BT, mask_BT, token_types_BT=None, positions_BT=None):
        cfg = self.cfg
        B, T = tokens_BT.shape
        if T > cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds the encoder's max_len {cfg.max_len}")
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if token_types_BT is None:
            token_types_BT = jnp.zeros((B, T), jnp.int32)
        x_BTD = Embeddings(cfg, name="embed")(tokens_BT, positions_BT, token_types_BT)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", None))
        for i in range(cfg.n_layers):
            x_BTD = Block(cfg, name=f"layers_{i}")(x_BTD, mask_BT)
        return x_BTD


def init_params(cfg: BertConfig, rng, *, boxed: bool = False):
    """Random parameters (plain arrays unless `boxed`, which keeps the logical-axis metadata)."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = BertEncoder(cfg).init(rng, tokens, jnp.ones_like(tokens))["params"]
    return params if boxed else nn.meta.unbox(params)


def pool(hidden_BTD, mask_BT, kind: str = "mean"):
    """Sentence vector per row: the mask-weighted mean of the hidden states (sentence-transformers'
    mean pooling, the count clamped at 1e-9) or the first ([CLS]) state. Float32."""
    if kind not in POOLINGS:
        raise ValueError(f"unknown pooling {kind!r}; known: {POOLINGS}")
    h_BTD = hidden_BTD.astype(jnp.float32)
    if kind == "cls":
        return h_BTD[:, 0]
    m_BT1 = mask_BT.astype(jnp.float32)[:, :, None]
    return jnp.sum(h_BTD * m_BT1, axis=1) / jnp.maximum(jnp.sum(m_BT1, axis=1), 1e-9)


def l2_normalize(x_BD, eps: float = 1e-12):
    """x / max(||x||, eps) per row, as torch.nn.functional.normalize."""
    return x_BD / jnp.maximum(jnp.linalg.norm(x_BD, axis=-1, keepdims=True), eps)


def embed(params, tokens_BT, mask_BT, cfg: BertConfig, *, pooling: str = "mean", normalize: bool = True):
    """Sentence embeddings emb_BD (float32) of token rows: encoder → `pool` → optional L2 norm."""
    hidden_BTD = BertEncoder(cfg).apply({"params": params}, tokens_BT, mask_BT)
    emb_BD = pool(hidden_BTD, mask_BT, pooling)
    return l2_normalize(emb_BD) if normalize else emb_BD
