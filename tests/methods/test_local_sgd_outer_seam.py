"""The optimizer seam of Local-SGD: any optax transform is the outer optimizer. A chain of global-norm
clipping and delayed Nesterov handed to a server gives the float64 NumPy hand computation; the
preset a config names and the same transform handed in explicitly train identically."""
import jax
import numpy as np
import optax
import pytest

from jaxllm.methods.local_sgd import LocalSGDConfig, delayed_nesterov
from jaxllm.methods.local_sgd.runner import run
from jaxllm.methods.local_sgd.server import AsyncServer
from tests.methods.test_local_sgd_run import EVAL, _cfg, mlp_params, mlp_task

LR, BETA, N, C, CLIP = 0.7, 0.9, 2, 0.25, 1.5


def _hand_delayed_nesterov_with_clipping(theta, grads):
    """θ after each arrival: g clipped to global norm CLIP, then arXiv 2401.09135 Alg. 3."""
    theta = {k: v.astype(np.float64) for k, v in theta.items()}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    window = {k: np.zeros_like(v) for k, v in theta.items()}
    out = []
    for t, g in enumerate(grads):
        norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in g.values()))
        g = {k: np.asarray(x, np.float64) * min(1.0, CLIP / norm) for k, x in g.items()}
        window = {k: window[k] + g[k] for k in g}
        if (t + 1) % N == 0:
            m = {k: BETA * m[k] + window[k] / N for k in g}
            u = {k: -LR * ((1 - C * N + C) * BETA * m[k] + g[k] / N) for k in g}
            window = {k: np.zeros_like(v) for k, v in window.items()}
        else:
            u = {k: -LR * (C * BETA * m[k] + g[k] / N) for k in g}
        theta = {k: theta[k] + u[k] for k in g}
        out.append(theta)
    return out


def test_chained_outer_optimizer_handed_to_the_server_gives_the_hand_computed_update():
    cfg = LocalSGDConfig(mode="async", num_workers=1, local_steps=1, total_local_steps=5, outer="nesterov",
                         outer_lr=0.1, seconds_per_step=(1.0,))
    tx = optax.chain(optax.clip_by_global_norm(CLIP), delayed_nesterov(LR, BETA, buffer_size=N, activation=C))
    params = mlp_params()
    server = AsyncServer(cfg, params, outer_optimizer=tx)
    rng = np.random.default_rng(3)
    grads = [{k: (scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
             for scale in (0.05, 1.0, 0.02, 2.0, 0.1)]  # below and above the clipping norm
    expected = _hand_delayed_nesterov_with_clipping(params, grads)
    for g, want in zip(grads, expected):
        job, _ = server.request_job(0)
        assert server.push(0, job.job_id, g)
        jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), e, rtol=1e-5, atol=1e-6),
                     server.params, want)
    assert server.done and server.version == len(grads)


def test_explicit_transform_equals_the_preset_the_config_names():
    cfg = _cfg(total_local_steps=30)
    task = mlp_task(3)
    preset_params, preset_hist = run(cfg, mlp_params(), task, EVAL)
    explicit = delayed_nesterov(cfg.outer_lr, cfg.outer_momentum, cfg.resolved_buffer_size, cfg.activation)
    params, hist = run(cfg, mlp_params(), task, EVAL, outer_optimizer=explicit)
    jax.tree.map(np.testing.assert_array_equal, params, preset_params)
    assert hist.eval_loss == preset_hist.eval_loss
    clipped, _ = run(cfg, mlp_params(), task, outer_optimizer=optax.chain(optax.clip_by_global_norm(1e-3), explicit))
    assert not np.allclose(clipped["w1"], params["w1"])  # the handed-in transform is the one applied


def test_outer_optimizer_must_be_an_optax_transform():
    with pytest.raises(ValueError, match="outer_optimizer must be an optax.GradientTransformation, got str"):
        AsyncServer(_cfg(), mlp_params(), outer_optimizer="delayed_nesterov")
