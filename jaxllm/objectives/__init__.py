"""Objectives: pure, jittable losses over logits or sequence log-probs (the objective seam of the README's seam table)."""
from jaxllm.objectives.lm import nll_loss, sequence_logprobs, token_logprobs
from jaxllm.objectives.sft import make_sft_loss, sft_objective
from jaxllm.objectives.preference import (
    CPO_LOSSES,
    DPO_LOSSES,
    PreferenceConfig,
    alphapo_reward,
    cpo_loss,
    dpo_loss,
    make_preference_loss,
    make_reference_logps,
    preference_objective,
)

__all__ = ["CPO_LOSSES", "DPO_LOSSES", "PreferenceConfig", "alphapo_reward", "cpo_loss", "dpo_loss",
           "make_preference_loss", "make_reference_logps", "make_sft_loss", "nll_loss", "preference_objective",
           "sequence_logprobs", "sft_objective", "token_logprobs"]
