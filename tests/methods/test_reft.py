"""ReFT: reward table, config checks, the PPO batch iterator, the first-epoch invariants, and a tiny
end-to-end run through `fit`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.data.tasks import arith
from jaxllm.methods import reft, reft_sft
from jaxllm.model import llama, model_dir, presets
from jaxllm.model.value_head import ActorCritic
from jaxllm.objectives import ppo

TOK = arith.CharTokenizer()
TASK = reft.ReasoningTask(TOK, arith.prompt, arith.extract_answer, arith.parse_gold)
CFG = presets.get("tiny", vocab_size=TOK.vocab_size, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16,
                  d_ff=64, max_len=128)


def test_answer_reward_table():
    gold = arith.parse_gold("18")
    assert reft.answer_reward("3*4=12. 12+6=18.\ntherefore: 18", gold, arith.extract_answer) == 1.0
    assert reft.answer_reward("\ntherefore: 18.009", gold, arith.extract_answer) == 1.0  # tolerance 1e-2
    assert reft.answer_reward("\ntherefore: 18.02", gold, arith.extract_answer) == 0.1
    assert reft.answer_reward("\ntherefore: 17", gold, arith.extract_answer, partial=0.0) == 0.0
    assert reft.answer_reward("3*4=12. 12+6=18.", gold, arith.extract_answer) == 0.0
    assert reft.answer_reward("ans=3*4+6", gold, arith.program_answer) == 1.0
    assert reft.answer_reward("import os\nans=18", gold, arith.program_answer) == 0.0


@pytest.mark.parametrize("kwargs,match", [
    ({"rollout_questions": 6, "minibatch": 4}, "not a multiple"), ({"gamma": 1.1}, "gamma"), ({"lam": -1}, "lam"),
    ({"clip": 0.0}, "clip"), ({"max_total_len": 100, "max_prompt_len": 100}, "no room"),
    ({"truncated_reward": "drop"}, "truncated_reward"), ({"reduction": "sum"}, "reduction")])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        reft.ReFTConfig(**kwargs)


def test_rollout_batches_visit_each_row_once_per_epoch_and_resume():
    cfg = reft.ReFTConfig(rollout_questions=6, minibatch=2, ppo_epochs=3)
    made = []

    def make_rollout(params, index):
        made.append((params, index))
        return {"row": np.arange(6) + 100 * index}, {"index": index}

    it = reft.RolloutBatches(make_rollout, "p0", cfg)
    first = [next(it)["row"] for _ in range(cfg.steps_per_rollout)]
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(np.concatenate(first[3 * epoch:3 * epoch + 3])), np.arange(6))
    it.set_policy("p1")
    batch = next(it)
    assert made == [("p0", 0), ("p1", 1)] and set(batch["row"]) <= set(range(100, 106))
    state = it.get_state()
    expected = [next(it)["row"] for _ in range(3)]
    resumed = reft.RolloutBatches(make_rollout, "p1", cfg)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.concatenate([next(resumed)["row"] for _ in range(3)]), np.concatenate(expected))


def _rollout_rows(cfg, problems, params, ac):
    prompts = [TASK.encode_prompt(p["question"]) for p in problems]
    responses = [TOK.encode(p["cot"][:5 + 3 * i], eos=i % 2 == 0) for i, p in enumerate(problems)]
    rows = reft.rollout.pack(prompts, responses, prompt_len=cfg.max_prompt_len, response_len=cfg.response_len,
                             pad_id=TOK.pad_id)
    score = np.array([1.0, 0.1, 0.0, 1.0], np.float32)
    return reft.make_scorer(ac, CFG, cfg)(params, params, rows, score)


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_first_ppo_epoch_has_ratio_one_and_minus_mean_whitened_advantage(reduction):
    cfg = reft.ReFTConfig(rollout_questions=4, minibatch=4, max_prompt_len=64, max_total_len=100, vf_coef=0.0,
                          reduction=reduction)
    ac = ActorCritic(CFG)
    params = ac.init(llama.init_params(CFG, jax.random.key(0)), jax.random.key(1))
    problems = arith.make_split(4, seed=0)
    rows, metrics = _rollout_rows(cfg, problems, params, ac)
    # Policy == reference: no KL, rewards only terminal.
    assert abs(float(metrics["kl_ref"])) < 1e-6
    loss, aux = reft.ppo_loss_fn(ac, cfg)(params, rows, jax.random.key(0))
    assert float(aux["ratio_mean"]) == 1.0 and float(aux["clip_frac"]) == 0.0
    adv, mask = np.asarray(rows["advantages"], np.float64), np.asarray(rows["mask"])
    if reduction == "sequence_mean":
        expected = -np.mean((adv * mask).sum(-1) / mask.sum(-1))
    else:
        expected = -(adv * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(loss), expected, atol=1e-5)
    # Advantages were whitened over the whole rollout, from GAE on the terminal-only rewards.
    rewards = ppo.kl_penalized_rewards(jnp.array([1.0, 0.1, 0.0, 1.0]), rows["old_logp"], rows["old_logp"], mask,
                                       kl_coef=0.05)
    raw, _ = ppo.gae(rewards, rows["old_values"], mask, gamma=1.0, lam=0.95)
    raw = np.asarray(raw)[mask > 0]
    np.testing.assert_allclose(adv[mask > 0], (raw - raw.mean()) / np.sqrt(raw.var() + 1e-8), atol=1e-4)


def test_tiny_reft_run_through_fit_and_evaluation(tmp_path):
    cfg = reft.ReFTConfig(rollout_questions=4, minibatch=2, ppo_epochs=2, rl_epochs=1, max_prompt_len=64,
                          max_total_len=112, learning_rate=1e-3, kl_coef=0.05)
    problems = arith.make_split(8, seed=0)
    warmup = llama.init_params(CFG, jax.random.key(0))
    result = reft.run(cfg, CFG, warmup, problems, TASK, tmp_path / "rl", devices=jax.devices()[:1])
    assert sorted(result.losses) == list(range(1, 9))  # 2 rollouts x 2 epochs x 2 mini-batches
    assert [r["step"] for r in result.history] == [4, 8]
    for record in result.history:
        for key in ("reward_mean", "accuracy", "kl_ref", "response_length", "clip_frac", "value_loss", "entropy"):
            assert np.isfinite(record[key]), key
        assert record["engine_logp_gap"] < 1e-4
        assert 0 <= record["accuracy"] <= record["reward_mean"] + 1e-6 <= 1.0 + 1e-6
    params = jax.device_get(result.state.params)
    policy = reft.policy_params(cfg, CFG, params)
    assert set(policy) == set(warmup)
    assert not np.allclose(policy["lm_head"], warmup["lm_head"])  # training moved the policy
    # The trained policy + value head as a model directory: reloaded, it gives the same values.
    ac = reft.actor_critic(cfg, CFG)
    model_dir.save_model(tmp_path / "value", *ac.value_model(params))
    value_cfg, loaded = model_dir.load_model(tmp_path / "value")
    assert value_cfg.value_head and float(loaded["value_bias"]) != 0.0  # the trained head, not a fresh one
    tokens = jnp.asarray(reft.rollout.pack([TASK.encode_prompt(p["question"]) for p in problems[:2]],
                                           [TOK.encode(p["cot"], eos=True) for p in problems[:2]], prompt_len=64,
                                           response_len=48, pad_id=TOK.pad_id)["tokens"])
    logits, values = llama.forward(value_cfg, loaded, tokens)
    trained_logits, trained_values = ac.apply(params, tokens)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(trained_values))
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(llama.forward(CFG, policy, tokens)))
    engine = reft_sft.make_engine(CFG, policy, max_len=112, max_seqs=8)
    scores = reft_sft.evaluate(engine, policy, problems[:4], TASK, max_tokens=48, k=3)
    assert set(scores) == {"greedy", "voting@3", "pass@3"} and scores["voting@3"] <= scores["pass@3"]


TIMING = ("step_time_s", "tokens_per_s", "mfu")


def _untimed(record):
    return {k: v for k, v in record.items() if k not in TIMING}


def test_interrupted_reft_run_resumes_bit_for_bit(tmp_path):
    cfg = reft.ReFTConfig(rollout_questions=4, minibatch=2, ppo_epochs=2, rl_epochs=1, max_prompt_len=64,
                          max_total_len=80, learning_rate=3e-3, kl_coef=0.05)
    warmup = llama.init_params(CFG, jax.random.key(0))
    problems = arith.make_split(8, seed=0)

    def run(name, until_step=None):
        return reft.run(cfg, CFG, warmup, problems, TASK, tmp_path / name, devices=jax.devices()[:1],
                        until_step=until_step)

    full = run("full")
    rollout_keys = ("reward_mean", "accuracy", "kl_ref", "value_mean", "response_length", "truncated")
    for stop in (3, 4):  # inside the first rollout (of 4 optimizer steps), and at its end
        first = run(f"stop{stop}", until_step=stop)
        assert sorted(first.losses) == list(range(1, stop + 1))
        rest = run(f"stop{stop}")  # resumes from the checkpoint at `stop`
        assert sorted(rest.losses) == list(range(stop + 1, 9))
        assert {**first.losses, **rest.losses} == full.losses
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(rest.state.params),
                     jax.device_get(full.state.params))
        assert _untimed(rest.history[-1]) == _untimed(full.history[-1])  # step 8: steps 5-8 and rollout 2
        if stop == 4:
            assert [_untimed(r) for r in first.history + rest.history] == [_untimed(r) for r in full.history]
        else:  # the resumed call's step-4 record averages step 4 alone, but reports the same rollout
            assert [rest.history[0][k] for k in rollout_keys] == [full.history[0][k] for k in rollout_keys]


def test_a_corrupt_saved_rollout_is_refused():
    cfg = reft.ReFTConfig(rollout_questions=2, minibatch=1, ppo_epochs=1)
    it = reft.RolloutBatches(lambda params, index: ({"row": np.arange(2.0)}, {"reward_mean": 0.5}), None, cfg)
    next(it)
    state = it.get_state()
    resumed = reft.RolloutBatches(None, None, cfg)
    resumed.set_state(state)
    assert resumed.metrics == {"reward_mean": 0.5} and next(resumed)["row"] == next(it)["row"]
    with pytest.raises(ValueError, match="rollout 0 saved with the position is corrupt"):
        resumed.set_state({**state, "rows_crc32": state["rows_crc32"] ^ 1})
    with pytest.raises(ValueError, match="saved without the rollout"):
        resumed.set_state({"rollout": 0, "position": 1})


def test_gold_answers_are_checked_up_front(tmp_path):
    problems = [{"question": "ann has 3 loose. how many?", "cot": "x", "answer": "three"}] * 4
    with pytest.raises(ValueError, match="gold answer 'three'"):
        reft.run(reft.ReFTConfig(rollout_questions=4, minibatch=4, max_prompt_len=64, max_total_len=112), CFG,
                 llama.init_params(CFG, jax.random.key(0)), problems, TASK, tmp_path)
    with pytest.raises(ValueError, match="gold answer 'three'"):
        reft_sft.sft_rows(problems, TASK, length=112)


def test_run_and_sft_reject_inputs_that_do_not_fit(tmp_path):
    problems = arith.make_split(8, seed=0)
    warmup = llama.init_params(CFG, jax.random.key(0))
    cfg = reft.ReFTConfig(rollout_questions=4, minibatch=4, max_prompt_len=64, max_total_len=112)
    with pytest.raises(ValueError, match="3 problems, fewer than rollout_questions=4"):
        reft.run(cfg, CFG, warmup, problems[:3], TASK, tmp_path)
    with pytest.raises(ValueError, match=r"problems \[5, 7\] have prompts longer than max_prompt_len=52"):
        reft.run(reft.ReFTConfig(rollout_questions=4, minibatch=4, max_prompt_len=52, max_total_len=100), CFG,
                 warmup, problems, TASK, tmp_path)
    with pytest.raises(ValueError, match="max_total_len=200 exceeds the model's max_len 128"):
        reft.run(reft.ReFTConfig(rollout_questions=4, minibatch=4, max_prompt_len=64, max_total_len=200), CFG,
                 warmup, problems, TASK, tmp_path)
    with pytest.raises(ValueError, match=r"warmup_epochs must be in \[1, epochs=2\], got 3"):
        reft_sft.sft(CFG, None, problems, problems, TASK, tmp_path, epochs=2, batch_size=4, warmup_epochs=3,
                     length=112, max_tokens=48)
    with pytest.raises(ValueError, match="batch_size 16 exceeds the 8 training problems"):
        reft_sft.sft(CFG, None, problems, problems, TASK, tmp_path, epochs=2, batch_size=16, length=112,
                     max_tokens=48)
    with pytest.raises(ValueError, match="problem 0: .* tokens exceed length 60"):
        reft_sft.sft_rows(problems, TASK, length=60)


def test_sft_stage_keeps_the_warmup_epoch_and_the_best_validation_epoch(tmp_path):
    problems = arith.make_split(24, seed=0)
    result = reft_sft.sft(CFG, None, problems[:16], problems[16:], TASK, tmp_path, epochs=3, batch_size=8,
                          learning_rate=3e-3, warmup_epochs=1, length=112, max_tokens=48, devices=jax.devices()[:1])
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    accs = [r["val_greedy"] for r in result.history]
    assert result.best_epoch == 1 + int(np.argmax(accs))
    engine = reft_sft.make_engine(CFG, None, max_len=112, max_seqs=8)
    best = reft_sft.evaluate(engine, result.best_params, problems[16:], TASK, max_tokens=48)["greedy"]
    assert best == max(accs)
    warmup_acc = reft_sft.evaluate(engine, result.warmup_params, problems[16:], TASK, max_tokens=48)["greedy"]
    assert warmup_acc == accs[0]  # the warm-up is the epoch-1 model
    init = llama.init_params(CFG, jax.random.key(0))
    assert not np.allclose(result.warmup_params["lm_head"], init["lm_head"])
    same = np.allclose(result.warmup_params["lm_head"], result.best_params["lm_head"])
    assert same == (result.best_epoch == 1)
