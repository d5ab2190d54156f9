"""Attention kernels (`jaxllm.model.kernels`) agree with float64 NumPy attention and with the XLA
path's gradients: the Pallas TPU kernels run in interpret mode on CPU, with packed segments,
grouped-query heads, the causal mask and lengths that are not block multiples."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model import kernels, llama, presets
from jaxllm.parallel import make_mesh, rules

B, T, H, G, K = 1, 200, 4, 2, 16  # 200 tokens: two 128-blocks after padding
SEGMENTS = np.asarray([[0] * 70 + [1] * 100 + [2] * 30], np.int32)


def _inputs(batch=B, length=T, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((batch, length, n, K)).astype(np.float32) for n in (H, G, G))
    return q, k, v, rng.standard_normal((batch, length, H, K)).astype(np.float32)


def numpy_attention(q_BTHK, k_BTGK, v_BTGK, seg_BT):
    """Float64 causal, segment-masked grouped-query attention (queries pre-scaled)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q_BTHK, k_BTGK, v_BTGK))
    R = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, R, axis=2), np.repeat(v, R, axis=2)
    logits = np.einsum("bthk,bshk->bhts", q, k)
    n = q.shape[1]
    visible = np.tril(np.ones((n, n), bool))[None] & (seg_BT[:, :, None] == seg_BT[:, None, :])
    logits = np.where(visible[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshk->bthk", p, v)


@pytest.mark.parametrize("name", ["splash", "flash"])
def test_pallas_kernel_matches_reference_forward_and_gradients(name):
    q, k, v, w = _inputs()
    seg = jnp.asarray(SEGMENTS)

    def loss(impl, q, k, v):
        out = kernels.causal_attention(impl, q, k, v, seg, block_q=128, block_kv=128)
        return jnp.sum(out * w), out

    with kernels.interpret_mode():
        (_, out), grads = jax.jit(jax.value_and_grad(lambda *a: loss(name, *a), (0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, SEGMENTS), atol=2e-5)
    (_, out_xla), grads_xla = jax.value_and_grad(lambda *a: loss("xla", *a), (0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(out_xla, numpy_attention(q, k, v, SEGMENTS), atol=2e-5)
    for got, want in zip(grads, grads_xla):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_splash_under_a_mesh_shards_batch_and_heads():
    """Inside the train step's mesh context the kernel runs per (batch, head) shard."""
    q, k, v, _ = _inputs(batch=2, length=100, seed=1)
    seg = np.asarray([[0] * 40 + [1] * 60, [5] * 100], np.int32)
    mesh = make_mesh("data:2,tensor:2", jax.devices()[:4])
    mesh_rules = rules.mesh_rules(rules.DEFAULT_RULES, mesh)

    @jax.jit
    def run(q, k, v, seg):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(mesh_rules):
            return kernels.causal_attention("splash", q, k, v, seg, block_q=128, block_kv=128)

    with kernels.interpret_mode(), jax.set_mesh(mesh):
        out = run(q, k, v, seg)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, seg), atol=2e-5)


def test_llama_with_splash_matches_xla_on_packed_rows():
    cfg = presets.get("tiny", vocab_size=101, n_layers=1, attention_block_q=128, attention_block_kv=128)
    params = llama.init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 101, (1, 90)))
    seg = jnp.asarray([[1] * 50 + [2] * 40])
    pos = jnp.asarray([list(range(50)) + list(range(40))])
    want = llama.forward(cfg, params, tokens, pos, seg)
    with kernels.interpret_mode():
        got = jax.jit(lambda *a: llama.forward(dataclasses.replace(cfg, attention="splash"), *a))(params, tokens, pos, seg)
    np.testing.assert_allclose(got, want, atol=5e-5)


def test_kernel_on_a_backend_without_it_names_backend_and_choices():
    q, k, v, _ = _inputs(length=8)
    for name, need in (("splash", "TPU"), ("flash", "TPU"), ("cudnn", "GPU")):
        with pytest.raises(ValueError, match=rf"'{name}' needs a {need} backend.*runs on 'cpu'.*\['xla'\]"):
            kernels.causal_attention(name, q, k, v, jnp.zeros((1, 8), jnp.int32))
    cfg = presets.get("tiny", n_layers=1, attention="splash")  # a config is valid anywhere; running it is not
    params = jax.eval_shape(lambda: llama.init_params(dataclasses.replace(cfg, attention="xla"), jax.random.key(0)))
    with pytest.raises(ValueError, match="'splash' needs a TPU backend"):
        jax.eval_shape(lambda p: llama.forward(cfg, p, jnp.zeros((1, 8), jnp.int32)), params)


def test_bad_attention_config_is_named():
    with pytest.raises(ValueError, match=r"unknown attention 'pallas'.*choices"):
        presets.get("tiny", attention="pallas")
    with pytest.raises(ValueError, match="attention_block_q=100 must be a positive multiple of 128"):
        presets.get("tiny", attention="splash", attention_block_q=100)
    with pytest.raises(ValueError, match="attention_block_q=384 and attention_block_kv=256 do not divide"):
        presets.get("tiny", attention="splash", attention_block_q=384, attention_block_kv=256)
