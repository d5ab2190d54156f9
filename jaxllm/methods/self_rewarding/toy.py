"""Self-Rewarding on the toy instruction task (`jaxllm.data.tasks.instructions`) from a config
mapping: what `launch/self_rewarding.py` and `experiments/self_rewarding/` share.

`config_dict()` lists every field with its default (absl `--config.x=...` overrides work, misspelt
ones fail); `build(config)` turns it into the model config, the `SelfRewardingConfig`, the SFT
examples (IFT ∪ EFT, or IFT only), the fixed prompt generator and the held-out sets.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from jaxllm import configs
from jaxllm.data.tasks import instructions as ins
from jaxllm.methods.self_rewarding import judging, loop, training
from jaxllm.model import llama
from jaxllm.train import optim


def config_dict(overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """Every field of a toy self-rewarding run with its default, then `overrides` as flattened
    names ({"loop.iterations": 1})."""
    d = {
        "model": {"preset": "tiny", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 192,
                  "max_len": 128},
        "task": {"ift": 1000, "eft": 1000, "eft_per_prompt": 2, "valid": 50, "test": 200, "judge_sets": 100,
                 "use_eft": True},
        "judge": {"template": "toy", "num_samples": 3, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 20},
        "loop": {"num_candidates": 4, "gen_temperature": 0.7, "gen_top_p": 0.9, "max_new_tokens": 16,
                 "iterations": 2, "prompts_per_iteration": 128, "beta": 0.1},
        "sft": {"steps": 1500, "batch_size": 32, "seq_len": 128, "learning_rate": 3e-3},
        "dpo": {"steps": 40, "batch_size": 16, "seq_len": 128, "learning_rate": 1e-4},
        "mesh": "fsdp:-1",
        "seed": 0,
    }
    config = ml_collections.ConfigDict(d)
    config.lock()  # a misspelt override fails
    config.update_from_flattened_dict(dict(overrides or {}))
    config.unlock()
    return config


def _stage(section: Mapping[str, Any], mesh: str, warmup: int) -> training.StageConfig:
    opt = optim.OptimizerConfig(learning_rate=section["learning_rate"], warmup_steps=warmup, min_lr_ratio=0.1,
                                weight_decay=0.0)
    return training.StageConfig(steps=section["steps"], batch_size=section["batch_size"], seq_len=section["seq_len"],
                                optimizer=opt, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class ToySetup:
    model: llama.LlamaConfig
    cfg: loop.SelfRewardingConfig
    tokenizer: ins.CharTokenizer
    task: ins.InstructionTask
    sft_examples: list
    prompt_source: ins.PromptGenerator
    splits: dict
    judge_sets: list


def build(config: Mapping[str, Any]) -> ToySetup:
    """The toy run `config` (shaped like `config_dict()`) describes."""
    config = dict(config)
    tokenizer, task = ins.CharTokenizer(), ins.InstructionTask()
    model_cfg = configs.model_from_dict({**config["model"], "vocab_size": tokenizer.vocab_size})
    t, j, lp = config["task"], config["judge"], config["loop"]
    judge = judging.JudgeConfig(template=judging.load_template(j["template"]), num_samples=j["num_samples"],
                                temperature=j["temperature"], top_p=j["top_p"], max_new_tokens=j["max_new_tokens"])
    cfg = loop.SelfRewardingConfig(
        judge=judge, num_candidates=lp["num_candidates"], gen_temperature=lp["gen_temperature"],
        gen_top_p=lp["gen_top_p"], max_new_tokens=lp["max_new_tokens"], iterations=lp["iterations"],
        prompts_per_iteration=lp["prompts_per_iteration"],
        dpo=loop.PreferenceConfig(kind="dpo", beta=lp["beta"], nll_weight=0.0),
        sft=_stage(config["sft"], config["mesh"], warmup=min(50, config["sft"]["steps"] // 10)),
        dpo_stage=_stage(config["dpo"], config["mesh"], warmup=0), seed=config["seed"])
    seed = config["seed"]
    splits = ins.split_prompts(task, {k: t[k] for k in ("ift", "eft", "valid", "test")}, seed)
    sft = ins.ift_items(task, splits["ift"])
    if t["use_eft"]:
        eft = ins.eft_items(task, splits["eft"], np.random.default_rng([seed, 3]), per_prompt=t["eft_per_prompt"])
        sft += [(judging.render(judge.template, p, r), target) for p, r, target in eft]
    held_out = task.prompts(t["judge_sets"], np.random.default_rng([seed, 4]),
                            exclude=frozenset(p for v in splits.values() for p in v))
    judge_sets = ins.judge_sets(task, held_out, np.random.default_rng([seed, 5]))
    used = frozenset(p for v in splits.values() for p in v) | frozenset(held_out)
    return ToySetup(model_cfg, cfg, tokenizer, task, sft, ins.PromptGenerator(task, seed, used), splits, judge_sets)
