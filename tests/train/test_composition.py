"""The library's claim across seams: a RoPE transform (entropy-aware ABF), a preference objective
(CPO) and a non-default optimizer (global-norm clipping chained with Local-SGD's delayed Nesterov)
compose through the one loop on a sharded (FSDP) mesh — checkpointed, stopped, resumed — and the resumed
run ends bit-identical to the uninterrupted one (params, optimizer state, step rng, losses)."""
import functools
import json

import jax
import numpy as np
import optax
import pytest

from jaxllm.data.epochs import EpochBatches
from jaxllm.methods.local_sgd.outer import DelayedNesterovState, delayed_nesterov
from jaxllm.model import llama, presets, rope
from jaxllm.objectives.preference import PreferenceConfig, make_preference_loss
from jaxllm.train.loop import LoopConfig, fit
from tests.methods.test_preference_trainer import toy_pairs

STEPS = 4
BASE = presets.get("tiny", vocab_size=128, max_len=32)
MODEL = presets.get("tiny", vocab_size=128, max_len=32,
                    rope=rope.entropy_aware_abf(BASE.rope, base=20_000.0, pretrained_window=8, unscaled_layers=(0,)))


def run(workdir, until_step=None):
    loss_fn = make_preference_loss(functools.partial(llama.forward, MODEL), PreferenceConfig(kind="cpo", beta=0.1))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            delayed_nesterov(learning_rate=0.3, momentum=0.9, buffer_size=2))
    loop_config = LoopConfig(steps=STEPS, seed=3, mesh="fsdp:2", log_every=1, checkpoint_every=100,
                             verbose=False)
    return fit(loss_fn, optimizer, EpochBatches(toy_pairs(), 8, seed=3),
               lambda rng: llama.init_params(MODEL, rng, boxed=True), workdir, loop_config, devices=jax.devices()[:2],
               until_step=until_step)


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_eabf_cpo_delayed_nesterov_resume_exactly(tmp_path):
    assert MODEL.rope != BASE.rope and MODEL.rope.logit_scale is not None
    straight = run(tmp_path / "straight")
    stopped = run(tmp_path / "stopped", until_step=2)
    assert int(stopped.state.step) == 2 and sorted(stopped.losses) == [1, 2]
    resumed = run(tmp_path / "stopped")
    assert sorted(resumed.losses) == [3, 4]

    assert {**stopped.losses, **resumed.losses} == straight.losses
    for a, b in zip(host(resumed.state), host(straight.state), strict=True):
        np.testing.assert_array_equal(a, b)
    nesterov = resumed.state.opt_state[1]
    assert isinstance(nesterov, DelayedNesterovState) and int(nesterov.count) == STEPS
    up = resumed.state.params["layers_0"]["mlp"]["up"]
    assert not up.sharding.is_fully_replicated, "params stay sharded over the mesh"
    assert straight.history[-1]["accuracy"] >= 0 and straight.losses[STEPS] < straight.losses[1]
    records = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == [straight.losses[s] for s in range(1, STEPS + 1)]
    with pytest.raises(ValueError, match="until_step"):
        run(tmp_path / "bad", until_step=STEPS + 1)
