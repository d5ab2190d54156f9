"""Self-rewarding loop: DPO from M_t with a frozen π_ref = M_t, errors, and an end-to-end iteration."""
import dataclasses
import math

import jax
import numpy as np
import pytest

from jaxllm.data.tasks import instructions as ins
from jaxllm.methods.self_rewarding import judging, loop, training
from jaxllm.model import llama, presets
from jaxllm.train import optim

TOK = ins.CharTokenizer()
TASK = ins.InstructionTask()
MODEL = presets.get("tiny", vocab_size=TOK.vocab_size, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, n_layers=1,
                    max_len=128)
ONE_DEVICE = jax.devices()[:1]
TEMPLATE = judging.load_template("toy")


def _stage(steps, lr, batch_size=8):
    return training.StageConfig(steps=steps, batch_size=batch_size, seq_len=128, log_every=5,
                                optimizer=optim.OptimizerConfig(learning_rate=lr, warmup_steps=0, weight_decay=0.0))


def _config(**kw):
    judge = judging.JudgeConfig(template=TEMPLATE, max_new_tokens=20)  # "11010\nScore: 3" + EOS
    return loop.SelfRewardingConfig(judge=judge, max_new_tokens=8, prompts_per_iteration=4, iterations=1,
                                    sft=_stage(150, 1e-2, 16), dpo_stage=_stage(4, 1e-3, 4), **kw)


def _logps_float64(params, rows):
    """Summed response log-probs of each side in float64 NumPy from the model's logits."""
    out = {}
    for side in ("chosen", "rejected"):
        logits = np.asarray(llama.forward(MODEL, params, rows[f"{side}_tokens"]), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        picked = np.take_along_axis(logp[:, :-1], rows[f"{side}_tokens"][:, 1:, None], -1)[..., 0]
        out[side] = (picked * rows[f"{side}_mask"][:, 1:]).sum(-1)
    return out


def test_config_errors():
    with pytest.raises(ValueError, match="num_candidates must be >= 2"):
        _config(num_candidates=1)
    with pytest.raises(ValueError, match="kind 'dpo'"):
        _config(dpo=loop.PreferenceConfig(kind="cpo"))


def test_dpo_reference_is_mt_frozen_and_first_loss_is_ln2(tmp_path):
    params = llama.init_params(MODEL, jax.random.key(0))
    before = jax.tree.map(np.array, jax.device_get(params))
    rows = training.pair_arrays(TOK, [("rev abc", "cba", "abc"), ("add 1 2", "3", "12"), ("up ab", "AB", "A"),
                                      ("sort ba", "ab", "ba x")], seq_len=128)
    new, rows_ref, result = training.train_dpo(MODEL, params, rows, _stage(4, 1e-2, 4), _config().dpo, seed=0,
                                               workdir=tmp_path, devices=ONE_DEVICE)
    want = _logps_float64(before, rows)
    np.testing.assert_allclose(rows_ref["ref_chosen_logps"], want["chosen"], rtol=1e-5)
    np.testing.assert_allclose(rows_ref["ref_rejected_logps"], want["rejected"], rtol=1e-5)
    assert result.losses[1] == pytest.approx(math.log(2.0), abs=1e-6)  # π_θ = π_ref at the first step
    assert result.losses[4] < result.losses[1]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), before)  # M_t itself untouched
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(before)))


def test_prompt_longer_than_context_and_zero_pairs(tmp_path):
    params = llama.init_params(MODEL, jax.random.key(1))
    cfg = _config()
    engine = loop.make_engine(MODEL, params)
    with pytest.raises(ValueError, match="prompt 1 has 126 tokens; .* exceeds the engine's context of 128"):
        loop.generate_candidates(engine, TOK, ["rev abc", "rev " + "a" * 118], cfg, seed=0)
    constant = lambda prompts, cands: np.full((len(prompts), len(cands[0])), 3.0)  # noqa: E731
    with pytest.raises(loop.NoPairsError, match="iteration 1 produced no preference pairs") as err:
        loop.run_iteration(MODEL, params, TOK, ["rev abc", "add 1 2"], cfg, iteration=1, workdir=tmp_path,
                           engine=engine, reward_fn=constant, devices=ONE_DEVICE)
    assert err.value.stats.tie_rate == 1.0 and err.value.stats.pairs_out == 0


