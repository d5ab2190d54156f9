"""Context extension of a trained RoPE model: a position transform, then a short SFT on long samples.

The recipe (entropy-aware ABF, arXiv 2401.07004, and the baselines it is compared with) is a
composition of two seams:

1. position: `extend_spec` picks one `jaxllm.model.rope` transform — PI (`linear`), static
   NTK-aware (`ntk`), `dynamic_ntk`, `yarn`, `abf`, entropy-aware ABF with layers 0–1 exempt from
   the logit scale (`eabf`, the paper's rule) or with every layer scaled (`eabf_all`, what the
   released code does) — and `extended_config` writes it into the model config with
   `max_len` = the target length;
2. loop: `sft` fine-tunes on long samples with the loss on the answer tokens only (AdamW
   β = (0.9, 0.95), weight decay 0.1, cosine learning rate, two epochs, drop-last batches: the
   paper's 100 samples at batch 32 give 6 steps): the SFT objective (`jaxllm.objectives.sft`)
   through the one loop (`jaxllm.train.finetune` → `jaxllm.train.loop.fit`).

`extend` runs both. The method name "none" keeps the RoPE spec (fine-tune at the target length
without any position change: the control arm); `SFTConfig(epochs=0)` is the transform-only
variant.

Measurement helpers for the recipe's experiments live here too: retrieval accuracy and per-token
NLL of a model on long-context probes (`jaxllm.data.tasks.long_context`), and the attention
entropy per layer and query position (the paper's motivating figure).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.model import attention, llama, rope
from jaxllm.objectives.lm import token_logprobs
from jaxllm.objectives.sft import make_sft_loss
from jaxllm.train import optim
from jaxllm.train.finetune import finetune
from jaxllm.train.loop import LoopConfig

METHODS = ("none", "pi", "ntk", "dynamic_ntk", "yarn", "abf", "eabf", "eabf_all")


def extend_spec(spec: rope.RopeSpec, method: str, factor: float, window: int, *, abf_base: float = 500_000.0,
                unscaled_layers=(0, 1), beta_fast: float = 32.0, beta_slow: float = 1.0) -> rope.RopeSpec:
    """The RoPE spec of `method` for extending a model pretrained at `window` tokens by `factor`.

    `abf_base` is the new base of `abf`/`eabf`/`eabf_all` (paper: 500,000 for a base-10,000
    model); `unscaled_layers` are the layers `eabf` leaves unscaled; `beta_fast`/`beta_slow` are
    YaRN's ramp bounds. PI, NTK and YaRN derive their frequencies from `spec.base`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown context-extension method {method!r}; known: {METHODS}")
    if window < 2:
        raise ValueError(f"pretrained window must be >= 2, got {window}")
    if method == "none":
        return spec
    if method == "pi":
        return rope.linear(spec, factor)
    if method == "ntk":
        return rope.ntk(spec, factor)
    if method == "dynamic_ntk":
        return rope.dynamic_ntk(spec, factor, window)
    if method == "yarn":
        return rope.yarn(spec, factor, window, beta_fast, beta_slow)
    if method == "abf":
        return rope.abf(spec, abf_base)
    exempt = unscaled_layers if method == "eabf" else ()
    return rope.entropy_aware_abf(spec, abf_base, window, exempt)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The fine-tune after the transform. Steps = epochs × (samples // batch_size) (drop-last);
    epochs 0 skips it. The learning rate follows a cosine from `learning_rate` (after
    `warmup_steps` of linear warm-up) to `learning_rate · min_lr_ratio`."""

    learning_rate: float = 2e-5
    batch_size: int = 32
    epochs: int = 2
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.epochs < 0:
            raise ValueError(f"sft needs batch_size >= 1 and epochs >= 0, got {self.batch_size}, {self.epochs}")
        self.optimizer()  # validates the optimizer fields

    def optimizer(self) -> optim.OptimizerConfig:
        return optim.OptimizerConfig(learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
                                     min_lr_ratio=self.min_lr_ratio, b1=self.b1, b2=self.b2,
                                     weight_decay=self.weight_decay, clip_norm=self.clip_norm)


@dataclasses.dataclass(frozen=True)
class ContextExtensionConfig:
    """Extend a model to `target_len` with `method` (see `extend_spec`). `window` is the pretrained
    window c (0: the model's current max_len); the scaling factor is target_len / c."""

    method: str
    target_len: int
    window: int = 0
    abf_base: float = 500_000.0
    unscaled_layers: tuple[int, ...] = (0, 1)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    sft: SFTConfig = SFTConfig()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown context-extension method {self.method!r}; known: {METHODS}")
        if self.target_len < 2 or self.window < 0:
            raise ValueError(f"target_len must be >= 2 and window >= 0, got {self.target_len}, {self.window}")
        if self.abf_base <= 0:
            raise ValueError(f"abf_base must be > 0, got {self.abf_base}")
        object.__setattr__(self, "unscaled_layers", tuple(int(l) for l in self.unscaled_layers))


def extended_config(model_cfg: llama.LlamaConfig, cfg: ContextExtensionConfig) -> llama.LlamaConfig:
    """`model_cfg` with the method's RoPE spec and max_len = cfg.target_len."""
    window = cfg.window or model_cfg.max_len
    if cfg.target_len <= window and cfg.method != "none":
        raise ValueError(f"target_len {cfg.target_len} does not extend the pretrained window {window}")
    spec = extend_spec(model_cfg.rope, cfg.method, cfg.target_len / window, window, abf_base=cfg.abf_base,
                       unscaled_layers=cfg.unscaled_layers, beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow)
    return dataclasses.replace(model_cfg, rope=spec, max_len=cfg.target_len)


def _check_data(data: dict, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    missing = {"tokens", "loss_mask"} - set(data)
    if missing:
        raise ValueError(f"fine-tuning data lacks {sorted(missing)} (needs tokens and loss_mask [N, T])")
    tokens, mask = np.asarray(data["tokens"], np.int32), np.asarray(data["loss_mask"], np.float32)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"tokens {tokens.shape} and loss_mask {mask.shape} must both be [N, T]")
    if tokens.shape[1] > max_len:
        raise ValueError(f"fine-tuning rows have {tokens.shape[1]} tokens, the model's max_len is {max_len}")
    return tokens, mask


def sft(params, model_cfg: llama.LlamaConfig, data: dict, cfg: SFTConfig, workdir: str | os.PathLike, *,
        devices: Sequence[jax.Device] | None = None, verbose: bool = False):
    """Fine-tune `params` on `data` = {"tokens", "loss_mask"} ([N, T]; the mask marks the scored
    answer tokens) with `jaxllm.objectives.sft` (token-mean NLL over each batch) through the one loop
    in `workdir` (checkpoints, resumable; default device: the first). Epochs visit the samples in
    permutations drawn from (seed, epoch) (`EpochBatches`). Returns (params, per-step losses)."""
    tokens, mask = _check_data(data, model_cfg.max_len)
    per_epoch = tokens.shape[0] // cfg.batch_size
    if cfg.epochs and per_epoch == 0:
        raise ValueError(f"{tokens.shape[0]} fine-tuning samples do not fill one batch of {cfg.batch_size}")
    total = cfg.epochs * per_epoch
    if total == 0:
        return params, []
    loop_config = LoopConfig(steps=total, seed=cfg.seed, log_every=1, checkpoint_every=total, keep_checkpoints=1,
                             verbose=verbose)
    result = finetune(make_sft_loss(functools.partial(llama.forward, model_cfg)), model_cfg,
                      {"tokens": tokens, "loss_mask": mask}, cfg.optimizer(), cfg.batch_size, workdir, loop_config,
                      params=params, devices=jax.devices()[:1] if devices is None else devices)
    return result.state.params, [result.losses[s] for s in sorted(result.losses)]


def extend(params, model_cfg: llama.LlamaConfig, data: dict, cfg: ContextExtensionConfig, workdir: str | os.PathLike):
    """The recipe: (extended model config, fine-tuned params); the fine-tune runs in `workdir`. See the
    module docstring."""
    new_cfg = extended_config(model_cfg, cfg)
    new_params, _ = sft(params, new_cfg, data, cfg.sft, workdir)
    return new_cfg, new_params


# ----------------------------------------------------------------------------- measurement

@functools.partial(jax.jit, static_argnames=("model_cfg",))
def token_nll(model_cfg: llama.LlamaConfig, params, tokens_BT):
    """−log p(token t | < t) at index t ([B, T] float32; index 0 is 0)."""
    return -token_logprobs(llama.forward(model_cfg, params, tokens_BT), tokens_BT)


@functools.partial(jax.jit, static_argnames=("model_cfg",))
def _answer_hits(model_cfg, params, tokens_BT, answer_positions_BQM):
    B, Q, M = answer_positions_BQM.shape
    targets_BS = answer_positions_BQM.reshape(B, Q * M)
    logits_BSV = llama.Llama(model_cfg).apply({"params": params}, tokens_BT, logit_indices_BS=targets_BS - 1)
    correct_BS = jnp.argmax(logits_BSV, axis=-1) == jnp.take_along_axis(tokens_BT, targets_BS, axis=1)
    return jnp.all(correct_BS.reshape(B, Q, M), axis=-1)


def retrieval_hits(model_cfg: llama.LlamaConfig, params, samples: dict, batch_size: int = 16) -> np.ndarray:
    """Exact match of greedy decoding for every query of `long_context.retrieval_samples` rows
    (bool [N, n_queries]): each answer token must be the argmax given the gold prefix, which is
    what greedy generation produces, so one teacher-forced pass suffices."""
    tokens, positions = np.asarray(samples["tokens"]), np.asarray(samples["answer_positions"])
    hits = [_answer_hits(model_cfg, params, tokens[i:i + batch_size], positions[i:i + batch_size])
            for i in range(0, len(tokens), batch_size)]
    return np.concatenate([np.asarray(h) for h in hits])


def causal_attention_entropy(q_BTHK, k_BCHK, mask_BTC=None):
    """Entropy −Σ p ln p (nats) of causal softmax attention per query: [B, H, T] float32.
    `q_BTHK` must already carry 1/sqrt(K) and any logit scale (as the model feeds attention)."""
    T = q_BTHK.shape[1]
    logits_BHTC = jnp.einsum("bthk,bchk->bhtc", q_BTHK.astype(jnp.float32), k_BCHK.astype(jnp.float32))
    mask_BTC = jnp.tril(jnp.ones((T, T), bool))[None] if mask_BTC is None else mask_BTC
    logits_BHTC = jnp.where(mask_BTC[:, None], logits_BHTC, attention.NEG_INF)
    logp_BHTC = jax.nn.log_softmax(logits_BHTC, axis=-1)
    return -jnp.sum(jnp.exp(logp_BHTC) * logp_BHTC, axis=-1)


@functools.partial(jax.jit, static_argnames=("model_cfg",))
def attention_entropy(model_cfg: llama.LlamaConfig, params, tokens_BT):
    """Attention entropy per layer and query position, averaged over rows and heads: [L, T].

    Each layer's attention input (its `attn_norm` output) is captured from a normal forward; the
    layer's queries and keys are rebuilt from it exactly as the model builds them (RoPE of the
    spec, query scale of that layer, 1/sqrt(K)). Needs `scan_layers=False`."""
    if model_cfg.scan_layers:
        raise ValueError("attention_entropy needs a model config with scan_layers=False")
    B, T = tokens_BT.shape
    _, captured = llama.Llama(model_cfg).apply({"params": params}, tokens_BT, mutable="intermediates",
                                               capture_intermediates=lambda mdl, _: mdl.name == "attn_norm")
    positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    groups = model_cfg.n_heads // model_cfg.n_kv_heads
    rows = []
    for layer in range(model_cfg.n_layers):
        x_BTD = captured["intermediates"][f"layers_{layer}"]["attn_norm"]["__call__"][0].astype(jnp.float32)
        w = params[f"layers_{layer}"]["attn"]
        q_BTHK = rope.apply(jnp.einsum("btd,dhk->bthk", x_BTD, w["q"].astype(jnp.float32)), positions_BT,
                            model_cfg.rope)
        k_BTGK = rope.apply(jnp.einsum("btd,dgk->btgk", x_BTD, w["k"].astype(jnp.float32)), positions_BT,
                            model_cfg.rope)
        scale_BT = rope.query_scale(positions_BT, model_cfg.rope, layer) * model_cfg.head_dim ** -0.5
        entropy_BHT = causal_attention_entropy(q_BTHK * scale_BT[:, :, None, None],
                                               jnp.repeat(k_BTGK, groups, axis=2))
        rows.append(jnp.mean(entropy_BHT, axis=(0, 1)))
    return jnp.stack(rows)
