"""Preference trainer on the training stack: parameters move, the margin rises on a separable set,
gradient accumulation is exact for CPO's token-mean NLL through the real step, DPO's precomputed
reference, resume on a sharded mesh, SFT rows, the seeded epoch batcher, the launcher end to end, and
config / bad-input errors. (Candidates are decoded by `jaxllm.serve.Engine`, tested in tests/serve.)

Log-probs used as references are recomputed here in float64 NumPy from the model's logits.
"""
import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from jaxllm.data import pairs as pair_data
from jaxllm.data.epochs import EpochBatches
from jaxllm.data.preference import collate_pairs
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.methods import preference as mp
from jaxllm import model as model_format
from jaxllm.model import llama, presets
from jaxllm.objectives.preference import PreferenceConfig
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.train import checkpoint, finetune
from jaxllm.train.optim import OptimizerConfig
from jaxllm.train.state import init_state
from jaxllm.train.step import make_train_step, total_loss
from tests.trajectory import assert_same_trajectory

MODEL = presets.get("tiny", vocab_size=128, max_len=32)
ONE_DEVICE = jax.devices()[:1]
REPO = pathlib.Path(__file__).resolve().parents[2]


def toy_pairs(n=32, seed=0):
    """Separable pairs: prompts of 3-8 tokens from [5, 40); chosen responses from [40, 70), rejected
    responses from [70, 100); 1-9 response tokens each side, so masks differ a lot between rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        prompt = [1] + rng.integers(5, 40, size=int(rng.integers(3, 9))).tolist()
        sides = {}
        for side, low in (("chosen", 40), ("rejected", 70)):
            response = rng.integers(low, low + 30, size=int(rng.integers(1, 10))).tolist() + [2]
            sides[f"{side}_tokens"] = np.asarray(prompt + response, np.int32)
            sides[f"{side}_mask"] = np.asarray([0] * len(prompt) + [1] * len(response), np.int32)
        rows.append(sides)
    return collate_pairs(rows, pad_id=0, length=24)


def train_config(**overrides):
    fields = dict(model=MODEL, steps=4, batch_size=8, log_every=1, checkpoint_every=100, seed=0,
                  optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0))
    return mp.PreferenceTrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def start_params():
    return jax.device_get(llama.init_params(MODEL, jax.random.key(0)))


def np_sequence_logps(params, tokens_BT, mask_BT):
    """Σ over scored tokens of log p(token | prefix), float64, from the model's logits."""
    logits = np.asarray(llama.forward(MODEL, params, tokens_BT), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(tokens_BT)[:, 1:, None], axis=-1)[..., 0]
    return (picked * np.asarray(mask_BT)[:, 1:]).sum(-1)


def np_margin(params, pairs):
    return (np_sequence_logps(params, pairs["chosen_tokens"], pairs["chosen_mask"])
            - np_sequence_logps(params, pairs["rejected_tokens"], pairs["rejected_mask"]))


def test_every_parameter_changes_and_the_start_is_kept(start_params, tmp_path):
    result = mp.fit_preference(train_config(steps=3), toy_pairs(), tmp_path, params=start_params, devices=ONE_DEVICE,
                               verbose=False)
    before = jax.tree_util.tree_flatten_with_path(start_params)[0]
    after = jax.tree.leaves(jax.device_get(result.state.params))
    assert len(before) == len(after)
    unchanged = [jax.tree_util.keystr(path) for (path, b), a in zip(before, after) if np.array_equal(b, a)]
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert int(result.state.step) == 3 and [h["step"] for h in result.history] == [1, 2, 3]


def test_cpo_margin_rises_on_a_separable_set(start_params, tmp_path):
    pairs = toy_pairs()
    margin_before = np_margin(start_params, pairs)
    result = mp.fit_preference(train_config(steps=12), pairs, tmp_path, params=start_params, devices=ONE_DEVICE,
                               verbose=False)
    margin_after = np_margin(jax.device_get(result.state.params), pairs)
    assert margin_after.mean() > margin_before.mean() + 5.0, (margin_before.mean(), margin_after.mean())
    assert np.mean(margin_after > 0) >= 0.9 > np.mean(margin_before > 0)
    logged = [h["margin"] for h in result.history]  # β·Δ on each step's batch
    assert logged[-1] > logged[0]
    assert result.history[-1]["prefer_loss"] < result.history[0]["prefer_loss"]


