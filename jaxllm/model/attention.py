"""Attention math shared by the full forward, the dense KV cache and the paged engine cache.

A KV cache is any pytree object with a `layers` field (per-layer state, leading axis = layer) and
an `attend(layer_state, q_BTHK, k_BTGK, v_BTGK) -> (out_BTHK, new_layer_state)` method that stores
the new keys/values and attends over everything cached for each query. The model never looks
inside the cache, so the dense cache below and the engine's paged cache are interchangeable.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

NEG_INF = -1e30


def grouped_attention(q_BTHK, k_BCGK, v_BCGK, mask_BTC):
    """Softmax attention with H query heads sharing G key/value heads (H % G == 0).

    Queries must already carry the 1/sqrt(K) factor and any logit scale. Softmax in float32;
    a query row with no visible key returns zeros.
    """
    B, T, H, K = q_BTHK.shape
    G = k_BCGK.shape[2]
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    logits_BGRTC = jnp.einsum("btgrk,bcgk->bgrtc", q_BTGRK, k_BCGK,
                              preferred_element_type=jnp.float32)
    logits_BGRTC = jnp.where(mask_BTC[:, None, None], logits_BGRTC, NEG_INF)
    probs_BGRTC = jax.nn.softmax(logits_BGRTC, axis=-1)
    probs_BGRTC = jnp.where(mask_BTC[:, None, None], probs_BGRTC, 0.0)
    out_BTGRK = jnp.einsum("bgrtc,bcgk->btgrk", probs_BGRTC.astype(v_BCGK.dtype), v_BCGK)
    return out_BTGRK.reshape(B, T, H, K)


def masked_attention(name: str, q_BTHK, k_BSGK, v_BSGK, mask_BTS):
    """`grouped_attention` under an arbitrary mask, by implementation name (see
    `jaxllm.model.kernels`): "cudnn" passes the mask to cuDNN's fused attention; the Pallas TPU
    kernels ("splash", "flash") take only static masks, not per-row cache lengths, so they run the
    XLA path here."""
    if name == "cudnn":
        return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask_BTS[:, None], scale=1.0,
                                            implementation="cudnn")
    return grouped_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS)


def causal_segment_mask(segment_ids_BT):
    """Token t sees token s iff s <= t and both lie in the same packed segment."""
    T = segment_ids_BT.shape[1]
    causal_TC = jnp.tril(jnp.ones((T, T), bool))
    same_BTC = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return causal_TC[None] & same_BTC


@flax.struct.dataclass
class DenseLayerKV:
    k_BCGK: jax.Array
    v_BCGK: jax.Array


@flax.struct.dataclass
class DenseKVCache:
    """Contiguous per-row cache: row b holds `lengths_B[b]` tokens at slots 0..lengths_B[b]-1.

    Each call appends T tokens per row; query t of row b sees slots <= lengths_B[b] + t.
    `attention` names the implementation (`masked_attention`).
    """

    layers: DenseLayerKV | None
    lengths_B: jax.Array
    attention: str = flax.struct.field(pytree_node=False, default="xla")

    @property
    def capacity(self) -> int:
        return self.layers.k_BCGK.shape[2]

    def attend(self, layer: DenseLayerKV, q_BTHK, k_BTGK, v_BTGK):
        write = jax.vmap(lambda buf, new, start: jax.lax.dynamic_update_slice_in_dim(buf, new, start, axis=0))
        k_BCGK = write(layer.k_BCGK, k_BTGK.astype(layer.k_BCGK.dtype), self.lengths_B)
        v_BCGK = write(layer.v_BCGK, v_BTGK.astype(layer.v_BCGK.dtype), self.lengths_B)
        T, C = q_BTHK.shape[1], k_BCGK.shape[1]
        last_BT = self.lengths_B[:, None] + jnp.arange(T)[None]
        mask_BTC = jnp.arange(C)[None, None] <= last_BT[:, :, None]
        out_BTHK = masked_attention(self.attention, q_BTHK, k_BCGK, v_BCGK, mask_BTC)
        return out_BTHK, DenseLayerKV(k_BCGK, v_BCGK)

    def advance(self, layers: DenseLayerKV, num_new: int) -> "DenseKVCache":
        return self.replace(layers=layers, lengths_B=self.lengths_B + num_new)

    def default_positions(self, T: int):
        return self.lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None]


def init_dense_cache(n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                     dtype=jnp.float32, attention: str = "xla") -> DenseKVCache:
    shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
    return DenseKVCache(layers=DenseLayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)),
                        lengths_B=jnp.zeros((batch,), jnp.int32), attention=attention)
