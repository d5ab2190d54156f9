"""Self-Rewarding Language Models (arXiv 2401.10020): one model as actor and judge, iterated DPO on
pairs it ranks itself (DESIGN.md, loop seam).

    judging.py judge prompt templates (`templates/`), `parse_score`, `judge` through the Engine
    pairs.py   `build_pairs`: best vs worst candidate per prompt, with tie / parse statistics
"""
from jaxllm.methods.self_rewarding.judging import (
    JudgeConfig, Judgements, judge, judge_prompt_ids, load_template, mean_valid, parse_score, render)
from jaxllm.methods.self_rewarding.pairs import PairStats, PreferencePair, build_pairs

__all__ = ["JudgeConfig", "Judgements", "PairStats", "PreferencePair", "build_pairs", "judge", "judge_prompt_ids",
           "load_template", "mean_valid", "parse_score", "render"]
