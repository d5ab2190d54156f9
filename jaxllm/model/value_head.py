"""Policy + value model for PPO: the Llama value head on a shared trunk, or a separate critic trunk.

ReFT (arXiv 2401.08967, lqtrung1998/mwp_ReFT) puts a freshly initialised linear map D → 1 on the
final normed hidden state of the policy itself (`LlamaConfig.value_head`), so value-loss gradients
reach the policy trunk. `ActorCritic(cfg, shared_trunk=False)` is the option modern PPO stacks
default to: a copy of the trunk as the critic, params `{"policy": ..., "critic": ...}`, so the
value loss never touches the policy (at the cost of a second forward, LM head included).
"""
from __future__ import annotations

import dataclasses

import jax

from jaxllm.model.llama import Llama, LlamaConfig, box_params, init_params

VALUE_KEYS = ("value_head", "value_bias")


def add_value_head(cfg: LlamaConfig, params, rng):
    """`params` plus a freshly initialised value head (as `Llama` initialises it)."""
    vcfg = dataclasses.replace(cfg, value_head=True)
    fresh = jax.jit(lambda r: {k: init_params(vcfg, r)[k] for k in VALUE_KEYS})(rng)
    return {**params, **fresh}


@dataclasses.dataclass(frozen=True)
class ActorCritic:
    """Logits and values of one policy/critic pair (`cfg.value_head` itself is ignored)."""

    cfg: LlamaConfig
    shared_trunk: bool = True

    @property
    def policy_cfg(self) -> LlamaConfig:
        """Config the engine samples with (`Engine(policy_cfg, policy_params(params))`)."""
        return dataclasses.replace(self.cfg, value_head=self.shared_trunk)

    def init(self, policy_params, rng):
        """Actor-critic params from a policy (e.g. the SFT warm-up): a fresh value head, on the
        policy's trunk or on a copy of it."""
        plain = {k: v for k, v in policy_params.items() if k not in VALUE_KEYS}
        if self.shared_trunk:
            return add_value_head(self.cfg, plain, rng)
        return {"policy": plain, "critic": add_value_head(self.cfg, jax.tree.map(lambda x: x.copy(), plain), rng)}

    def policy_params(self, params):
        return params if self.shared_trunk else params["policy"]

    def value_model(self, params) -> tuple[LlamaConfig, dict]:
        """The model that carries the value head, as `jaxllm.model.save_model` writes it (its config
        has `value_head=True`): the policy with its head on a shared trunk, else the critic."""
        return dataclasses.replace(self.cfg, value_head=True), params if self.shared_trunk else params["critic"]

    def apply(self, params, tokens_BT, positions_BT=None, segment_ids_BT=None):
        """(logits_BTV, values_BT) of a full causal forward."""
        vcfg = dataclasses.replace(self.cfg, value_head=True)
        if self.shared_trunk:
            return Llama(vcfg).apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT)
        logits_BTV = Llama(self.policy_cfg).apply({"params": params["policy"]}, tokens_BT, positions_BT,
                                                  segment_ids_BT)
        _, values_BT = Llama(vcfg).apply({"params": params["critic"]}, tokens_BT, positions_BT, segment_ids_BT)
        return logits_BTV, values_BT

    def box(self, params):
        """`params` with their logical-axis boxes (`llama.box_params`), so `fit` shards them."""
        vcfg = dataclasses.replace(self.cfg, value_head=True)
        if self.shared_trunk:
            return box_params(vcfg, params)
        return {"policy": box_params(self.policy_cfg, params["policy"]), "critic": box_params(vcfg, params["critic"])}
