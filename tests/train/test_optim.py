"""Optimizer from config: schedule shape, weight-decay mask, and two AdamW steps against float64
NumPy (clipping, bias correction, masked decoupled decay)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.model import llama, presets
from jaxllm.train import optim


def test_schedule_warms_up_from_the_first_step_and_ends_at_the_minimum():
    cfg = optim.OptimizerConfig(learning_rate=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    schedule = optim.learning_rate_schedule(cfg, total_steps=24)
    lr_of_step = lambda k: float(schedule(k - 1))  # step k (1-based) runs at optimizer count k - 1
    np.testing.assert_allclose([lr_of_step(k) for k in (1, 2, 4)], [2.5e-4, 5e-4, 1e-3], rtol=1e-6)
    midpoint = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 10 / 20))  # 10 of 20 decay steps
    np.testing.assert_allclose(lr_of_step(14), midpoint, rtol=1e-6)
    np.testing.assert_allclose(lr_of_step(24), 1e-4, rtol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decay_mask_skips_norms_and_embedding(scan_layers):
    cfg = presets.get("tiny", scan_layers=scan_layers)
    params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]}
    skipped = sorted(k for k, m in flat.items() if not m)
    assert all("norm" in k or "embed" in k for k in skipped)
    assert "['embed']['embedding']" in skipped and "['final_norm']['scale']" in skipped
    assert sum("norm" in k for k in skipped) == (3 if scan_layers else 1 + 2 * cfg.n_layers)
    assert flat["['lm_head']"] and sum(flat.values()) == (7 if scan_layers else 7 * cfg.n_layers) + 1


def test_two_adamw_steps_match_float64_numpy():
    cfg = optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=2, min_lr_ratio=0.5, b1=0.8, b2=0.9, eps=1e-6,
                                weight_decay=0.3, clip_norm=0.5)
    rng = np.random.default_rng(0)
    params = {"embed": {"embedding": rng.normal(size=(5, 3))}, "w": rng.normal(size=(3, 4)),
              "final_norm": {"scale": rng.normal(size=(4,))}}
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape) * 2.0, params) for _ in range(2)]
    tx, schedule = optim.make_optimizer(cfg, total_steps=10)

    p32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(p32)
    for g in grads:
        updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p32)
        p32 = optax.apply_updates(p32, updates)

    keys = ["embed", "w", "final_norm"]
    leaf = lambda tree, k: tree["embed"]["embedding"] if k == "embed" else tree["final_norm"]["scale"] if k == "final_norm" else tree[k]
    p = {k: leaf(params, k).copy() for k in keys}
    m = {k: np.zeros_like(p[k]) for k in keys}
    v = {k: np.zeros_like(p[k]) for k in keys}
    for t, g in enumerate(grads, start=1):
        g = {k: leaf(g, k) for k in keys}
        norm = math.sqrt(sum((x ** 2).sum() for x in g.values()))
        lr = cfg.learning_rate * min(t / cfg.warmup_steps, 1.0)  # steps 1, 2 are in warmup
        for k in keys:
            gk = g[k] * min(1.0, cfg.clip_norm / norm)
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * gk
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * gk ** 2
            step = (m[k] / (1 - cfg.b1 ** t)) / (np.sqrt(v[k] / (1 - cfg.b2 ** t)) + cfg.eps)
            decay = cfg.weight_decay * p[k] if k == "w" else 0.0
            p[k] = p[k] - lr * (step + decay)
    for k in keys:
        np.testing.assert_allclose(np.asarray(leaf(p32, k)), p[k], rtol=2e-5, atol=1e-6)


def test_bad_optimizer_fields_are_named():
    with pytest.raises(ValueError, match="optimizer.learning_rate must be > 0, got 0"):
        optim.OptimizerConfig(learning_rate=0)
    with pytest.raises(ValueError, match=r"optimizer.b2 must be in \[0, 1\), got 1.0"):
        optim.OptimizerConfig(b2=1.0)
