"""Paged KV cache: block accounting, prefix caching, fork, and the device scatter/copy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.serve.cache import BlockManager, KVPool, copy_blocks, init_kv_pool, write_kv


def test_allocate_append_free_accounting():
    bm = BlockManager(num_blocks=6, block_size=4, prefix_caching=False)
    assert bm.allocate(0, list(range(10)), 10) == 0
    table = bm.block_table(0)
    assert len(table) == 3 and bm.num_free_blocks == 3
    # positions 0..9 -> block table[p // 4] at offset p % 4
    want = [table[p // 4] * 4 + p % 4 for p in range(10)]
    np.testing.assert_array_equal(bm.slot_mapping(0, 0, 10), want)
    assert bm.append_slots(0, 12)  # still fits in 3 blocks
    assert bm.num_free_blocks == 3
    assert bm.append_slots(0, 13) and len(bm.block_table(0)) == 4
    assert not bm.append_slots(0, 25)  # would need 3 more, only 2 free: no change
    assert len(bm.block_table(0)) == 4 and bm.num_free_blocks == 2
    bm.allocate(1, [1, 2], 2)
    assert sorted(bm.block_table(0) + bm.block_table(1)) == sorted(set(bm.block_table(0) + bm.block_table(1)))
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 6 and not bm.ref_counts.any()


def test_block_manager_rejects_misuse():
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="needs 3 free blocks"):
        bm.allocate(0, list(range(9)), 9)
    bm.allocate(0, [1], 1)
    with pytest.raises(ValueError, match="already has a block table"):
        bm.allocate(0, [1], 1)
    with pytest.raises(ValueError, match="unknown sequence 7"):
        bm.free(7)
    with pytest.raises(ValueError, match="exceed"):
        bm.slot_mapping(0, 0, 5)


def _prompt(n, offset=0):
    return [(offset + 7 * i) % 97 for i in range(n)]


def test_prefix_cache_reuses_committed_full_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = _prompt(10)
    bm.allocate(0, a, 10)
    assert bm.cached_prefix(a) == []  # nothing is cached before K/V is written
    bm.commit(0, a, 6)  # only block 0 is full and computed
    assert bm.num_cached_blocks == 1
    bm.commit(0, a, 10)
    assert bm.num_cached_blocks == 2

    b = a[:8] + [1, 2, 3]  # shares two full blocks with a
    assert bm.blocks_to_allocate(b, 11) == 1  # two live hits, one new block
    assert bm.allocate(1, b, 11) == 8
    ta, tb = bm.block_table(0), bm.block_table(1)
    assert tb[:2] == ta[:2] and tb[2] not in ta
    assert [bm.ref_counts[x] for x in ta] == [2, 2, 1]

    # The block holding the last token is never shared: an exact 8-token prefix matches 1 block.
    assert bm.cached_prefix(a[:8]) == [ta[0]]
    # The hash is a chain: identical block content after a different first block does not match.
    assert bm.cached_prefix([5, 5, 5, 5] + a[4:8] + [0]) == []

    bm.free(0)
    assert [bm.ref_counts[x] for x in ta] == [1, 1, 0]
    bm.free(1)
    assert bm.num_free_blocks == 10
    # Freed blocks stay cached (evictable): a later prompt still hits, taking them off the free list.
    assert bm.blocks_to_allocate(a, 10) == 3
    assert bm.allocate(2, a, 10) == 8 and bm.block_table(2)[:2] == ta[:2]
    bm.free(2)

    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.cached_prefix(a) == []


def test_prefix_cache_eviction_and_reset_guard():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = [1, 2, 3, 4, 5]
    bm.allocate(0, a, 5)
    bm.commit(0, a, 5)
    with pytest.raises(ValueError, match="in use"):
        bm.reset_prefix_cache()
    bm.free(0)
    assert bm.num_cached_blocks == 2
    bm.allocate(1, [9, 9, 9, 9, 9], 5)  # takes all three blocks: cached ones are evicted
    assert bm.num_cached_blocks == 0 and bm.cached_prefix(a) == []
    bm.free(1)


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, prefix_caching=False)
    bm.allocate(0, [1, 2, 3, 4, 5], 5)
    bm.commit(0, [1, 2, 3, 4, 5], 5)
    assert bm.cached_prefix([1, 2, 3, 4, 5]) == [] and bm.num_cached_blocks == 0


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(num_blocks=6, block_size=4)
    bm.allocate(0, list(range(10)), 10)
    parent = bm.block_table(0)
    copies = bm.fork(0, 1, 10)
    child = bm.block_table(1)
    assert child[:2] == parent[:2] and copies == [(parent[2], child[2])] and child[2] not in parent
    assert [bm.ref_counts[x] for x in parent] == [2, 2, 1] and bm.ref_counts[child[2]] == 1
    assert bm.fork(0, 2, 8) == []  # block-aligned: nothing to copy
    bm.free(0)
    bm.free(1)
    bm.free(2)
    assert bm.num_free_blocks == 6 and not bm.ref_counts.any()


def test_write_kv_matches_numpy_scatter_and_drops_padding():
    N, P, G, K = 3, 4, 2, 5
    rng = np.random.default_rng(0)
    pool = init_kv_pool(2, N, P, G, K)
    assert pool.k.shape == (2, N, P, G, K)
    k_TGK = rng.normal(size=(6, G, K)).astype(np.float32)
    v_TGK = rng.normal(size=(6, G, K)).astype(np.float32)
    slots_T = np.array([5, 6, 0, -1, 11, -1], np.int32)
    k, v = jax.jit(write_kv)(pool.k[1], pool.v[1], k_TGK, v_TGK, slots_T)

    want_k = np.zeros((N * P, G, K), np.float32)
    want_v = np.zeros((N * P, G, K), np.float32)
    for t, slot in enumerate(slots_T):
        if slot >= 0:
            want_k[slot], want_v[slot] = k_TGK[t], v_TGK[t]
    np.testing.assert_array_equal(np.asarray(k).reshape(N * P, G, K), want_k)
    np.testing.assert_array_equal(np.asarray(v).reshape(N * P, G, K), want_v)


def test_copy_blocks_copies_every_layer():
    rng = np.random.default_rng(1)
    k = rng.normal(size=(2, 4, 3, 1, 2)).astype(np.float32)
    v = rng.normal(size=(2, 4, 3, 1, 2)).astype(np.float32)
    out = copy_blocks(KVPool(jnp.asarray(k), jnp.asarray(v)), jnp.array([0, 2]), jnp.array([3, 1]))
    want_k, want_v = k.copy(), v.copy()
    want_k[:, [3, 1]], want_v[:, [3, 1]] = k[:, [0, 2]], v[:, [0, 2]]
    np.testing.assert_array_equal(out.k, want_k)
    np.testing.assert_array_equal(out.v, want_v)
