"""The two trainings of Self-Rewarding (arXiv 2401.10020 §2.2–2.3) as calls of the preference
trainer (`jaxllm.methods.preference.fit_preference`, one loop): joint SFT on IFT ∪ EFT (M0 → M1)
and DPO on AI-feedback pairs (M_t → M_{t+1}).

Rows are chat-templated token ids (`tokenizer.apply_chat`): SFT rows (`tokens`, `loss_mask`) are a
user turn and the assistant's target, scored on the target and its EOS (`jaxllm.objectives.sft`);
pair rows share the prompt (user turn + assistant header) and score each response and its EOS. DPO
is `jaxllm.objectives.preference` with summed, shifted, masked response log-probs and the frozen
reference's log-probs computed once, before the first step, from the params the call starts from
(stored in the stage's workdir, so a resumed stage reuses them).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from jaxllm.data.preference import collate_pairs
from jaxllm.methods import preference
from jaxllm.model import llama
from jaxllm.objectives.preference import PreferenceConfig
from jaxllm.train import hooks, optim
from jaxllm.train.loop import FitResult


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One training stage: `steps` of `batch_size` rows (fewer when there are fewer rows; epochs
    reshuffled), `optimizer` scheduled over those steps, rows padded to `seq_len` tokens, on `mesh`
    (a `jaxllm.parallel.mesh` spec)."""

    steps: int = 100
    batch_size: int = 16
    seq_len: int = 128
    optimizer: optim.OptimizerConfig = optim.OptimizerConfig(learning_rate=1e-6, warmup_steps=0, min_lr_ratio=0.1,
                                                             weight_decay=0.0)
    mesh: str = "fsdp:-1"
    log_every: int = 10
    checkpoint_every: int = 100

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The user turn `prompt` and the assistant header: what the model continues."""
    return tokenizer.apply_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)[0]


def _pad(rows: Sequence[Sequence[int]], length: int, pad_id: int, what: str) -> np.ndarray:
    out = np.full((len(rows), length), pad_id, np.int32)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"{what} {i} has {len(row)} tokens, more than seq_len {length}")
        out[i, :len(row)] = row
    return out


def sft_arrays(tokenizer, examples: Sequence[tuple[str, str]], seq_len: int) -> dict[str, np.ndarray]:
    """(user text, assistant target) examples → SFT rows {"tokens", "loss_mask"} [N, seq_len]."""
    if not examples:
        raise ValueError("no SFT examples")
    chats = [tokenizer.apply_chat([{"role": "user", "content": p}, {"role": "assistant", "content": t}])
             for p, t in examples]
    return {"tokens": _pad([ids for ids, _ in chats], seq_len, tokenizer.pad_id, "SFT example"),
            "loss_mask": _pad([mask for _, mask in chats], seq_len, 0, "SFT example")}


def pair_arrays(tokenizer, triplets: Sequence[tuple[str, str, str]], seq_len: int) -> dict[str, np.ndarray]:
    """(prompt, chosen, rejected) texts → padded pair arrays [N, seq_len] (`collate_pairs` keys)."""
    if not triplets:
        raise ValueError("no preference pairs")
    rows = []
    for prompt, chosen, rejected in triplets:
        head = prompt_ids(tokenizer, prompt)
        row = {}
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            body = tokenizer.encode(text) + [tokenizer.eos_id]
            row[f"{side}_tokens"] = np.asarray(head + body, np.int32)
            row[f"{side}_mask"] = np.asarray([0] * len(head) + [1] * len(body), np.int32)
        rows.append(row)
    return collate_pairs(rows, pad_id=tokenizer.pad_id, length=seq_len)


class Preempted(RuntimeError):
    """SIGTERM stopped a training stage; its checkpoint is saved and a rerun continues it. Raised so
    that a half-trained model is never saved as the stage's result."""


def _fit(model_cfg, objective, params, rows, stage: StageConfig, seed: int, workdir, devices) -> tuple[dict, FitResult]:
    """`stage` as a `PreferenceTrainConfig` (`objective` None: SFT) run from `params` on `rows`."""
    num_rows = len(rows["tokens" if objective is None else "chosen_tokens"])
    cfg = preference.PreferenceTrainConfig(
        model=model_cfg, objective=objective, optimizer=stage.optimizer, steps=stage.steps,
        batch_size=min(stage.batch_size, num_rows), checkpoint_every=stage.checkpoint_every, keep_checkpoints=1,
        log_every=stage.log_every, seed=seed, mesh=stage.mesh)
    result = preference.fit_preference(cfg, rows, workdir, params=params, devices=devices, verbose=False)
    if result.preempted:
        raise Preempted(f"SIGTERM at step {int(result.state.step)} of {stage.steps}: checkpoint saved in {workdir}; "
                        "run again to continue")
    return hooks.host_params(result.state.params), result


def train_sft(model_cfg: llama.LlamaConfig, params, rows: dict[str, np.ndarray], stage: StageConfig, *,
              seed: int, workdir: str | os.PathLike, devices=None) -> tuple[dict, FitResult]:
    """SFT of `params` on `sft_arrays` rows; returns (host params, FitResult). Raises `Preempted`
    when SIGTERM stopped it (as `train_dpo`)."""
    return _fit(model_cfg, None, params, rows, stage, seed, workdir, devices)


def train_dpo(model_cfg: llama.LlamaConfig, params, rows: dict[str, np.ndarray], stage: StageConfig,
              objective: PreferenceConfig, *, seed: int, workdir: str | os.PathLike,
              devices=None) -> tuple[dict, dict[str, np.ndarray], FitResult]:
    """DPO from `params` with π_ref = `params` (its summed response log-probs are computed once,
    before training, and travel in the batches). Returns (host params, the rows with their reference
    log-probs, FitResult)."""
    if objective.kind != "dpo":
        raise ValueError(f"train_dpo needs a PreferenceConfig of kind 'dpo', got {objective.kind!r}")
    new_params, result = _fit(model_cfg, objective, params, rows, stage, seed, workdir, devices)
    stored = np.load(pathlib.Path(workdir) / preference.REFERENCE_FILE)
    return new_params, {**rows, "ref_chosen_logps": stored["ref_chosen_logps"],
                        "ref_rejected_logps": stored["ref_rejected_logps"]}, result
