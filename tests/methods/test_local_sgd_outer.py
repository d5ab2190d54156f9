"""Outer optimizers of Local-SGD against optax's Nesterov SGD and float64 NumPy closed forms."""

import jax
import numpy as np
import optax
import pytest

from jaxllm.methods.local_sgd import (
    LocalSGDConfig,
    OuterNesterovState,
    delayed_nesterov,
    outer_nesterov,
)

LR, BETA = 0.7, 0.9


def _tree(rng, scale=1.0):
    return {"w": scale * rng.normal(size=(3, 4)), "b": {"x": scale * rng.normal(size=(5,))}}


def _stack(trees):
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _assert_trees_close(actual, expected, rtol=1e-12, atol=1e-12):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=rtol, atol=atol), _np(actual), _np(expected))


@pytest.mark.parametrize("buffer_size", [1, 3, 4])
def test_delayed_nesterov_window_equals_one_nesterov_step_on_the_mean(buffer_size):
    """c = 0: every window of N arrivals moves (θ, m) like one optax Nesterov step on their mean."""
    rng = np.random.default_rng(buffer_size)
    with jax.enable_x64(True):
        theta = _tree(rng)
        dn, ref = delayed_nesterov(LR, BETA, buffer_size=buffer_size), optax.sgd(LR, momentum=BETA, nesterov=True)
        dn_state, ref_state = dn.init(theta), ref.init(theta)
        dn_theta = ref_theta = theta
        for _ in range(3):
            grads = [_tree(rng) for _ in range(buffer_size)]
            for i, g in enumerate(grads):
                before = _np(dn_theta)
                u, dn_state = dn.update(g, dn_state, dn_theta)
                dn_theta = optax.apply_updates(dn_theta, u)
                if i < buffer_size - 1:  # between milestones: plain SGD with rate ε/N
                    _assert_trees_close(dn_theta, jax.tree.map(lambda t, x: t - LR * x / buffer_size, before, g))
            mean_g = jax.tree.map(lambda x: x.mean(axis=0), _stack(grads))
            u, ref_state = ref.update(mean_g, ref_state, ref_theta)
            ref_theta = optax.apply_updates(ref_theta, u)
            _assert_trees_close(dn_theta, ref_theta)
            _assert_trees_close(dn_state.momentum, ref_state[0].trace)
        assert not np.allclose(_np(dn_theta)["w"], theta["w"])  # the comparison saw real movement


def test_buffer_size_one_equals_outer_nesterov_and_optax_step_for_step():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        theta = _tree(rng)
        txs = [delayed_nesterov(LR, BETA, buffer_size=1), outer_nesterov(LR, BETA), optax.sgd(LR, BETA, nesterov=True)]
        states = [tx.init(theta) for tx in txs]
        thetas = [theta] * 3
        for _ in range(5):
            g = _tree(rng)
            for i, tx in enumerate(txs):
                u, states[i] = tx.update(g, states[i], thetas[i])
                thetas[i] = optax.apply_updates(thetas[i], u)
            _assert_trees_close(thetas[0], thetas[2])
            _assert_trees_close(thetas[1], thetas[2])


