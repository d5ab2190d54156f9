"""Paged KV cache: host-side block bookkeeping and the device-side pool layout.

The KV pool is a fixed set of `num_blocks` blocks of `block_size` token slots. Each sequence owns a
block table (block ids in position order); token position p of a sequence lives in slot
`table[p // block_size] * block_size + p % block_size` of the flattened pool.

Host side (`BlockManager`, plain Python/NumPy): free list, reference counts, per-sequence block
tables, and a prefix cache that maps a hash chain of *full, already computed* blocks to the block
holding them, so a prompt sharing a prefix with an earlier one (judge templates, few-shot prompts)
reuses those blocks instead of recomputing them. Blocks whose reference count drops to zero stay
in the prefix cache until the free list hands them out again (least recently freed first).

Device side (pure jnp): `KVPool` (k/v arrays [L, N, P, G, K]: layers, blocks, tokens per block,
kv heads, head dim) laid out as `KVSpec` says, `write_kv` (scatter new K/V by slot index),
`copy_blocks` (for `fork`), and the ragged-batch metadata `RaggedBatch`. The pool and one pass's
metadata travel together as `jaxllm.serve.paged_attention.PagedKVCache`.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _chain_hash(prev: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash of one full block given the hash of the block before it (b"" for the first block)."""
    data = prev + np.asarray(token_ids, dtype=np.int64).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


class BlockManager:
    """Host-side allocator of the paged KV pool.

    Sequences are named by integer ids. A sequence gets a block table with `allocate`, grows it
    with `append_slots`, shares it with `fork`, reports which tokens have their K/V written with
    `commit` (full blocks then enter the prefix cache), and returns its blocks with `free`.
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._ref_count_N = np.zeros(num_blocks, np.int32)
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
        self._tables: dict[int, list[int]] = {}
        self._chains: dict[int, list[bytes]] = {}  # per sequence: hashes of its leading committed full blocks
        self._cached: dict[bytes, int] = {}  # chain hash -> block holding that content
        self._block_hash: dict[int, bytes] = {}  # block -> its key in _cached (canonical copies only)

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any sequence (including evictable prefix-cached ones)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently findable through the prefix cache."""
        return len(self._cached)

    @property
    def ref_counts(self) -> np.ndarray:
        """Copy of the per-block reference counts [N]."""
        return self._ref_count_N.copy()

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self._table(seq_id))

    def slot_mapping(self, seq_id: int, start: int, stop: int) -> np.ndarray:
        """Flat pool slots of positions [start, stop) of a sequence (int32)."""
        table = np.asarray(self._table(seq_id), np.int32)
        pos = np.arange(start, stop)
        if stop > len(table) * self.block_size:
            raise ValueError(f"positions up to {stop} exceed the {len(table)} blocks of sequence {seq_id}")
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).astype(np.int32)

    def cached_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Blocks of the prefix cache holding the longest run of leading full blocks of `token_ids`.

        The block holding the last token is never matched: that token must be computed to get the
        logits that continue the sequence.
        """
        if not self.prefix_caching:
            return []
        bs = self.block_size
        blocks, h = [], b""
        for i in range((len(token_ids) - 1) // bs):
            h = _chain_hash(h, token_ids[i * bs:(i + 1) * bs])
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def blocks_to_allocate(self, token_ids: Sequence[int], num_tokens: int) -> int:
        """Free-list blocks `allocate(_, token_ids, num_tokens)` would take (prefix hits on live
        blocks are free of charge; hits on evictable blocks take them off the free list)."""
        hits = self.cached_prefix(token_ids)
        live = sum(1 for b in hits if self._ref_count_N[b] > 0)
        return self.blocks_for(num_tokens) - live

    # ---- mutations -----------------------------------------------------------------------------
    def allocate(self, seq_id: int, token_ids: Sequence[int], num_tokens: int) -> int:
        """Create the block table of `seq_id` with room for `num_tokens` tokens, reusing the cached
        prefix of `token_ids`. Returns how many leading tokens are already computed (cache hits)."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has a block table")
        if not token_ids:
            raise ValueError(f"sequence {seq_id}: cannot allocate for an empty token list")
        if num_tokens < len(token_ids):
            raise ValueError(f"num_tokens {num_tokens} is shorter than the {len(token_ids)} tokens given")
        need = self.blocks_to_allocate(token_ids, num_tokens)
        if need > len(self._free):
            raise ValueError(f"sequence {seq_id} needs {need} free blocks, only {len(self._free)} are free")
        hits = self.cached_prefix(token_ids)
        for block in hits:
            if self._ref_count_N[block] == 0:
                del self._free[block]
            self._ref_count_N[block] += 1
        self._tables[seq_id] = hits + [self._pop_free() for _ in range(self.blocks_for(num_tokens) - len(hits))]
        self._chains[seq_id] = [self._block_hash[b] for b in hits]
        return len(hits) * self.block_size

    def append_slots(self, seq_id: int, num_tokens: int) -> bool:
        """Grow the table of `seq_id` to hold `num_tokens` tokens. False (and no change) when the
        free list is too short."""
        table = self._table(seq_id)
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            return False
        table.extend(self._pop_free() for _ in range(need))
        return True

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Record that K/V of the first `num_computed` tokens are written; every full block among
        them enters the prefix cache (unless an identical block is already there)."""
        if not self.prefix_caching:
            return
        table, chain, bs = self._table(seq_id), self._chains[seq_id], self.block_size
        if num_computed > min(len(token_ids), len(table) * bs):
            raise ValueError(f"sequence {seq_id}: {num_computed} computed tokens exceed its tokens or blocks")
        while len(chain) < num_computed // bs:
            i = len(chain)
            h = _chain_hash(chain[-1] if chain else b"", token_ids[i * bs:(i + 1) * bs])
            chain.append(h)
            if h not in self._cached:
                self._cached[h] = table[i]
                self._block_hash[table[i]] = h

    def fork(self, parent_id: int, child_id: int, num_tokens: int) -> list[tuple[int, int]]:
        """Give `child_id` the first `num_tokens` tokens of `parent_id`: full blocks are shared
        (ref count + 1), a partially filled last block is copied into a fresh block. Returns the
        (src, dst) block pairs the device must copy (`copy_blocks`) before the child writes."""
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id} already has a block table")
        parent, bs = self._table(parent_id), self.block_size
        if not 0 < num_tokens <= len(parent) * bs:
            raise ValueError(f"cannot fork {num_tokens} tokens from sequence {parent_id} with {len(parent)} blocks")
        full, partial = divmod(num_tokens, bs)
        if partial and not self._free:
            raise ValueError(f"fork of sequence {parent_id} needs a free block, none is free")
        shared = parent[:full]
        for block in shared:
            self._ref_count_N[block] += 1
        copies = [(parent[full], self._pop_free())] if partial else []
        self._tables[child_id] = shared + [dst for _, dst in copies]
        self._chains[child_id] = self._chains[parent_id][:full]
        return copies

    def free(self, seq_id: int) -> None:
        """Release the blocks of `seq_id`; last blocks of the table are evicted first."""
        table = self._table(seq_id)
        del self._tables[seq_id], self._chains[seq_id]
        for block in reversed(table):
            self._ref_count_N[block] -= 1
            if self._ref_count_N[block] == 0:
                self._free[block] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (call when the weights change: cached K/V are stale)."""
        in_use = int(np.count_nonzero(self._ref_count_N))
        if in_use:
            raise ValueError(f"cannot reset the prefix cache while {in_use} blocks are in use")
        self._cached.clear()
        self._block_hash.clear()

    # ---- internals -----------------------------------------------------------------------------
    def _table(self, seq_id: int) -> list[int]:
        if seq_id not in self._tables:
            raise ValueError(f"unknown sequence {seq_id}")
        return self._tables[seq_id]

    def _pop_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self._block_hash.pop(block, None)
        if h is not None:
            del self._cached[h]
        self._ref_count_N[block] = 1
        return block


