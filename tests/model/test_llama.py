"""Llama forward paths agree with each other: KV-cache decode, packed rows, scanned layers, remat."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model import llama, presets, rope

CFG = presets.get("tiny", vocab_size=101)


@pytest.fixture(scope="module")
def params():
    return llama.init_params(CFG, jax.random.key(0))


def rand_tokens(B, T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T)))


@pytest.mark.parametrize("rope_spec", [CFG.rope, rope.entropy_aware_abf(CFG.rope, pretrained_window=4,
                                                                         unscaled_layers=(0,)),
                                       rope.yarn(CFG.rope, 4.0, 8)], ids=["default", "eabf", "yarn"])
def test_cached_decoding_equals_full_forward(rope_spec):
    cfg = dataclasses.replace(CFG, rope=rope_spec)
    params = llama.init_params(cfg, jax.random.key(1))
    toks = rand_tokens(3, 20, seed=1)
    full = llama.forward(cfg, params, toks)
    model = llama.Llama(cfg)
    cache = llama.init_cache(cfg, 3, 32)
    logits, cache = model.apply({"params": params}, toks[:, :12], cache=cache)  # prefill
    np.testing.assert_allclose(logits, full[:, :12], atol=2e-5)
    step = jax.jit(lambda c, t: model.apply({"params": params}, t, cache=c))
    for t in range(12, 20):  # one-step decode at absolute positions 12..19
        logits, cache = step(cache, toks[:, t:t + 1])
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=2e-5)
    assert np.all(np.asarray(cache.lengths_B) == 20)


def test_packed_segments_equal_separate_forwards(params):
    a, b, c = rand_tokens(1, 7, 2), rand_tokens(1, 5, 3), rand_tokens(1, 4, 4)
    packed = jnp.concatenate([a, b, c], axis=1)
    segments = jnp.asarray([[1] * 7 + [2] * 5 + [3] * 4])
    positions = jnp.asarray([list(range(7)) + list(range(5)) + list(range(4))])
    out = llama.forward(CFG, params, packed, positions, segments)
    for piece, start in ((a, 0), (b, 7), (c, 12)):
        alone = llama.forward(CFG, params, piece)
        np.testing.assert_allclose(out[:, start:start + piece.shape[1]], alone, atol=2e-5)


def test_scan_and_remat_match_unrolled(params):
    toks = rand_tokens(2, 9, 5)
    ref = llama.forward(CFG, params, toks)
    stacked = {k: v for k, v in params.items() if not k.startswith("layers_")}
    stacked["layers"] = jax.tree.map(lambda *x: jnp.stack(x), *[params[f"layers_{i}"] for i in range(CFG.n_layers)])
    for remat in ("none", "full", "dots"):
        cfg = dataclasses.replace(CFG, scan_layers=True, remat=remat)
        np.testing.assert_allclose(llama.forward(cfg, stacked, toks), ref, atol=2e-5)
        loss = lambda p, cfg=cfg: jnp.mean(llama.forward(cfg, p, toks) ** 2)
        g = jax.grad(loss)(stacked)
        g_ref = jax.grad(lambda p: jnp.mean(llama.forward(CFG, p, toks) ** 2))(params)
        np.testing.assert_allclose(g["layers"]["attn"]["q"][1], g_ref["layers_1"]["attn"]["q"], atol=1e-6)


def test_logit_indices_select_rows(params):
    toks = rand_tokens(2, 10, 6)
    full = llama.forward(CFG, params, toks)
    idx = jnp.asarray([[9, 3], [0, 7]])
    picked = llama.Llama(CFG).apply({"params": params}, toks, logit_indices_BS=idx)
    np.testing.assert_allclose(picked, jnp.take_along_axis(full, idx[:, :, None], axis=1), atol=1e-6)


def test_param_count_matches_tree(params):
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == CFG.num_params()
    tied = dataclasses.replace(CFG, tie_embeddings=True)
    assert sum(x.size for x in jax.tree.leaves(llama.init_params(tied, jax.random.key(0)))) == tied.num_params()


def test_bad_configs_raise_named_errors():
    with pytest.raises(ValueError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        presets.get("tiny", n_heads=6, n_kv_heads=4, head_dim=16)
    with pytest.raises(ValueError, match="unknown model preset 'llama9_1t'"):
        presets.get("llama9_1t")
    with pytest.raises(ValueError, match="unknown LlamaConfig fields \\['d_modle'\\]"):
        presets.get("tiny", d_modle=3)
    with pytest.raises(ValueError, match="unknown remat policy 'some'"):
        presets.get("tiny", remat="some")
    with pytest.raises(ValueError, match="sequence length 600 exceeds the model's max_len 512"):
        llama.forward(CFG, llama.init_params(CFG, jax.random.key(0)), jnp.zeros((1, 600), jnp.int32))


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_presets_have_expected_sizes(name):
    expected = {"llama2_7b": 6.74e9, "llama2_13b": 13.0e9, "llama2_70b": 68.98e9, "llama3_8b": 8.03e9,
                "mistral_7b": 7.24e9}
    cfg = presets.get(name)
    if name in expected:
        assert cfg.num_params() == pytest.approx(expected[name], rel=0.01)
