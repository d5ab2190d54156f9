"""ReFT: reinforced fine-tuning for reasoning (arXiv 2401.08967; lqtrung1998/mwp_ReFT `train_rl_reft.py`).

After an SFT warm-up (`jaxllm.methods.reft_sft`), PPO runs on the same training questions with
only the gold final answer: per rollout batch, one response per question is sampled through the
one sampler (`jaxllm.methods.rollout`, T = 1), rewarded 1 / `partial_reward` / 0 by
`answer_reward` (correct / an answer extracted but wrong / none), KL-penalised against the frozen
warm-up model per token, turned into GAE advantages whitened over the whole rollout batch, and
optimised for `ppo_epochs` passes over mini-batches with the clipped policy and value losses
(`jaxllm.objectives.ppo`) through the one loop `jaxllm.train.fit`.

The PPO loop is one `fit` call: `RolloutBatches` is its batch iterator and produces a new rollout
whenever the previous one is used up; a hook at every rollout boundary (`log_every` = optimizer
steps per rollout) hands it the current params and adds the rollout's metrics to the record.
Checkpoints fall on rollout boundaries; a SIGTERM or `until_step` checkpoint inside a rollout also
saves the rollout itself (its rows and metrics, in the iterator position), so a resumed run is
exact either way: it equals the uninterrupted run bit for bit.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import math
import os
import pathlib
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.methods import rollout
from jaxllm.model.llama import Llama, LlamaConfig
from jaxllm.model.value_head import VALUE_KEYS, ActorCritic
from jaxllm.objectives import ppo
from jaxllm.serve.engine import Engine
from jaxllm.train import checkpoint, hooks as hooks_lib
from jaxllm.train.loop import FitResult, LoopConfig, fit


@dataclasses.dataclass(frozen=True)
class ReFTConfig:
    """PPO settings of ReFT (spec defaults: the paper's GSM8K N-CoT run; kl_coef 0.01 for P-CoT).

    `rollout_questions` questions are sampled per rollout, split into mini-batches of `minibatch`
    rows, each visited `ppo_epochs` times; `rl_epochs` passes over the training questions in all.
    Lengths are tokens: prompts are left-padded to `max_prompt_len`, responses get the rest of
    `max_total_len`. `truncated_reward`: "score" rewards a sample cut at the length limit like any
    other (the paper's code), "zero" gives it 0. `reduction`: see `jaxllm.objectives.ppo`.
    """

    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 5.0
    ppo_epochs: int = 2
    rollout_questions: int = 32
    minibatch: int = 32
    learning_rate: float = 3e-7
    grad_clip: float = 1.0
    temperature: float = 1.0
    max_prompt_len: int = 300
    max_total_len: int = 700
    partial_reward: float = 0.1
    shared_value_trunk: bool = True
    truncated_reward: Literal["score", "zero"] = "score"
    reduction: str = "sequence_mean"
    rl_epochs: int = 300
    seed: int = 0

    def __post_init__(self):
        for name in ("ppo_epochs", "rollout_questions", "minibatch", "rl_epochs", "max_prompt_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ReFTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.rollout_questions % self.minibatch:
            raise ValueError(f"rollout_questions={self.rollout_questions} is not a multiple of "
                             f"minibatch={self.minibatch}")
        if self.max_total_len <= self.max_prompt_len:
            raise ValueError(f"max_total_len={self.max_total_len} leaves no room for a response after "
                             f"max_prompt_len={self.max_prompt_len}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"ReFTConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("clip", "value_clip", "temperature", "learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ReFTConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.kl_coef < 0 or self.vf_coef < 0:
            raise ValueError(f"kl_coef and vf_coef must be >= 0, got {self.kl_coef}, {self.vf_coef}")
        if self.truncated_reward not in ("score", "zero"):
            raise ValueError(f"truncated_reward must be 'score' or 'zero', got {self.truncated_reward!r}")
        if self.reduction not in ppo.REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduction!r}; known: {ppo.REDUCTIONS}")

    @property
    def response_len(self) -> int:
        return self.max_total_len - self.max_prompt_len

    @property
    def steps_per_rollout(self) -> int:
        return self.ppo_epochs * (self.rollout_questions // self.minibatch)


def numeric_match(pred, gold, tol: float = 1e-2) -> bool:
    """|pred − gold| ≤ tol (the paper's numeric comparison)."""
    return abs(float(pred) - float(gold)) <= tol


def answer_reward(text: str, gold, extract: Callable[[str], Any], compare: Callable = numeric_match, *,
                  partial: float = 0.1) -> float:
    """1 if the answer `extract` reads from `text` matches `gold`, `partial` if one was read but is
    wrong, 0 if none (parse failure, refused program). Use the evaluation's extractor."""
    pred = extract(text)
    if pred is None:
        return 0.0
    return 1.0 if compare(pred, gold) else float(partial)


@dataclasses.dataclass(frozen=True)
class ReasoningTask:
    """What ReFT needs of a task: a tokenizer (`encode(text, bos, eos)`, `decode(ids)`, `eos_id`,
    `pad_id`), the prompt of a question, the one answer extractor, the comparison, and the parser
    that checks gold answers up front (ValueError on an unparseable one)."""

    tokenizer: Any
    prompt: Callable[[str], str]
    extract: Callable[[str], Any]
    parse_gold: Callable[[Any], Any]
    compare: Callable = numeric_match

    def encode_prompt(self, question: str) -> list[int]:
        return self.tokenizer.encode(self.prompt(question), bos=True)


def ppo_loss_fn(ac: ActorCritic, cfg: ReFTConfig):
    """`loss_fn(params, batch, rng)` for `fit`: clipped policy loss + vf_coef × clipped value loss
    on a mini-batch of rollout rows. A scalar loss: with `grad_accum` micro-batches it is exact
    for `reduction="sequence_mean"` (equal micro-batches, every row non-empty)."""

    def loss_fn(params, batch, rng):
        del rng  # no dropout: the first epoch's ratio is exactly 1
        logits, values = ac.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
        logp, values_BT, entropy = rollout.response_view(logits, values, batch["tokens"], cfg.max_prompt_len,
                                                         temperature=cfg.temperature)
        mask = batch["mask"]
        pg, pg_aux = ppo.policy_loss(logp, batch["old_logp"], batch["advantages"], mask, clip=cfg.clip,
                                     reduction=cfg.reduction)
        vl, v_aux = ppo.value_loss(values_BT, batch["old_values"], batch["returns"], mask, clip=cfg.value_clip,
                                   reduction=cfg.reduction)
        aux = {"policy_loss": pg, "value_loss": vl, "entropy": ppo.masked_mean(entropy, mask), **pg_aux, **v_aux}
        return pg + cfg.vf_coef * vl, jax.lax.stop_gradient(aux)

    return loss_fn


def make_scorer(ac: ActorCritic, ref_cfg: LlamaConfig, cfg: ReFTConfig):
    """Jitted `(params, ref_params, rows, score_B) -> rollout rows` adding old log-probs and values,
    KL-penalised rewards, GAE and advantages whitened over the whole rollout, plus metrics."""

    def score(params, ref_params, rows, score_B):
        P, mask = cfg.max_prompt_len, rows["mask"]
        logits, values = ac.apply(params, rows["tokens"], rows["positions"], rows["segment_ids"])
        logp, old_values, _ = rollout.response_view(logits, values, rows["tokens"], P, temperature=cfg.temperature)
        ref_logits = Llama(ref_cfg).apply({"params": ref_params}, rows["tokens"], rows["positions"],
                                          rows["segment_ids"])
        ref_logp, _, _ = rollout.response_view(ref_logits, None, rows["tokens"], P, temperature=cfg.temperature)
        rewards = ppo.kl_penalized_rewards(score_B, logp, ref_logp, mask, kl_coef=cfg.kl_coef)
        advantages, returns = ppo.gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
        out = {**rows, "old_logp": logp, "old_values": old_values, "returns": returns,
               "advantages": ppo.masked_whiten(advantages, mask)}
        metrics = {"kl_ref": jnp.mean(jnp.sum((logp - ref_logp) * mask, axis=-1)),
                   "value_mean": ppo.masked_mean(old_values, mask)}
        return out, metrics

    return jax.jit(score)


class RolloutBatches(grain.DatasetIterator):
    """`fit`'s batch iterator for PPO: mini-batches of rollouts made on demand by
    `make_rollout(params, index) -> (rows, metrics)` from the params last handed over with
    `set_policy`; each rollout is visited `ppo_epochs` times, in a fresh order each epoch.
    Position = (rollout index, mini-batch index), saved with the checkpoint; inside a rollout the
    position also carries the rollout (rows as a checksummed npz, metrics), which a resumed
    run cannot redraw: the params that sampled it are gone."""

    def __init__(self, make_rollout: Callable, params, cfg: ReFTConfig):
        super().__init__()
        self.make_rollout, self.params, self.cfg = make_rollout, params, cfg
        self.index, self.position = 0, 0
        self._rows: dict | None = None
        self.metrics: dict = {}

    def set_policy(self, params) -> None:
        self.params = params

    def __next__(self) -> dict[str, np.ndarray]:
        cfg = self.cfg
        if self._rows is None:
            self._rows, self.metrics = self.make_rollout(self.params, self.index)
        per_epoch = cfg.rollout_questions // cfg.minibatch
        epoch, j = divmod(self.position, per_epoch)
        order = np.random.default_rng([cfg.seed, self.index, epoch]).permutation(cfg.rollout_questions)
        picked = order[j * cfg.minibatch:(j + 1) * cfg.minibatch]
        batch = {k: v[picked] for k, v in self._rows.items()}
        self.position += 1
        if self.position == cfg.steps_per_rollout:
            self.index, self.position, self._rows = self.index + 1, 0, None
        return batch

    def get_state(self) -> dict:
        state = {"rollout": self.index, "position": self.position}
        if self.position:
            buffer = io.BytesIO()
            np.savez(buffer, **self._rows)
            raw = buffer.getvalue()
            state.update(rows=base64.b64encode(raw).decode("ascii"), rows_crc32=zlib.crc32(raw),
                         metrics=self.metrics)
        return state

    def set_state(self, state) -> None:
        index, position, rows, metrics = int(state["rollout"]), int(state["position"]), None, {}
        if position:
            if "rows" not in state:
                raise ValueError(f"position {position} inside rollout {index} was saved without the rollout")
            raw = base64.b64decode(state["rows"])
            if zlib.crc32(raw) != state["rows_crc32"]:
                raise ValueError(f"the rollout {index} saved with the position is corrupt (crc32 mismatch)")
            with np.load(io.BytesIO(raw)) as saved:
                rows = {k: saved[k] for k in saved.files}
            metrics = state["metrics"]
        self.index, self.position, self._rows, self.metrics = index, position, rows, metrics


def run(cfg: ReFTConfig, model_cfg: LlamaConfig, warmup_params, problems: Sequence[dict], task: ReasoningTask,
        workdir: str | os.PathLike, *, mesh: str = "fsdp:-1", devices=None, hooks=(), checkpoint_every: int = 0,
        until_step: int | None = None, verbose: bool = False) -> FitResult:
    """PPO from `warmup_params` (also the frozen reference π_0) on `problems` ({"question",
    "answer"}), in `workdir` (resumed, exactly, if it has a checkpoint; `until_step` stops this
    call after that optimizer step, as `fit`'s does, and a later call continues). Returns `fit`'s
    result: `result.state.params` are `actor_critic(cfg, model_cfg)`'s, the policy is
    `policy_params(cfg, model_cfg, ...)` of them and the value-head model to save
    `actor_critic(cfg, model_cfg).value_model(...)`; every record carries the rollout metrics
    (reward_mean, accuracy, kl_ref, response_length, truncated) next to the step metrics (loss,
    policy_loss, value_loss, clip_frac, entropy, ...)."""
    golds = [task.parse_gold(p["answer"]) for p in problems]
    if len(problems) < cfg.rollout_questions:
        raise ValueError(f"{len(problems)} problems, fewer than rollout_questions={cfg.rollout_questions}")
    prompts = [task.encode_prompt(p["question"]) for p in problems]
    too_long = [i for i, p in enumerate(prompts) if len(p) > cfg.max_prompt_len]
    if too_long:
        raise ValueError(f"problems {too_long[:5]} have prompts longer than max_prompt_len={cfg.max_prompt_len}")
    if cfg.max_total_len > model_cfg.max_len:
        raise ValueError(f"max_total_len={cfg.max_total_len} exceeds the model's max_len {model_cfg.max_len}")
    ac = actor_critic(cfg, model_cfg)
    plain_cfg = ac.cfg
    ref_params = jax.device_get(warmup_params)
    params = ac.init(ref_params, jax.random.key(cfg.seed))
    engine = Engine(ac.policy_cfg, ac.policy_params(params), token_budget=256, block_size=16,
                    num_blocks=cfg.rollout_questions * math.ceil(cfg.max_total_len / 16) + 1,
                    max_seqs=cfg.rollout_questions, max_model_len=cfg.max_total_len)
    scorer = make_scorer(ac, plain_cfg, cfg)
    per_epoch = len(problems) // cfg.rollout_questions

    def make_rollout(params, index):
        epoch, j = divmod(index, per_epoch)
        picked = np.random.default_rng([cfg.seed, epoch]).permutation(len(problems))[
            j * cfg.rollout_questions:(j + 1) * cfg.rollout_questions]
        batch_prompts = [prompts[i] for i in picked]
        completions = rollout.sample(engine, ac.policy_params(params), batch_prompts, max_tokens=cfg.response_len,
                                     stop_token=task.tokenizer.eos_id, temperature=cfg.temperature,
                                     seed=(cfg.seed * 1_000_003 + index) % 2**32)
        texts = [task.tokenizer.decode(c.tokens) for c in completions]
        score = np.array([answer_reward(t, golds[i], task.extract, task.compare, partial=cfg.partial_reward)
                          for t, i in zip(texts, picked)], np.float32)
        truncated = np.array([c.finish_reason == "length" for c in completions])
        correct = np.array([task.extract(t) is not None and task.compare(task.extract(t), golds[i])
                            for t, i in zip(texts, picked)])
        if cfg.truncated_reward == "zero":
            score = np.where(truncated, 0.0, score).astype(np.float32)
        rows = rollout.pack(batch_prompts, [c.tokens for c in completions], prompt_len=cfg.max_prompt_len,
                            response_len=cfg.response_len, pad_id=task.tokenizer.pad_id)
        rows, device_metrics = scorer(params, ref_params, rows, score)
        rows = jax.device_get(rows)
        logp_gap = np.abs((rows["old_logp"] - rollout.engine_logprobs(completions, cfg.response_len)) * rows["mask"])
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        metrics.update(reward_mean=float(score.mean()), accuracy=float(correct.mean()),
                       response_length=float(rows["mask"].sum(-1).mean()), truncated=float(truncated.mean()),
                       engine_logp_gap=float(logp_gap.max()))
        return rows, metrics

    workdir = pathlib.Path(workdir)
    if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        params = checkpoint.restore_params(workdir / "checkpoints", jax.eval_shape(lambda: params))
    batches = RolloutBatches(make_rollout, jax.device_get(params), cfg)

    def policy_hook(step, state, record):
        del record
        if step % cfg.steps_per_rollout:
            return None
        rollout_metrics = batches.metrics
        batches.set_policy(hooks_lib.host_params(state.params))
        return rollout_metrics

    steps = cfg.rl_epochs * per_epoch * cfg.steps_per_rollout
    every = cfg.steps_per_rollout * max(1, checkpoint_every // cfg.steps_per_rollout)
    loop_cfg = LoopConfig(steps=steps, seed=cfg.seed, mesh=mesh, log_every=cfg.steps_per_rollout,
                          checkpoint_every=every, verbose=verbose)
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                            optax.adamw(cfg.learning_rate, eps=1e-8, weight_decay=0.0))
    return fit(ppo_loss_fn(ac, cfg), optimizer, batches, ac.box(params), workdir, loop_cfg,
               hooks=(policy_hook, *hooks), devices=devices, until_step=until_step)


def actor_critic(cfg: ReFTConfig, model_cfg: LlamaConfig) -> ActorCritic:
    """The policy/value model `run` trains (its params: `result.state.params`)."""
    return ActorCritic(dataclasses.replace(model_cfg, value_head=False), shared_trunk=cfg.shared_value_trunk)


def policy_params(cfg: ReFTConfig, model_cfg: LlamaConfig, params):
    """The policy (no value head) out of `run`'s trained actor-critic params."""
    p = actor_critic(cfg, model_cfg).policy_params(params)
    return {k: v for k, v in p.items() if k not in VALUE_KEYS}
