"""Value head: off ⇒ the plain model; on ⇒ a linear map of the final normed hidden state; the
separate-critic option keeps value gradients off the policy trunk."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model import llama, model_dir, presets, value_head
from jaxllm.objectives import ppo

CFG = presets.get("tiny", vocab_size=61, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                  max_len=64)
VCFG = dataclasses.replace(CFG, value_head=True)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 9)))


def test_value_head_off_is_the_plain_model_and_on_adds_only_the_head():
    plain = llama.init_params(CFG, jax.random.key(0))
    with_head = llama.init_params(VCFG, jax.random.key(0))
    assert set(with_head) - set(plain) == set(value_head.VALUE_KEYS)
    trunk = {k: v for k, v in with_head.items() if k not in value_head.VALUE_KEYS}
    jax.tree.map(np.testing.assert_array_equal, trunk, plain)
    logits, values = llama.forward(VCFG, with_head, TOKENS)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(llama.forward(CFG, plain, TOKENS)))
    assert values.shape == TOKENS.shape and values.dtype == jnp.float32


def test_values_are_a_linear_map_of_the_final_hidden_state():
    # With the head set to one LM-head column (+ bias), values equal that column's logits + bias.
    params = llama.init_params(VCFG, jax.random.key(1))
    params = {**params, "value_head": params["lm_head"][:, 7], "value_bias": jnp.asarray(0.25)}
    logits, values = llama.forward(VCFG, params, TOKENS)
    np.testing.assert_allclose(np.asarray(values), np.asarray(logits[..., 7]) + 0.25, atol=1e-5)


def test_engine_path_with_a_cache_still_returns_logits_only():
    params = llama.init_params(VCFG, jax.random.key(2))
    cache = llama.init_cache(VCFG, 2, 16)
    logits, _ = llama.Llama(VCFG).apply({"params": params}, TOKENS, cache=cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(llama.forward(VCFG, params, TOKENS)[0]), atol=2e-5)


def test_value_head_requested_on_a_checkpoint_without_one_says_how_to_add_it(tmp_path):
    plain = llama.init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match=r"value_head=True but the params have no value head.*add_value_head"):
        llama.forward(VCFG, plain, TOKENS)
    with pytest.raises(ValueError, match="no value head"):
        value_head.ActorCritic(CFG).apply(plain, TOKENS)
    with pytest.raises(ValueError, match="no value head"):
        value_head.ActorCritic(CFG, shared_trunk=False).apply({"policy": plain, "critic": plain}, TOKENS)
    # A model directory saved without a head, whose config is edited to ask for one.
    model_dir.save_model(tmp_path / "plain", CFG, plain)
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    config["jaxllm"]["config"]["value_head"] = True
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"asks for a value head .* have none .*add_value_head"):
        model_dir.load_model(tmp_path / "plain")
    fixed = value_head.add_value_head(CFG, plain, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(llama.forward(VCFG, fixed, TOKENS)[0]),
                                  np.asarray(llama.forward(CFG, plain, TOKENS)))


@pytest.mark.parametrize("shared", [True, False])
def test_actor_critic_value_model_round_trips_through_a_model_directory(tmp_path, shared):
    ac = value_head.ActorCritic(CFG, shared_trunk=shared)
    params = ac.init(llama.init_params(CFG, jax.random.key(0)), jax.random.key(1))
    # A trained head: nonzero bias, weights unlike a fresh init.
    head = params if shared else params["critic"]
    head.update(value_head=head["value_head"] * 3.0, value_bias=jnp.asarray(0.7, head["value_bias"].dtype))
    cfg, model = ac.value_model(params)
    model_dir.save_model(tmp_path / "value", cfg, model)
    assert json.loads((tmp_path / "value" / "config.json").read_text())["jaxllm"]["config"]["value_head"] is True
    loaded_cfg, loaded = model_dir.load_model(tmp_path / "value")
    assert loaded_cfg == cfg and loaded_cfg.value_head
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(model))
    policy_logits, values = ac.apply(params, TOKENS)
    logits, loaded_values = llama.forward(loaded_cfg, loaded, TOKENS)
    np.testing.assert_array_equal(np.asarray(loaded_values), np.asarray(values))
    if shared:  # the saved model is the policy too
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(policy_logits))


@pytest.mark.parametrize("shared", [True, False])
def test_value_loss_reaches_the_policy_trunk_only_with_a_shared_trunk(shared):
    ac = value_head.ActorCritic(CFG, shared_trunk=shared)
    params = ac.init(llama.init_params(CFG, jax.random.key(0)), jax.random.key(1))
    mask = jnp.ones(TOKENS.shape)

    def loss(p):
        _, values = ac.apply(p, TOKENS)
        return ppo.value_loss(values, jnp.zeros_like(values), jnp.ones_like(values), mask)[0]

    grads = jax.grad(loss)(params)
    trunk = grads if shared else grads["policy"]
    trunk_norm = sum(float(jnp.sum(jnp.abs(g))) for k, g in jax.tree_util.tree_leaves_with_path(trunk)
                     if "value" not in jax.tree_util.keystr(k))
    assert (trunk_norm > 0) == shared
    if not shared:
        critic_trunk = grads["critic"]["layers_0"]
        assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(critic_trunk)) > 0
        # The policy's logits are the plain model's.
        np.testing.assert_array_equal(np.asarray(ac.apply(params, TOKENS)[0]),
                                      np.asarray(llama.forward(CFG, params["policy"], TOKENS)))
