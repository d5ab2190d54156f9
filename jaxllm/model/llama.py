"""Llama-family decoder (Llama 2/3, Mistral without sliding window) in flax.linen. Shape-suffix
letters: see the legend in `jaxllm/__init__.py`.

Pre-norm blocks: RMSNorm → grouped-query causal attention with RoPE → residual, RMSNorm → SwiGLU
MLP → residual; final RMSNorm and an LM head (tied to the embedding or not). Parameters carry
logical axis names (see `jaxllm.parallel.rules`) so one definition shards on any mesh.

Positions and packed-segment ids are explicit inputs, so packed training rows, KV-cache decoding
and ragged engine batches all run the same blocks. A KV cache (see `attention.py`) is passed in and
returned updated; the blocks never depend on how it stores keys and values.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.model import attention, kernels, rope

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of a Llama-family decoder.

    n_kv_heads < n_heads gives grouped-query attention (1 = multi-query). `dtype` is the compute
    dtype, `param_dtype` the storage dtype; softmax and losses always run in float32. `remat` is a
    key of REMAT_POLICIES; `scan_layers` stacks the blocks under one `lax.scan` (fast compiles for
    deep models; parameters get a leading layer axis). `value_head` adds a linear map D → 1 on the
    final normed hidden state (the critic of PPO, see `jaxllm.model.value_head`). `attention` names
    the attention kernel (`jaxllm.model.kernels`: "xla", "splash"/"flash" on TPU, "cudnn" on GPU)
    and `attention_block_q`/`attention_block_kv` its tiles.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope: rope.RopeSpec
    max_len: int = 2048
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    value_head: bool = False
    attention: str = "xla"
    attention_block_q: int = 512
    attention_block_kv: int = 512

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.rope.head_dim != self.head_dim:
            raise ValueError(f"rope.head_dim={self.rope.head_dim} differs from head_dim={self.head_dim}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; known: {sorted(REMAT_POLICIES)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; known: {sorted(DTYPES)}")
        kernels.check_config(self.attention, self.attention_block_q, self.attention_block_kv)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def storage_dtype(self):
        return DTYPES[self.param_dtype]

    def num_params(self, include_embedding: bool = True) -> int:
        D, F, K = self.d_model, self.d_ff, self.head_dim
        per_layer = D * K * (2 * self.n_heads + 2 * self.n_kv_heads) + 3 * D * F + 2 * D
        embed = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + D + (embed if include_embedding else 0)


def _param(module: nn.Module, name: str, shape, names, std, cfg: LlamaConfig):
    init = nn.with_logical_partitioning(nn.initializers.normal(std), names)
    return module.param(name, init, shape, cfg.storage_dtype)


class RMSNorm(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD):
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)),
                             (x_BTD.shape[-1],), self.cfg.storage_dtype)
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return scale_D.astype(self.cfg.compute_dtype) * x.astype(self.cfg.compute_dtype)


class Embed(nn.Module):
    """Token embedding table [V, D]; its transpose is the LM head when embeddings are tied."""

    cfg: LlamaConfig

    def setup(self):
        std = self.cfg.d_model ** -0.5 if self.cfg.tie_embeddings else 1.0
        self.embedding_VD = _param(self, "embedding", (self.cfg.vocab_size, self.cfg.d_model),
                                   ("vocab", "embed"), std, self.cfg)

    def __call__(self, tokens_BT):
        return jnp.take(self.embedding_VD, tokens_BT, axis=0).astype(self.cfg.compute_dtype)


class Attention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, layer, segment_ids_BT=None, cache=None, layer_kv=None):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        D, H, G, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        std = D ** -0.5
        wq = _param(self, "q", (D, H, K), ("embed", "heads", None), std, cfg).astype(dt)
        wk = _param(self, "k", (D, G, K), ("embed", "kv_heads", None), std, cfg).astype(dt)
        wv = _param(self, "v", (D, G, K), ("embed", "kv_heads", None), std, cfg).astype(dt)
        wo = _param(self, "o", (H, K, D), ("heads", None, "embed"), (H * K * 2 * cfg.n_layers) ** -0.5, cfg)
        x_BTD = x_BTD.astype(dt)
        q_BTHK = rope.apply(jnp.einsum("btd,dhk->bthk", x_BTD, wq), positions_BT, cfg.rope)
        k_BTGK = rope.apply(jnp.einsum("btd,dgk->btgk", x_BTD, wk), positions_BT, cfg.rope)
        v_BTGK = jnp.einsum("btd,dgk->btgk", x_BTD, wv)
        scale_BT = rope.query_scale(positions_BT, cfg.rope, layer) * K ** -0.5
        q_BTHK = (q_BTHK.astype(jnp.float32) * scale_BT[:, :, None, None]).astype(dt)
        kernels.check_backend(cfg.attention)
        if cache is None:
            out_BTHK = kernels.causal_attention(cfg.attention, q_BTHK, k_BTGK, v_BTGK, segment_ids_BT,
                                                block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv)
        else:
            out_BTHK, layer_kv = cache.attend(layer_kv, q_BTHK, k_BTGK, v_BTGK)
        out_BTD = jnp.einsum("bthk,hkd->btd", out_BTHK.astype(dt), wo.astype(dt))
        return out_BTD, layer_kv


class Mlp(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        D, F = cfg.d_model, cfg.d_ff
        w_gate = _param(self, "gate", (D, F), ("embed", "mlp"), D ** -0.5, cfg).astype(dt)
        w_up = _param(self, "up", (D, F), ("embed", "mlp"), D ** -0.5, cfg).astype(dt)
        w_down = _param(self, "down", (F, D), ("mlp", "embed"), (F * 2 * cfg.n_layers) ** -0.5, cfg).astype(dt)
        x_BTD = x_BTD.astype(dt)
        h_BTF = nn.silu(x_BTD @ w_gate) * (x_BTD @ w_up)
        return h_BTF @ w_down


class Block(nn.Module):
    """One pre-norm decoder layer. Signature fits `nn.scan`: (carry, layer inputs) -> (carry, out)."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD, layer_in, positions_BT, segment_ids_BT, cache):
        layer, layer_kv = layer_in
        h_BTD, layer_kv = Attention(self.cfg, name="attn")(
            RMSNorm(self.cfg, name="attn_norm")(x_BTD), positions_BT, layer, segment_ids_BT, cache, layer_kv)
        x_BTD = x_BTD + h_BTD
        x_BTD = x_BTD + Mlp(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BTD))
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", None))
        return x_BTD, layer_kv