def test_gradient_accumulation_is_exact_for_cpo_token_mean_nll(start_params):
    """One SGD step through the real (sharded) train step: 4 micro-batches == 1 batch. Plain SGD keeps
    the update proportional to the gradient, so a wrong reduction cannot hide behind Adam's normalisation;
    the same step with the per-micro-batch mean (the wrong reduction) must differ."""
    pairs = toy_pairs(16, seed=1)
    cfg = train_config(objective=PreferenceConfig(kind="cpo", nll_weight=5.0), batch_size=16)
    loss_fn = mp.make_loss_fn(cfg)
    mesh = mesh_lib.make_mesh("data:2", jax.devices()[:2])
    optimizer = optax.sgd(1.0)

    def one_step(fn, grad_accum):
        state = init_state(jax.device_put(start_params, jax.devices()[0], may_alias=False), optimizer, jax.random.key(0))
        step = make_train_step(fn, optimizer, mesh, grad_accum=grad_accum)
        new_state, metrics = step(state, pairs)
        return jax.device_get(new_state.params), float(metrics["loss"])

    whole, loss_whole = one_step(loss_fn, 1)
    accumulated, loss_accumulated = one_step(loss_fn, 4)
    assert loss_accumulated == pytest.approx(loss_whole, rel=1e-6)
    for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)

    per_micro_mean = lambda p, b, r: (lambda loss, aux: (total_loss(loss), aux))(*loss_fn(p, b, r))  # noqa: E731
    wrong, _ = one_step(per_micro_mean, 4)
    delta = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(wrong), jax.tree.leaves(whole)))
    assert delta > 1e-3, "the test cannot tell a per-micro-batch mean from the global token mean"


def test_dpo_reference_is_precomputed_once_and_reused_on_resume(start_params, tmp_path):
    pairs = toy_pairs()
    cfg = train_config(objective=PreferenceConfig(kind="dpo"), steps=4)
    first = mp.fit_preference(cfg, pairs, tmp_path, params=start_params, devices=ONE_DEVICE, until_step=2, verbose=False)
    # The reference is the starting policy: at step 1 every log-ratio is 0, so the loss is ln 2.
    assert first.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first.history[0]["margin"] == pytest.approx(0.0, abs=1e-5)
    stored = np.load(tmp_path / mp.REFERENCE_FILE)
    np.testing.assert_allclose(stored["ref_chosen_logps"], np_sequence_logps(start_params, pairs["chosen_tokens"],
                                                                             pairs["chosen_mask"]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stored["ref_rejected_logps"], np_sequence_logps(
        start_params, pairs["rejected_tokens"], pairs["rejected_mask"]), rtol=1e-4, atol=1e-4)
    # Resuming needs neither the start params nor the reference: both come from the workdir.
    resumed = mp.fit_preference(cfg, pairs, tmp_path, devices=ONE_DEVICE, verbose=False)
    assert [h["step"] for h in resumed.history] == [3, 4] and resumed.history[-1]["margin"] > 0
    other = {**pairs, "chosen_tokens": pairs["chosen_tokens"][::-1].copy()}
    with pytest.raises(ValueError, match="different pairs"):
        mp.fit_preference(cfg, other, tmp_path, devices=ONE_DEVICE, verbose=False)


def test_sharded_run_resumed_on_one_device_matches_one_device_run(start_params, tmp_path):
    """Steps 1-2 on 8 devices (data:2, fsdp:4), checkpoint, steps 3-4 resumed on one device == 4 steps on
    one device (up to float reduction order: losses to 1e-4, parameters as `assert_same_trajectory`)."""
    pairs, cfg = toy_pairs(), train_config(steps=4)
    straight = mp.fit_preference(cfg, pairs, tmp_path / "one", params=start_params, devices=ONE_DEVICE, verbose=False)
    sharded = mp.fit_preference(train_config(steps=4, mesh="data:2,fsdp:4"), pairs, tmp_path / "resumed",
                                params=start_params, until_step=2, verbose=False)
    embedding = sharded.state.params["embed"]["embedding"]
    assert len(embedding.sharding.device_set) == 8 and not embedding.sharding.is_fully_replicated
    resumed = mp.fit_preference(cfg, pairs, tmp_path / "resumed", devices=ONE_DEVICE, verbose=False)
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in straight.history[2:]],
                               rtol=1e-4)
    assert_same_trajectory(resumed.state.params, straight.state.params, start_params)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all("accuracy" in r for r in records)


