"""Paged attention over the engine's KV pool, and the cache object that runs it inside the model.

`PagedKVCache` implements the model's KV-cache protocol (see `jaxllm.model.attention`): the same
`Llama` module that decodes with a `DenseKVCache` runs the engine's flat ragged pass [1, T] with
this cache. During the forward the pool is only read: each layer's `attend` returns the pass's new
K/V rows, `advance` keeps all layers' rows as `pending`, and `commit` scatters them into the pool
at the scheduler's slot mapping (`write_kv`) in a separate jitted program that donates the pool.
Both halves matter on CPU: rebuilding the pool layer by layer inside the model copies it every
pass, and XLA copies a donated buffer that the same program also reads, so only a write-only
program updates it in place.

A token of row s at position p therefore attends to two key sets, merged in one softmax:
- history: its row's keys cached by earlier passes, positions below the row's first position in
  this pass, read through the row's block table, followed by the keys of its own tile (below)
  at positions <= p;
- the rest of this pass: the tokens of its own row in other tiles with position <= p (dense
  T × T, masked).
Every token of a row shares the row's history, so history is read per *tile* (up to `tile`
consecutive tokens of one row), not per token: a pass of T tokens in at most S rows has at most
(T + S·(tile − 1)) / tile tiles. Long prompt chunks then read their history once per tile while
decodes (one-token rows) read exactly their own context plus their own key.

The attention is a function argument (`AttentionFn`), the seam for a kernel: the plain-JAX
`paged_attention` below runs on CPU, GPU and TPU; on TPU
`jaxllm.serve.ragged_attention.ragged_paged_attention` runs the Pallas kernel of that name instead.

Row offsets: an ensemble member that sees a shorter prompt than the request's longest (proxy
tuning's base next to a chat-formatted expert) stores its tokens from table index `offset_S[s]`
on; table indices before that are never written and never attended, its padding tokens carry
slot −1, and its RoPE positions are table index − offset.
"""
from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from jaxllm.model.attention import NEG_INF
from jaxllm.serve.cache import KVPool, RaggedBatch, write_kv

AttentionFn = Callable[..., jax.Array]
TILE = 4  # query tile for history reads when a pass has more tokens than rows (fastest measured)


def _partial_softmax(logits_XC, mask_XC, v_fn):
    """Unnormalised softmax pieces over the last axis: (max, sum of exp, exp-weighted values)."""
    logits_XC = jnp.where(mask_XC, logits_XC, NEG_INF)
    max_X = jnp.max(logits_XC, axis=-1)
    p_XC = jnp.where(mask_XC, jnp.exp(logits_XC - max_X[..., None]), 0.0)
    return max_X, jnp.sum(p_XC, axis=-1), v_fn(p_XC)


