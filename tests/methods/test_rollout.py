"""Rollouts: the engine's per-token log-probs equal the training forward's on packed rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.methods import rollout
from jaxllm.model import llama, presets, value_head
from jaxllm.objectives import ppo
from jaxllm.serve.engine import Engine

CFG = presets.get("tiny", vocab_size=37, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                  max_len=64)
P, T = 12, 10


@pytest.mark.parametrize("temperature,shared", [(1.0, True), (0.7, False)])
def test_engine_logprobs_equal_training_forward_logprobs(temperature, shared):
    ac = value_head.ActorCritic(CFG, shared_trunk=shared)
    params = ac.init(llama.init_params(CFG, jax.random.key(0)), jax.random.key(1))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, CFG.vocab_size, size=n).tolist() for n in (3, 12, 7, 1, 9)]
    engine = Engine(ac.policy_cfg, ac.policy_params(params), token_budget=32, block_size=8, num_blocks=64,
                    max_seqs=8, max_model_len=P + T)
    stop = 2
    completions = rollout.sample(engine, ac.policy_params(params), prompts, max_tokens=T, stop_token=stop,
                                 temperature=temperature, seed=3)
    rows = rollout.pack(prompts, [c.tokens for c in completions], prompt_len=P, response_len=T, pad_id=0)
    logits, values = ac.apply(params, rows["tokens"], rows["positions"], rows["segment_ids"])
    logp, values_BT, entropy = rollout.response_view(logits, values, jnp.asarray(rows["tokens"]), P,
                                                     temperature=temperature)
    mask = rows["mask"]
    lengths = [len(c.tokens) for c in completions]
    np.testing.assert_array_equal(mask.sum(-1), lengths)
    assert len(set(lengths)) > 1  # some stopped early, some did not
    expected = rollout.engine_logprobs(completions, T)
    assert np.max(np.abs((np.asarray(logp) - expected) * mask)) < 1e-4
    # Values are those of the states that emitted each token: the unpacked prompt+prefix forward.
    b = 2
    seq = jnp.asarray([prompts[b] + completions[b].tokens])
    _, v_ref = ac.apply(params, seq)
    n = len(prompts[b])
    np.testing.assert_allclose(np.asarray(values_BT[b, :lengths[b]]), np.asarray(v_ref[0, n - 1:n - 1 + lengths[b]]),
                               atol=1e-5)
    assert np.all(np.asarray(entropy) > 0)


def test_pad_equal_to_eos_keeps_the_eos_action_in_the_mask():
    eos = pad = 0
    prompts = [[5, 6], [7]]
    responses = [[9, 4, eos], [3, 3, 3, 3]]  # the second one is truncated at T = 4
    rows = rollout.pack(prompts, responses, prompt_len=3, response_len=4, pad_id=pad)
    np.testing.assert_array_equal(rows["mask"], [[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(rows["tokens"], [[pad, 5, 6, 9, 4, eos, pad], [pad, pad, 7, 3, 3, 3, 3]])
    np.testing.assert_array_equal(rows["positions"][0], [0, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(rows["segment_ids"][1], [0, 0, 1, 1, 1, 1, 1])
    rewards = ppo.kl_penalized_rewards(jnp.array([1.0, 0.1]), jnp.zeros((2, 4)), jnp.zeros((2, 4)),
                                       rows["mask"], kl_coef=0.05)
    np.testing.assert_allclose(np.asarray(rewards), [[0, 0, 1.0, 0], [0, 0, 0, 0.1]], atol=1e-7)


def test_pack_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="row 1: prompt of 4 tokens"):
        rollout.pack([[1], [1, 2, 3, 4]], [[1], [1]], prompt_len=3, response_len=2, pad_id=0)
    with pytest.raises(ValueError, match="row 0: response of 0 tokens"):
        rollout.pack([[1]], [[]], prompt_len=3, response_len=2, pad_id=0)
