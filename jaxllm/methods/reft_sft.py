"""ReFT's SFT stage and its evaluation (arXiv 2401.08967; lqtrung1998/mwp_ReFT `train_sft_model.py`).

One SFT run on (question, chain of thought) rows gives both starting points of the paper: the
*warm-up* (the checkpoint after `warmup_epochs` epochs, from which ReFT starts) and *SFT-best* (the
epoch with the best greedy validation accuracy, the SFT baseline). The paper's code selects on
the test set; here selection is on a validation split and test is reported once. The objective is
`jaxllm.objectives.sft` (masked token-mean NLL over the response), run by `jaxllm.train.finetune`
(epoch batcher + the one loop). The core optimizer's warm-up + cosine schedule stands in for the
paper's warm-up + linear decay.

`evaluate` decodes through the one sampler: greedy accuracy, and with `k` > 0 samples at T = 1
voting@k (majority over the extracted answers) and pass@k, all read by the task's one extractor.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
from collections.abc import Sequence

import numpy as np

from jaxllm.methods.reft import ReasoningTask
from jaxllm.model.llama import LlamaConfig, forward
from jaxllm.objectives.sft import make_sft_loss
from jaxllm.serve.engine import Engine
from jaxllm.serve.sampling import SamplingParams
from jaxllm.train import hooks as hooks_lib
from jaxllm.train.finetune import finetune
from jaxllm.train.loop import LoopConfig
from jaxllm.train.optim import OptimizerConfig


def sft_rows(problems: Sequence[dict], task: ReasoningTask, *, length: int) -> dict[str, np.ndarray]:
    """Rows `BOS prompt cot EOS` right-padded to `length`: {"tokens", "loss_mask"} with the mask on
    the chain-of-thought and EOS tokens (the scored targets). ValueError naming a row that does not
    fit or whose gold answer does not parse."""
    tokens = np.full((len(problems), length), task.tokenizer.pad_id, np.int32)
    mask = np.zeros((len(problems), length), np.float32)
    for i, p in enumerate(problems):
        task.parse_gold(p["answer"])
        prompt = task.encode_prompt(p["question"])
        target = task.tokenizer.encode(p["cot"], eos=True)
        if len(prompt) + len(target) > length:
            raise ValueError(f"problem {i}: {len(prompt) + len(target)} tokens exceed length {length}")
        tokens[i, :len(prompt) + len(target)] = prompt + target
        mask[i, len(prompt):len(prompt) + len(target)] = 1.0
    return {"tokens": tokens, "loss_mask": mask}


def make_engine(model_cfg: LlamaConfig, params, *, max_len: int, max_seqs: int = 64) -> Engine:
    return Engine(model_cfg, params, token_budget=256, block_size=16, max_seqs=max_seqs,
                  num_blocks=max_seqs * math.ceil(max_len / 16) + 1, max_model_len=max_len)


def evaluate(engine: Engine, params, problems: Sequence[dict], task: ReasoningTask, *, max_tokens: int,
             k: int = 0, seed: int = 0) -> dict[str, float]:
    """{"greedy"} accuracy, plus {"voting@k", "pass@k"} over `k` samples at T = 1 when k > 0."""
    engine.set_params(params)
    prompts = [task.encode_prompt(p["question"]) for p in problems]
    golds = [task.parse_gold(p["answer"]) for p in problems]
    eos = task.tokenizer.eos_id

    def answers(sampling):
        return [task.extract(task.tokenizer.decode(c.tokens)) for c in engine.generate(prompts, sampling)]

    def right(pred, gold):
        return pred is not None and bool(task.compare(pred, gold))

    greedy = answers(SamplingParams(max_tokens=max_tokens, stop_tokens=(eos,)))
    out = {"greedy": float(np.mean([right(a, g) for a, g in zip(greedy, golds)]))}
    if k:
        sampled = answers(SamplingParams(max_tokens=max_tokens, temperature=1.0, stop_tokens=(eos,), seed=seed, n=k))
        votes, passes = [], []
        for i, gold in enumerate(golds):
            preds = [a for a in sampled[i * k:(i + 1) * k] if a is not None]
            top = collections.Counter(preds).most_common(1)
            votes.append(bool(top) and right(top[0][0], gold))
            passes.append(any(right(a, gold) for a in preds))
        out[f"voting@{k}"], out[f"pass@{k}"] = float(np.mean(votes)), float(np.mean(passes))
    return out


@dataclasses.dataclass
class SFTResult:
    """Warm-up params (after `warmup_epochs`), SFT-best params (best validation greedy accuracy),
    the best epoch, and the per-epoch records (loss and validation accuracy)."""
    warmup_params: dict
    best_params: dict
    best_epoch: int
    history: list[dict]


def sft(model_cfg: LlamaConfig, params, train: Sequence[dict], val: Sequence[dict], task: ReasoningTask,
        workdir: str | os.PathLike, *, epochs: int, batch_size: int, learning_rate: float = 1e-5,
        warmup_epochs: int = 2, length: int, max_tokens: int, seed: int = 0, mesh: str = "fsdp:-1",
        devices=None, verbose: bool = False) -> SFTResult:
    """SFT from `params` (None: random init from `seed`) for `epochs` epochs, validating (greedy)
    after every epoch."""
    if not 1 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [1, epochs={epochs}], got {warmup_epochs}")
    rows = sft_rows(train, task, length=length)
    per_epoch = len(train) // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(train)} training problems")
    steps = epochs * per_epoch
    optimizer = OptimizerConfig(learning_rate=learning_rate, warmup_steps=steps // 10, min_lr_ratio=0.0, b2=0.999,
                                weight_decay=0.0)
    engine = make_engine(model_cfg, None, max_len=length)
    kept = {"warmup": None, "best": None, "best_acc": -1.0, "best_epoch": 0}

    def epoch_hook(step, state, record):
        if step % per_epoch:
            return None
        epoch, params = step // per_epoch, hooks_lib.host_params(state.params)
        acc = evaluate(engine, params, val, task, max_tokens=max_tokens)["greedy"]
        if epoch == warmup_epochs:
            kept["warmup"] = params
        if acc > kept["best_acc"]:
            kept.update(best=params, best_acc=acc, best_epoch=epoch)
        return {"epoch": epoch, "val_greedy": acc}

    result = finetune(make_sft_loss(functools.partial(forward, model_cfg)), model_cfg, rows, optimizer, batch_size,
                      workdir, LoopConfig(steps=steps, seed=seed, mesh=mesh, log_every=per_epoch,
                                          checkpoint_every=per_epoch, verbose=verbose),
                      params=params, hooks=(epoch_hook,), devices=devices)
    if kept["warmup"] is None:
        raise ValueError(f"workdir {workdir} resumed past the warm-up epoch {warmup_epochs}; use a fresh workdir")
    return SFTResult(kept["warmup"], kept["best"], kept["best_epoch"], result.history)