def _tiles(batch: RaggedBatch, tile: int):
    """Tile layout of a pass: token index per (tile, slot) [J, Q] (−1 empty), each tile's row [J],
    and each token's (tile, slot) [T] (tile = J for tokens with slot −1, which own no tile)."""
    T, S = batch.tokens_T.shape[0], batch.last_index_S.shape[0]
    J = min(T, (T + S * (tile - 1)) // tile)
    t_T = jnp.arange(T, dtype=jnp.int32)
    first_S = jnp.concatenate([jnp.zeros((1,), jnp.int32), batch.last_index_S[:-1] + 1])  # rows are contiguous
    n_S = jnp.where(batch.last_index_S >= 0, batch.last_index_S - first_S + 1, 0)
    tiles_S = (n_S + tile - 1) // tile
    tile_start_S = jnp.cumsum(tiles_S) - tiles_S
    in_row_T = batch.slot_T >= 0
    row_T = jnp.maximum(batch.slot_T, 0)
    if tile == 1:  # every token its own tile, in place
        return jnp.where(in_row_T, t_T, -1)[:, None], row_T, jnp.where(in_row_T, t_T, J), jnp.zeros_like(t_T), first_S
    i_T = t_T - first_S[row_T]
    tile_T = jnp.where(in_row_T, tile_start_S[row_T] + i_T // tile, J)
    slot_in_tile_T = i_T % tile
    token_JQ = jnp.full((J, tile), -1, jnp.int32).at[tile_T, slot_in_tile_T].set(t_T, mode="drop")
    row_J = jnp.zeros((J,), jnp.int32).at[tile_T].set(row_T, mode="drop")
    return token_JQ, row_J, tile_T, slot_in_tile_T, first_S


def paged_attention(q_THK: jax.Array, k_TGK: jax.Array, v_TGK: jax.Array, k_NPGK: jax.Array, v_NPGK: jax.Array,
                    batch: RaggedBatch, offset_S: jax.Array) -> jax.Array:
    """Attention of each token of a ragged pass (plain JAX).

    `k_NPGK`/`v_NPGK` hold the K/V of every earlier pass; `k_TGK`/`v_TGK` are this pass's (not yet
    in the pool). Token t of row s = `slot_T[t]` at position p = `positions_T[t]` sees this pass's
    tokens of row s at positions <= p and the pool keys of row s at table indices
    offset_S[s] + [0, h_s), h_s being the position of row s's first token in the pass. Tokens with
    slot −1 see nothing and return zeros. Softmax in float32.
    """
    N, P, G, K = k_NPGK.shape
    T, H, _ = q_THK.shape
    R = H // G
    W = batch.block_tables_SW.shape[1]
    S = batch.last_index_S.shape[0]
    slot_T, pos_T = batch.slot_T, batch.positions_T
    # Batch axes lead in every contraction below (kv head g, then tile j): CPU dots are much
    # faster that way than with the batch axis between the others.
    q_GTRK = q_THK.reshape(T, G, R, K).transpose(1, 0, 2, 3)

    # History tiles (below) also hold their own tokens' keys; this part is the rest of the pass:
    # dense over T, same row, causal by position, other tiles.
    tile = 1 if T <= S else TILE
    token_JQ, row_J, tile_T, slot_in_tile_T, first_S = _tiles(batch, tile)
    mask_TT = ((slot_T[:, None] == slot_T[None, :]) & (slot_T >= 0)[:, None] & (pos_T[None, :] <= pos_T[:, None])
               & (tile_T[:, None] != tile_T[None, :]))
    logits_GTRT = jnp.einsum("gtrk,gsk->gtrs", q_GTRK, k_TGK.astype(q_THK.dtype).transpose(1, 0, 2),
                             preferred_element_type=jnp.float32)
    now = _partial_softmax(logits_GTRT, mask_TT[None, :, None], lambda p: jnp.einsum(
        "gtrs,gsk->gtrk", p.astype(v_TGK.dtype), v_TGK.transpose(1, 0, 2), preferred_element_type=jnp.float32))

    # History: per tile of one row, that row's cached keys before its first position in the pass,
    # then the tile's own tokens (causal). The own keys also make each layer's gather depend on
    # that layer, so XLA gathers layer by layer into one reused buffer instead of every layer's
    # history up front (on CPU that was ~100 MB of fresh pages per pass, a quarter of its time).
    J = token_JQ.shape[0]
    hist_S = pos_T[jnp.clip(first_S, 0, T - 1)]
    blocks_JW = jnp.maximum(batch.block_tables_SW[row_J], 0)  # −1 past a table's end: masked below
    own_JQ = jnp.maximum(token_JQ, 0)

    def gather(pool_NPGK, new_TGK):
        rows = jnp.take(pool_NPGK.reshape(N, P * G * K), blocks_JW.reshape(-1), axis=0)
        keys_JCGK = jnp.concatenate([rows.reshape(J, W * P, G, K), new_TGK[own_JQ].astype(pool_NPGK.dtype)], axis=1)
        return keys_JCGK.transpose(2, 0, 1, 3)

    key_pos_JC = jnp.arange(W * P, dtype=jnp.int32)[None] - offset_S[row_J][:, None]
    mask_JC = (key_pos_JC >= 0) & (key_pos_JC < hist_S[row_J][:, None])
    own_pos_JQ = pos_T[own_JQ]
    mask_own_JQQ = (token_JQ >= 0)[:, None, :] & (own_pos_JQ[:, None, :] <= own_pos_JQ[:, :, None])
    mask_JQC = jnp.concatenate([jnp.broadcast_to(mask_JC[:, None], (J, tile, W * P)), mask_own_JQQ], axis=-1)
    mask_JQC = jnp.broadcast_to(mask_JQC[:, :, None], (J, tile, R, W * P + tile)).reshape(J, tile * R, -1)
    q_GJQK = (q_GTRK if tile == 1 else q_GTRK[:, own_JQ]).reshape(G, J, tile * R, K)
    k_GJCK, v_GJCK = gather(k_NPGK, k_TGK), gather(v_NPGK, v_TGK)
    logits_GJQC = jnp.einsum("gjqk,gjck->gjqc", q_GJQK, k_GJCK.astype(q_THK.dtype), preferred_element_type=jnp.float32)
    hist = _partial_softmax(logits_GJQC, mask_JQC[None], lambda p: jnp.einsum(
        "gjqc,gjck->gjqk", p.astype(v_GJCK.dtype), v_GJCK, preferred_element_type=jnp.float32))
    in_tile_T = tile_T < J
    if tile == 1:
        hist_max, hist_sum, hist_out = hist
    else:
        tile_of_T, slot_of_T = jnp.minimum(tile_T, J - 1), slot_in_tile_T
        hist_max, hist_sum = (x.reshape(G, J, tile, R)[:, tile_of_T, slot_of_T] for x in hist[:2])
        hist_out = hist[2].reshape(G, J, tile, R, K)[:, tile_of_T, slot_of_T]
    hist_max = jnp.where(in_tile_T[None, :, None], hist_max, NEG_INF)
    hist_sum = jnp.where(in_tile_T[None, :, None], hist_sum, 0.0)

    # One softmax over both key sets.
    now_max, now_sum, now_out = now
    top = jnp.maximum(now_max, hist_max)
    a, b = jnp.exp(now_max - top), jnp.exp(hist_max - top)
    total = a * now_sum + b * hist_sum
    out_GTRK = (a[..., None] * now_out + b[..., None] * jnp.where(in_tile_T[None, :, None, None], hist_out, 0.0))
    out_GTRK = out_GTRK / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]
    return out_GTRK.transpose(1, 0, 2, 3).reshape(T, H, K).astype(q_THK.dtype)


@flax.struct.dataclass
class PagedKVCache:
    """The cache a LogitsFn receives from the engine: the pool (`layers`, leading axis L) plus one
    pass's metadata. `offset_S` is where each row's tokens start in its block table (zeros unless
    the model is an ensemble member with a shorter prompt); `attention` is the kernel seam.

    Per layer, `attend` reads that layer's pool and returns the pass's new K/V rows as the layer's
    new state; `advance` keeps every layer's rows in `pending` ([L, T, G, K]) for `commit`."""

    layers: KVPool | None
    batch: RaggedBatch
    offset_S: jax.Array
    pending: KVPool | None = None
    attention: AttentionFn = flax.struct.field(pytree_node=False, default=paged_attention)

    def attend(self, layer: KVPool, q_BTHK, k_BTGK, v_BTGK):
        """Attention of the pass (batch axis B = 1) over this layer's pool; returns (out, new
        rows KVPool(k_TGK, v_TGK))."""
        if q_BTHK.shape[0] != 1:
            raise ValueError(f"a paged pass is one flat row of tokens, got batch {q_BTHK.shape[0]}")
        out_THK = self.attention(q_BTHK[0], k_BTGK[0], v_BTGK[0], layer.k, layer.v, self.batch, self.offset_S)
        return out_THK[None], KVPool(k_BTGK[0], v_BTGK[0])

    def advance(self, new_rows: KVPool, num_new: int) -> PagedKVCache:
        del num_new  # lengths live in the scheduler's metadata
        return self.replace(pending=new_rows)

    def default_positions(self, T: int):
        return self.batch.positions_T[None, :T]


def commit(pool: KVPool, pending: KVPool, slot_mapping_T: jax.Array) -> KVPool:
    """The pool with a pass's pending rows [L, T, G, K] written at their slots (−1 dropped); jit it
    with the pool donated, apart from the forward, to update in place."""
    write = jax.vmap(write_kv, in_axes=(0, 0, 0, 0, None))
    return KVPool(*write(pool.k, pool.v, pending.k, pending.v, slot_mapping_T))