def test_preempted_sft_saves_no_model(tmp_path, monkeypatch):
    import types
    fake = types.SimpleNamespace(state=types.SimpleNamespace(step=3), preempted=True, losses={}, history=[])
    monkeypatch.setattr(training.preference, "fit_preference", lambda *a, **k: fake)
    params0 = llama.init_params(MODEL, jax.random.key(4))
    with pytest.raises(training.Preempted, match="SIGTERM at step 3 of 150"):
        loop.run(MODEL, params0, TOK, [("rev abc", "cba")], lambda t, n: ["rev abc"], _config(), tmp_path,
                 devices=ONE_DEVICE, verbose=False)
    assert not (tmp_path / "M1").exists()


def test_iteration_with_a_rubric_reward_trains_on_its_pairs(tmp_path):
    """The iteration's plumbing without a trained judge: candidates → rubric scores → pairs → DPO."""
    params = llama.init_params(MODEL, jax.random.key(3))
    prompts = ["rev abc", "add 1 2", "up abcd", "sort dcba"]
    seen = {}

    def rubric(ps, cands):
        seen["candidates"] = cands
        return np.asarray([[ins.rubric_score(TASK, p, c) for c in cs] for p, cs in zip(ps, cands)], float)

    cfg = _config()
    new, report = loop.run_iteration(MODEL, params, TOK, prompts, cfg, iteration=2, workdir=tmp_path,
                                     reward_fn=rubric, devices=ONE_DEVICE)
    scores = rubric(prompts, seen["candidates"])
    assert all(len(c) == cfg.num_candidates for c in seen["candidates"])
    want_pairs = sum(s.max() > s.min() for s in scores)
    assert report.pairs.pairs_out == want_pairs >= 1
    assert report.pairs.tie_rate == pytest.approx(1 - want_pairs / 4)
    assert report.pairs.score_histogram == tuple(np.bincount(scores.astype(int).ravel(), minlength=6))
    assert np.isnan(report.judge_parse_failure_rate)  # no judge ran
    assert report.mean_candidate_len == pytest.approx(np.mean([len(c) for cs in seen["candidates"] for c in cs]))
    assert report.dpo_first_loss == pytest.approx(math.log(2.0), abs=1e-6)
    assert len((tmp_path / "pairs.jsonl").read_text().splitlines()) == want_pairs
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(jax.device_get(params))))


@pytest.mark.slow  # trains M1 (150 SFT steps) before the iteration
def test_run_sft_then_one_self_rewarding_iteration_and_resume(tmp_path):
    splits = ins.split_prompts(TASK, {"ift": 200, "eft": 200}, seed=0)
    rng = np.random.default_rng(0)
    sft = ins.ift_items(TASK, splits["ift"]) + [(judging.render(TEMPLATE, p, r), t)
                                                for p, r, t in ins.eft_items(TASK, splits["eft"], rng)]
    gen = ins.PromptGenerator(TASK, seed=0, exclude=frozenset(splits["ift"] + splits["eft"]))
    cfg = _config()
    params0 = llama.init_params(MODEL, jax.random.key(2))
    reports = loop.run(MODEL, params0, TOK, sft, gen, cfg, tmp_path, devices=ONE_DEVICE, verbose=False)
    (report,) = reports
    stats = report.pairs
    assert stats.prompts_in == 4 and stats.pairs_out >= 1
    assert sum(stats.score_histogram) == 16 * (1 - stats.invalid_rate)
    assert report.judge_parse_failure_rate < 0.5  # SFT on EFT taught the score format
    assert report.dpo_first_loss == pytest.approx(math.log(2.0), abs=1e-6)
    assert report.mean_candidate_len > 0 and 0 <= stats.tie_rate <= 1
    _, m1 = loop.model_dir.load_model(tmp_path / "M1")
    _, m2 = loop.model_dir.load_model(tmp_path / "M2")
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)))
    again = loop.run(MODEL, params0, TOK, sft, gen, dataclasses.replace(cfg), tmp_path, devices=ONE_DEVICE,
                     verbose=False)
    assert again == reports  # resumed: nothing recomputed


@pytest.mark.slow  # subprocess
def test_launcher_trains_m1_and_rejects_a_misspelt_field(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    args = [sys.executable, "-m", "launch.self_rewarding", "--config=experiments/self_rewarding/config.py",
            f"--workdir={tmp_path}", "--config.sft.steps=3", "--config.sft.batch_size=4", "--config.task.ift=8",
            "--config.task.eft=8", "--config.loop.iterations=0"]
    done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "M1" / "config.json").exists()
    bad = subprocess.run(args + ["--config.loop.num_candidate=3"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "num_candidate" in bad.stderr