class SigtermAtSecondBatch(EpochBatches):
    """Sends SIGTERM to this process when the second batch is drawn, as a preemption notice would."""

    drawn = 0

    def __next__(self):
        self.drawn += 1
        if self.drawn == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


def test_sigterm_checkpoints_and_the_resumed_run_ends_identically(start_params, tmp_path, monkeypatch):
    pairs, cfg = toy_pairs(), train_config(steps=4)
    straight = mp.fit_preference(cfg, pairs, tmp_path / "straight", params=start_params, devices=ONE_DEVICE,
                                 verbose=False)
    monkeypatch.setattr(finetune, "EpochBatches", SigtermAtSecondBatch)
    handler_before = signal.getsignal(signal.SIGTERM)  # another library (e.g. ray) may own it
    stopped = mp.fit_preference(cfg, pairs, tmp_path / "stopped", params=start_params, devices=ONE_DEVICE,
                                verbose=False)
    assert stopped.preempted and int(stopped.state.step) == 2
    assert checkpoint.Checkpointer(tmp_path / "stopped" / "checkpoints").all_steps() == [2]
    assert signal.getsignal(signal.SIGTERM) is handler_before, "the previous handler is restored"
    monkeypatch.undo()
    resumed = mp.fit_preference(cfg, pairs, tmp_path / "stopped", params=start_params, devices=ONE_DEVICE,
                                verbose=False)
    assert not resumed.preempted and [h["step"] for h in resumed.history] == [3, 4]
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state.params)),
                    jax.tree.leaves(jax.device_get(straight.state.params))):
        np.testing.assert_array_equal(a, b)


def test_sft_objective_trains_on_the_chosen_side_only(start_params, tmp_path):
    pairs = toy_pairs()
    rows = pair_data.chosen_rows(pairs)
    assert sorted(rows) == ["loss_mask", "positions", "segment_ids", "tokens"]
    result = mp.fit_preference(train_config(objective=None, steps=2), rows, tmp_path, params=start_params,
                               devices=ONE_DEVICE, verbose=False)
    # Step 1's loss is the token-mean NLL of the chosen responses of its batch under the start params.
    first_rows = next(EpochBatches(rows, 8, seed=0))
    nll = -np_sequence_logps(start_params, first_rows["tokens"], first_rows["loss_mask"]).sum()
    assert result.history[0]["loss"] == pytest.approx(nll / first_rows["loss_mask"][:, 1:].sum(), rel=1e-5)
    with pytest.raises(ValueError, match="lacks"):
        mp.fit_preference(train_config(), rows, tmp_path / "cpo", devices=ONE_DEVICE, verbose=False)
    with pytest.raises(ValueError, match=r"SFT data lacks \['tokens', 'loss_mask'\]"):
        mp.fit_preference(train_config(objective=None), pairs, tmp_path / "sft", devices=ONE_DEVICE, verbose=False)


def test_epoch_batches_cover_each_epoch_and_resume_exactly():
    rows = {"tokens": np.arange(10)[:, None], "loss_mask": np.ones((10, 1))}
    batches = EpochBatches(rows, 3, seed=5)
    epoch = np.concatenate([next(batches)["tokens"][:, 0] for _ in range(3)])
    assert sorted(epoch.tolist()) == sorted(set(epoch.tolist())) and len(epoch) == 9  # drop-last, no repeats
    np.testing.assert_array_equal(epoch, np.random.default_rng([5, 0]).permutation(10)[:9])
    state = batches.get_state()
    expected = [next(batches)["tokens"][:, 0].tolist() for _ in range(4)]
    assert expected[0] == np.random.default_rng([5, 1]).permutation(10)[:3].tolist()
    again = EpochBatches(rows, 3, seed=5)
    again.set_state(json.loads(json.dumps(state)))
    assert [next(again)["tokens"][:, 0].tolist() for _ in range(4)] == expected
    draws = []
    counted = EpochBatches(10, 3, seed=5, fetch=lambda r, draw: draws.append(draw) or {"rows": r})
    for _ in range(5):
        next(counted)
    assert draws == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="batch_size"):
        EpochBatches(rows, 11, seed=0)
    with pytest.raises(ValueError, match="disagree"):
        EpochBatches({"tokens": np.zeros((3, 1)), "loss_mask": np.zeros((4, 1))}, 1, seed=0)


