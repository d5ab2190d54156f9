"""Sharded Llama forward and training on 8 fake CPU devices equal the single-device results."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.model import llama, presets
from jaxllm.objectives import lm
from jaxllm.parallel import make_mesh, rules
from jaxllm.train import state as state_lib
from jaxllm.train import step as step_lib

CFG = presets.get("tiny", vocab_size=128, n_heads=4, n_kv_heads=2, d_model=64, d_ff=128)
MESHES = ["fsdp:8", "fsdp:4,tensor:2", "data:2,fsdp:2,tensor:2"]


def sharded_params(cfg, mesh):
    model = llama.Llama(cfg)
    params, shardings = rules.init_sharded(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32)), mesh,
                                           rules.DEFAULT_RULES, jax.random.key(0))
    return params["params"], shardings["params"]


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_forward_equals_single_device(spec):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = make_mesh(spec)
    params, shardings = sharded_params(CFG, mesh)
    assert rules.check_sharded(params) <= 0.01
    toks = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 16)))
    single = llama.forward(CFG, jax.device_get(params), toks)
    with jax.set_mesh(mesh), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        fwd = jax.jit(lambda p, t: llama.forward(CFG, p, t),
                      in_shardings=(shardings, rules.batch_sharding(mesh)))
        out = fwd(params, toks)
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=2e-5)


def test_sharded_training_matches_single_device():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = make_mesh("data:2,fsdp:2,tensor:2")

    def loss_fn(params, batch, rng):
        logits = llama.forward(CFG, params, batch["tokens"])
        return {"nll": lm.nll_loss(logits, batch["tokens"], batch["loss_mask"])}, {}

    toks = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (8, 16)))
    batch = {"tokens": toks, "loss_mask": jnp.ones_like(toks, jnp.float32)}
    opt = optax.adamw(3e-3)
    params, _ = sharded_params(CFG, mesh)
    host = jax.device_get(params)
    curves = []
    for m, p in ((None, jax.tree.map(jnp.asarray, host)), (mesh, params)):
        st = state_lib.init_state(p, opt, jax.random.key(0))
        if m is not None:  # AdamW moments are created sharded like their params
            assert rules.check_sharded(st.opt_state[0].mu) <= 0.01
            assert rules.check_sharded(st.opt_state[0].nu) <= 0.01
        step = step_lib.make_train_step(loss_fn, opt, m, grad_accum=2)
        losses = []
        for _ in range(4):
            st, metrics = step(st, batch)
            losses.append(float(metrics["loss"]))
        curves.append(losses)
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-5)


def test_indivisible_dimension_is_named():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    cfg = presets.get("tiny", vocab_size=100)  # 100 rows over tensor:8
    with pytest.raises(ValueError, match="100"):
        sharded_params(cfg, make_mesh("tensor:8"))
