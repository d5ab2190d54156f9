"""Self-Rewarding Language Models (arXiv 2401.10020): one model as actor and judge, iterated DPO on
pairs it ranks itself (the loop seam of the README's seam table).

    judging.py judge prompt templates (`templates/`), `parse_score`, `judge` through the Engine
    pairs.py   `build_pairs`: best vs worst candidate per prompt, with tie / parse statistics
    training.py  joint SFT and DPO (π_ref = the starting params) through `preference.fit_preference`
    loop.py    `run_iteration` (M_t → M_{t+1}), `run` (M0 → M1 → ... resumable), `IterationReport`
    toy.py     the toy instruction task run from a config (launcher and experiment)
"""
from jaxllm.methods.self_rewarding.judging import (
    JudgeConfig, Judgements, judge, judge_prompt_ids, load_template, mean_valid, parse_score, render)
from jaxllm.methods.self_rewarding.loop import (
    IterationReport, NoPairsError, SelfRewardingConfig, generate_candidates, run, run_iteration)
from jaxllm.methods.self_rewarding.pairs import PairStats, PreferencePair, build_pairs

__all__ = ["IterationReport", "JudgeConfig", "Judgements", "NoPairsError", "PairStats", "PreferencePair",
           "SelfRewardingConfig", "build_pairs", "generate_candidates", "judge", "judge_prompt_ids", "load_template",
           "mean_valid", "parse_score", "render", "run", "run_iteration"]
