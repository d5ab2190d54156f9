"""`paged_attention` against dense grouped-query attention in float64 NumPy.

A ragged pass of rows with different cached histories (read through block tables from a pool whose
other slots hold garbage), different numbers of new tokens, a member offset (table indices before
it never attended) and padding tokens; both the per-token (decode) and the tiled (prefill) paths.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.serve.cache import RaggedBatch
from jaxllm.serve.paged_attention import paged_attention

H, G, K, P, N = 4, 2, 8, 4, 24  # query heads, kv heads, head width, tokens per block, pool blocks


def _dense_gqa(q_HK, k_CGK, v_CGK):
    """float64 softmax(q·k) v with H query heads over G shared kv heads (no scaling: the model
    scales q before the cache sees it)."""
    R = H // G
    out = np.zeros((H, K))
    for h in range(H):
        logits_C = k_CGK[:, h // R] @ q_HK[h]
        p_C = np.exp(logits_C - logits_C.max())
        out[h] = (p_C / p_C.sum()) @ v_CGK[:, h // R]
    return out


def _case(history, new, offsets, pad, seed):
    rng = np.random.default_rng(seed)
    S, T = len(history), sum(new) + pad
    W = max((o + h + n + P - 1) // P for h, n, o in zip(history, new, offsets))
    k_NPGK, v_NPGK = rng.normal(size=(2, N, P, G, K))  # garbage wherever no history lives
    free = list(rng.permutation(N))
    tables_SW = np.full((S, W), -1, np.int32)
    hist_keys, hist_values = [], []
    for s, (h, o) in enumerate(zip(history, offsets)):
        used = (o + h + new[s] + P - 1) // P
        tables_SW[s, :used] = [free.pop() for _ in range(used)]
        ks, vs = rng.normal(size=(2, h, G, K))
        for pos in range(h):
            index = o + pos
            block, slot = tables_SW[s, index // P], index % P
            k_NPGK[block, slot], v_NPGK[block, slot] = ks[pos], vs[pos]
        hist_keys.append(ks)
        hist_values.append(vs)
    slot_T = np.concatenate([np.full(n, s) for s, n in enumerate(new)] + [np.full(pad, -1)]).astype(np.int32)
    positions_T = np.concatenate([h + np.arange(n) for h, n in zip(history, new)] + [np.zeros(pad)]).astype(np.int32)
    last_index_S = (np.cumsum(new) - 1).astype(np.int32)
    q_THK, k_TGK, v_TGK = rng.normal(size=(T, H, K)), rng.normal(size=(T, G, K)), rng.normal(size=(T, G, K))
    batch = RaggedBatch(tokens_T=jnp.zeros(T, jnp.int32), positions_T=jnp.asarray(positions_T),
                        slot_T=jnp.asarray(slot_T), slot_mapping_T=jnp.full(T, -1, jnp.int32),
                        block_tables_SW=jnp.asarray(tables_SW),
                        context_len_S=jnp.asarray(np.add(history, new), jnp.int32),
                        last_index_S=jnp.asarray(last_index_S), sample_S=jnp.ones(S, bool))
    got = jax.jit(paged_attention)(*(jnp.asarray(x, jnp.float32) for x in (q_THK, k_TGK, v_TGK, k_NPGK, v_NPGK)), batch,
                          jnp.asarray(offsets, jnp.int32))

    want = np.zeros((T, H, K))
    for t in range(T):
        s = slot_T[t]
        if s < 0:
            continue  # padding attends to nothing and returns zeros
        same = (slot_T == s) & (positions_T <= positions_T[t])
        keys = np.concatenate([hist_keys[s], k_TGK[same]])
        values = np.concatenate([hist_values[s], v_TGK[same]])
        want[t] = _dense_gqa(q_THK[t], keys, values)
    return np.asarray(got, np.float64), want


@pytest.mark.parametrize("history,new,offsets,pad", [
    ((5, 0, 9), (7, 3, 4), (0, 2, 1), 2),    # prefill chunks: more tokens than rows (tiled history reads)
    ((5, 1, 13, 6), (1, 1, 1, 1), (0, 3, 0, 1), 0),  # decodes: one token per row
    ((0, 2), (9, 6), (0, 0), 1),             # first chunk of a prompt next to a continuing one
])
def test_paged_attention_matches_dense_grouped_attention(history, new, offsets, pad):
    got, want = _case(history, new, offsets, pad, seed=sum(history) + len(new))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 0.1


def test_engine_pass_gathers_each_layers_history_after_that_layer():
    """A tile's gathered keys end with its own tokens' keys, so each layer's gather depends on that
    layer and XLA reuses one buffer across layers. Before, it gathered every layer's history up
    front (2 × layers buffers; on CPU ~100 MB of fresh pages per pass of the benchmark's 28M model)."""
    from jaxllm.model import llama, presets
    from jaxllm.serve import Engine
    from jaxllm.serve.sampling import sampling_rows

    cfg = presets.get("tiny", vocab_size=256, d_model=64, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=128)
    engine = Engine(cfg, llama.init_params(cfg, jax.random.key(0)), num_blocks=512, block_size=16, max_seqs=64,
                    token_budget=64)
    T = S = 64
    W = 16
    zeros = lambda *shape, dtype=np.int32: np.zeros(shape, dtype)  # noqa: E731
    batch = RaggedBatch(zeros(T), zeros(T), zeros(T), zeros(T), zeros(S, W), zeros(S), zeros(S), zeros(S, dtype=bool))
    rows = sampling_rows([], [], [], [], S)
    compiled = engine._step_fn.lower(engine.params, engine._pools, (batch,), (zeros(S),), rows, None).compile()
    one_gather = S * (W * 16 + 1) * cfg.n_kv_heads * cfg.head_dim * 4  # one layer's K (or V) history, float32
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 4 * one_gather, (temp, one_gather)  # all layers up front: >= 16 gathers