def test_load_params_restores_policy_from_a_training_checkpoint(start_params, tmp_path):
    optimizer = optax.adamw(1e-3)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(init_state(jax.device_put(start_params), optimizer, jax.random.key(0)), EpochBatches(toy_pairs(), 8, 0))
    ckpt.wait()
    ckpt.close()
    mesh = mesh_lib.make_mesh("fsdp:-1", ONE_DEVICE)
    loaded = mp.load_params(tmp_path, MODEL, mesh)
    for a, b in zip(jax.tree.leaves(jax.device_get(loaded)), jax.tree.leaves(start_params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        mp.load_params(tmp_path, presets.get("tiny", vocab_size=128, max_len=32, d_ff=128), mesh)
    with pytest.raises(FileNotFoundError):
        mp.load_params(tmp_path / "missing", MODEL, mesh)


def test_config_dict_round_trip_and_errors():
    d = mp.config_dict(model=dict(preset="tiny", vocab_size=96), objective=dict(kind="dpo", beta=0.2),
                       optimizer=dict(learning_rate=5e-4), steps=7, extra=dict(data=dict(source="translation")))
    cfg = mp.from_dict(d.to_dict())
    assert cfg.model.vocab_size == 96 and cfg.model.d_model == 64 and cfg.steps == 7
    assert cfg.objective == PreferenceConfig(kind="dpo", beta=0.2) and cfg.objective.nll_weight == 0.0
    assert cfg.optimizer.learning_rate == 5e-4 and cfg.needs_reference
    d.objective.kind = "sft"
    assert mp.from_dict(d.to_dict()).objective is None
    d.objective.kind = "kto"
    with pytest.raises(ValueError, match="unknown objective kind 'kto'"):
        mp.from_dict(d.to_dict())
    with pytest.raises(ValueError, match=r"unknown config fields \['objective.betta'\]"):
        mp.from_dict({**d.to_dict(), "objective": {"kind": "cpo", "betta": 1.0}})
    with pytest.raises(ValueError, match="grad_accum"):
        train_config(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="data.source"):
        pair_data.PairDataConfig(source="csv")
    with pytest.raises(ValueError, match="until_step"):
        mp.fit_preference(train_config(), toy_pairs(), "/tmp/unused", until_step=9)


# a subprocess launch; the trainer it calls is tested in-process above
@pytest.mark.slow
def test_launcher_trains_dpo_end_to_end(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    cmd = [sys.executable, "-m", "launch.train_preference", "--config=experiments/cpo/trainer_config.py",
           f"--workdir={tmp_path}", "--config.steps=3", "--config.log_every=1", "--config.batch_size=8",
           "--config.data.num_sources=100", "--config.objective.kind=dpo", "--config.objective.nll_weight=1.0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["prefer_loss"] == pytest.approx(math.log(2), abs=1e-5) and records[0]["nll_loss"] > 0
    assert (tmp_path / "checkpoints" / "3").is_dir() and (tmp_path / mp.REFERENCE_FILE).is_file()
    assert "step 3/3" in proc.stdout


# a subprocess launch; nothing else runs the launcher on JSONL pairs to the end
@pytest.mark.slow
def test_launcher_on_jsonl_pairs_records_their_tokenizer(tmp_path):
    """The workdir of a JSONL run is a complete model source: config, params and the tokenizer the
    pairs were made with, so serving it needs no --tokenizer."""
    rows = [{"prompt": f"Say {w}.", "chosen": f" {w}", "rejected": " no"} for w in ("yes", "maybe", "sure", "fine")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "launch.train_preference", "--config=experiments/cpo/trainer_config.py",
           f"--workdir={work}", "--config.steps=2", "--config.batch_size=4", "--config.data.source=jsonl",
           f"--config.data.files={data}", "--config.model.vocab_size=4096"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokenizer = model_format.load_tokenizer(work)
    assert tokenizer.encode("Say maybe.") == Tokenizer.default().encode("Say maybe.")
    cfg, _ = model_format.load_model(work)
    assert cfg.vocab_size == 4096