# ---- device side ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KVSpec:
    """Per-token K/V layout of one model: what a paged pool for it holds."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"

    @classmethod
    def of(cls, cfg) -> KVSpec:
        """The spec of a `LlamaConfig` (K/V stored in its compute dtype)."""
        return cls(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.dtype)

    def bytes_per_block(self, block_size: int) -> int:
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPool:
    """K and V of every layer in blocks: `k`, `v` are [L, N, P, G, K] (P = tokens per block). Inside
    the model each layer sees its slice, a KVPool of [N, P, G, K] arrays."""
    k: jax.Array
    v: jax.Array


def init_kv_pool(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype=jnp.float32) -> KVPool:
    shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
    return KVPool(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def write_kv(k_NPGK: jax.Array, v_NPGK: jax.Array, k_TGK: jax.Array, v_TGK: jax.Array,
             slot_mapping_T: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter one layer's new K/V rows into the pool at flat slots; slot −1 (padding) is dropped."""
    N, P = k_NPGK.shape[:2]
    idx_T = jnp.where(slot_mapping_T < 0, N * P, slot_mapping_T)  # out of range -> dropped

    def scatter(pool_NPGK, new_TGK):
        flat = pool_NPGK.reshape(N * P, *pool_NPGK.shape[2:])
        flat = flat.at[idx_T].set(new_TGK.astype(pool_NPGK.dtype), mode="drop")
        return flat.reshape(pool_NPGK.shape)

    return scatter(k_NPGK, k_TGK), scatter(v_NPGK, v_TGK)


def copy_blocks(pool: KVPool, src_C: jax.Array, dst_C: jax.Array) -> KVPool:
    """Copy whole blocks src -> dst in every layer (the device half of `BlockManager.fork`). A dst
    out of range (>= num_blocks: padding of a fixed-size copy list) is dropped."""
    return KVPool(pool.k.at[:, dst_C].set(pool.k[:, src_C], mode="drop"),
                  pool.v.at[:, dst_C].set(pool.v[:, src_C], mode="drop"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedBatch:
    """One flat ragged pass of T tokens from up to S sequences (NumPy on host, arrays on device).

    Per token: `tokens_T`, `positions_T` (position in its sequence), `slot_T` (row of its sequence
    in the S axis, −1 for padding), `slot_mapping_T` (flat pool slot its K/V is written to, −1 for
    padding). Per row: `block_tables_SW` (the sequence's leading blocks, at least those holding the
    tokens cached before this pass; −1 past its end),
    `context_len_S` (tokens of the sequence in the cache after this pass), `last_index_S` (index in
    T of the row's last token, −1 for padding rows), `sample_S` (whether a token is sampled from
    this row: decodes and final prompt chunks).
    """
    tokens_T: jax.Array
    positions_T: jax.Array
    slot_T: jax.Array
    slot_mapping_T: jax.Array
    block_tables_SW: jax.Array
    context_len_S: jax.Array
    last_index_S: jax.Array
    sample_S: jax.Array

