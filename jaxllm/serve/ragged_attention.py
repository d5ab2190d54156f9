"""The engine's attention through the Pallas TPU kernel `ragged_paged_attention`
(`jax.experimental.pallas.ops.tpu.ragged_paged_attention`, the kernel vLLM-TPU serves with).

It is an `AttentionFn` (see `jaxllm.serve.paged_attention`): pass it as `Engine(...,
attention=ragged_paged_attention)` on TPU. The kernel reads every key, this pass's included, from
pages of one combined pool [N, P, 2G, K] (K and V of kv head g at 2g and 2g + 1) given each row's
kv length, page table and query start. The engine keeps K and V in separate pools and writes a
pass's rows after the forward (`commit`), so per layer this adapter scatters the pass's rows into
copies of the layer's pools and interleaves them: a copy of the layer's pool per pass, the price
of one pool layout for both attentions. Rows must start at table index 0 (no ensemble offsets),
each row's block table must cover its context after the pass, and the head dimension must be a
multiple of the 128-lane vector width (the kernel's tiling).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxllm.model import kernels
from jaxllm.serve.cache import RaggedBatch, write_kv


def ragged_paged_attention(q_THK: jax.Array, k_TGK: jax.Array, v_TGK: jax.Array, k_NPGK: jax.Array,
                           v_NPGK: jax.Array, batch: RaggedBatch, offset_S: jax.Array) -> jax.Array:
    """`paged_attention`'s contract through the Pallas kernel (queries pre-scaled: softmax scale 1).

    Under the engine's `tensor` mesh the kernel runs per shard (`jax.shard_map`; XLA cannot
    partition a Mosaic call) on the shard's query heads and its own kv heads (the engine repeats
    kv heads fewer than the shards: `jaxllm.serve.sharding.serving_config`)."""
    del offset_S  # rows start at table index 0 (see the module docstring)
    kernels.check_backend("splash")  # the same requirement: a TPU (or interpret mode)
    mesh = jax.sharding.get_abstract_mesh()
    t = 1 if mesh.empty else dict(mesh.shape).get("tensor", 1)
    if t == 1:
        return _local(q_THK, k_TGK, v_TGK, k_NPGK, v_NPGK, batch)
    G = k_NPGK.shape[2]
    if G % t:
        raise ValueError(f"ragged_paged_attention: {G} kv heads do not split over tensor={t}")
    heads = PartitionSpec(None, "tensor", None)
    pool = PartitionSpec(None, None, "tensor", None)
    return jax.shard_map(_local, mesh=mesh, in_specs=(heads, heads, heads, pool, pool, PartitionSpec()),
                         out_specs=heads, check_vma=False)(q_THK, k_TGK, v_TGK, k_NPGK, v_NPGK, batch)


def _local(q_THK, k_TGK, v_TGK, k_NPGK, v_NPGK, batch: RaggedBatch):
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa
    k_NPGK, v_NPGK = write_kv(k_NPGK, v_NPGK, k_TGK, v_TGK, batch.slot_mapping_T)
    N, P, G, K = k_NPGK.shape
    if K % kernels.LANES:
        raise ValueError(f"ragged_paged_attention needs a head dimension that is a multiple of {kernels.LANES}, got {K}")
    kv_pages = jnp.stack([k_NPGK, v_NPGK.astype(k_NPGK.dtype)], axis=3).reshape(N, P, 2 * G, K)
    valid_S = batch.last_index_S >= 0  # padding rows follow the real ones
    ends_S = jax.lax.cummax(jnp.where(valid_S, batch.last_index_S + 1, 0))
    cu_q_lens = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_S.astype(jnp.int32)])
    kv_lens_S = jnp.where(valid_S, batch.context_len_S, 0).astype(jnp.int32)
    num_seqs = jnp.sum(valid_S, dtype=jnp.int32).reshape(1)
    pages_SW = jnp.maximum(batch.block_tables_SW, 0).astype(jnp.int32)
    # On a TPU the kernel looks up tuned blocks for the chip it runs on; lowering from another host
    # (ahead of time, or interpreted) has no chip to ask.
    blocks = {} if jax.default_backend() == "tpu" else dict(
        num_kv_pages_per_block=min(max(1, 128 // P), pages_SW.shape[1]), num_queries_per_block=min(32, q_THK.shape[0]))
    call = lambda: rpa.ragged_paged_attention(q_THK.astype(kv_pages.dtype), kv_pages, kv_lens_S, pages_SW,  # noqa: E731
                                              cu_q_lens, num_seqs, sm_scale=1.0, **blocks)
    if kernels.interpreting():
        from jax.experimental.pallas import tpu as pltpu
        with pltpu.force_tpu_interpret_mode():  # this kernel has no interpret flag and no backward
            out_THK = call()
    else:
        out_THK = call()
    in_row_T = batch.slot_T >= 0
    return jnp.where(in_row_T[:, None, None], out_THK, 0).astype(q_THK.dtype)