def test_naive_async_amplification_matches_closed_form():
    """Spec Eq. 5: 4 identical g through per-arrival Nesterov from a random old momentum."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        theta, g, m_old = _tree(rng), _tree(rng), _tree(rng)
        tx = outer_nesterov(LR, BETA)
        state = OuterNesterovState(momentum=m_old)
        new_theta = theta
        for _ in range(4):
            u, state = tx.update(g, state, new_theta)
            new_theta = optax.apply_updates(new_theta, u)
        b = BETA
        grad_coef = 4 + 4 * b + 3 * b**2 + 2 * b**3 + b**4
        mom_coef = b**2 * (1 + b + b**2 + b**3)
        expected_theta = jax.tree.map(lambda t, x, m: t - LR * (grad_coef * x + mom_coef * m), theta, g, m_old)
        expected_m = jax.tree.map(lambda x, m: b**4 * m + (1 + b + b**2 + b**3) * x, g, m_old)
        _assert_trees_close(new_theta, expected_theta)
        _assert_trees_close(state.momentum, expected_m)


def test_activation_one_over_n_spreads_momentum_and_compiles_once():
    n, rng = 4, np.random.default_rng(2)
    c = 1.0 / n
    with jax.enable_x64(True):
        theta = _tree(rng)
        tx = delayed_nesterov(LR, BETA, buffer_size=n, activation=c)
        traces = []

        def update(g, state, params):
            traces.append(None)
            return tx.update(g, state, params)

        update = jax.jit(update)
        state = tx.init(theta)
        m = jax.tree.map(np.zeros_like, theta)
        window = jax.tree.map(np.zeros_like, theta)
        for t in range(2 * n + 1):
            g = _tree(rng)
            u, state = update(g, state, theta)
            window = jax.tree.map(np.add, window, g)
            if (t + 1) % n == 0:
                m = jax.tree.map(lambda m_, s: BETA * m_ + s / n, m, window)
                window = jax.tree.map(np.zeros_like, window)
                _assert_trees_close(state.buffer, window, atol=0)
            expected_u = jax.tree.map(lambda x, m_: -LR * (BETA * m_ / n + x / n), g, m)
            _assert_trees_close(u, expected_u)
            _assert_trees_close(state.momentum, m)
            assert int(state.count) == t + 1
            theta = optax.apply_updates(theta, u)
        assert len(traces) == 1


def test_outer_sgd_with_unit_rate_moves_global_params_to_the_local_ones():
    """Sign convention: g = θ_start − θ_local, ε = 1, no momentum → θ_new = θ_local."""
    rng = np.random.default_rng(3)
    theta_start, theta_local = _tree(rng), _tree(rng)
    pseudo_grad = jax.tree.map(lambda a, b: a - b, theta_start, theta_local)
    for tx in [outer_nesterov(1.0, momentum=0.0), LocalSGDConfig(
        mode="sync", num_workers=1, local_steps=1, total_local_steps=1, outer="sgd", outer_lr=1.0
    ).outer_optimizer()]:
        u, _ = tx.update(pseudo_grad, tx.init(theta_start), theta_start)
        _assert_trees_close(optax.apply_updates(theta_start, u), theta_local, rtol=1e-6, atol=1e-6)


def test_delayed_nesterov_chains_with_other_transforms():
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        theta = _tree(rng)
        chained = optax.chain(optax.clip_by_global_norm(1.0), delayed_nesterov(LR, BETA, buffer_size=2))
        alone = delayed_nesterov(LR, BETA, buffer_size=2)
        s_chained, s_alone = chained.init(theta), alone.init(theta)
        for _ in range(4):
            g = _tree(rng, scale=3.0)
            norm = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(g)))
            clipped = jax.tree.map(lambda x: x / max(norm, 1.0), g)
            u_chained, s_chained = chained.update(g, s_chained, theta)
            u_alone, s_alone = alone.update(clipped, s_alone, theta)
            _assert_trees_close(u_chained, u_alone)
            theta = optax.apply_updates(theta, u_alone)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"buffer_size": 0}, "buffer_size=0"),
        ({"buffer_size": 2.0}, "buffer_size=2.0"),
        ({"buffer_size": 4, "activation": 0.3}, "activation=0.3"),
        ({"activation": -0.1}, "activation=-0.1"),
        ({"momentum": 1.0}, "momentum=1.0"),
    ],
)
def test_delayed_nesterov_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        delayed_nesterov(LR, **kwargs)


@pytest.mark.parametrize("make_tx", [lambda: outer_nesterov(LR), lambda: delayed_nesterov(LR, buffer_size=2)])
def test_pseudo_gradient_that_does_not_match_params_is_named(make_tx):
    theta = _tree(np.random.default_rng(5))
    tx = make_tx()
    state = tx.init(theta)
    missing = {"w": theta["w"], "b": {}}
    with pytest.raises(ValueError, match=r"missing leaves \[\"\['b'\]\['x'\]\"\]"):
        tx.update(missing, state, theta)
    wrong_shape = {"w": theta["w"][:2], "b": theta["b"]}
    with pytest.raises(ValueError, match=r"\['w'\] has shape \(2, 4\).*shape \(3, 4\)"):
        jax.jit(tx.update)(wrong_shape, state, theta)
    renamed = {"w": theta["w"], "b": {"y": theta["b"]["x"]}}
    with pytest.raises(ValueError, match=r"unexpected leaves \[\"\['b'\]\['y'\]\"\]"):
        tx.update(renamed, state)
