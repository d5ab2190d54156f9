"""The pre-training optimizer from a frozen config: AdamW with linear warmup and cosine decay,
global-norm gradient clipping, and weight decay on matrices only.

Weight decay skips the RMSNorm scales (a decayed scale fights the normalisation it undoes) and the
token embedding (rows of rare tokens would be pulled to zero between their rare updates); the
attention, MLP and LM-head matrices are decayed.
"""
from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters. The learning rate rises linearly from 0 to `learning_rate` over
    `warmup_steps`, then follows a cosine down to `learning_rate · min_lr_ratio` at the last step.
    `clip_norm` 0 disables clipping."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"optimizer.learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optimizer.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("eps", "weight_decay", "clip_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"optimizer.{name} must be >= 0, got {getattr(self, name)}")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Warmup + cosine over `total_steps` optimizer steps, indexed by the optimizer's count c
    (0 for the first step). Step c + 1 gets lr · (c + 1) / warmup_steps during warmup, the peak at
    step `warmup_steps`, and the cosine ends at the minimum on step `total_steps`: no step is
    wasted at learning rate 0."""
    warmup = min(cfg.warmup_steps, total_steps)
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)
    return lambda count: base(count + 1)


def _key_name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def decay_mask(params):
    """True for the parameters weight decay applies to: everything but norm scales and the token
    embedding (identified by name, so it also holds for scanned layers with a leading L axis)."""
    def decayed(path, _):
        names = [_key_name(k) for k in path]
        return not any(n == "embed" or n.endswith("norm") for n in names)
    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule). The schedule is indexed by the optimizer step, which
    equals `TrainState.step` (a skipped non-finite step advances neither)."""
    schedule = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw), schedule
    return adamw, schedule
