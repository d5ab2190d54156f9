"""PPO objective vs hand examples (ReFT spec) and float64 NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.objectives import ppo


def _gae_reference(rewards, values, mask, gamma, lam):
    """Float64 loop straight from the GAE definition, one row at a time over its valid span."""
    B, T = rewards.shape
    adv, ret = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        n = int(mask[b].sum())
        v = np.append(values[b, :n], 0.0)
        delta = rewards[b, :n] + gamma * v[1:] - v[:-1]
        for t in range(n):
            adv[b, t] = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t))
            ret[b, t] = adv[b, t] + v[t]
    return adv, ret


def _prefix_mask(lengths, T):
    return (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.float32)


def test_gae_hand_example():
    adv, ret = ppo.gae(jnp.array([[0.0, 0, 0, 1]]), jnp.array([[0.5, 0.6, 0.7, 0.8]]), jnp.ones((1, 4)),
                       gamma=1.0, lam=0.95)
    np.testing.assert_allclose(adv[0], [0.456725, 0.3755, 0.29, 0.2], atol=1e-6)
    np.testing.assert_allclose(ret[0], [0.956725, 0.9755, 0.99, 1.0], atol=1e-6)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.5, 0.0), (1.0, 0.5)])
def test_gae_matches_float64_loop_on_masked_batches(gamma, lam):
    rng = np.random.default_rng(0)
    B, T = 6, 9
    lengths = np.array([1, 9, 4, 7, 2, 5])
    mask = _prefix_mask(lengths, T)
    rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    # Garbage beyond the valid span must not leak into the result.
    adv, ret = ppo.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), jnp.asarray(mask),
                       gamma=gamma, lam=lam)
    ref_adv, ref_ret = _gae_reference(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)


def test_reward_placement_terminal_eos_truncated_and_kl_zero_when_policy_is_reference():
    lengths = np.array([2, 5, 1])  # row 1 is truncated: its last token is the last index
    mask = _prefix_mask(lengths, 5)
    logp = np.log(np.random.default_rng(1).uniform(0.1, 1.0, size=(3, 5))).astype(np.float32)
    rewards = np.asarray(ppo.kl_penalized_rewards(jnp.array([1.0, 0.1, 0.0]), logp, logp, mask, kl_coef=0.05))
    expected = np.zeros((3, 5), np.float32)
    expected[0, 1], expected[1, 4], expected[2, 0] = 1.0, 0.1, 0.0
    np.testing.assert_array_equal(rewards, expected)


def test_kl_penalty_on_every_valid_token_only():
    rng = np.random.default_rng(2)
    mask = _prefix_mask([3, 1], 4)
    logp, ref = rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(2, 4)).astype(np.float32)
    rewards = np.asarray(ppo.kl_penalized_rewards(jnp.array([2.0, -1.0]), logp, ref, mask, kl_coef=0.1))
    expected = -0.1 * (logp.astype(np.float64) - ref) * mask
    expected[0, 2] += 2.0
    expected[1, 0] += -1.0
    np.testing.assert_allclose(rewards, expected, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_ratio_one_gives_minus_mean_whitened_advantage(reduction):
    # Lengths 1 and 3: the two reductions differ (whitened token mean is 0, the per-row mean is not).
    mask = _prefix_mask([1, 3], 3)
    adv = np.asarray(ppo.masked_whiten(jnp.array([[2.0, 9, 9], [0.5, -1.0, 3.0]]), mask), np.float64)
    logp = np.log(np.full((2, 3), 0.3, np.float32))
    loss, aux = ppo.policy_loss(logp, logp, adv.astype(np.float32), mask, reduction=reduction)
    if reduction == "sequence_mean":
        expected = -(adv[0, 0] + adv[1].sum() / 3) / 2
        assert abs(expected) > 0.1
    else:
        expected = -adv.sum() / 4
    np.testing.assert_allclose(float(loss), expected, atol=1e-6)
    assert float(aux["clip_frac"]) == 0.0 and float(aux["ratio_mean"]) == 1.0 and float(aux["approx_kl"]) == 0.0


@pytest.mark.parametrize("ratio,adv,zero", [(1.5, 1.0, True), (0.5, -1.0, True), (1.5, -1.0, False),
                                            (0.5, 1.0, False), (1.1, 1.0, False)])
def test_policy_clip_zeroes_gradient_exactly_when_active(ratio, adv, zero):
    old = jnp.full((1, 1), -1.0)
    logp = old + jnp.log(ratio)
    grad = jax.grad(lambda lp: ppo.policy_loss(lp, old, jnp.full((1, 1), adv), jnp.ones((1, 1)))[0])(logp)
    if zero:
        assert float(grad[0, 0]) == 0.0
    else:  # d(−Â·ρ)/d logp = −Â·ρ
        np.testing.assert_allclose(float(grad[0, 0]), -adv * ratio, rtol=1e-6)
    _, aux = ppo.policy_loss(logp, old, jnp.full((1, 1), adv), jnp.ones((1, 1)))
    assert float(aux["clip_frac"]) == float(zero)


def test_value_loss_clip_by_hand():
    old = jnp.array([[1.0, 1.0, 1.0]])
    values = jnp.array([[1.5, 1.5, 1.1]])
    returns = jnp.array([[2.0, 0.0, 3.0]])
    # token 0: unclipped (0.5)^2=.25, clipped (1.2-2)^2=.64 -> .64 (clip active, zero grad)
    # token 1: unclipped 2.25, clipped 1.44 -> 2.25; token 2: inside the clip range -> 3.61
    loss, aux = ppo.value_loss(values, old, returns, jnp.ones((1, 3)))
    np.testing.assert_allclose(float(loss), 0.5 * (0.64 + 2.25 + 3.61) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(aux["value_clip_frac"]), 1 / 3, rtol=1e-6)
    grad = jax.grad(lambda v: ppo.value_loss(v, old, returns, jnp.ones((1, 3)))[0])(values)
    np.testing.assert_allclose(np.asarray(grad[0]), [0.0, 1.5 / 3, -1.9 / 3], atol=1e-6)


def test_masked_whiten_statistics_and_masked_entries_ignored():
    rng = np.random.default_rng(3)
    x = rng.normal(3.0, 5.0, size=(4, 7))
    mask = _prefix_mask([7, 2, 5, 1], 7)
    out = np.asarray(ppo.masked_whiten(jnp.asarray(x, jnp.float32), mask))
    vals = x[mask > 0]
    expected = (x - vals.mean()) / np.sqrt(vals.var() + 1e-8) * mask
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(out[mask > 0].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(out[mask > 0].var(), 1.0, atol=1e-5)
    x2 = np.where(mask > 0, x, 1e6)  # masked entries do not move the statistics
    np.testing.assert_allclose(np.asarray(ppo.masked_whiten(jnp.asarray(x2, jnp.float32), mask)), out, atol=1e-6)
    unshifted = np.asarray(ppo.masked_whiten(jnp.asarray(x, jnp.float32), mask, shift_mean=False))
    np.testing.assert_allclose(unshifted, (expected + vals.mean()) * mask, atol=1e-4)


def test_masked_whiten_uses_global_batch_statistics_on_a_sharded_batch():
    devices = jax.devices()
    assert len(devices) == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    rng = np.random.default_rng(4)
    # Each device's rows have their own scale, so per-shard whitening would differ from global.
    x = (rng.normal(size=(16, 6)) * np.arange(1, 17)[:, None] + np.arange(16)[:, None]).astype(np.float32)
    mask = _prefix_mask(rng.integers(1, 7, size=16), 6)
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    xs, ms = jax.device_put(x, sharding), jax.device_put(mask, sharding)
    out = jax.jit(ppo.masked_whiten, in_shardings=(sharding, sharding), out_shardings=sharding)(xs, ms)
    assert len(out.sharding.device_set) == 8
    vals = x[mask > 0].astype(np.float64)
    expected = (x - vals.mean()) / np.sqrt(vals.var() + 1e-8) * mask
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    local = np.concatenate([(x[i:i + 2] - x[i:i + 2][mask[i:i + 2] > 0].mean()) for i in range(0, 16, 2)])
    assert not np.allclose(local * mask, (x - vals.mean()) * mask, atol=1e-2)


def test_bad_inputs_raise_clear_errors():
    ones = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"mask rows \[1\] have no valid token"):
        ppo.policy_loss(ones, ones, ones, jnp.array([[1.0, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"mask rows \[0\]"):
        ppo.value_loss(ones, ones, ones, jnp.array([[0.0, 0, 0], [1, 0, 0]]))
    with pytest.raises(ValueError, match="one shape"):
        ppo.gae(ones, jnp.ones((2, 4)), ones)
    with pytest.raises(ValueError, match="one shape"):
        ppo.policy_loss(ones, ones, jnp.ones((3, 3)), ones)
    with pytest.raises(ValueError, match="clip must be > 0, got 0"):
        ppo.policy_loss(ones, ones, ones, ones, clip=0.0)
    with pytest.raises(ValueError, match="value clip must be > 0, got -0.1"):
        ppo.value_loss(ones, ones, ones, ones, clip=-0.1)
    with pytest.raises(ValueError, match="gamma must be in"):
        ppo.gae(ones, ones, ones, gamma=1.5)
    with pytest.raises(ValueError, match="lam must be in"):
        ppo.gae(ones, ones, ones, lam=-0.1)
    with pytest.raises(ValueError, match="unknown reduction 'mean'"):
        ppo.policy_loss(ones, ones, ones, ones, reduction="mean")
    with pytest.raises(ValueError, match=r"score_B has shape \(3,\)"):
        ppo.kl_penalized_rewards(jnp.ones(3), ones, ones, ones, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"one shape, got .*'returns_BT': \(2, 4\)"):
        ppo.value_loss(ones, ones, jnp.ones((2, 4)), ones)
    with pytest.raises(ValueError, match=r"one shape, got .*'mask_BT': \(3,\)"):
        ppo.masked_whiten(ones, jnp.ones(3))
    with pytest.raises(ValueError, match=r"one shape, got .*'ref_logp_BT': \(2, 2\)"):
        ppo.kl_penalized_rewards(jnp.ones(2), ones, jnp.ones((2, 2)), ones, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef must be >= 0, got -0.1"):
        ppo.kl_penalized_rewards(jnp.ones(2), ones, ones, ones, kl_coef=-0.1)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got -0.5"):
        ppo.gae(ones, ones, ones, gamma=-0.5)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\], got 1.01"):
        ppo.gae(ones, ones, ones, lam=1.01)