class Llama(nn.Module):
    """Decoder-only LM.

    `__call__(tokens_BT, positions_BT=None, segment_ids_BT=None, *, cache=None, logit_indices_BS=None)`:
    - no cache: full causal forward; packed rows never attend across `segment_ids_BT`; returns
      logits_BTV (float32).
    - with a KV cache: appends the tokens to it and returns (logits, new cache).
    - `logit_indices_BS` picks the rows that need logits (the LM head runs only on those) and gives
      logits_BSV instead.
    - `cfg.value_head` (no cache): returns (logits_BTV, values_BT), values in float32. Decoding with
      a cache never needs values and returns logits only.
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, cache=None, logit_indices_BS=None):
        cfg = self.cfg
        B, T = tokens_BT.shape
        if cache is None and T > cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds the model's max_len {cfg.max_len}")
        if positions_BT is None:
            positions_BT = (jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if cache is None
                            else cache.default_positions(T))
        if cache is None and segment_ids_BT is None:
            segment_ids_BT = jnp.zeros((B, T), jnp.int32)
        embed = Embed(cfg, name="embed")
        x_BTD = embed(tokens_BT)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", None))

        block = Block
        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            block = nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)
        meta = None if cache is None else cache.replace(layers=None)
        layers_kv = None if cache is None else cache.layers
        if cfg.scan_layers:
            scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            layer_ids = jnp.arange(cfg.n_layers)
            x_BTD, new_kv = scanned(cfg, name="layers")(x_BTD, (layer_ids, layers_kv), positions_BT, segment_ids_BT, meta)
        else:
            outs = []
            for i in range(cfg.n_layers):
                layer_kv = None if cache is None else jax.tree.map(lambda a, i=i: a[i], layers_kv)
                x_BTD, kv = block(cfg, name=f"layers_{i}")(x_BTD, (i, layer_kv), positions_BT, segment_ids_BT, meta)
                outs.append(kv)
            new_kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

        if logit_indices_BS is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logit_indices_BS[:, :, None], axis=1)
        x_BTD = RMSNorm(cfg, name="final_norm")(x_BTD)
        if cfg.tie_embeddings:
            head_DV = embed.embedding_VD.T
        else:
            head_DV = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                             cfg.d_model ** -0.5, cfg)
        logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, head_DV.astype(cfg.compute_dtype),
                                preferred_element_type=jnp.float32)
        logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "length", "vocab"))
        if cache is not None:
            return logits_BTV, cache.advance(new_kv, T)
        if cfg.value_head:
            if not self.is_initializing() and not self.has_variable("params", "value_head"):
                raise ValueError("LlamaConfig.value_head=True but the params have no value head ('value_head', "
                                 "'value_bias'; a checkpoint saved without one): add a freshly initialised one with "
                                 "jaxllm.model.value_head.add_value_head(cfg, params, rng)")
            w_D = _param(self, "value_head", (cfg.d_model,), ("embed",), cfg.d_model ** -0.5, cfg)
            bias = self.param("value_bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                              cfg.storage_dtype)
            return logits_BTV, jnp.einsum("btd,d->bt", x_BTD.astype(jnp.float32), w_D.astype(jnp.float32)) + bias
        return logits_BTV


def init_params(cfg: LlamaConfig, rng, *, boxed: bool = False):
    """Random parameters (plain arrays unless `boxed`, which keeps the logical-axis metadata)."""
    variables = Llama(cfg).init(rng, jnp.zeros((1, 8), jnp.int32))
    params = variables["params"]
    return params if boxed else nn.meta.unbox(params)


def box_params(cfg: LlamaConfig, params):
    """`params` of `cfg` wrapped in the logical-axis boxes `init_params(boxed=True)` gives them (traced
    abstractly, nothing computed), so `jaxllm.train.loop.fit` lays them out sharded like a fresh init."""
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), boxed=True))
    return jax.tree.map(lambda box, x: box.replace_boxed(x), abstract, params,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def init_cache(cfg: LlamaConfig, batch: int, max_len: int | None = None) -> attention.DenseKVCache:
    """Empty dense KV cache for `batch` rows of up to `max_len` tokens (default cfg.max_len)."""
    return attention.init_dense_cache(cfg.n_layers, batch, max_len or cfg.max_len, cfg.n_kv_heads,
                                      cfg.head_dim, cfg.compute_dtype, cfg.attention)


def forward(cfg: LlamaConfig, params: Any, tokens_BT, positions_BT=None, segment_ids_BT=None):
    """Functional alias: logits_BTV of `Llama(cfg)` with `params`."""
    return Llama(cfg).apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT)
