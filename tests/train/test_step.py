"""The train step: exact gradient accumulation with token-mean losses, NaN guard."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.model import llama, presets
from jaxllm.objectives import lm
from jaxllm.train import state as state_lib
from jaxllm.train import step as step_lib

CFG = presets.get("tiny", vocab_size=64, n_layers=1)


def nll_fn(params, batch, rng):
    logits = llama.forward(CFG, params, batch["tokens"])
    num, den = lm.nll_loss(logits, batch["tokens"], batch["loss_mask"])
    return {"nll": (num, den)}, {"scored_tokens": den}


def batch(B=8, T=12, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T + 1, size=B)  # very uneven masks across micro-batches
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    return {"tokens": jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T))), "loss_mask": jnp.asarray(mask)}


def test_token_mean_accumulation_is_exact():
    params = llama.init_params(CFG, jax.random.key(0))
    b = batch()
    grads = jax.jit(step_lib.accumulated_grads, static_argnums=(0,), static_argnames=("grad_accum",))
    loss1, g1, _ = grads(nll_fn, params, b, jax.random.key(0), grad_accum=1)
    loss4, g4, _ = grads(nll_fn, params, b, jax.random.key(0), grad_accum=4)
    logits = llama.forward(CFG, params, b["tokens"])
    mask = np.asarray(b["loss_mask"]).copy()
    mask[:, 0] = 0
    ref = -np.sum(np.asarray(lm.token_logprobs(logits, b["tokens"])) * mask) / mask.sum()
    np.testing.assert_allclose(loss1, ref, rtol=1e-6)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-7, rtol=1e-5), g1, g4)
    # a naive mean of micro-batch means differs here, so the test can fail
    naive = np.mean([float(grads(nll_fn, params, jax.tree.map(lambda x: x[i * 2:(i + 1) * 2], b),
                                 jax.random.key(0))[0]) for i in range(4)])
    assert abs(naive - float(loss1)) > 1e-3


def test_train_steps_reduce_loss_and_guard_nan():
    params = llama.init_params(CFG, jax.random.key(0))
    opt = optax.adamw(1e-2)
    st = state_lib.init_state(params, opt, jax.random.key(1))
    step = step_lib.make_train_step(nll_fn, opt, grad_accum=2)
    b = batch(seed=1)
    losses = []
    for _ in range(8):
        st, m = step(st, b)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.5 and int(st.step) == 8
    bad = dict(b, loss_mask=b["loss_mask"] * jnp.nan)
    before = jax.tree.map(np.asarray, st.params)
    st2, m = step(st, bad)
    assert float(m["finite"]) == 0.0 and int(st2.step) == 8
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, st2.params))


def test_indivisible_batch_raises():
    params = llama.init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="batch size 6 is not divisible by grad_accum=4"):
        step_lib.accumulated_grads(nll_fn, params, batch(B=6), jax.random.key(0), grad_accum=4)
