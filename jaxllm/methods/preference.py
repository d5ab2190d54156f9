"""Preference training: a policy tuned on (prompt, chosen, rejected) pairs with CPO or DPO, or SFT on
rows, as a short caller of the one loop (`jaxllm.train.finetune` → `jaxllm.train.loop.fit`).

The recipe (the loop seam of the README's seam table) composes:

* the objective: `jaxllm.objectives.preference.make_preference_loss` (CPO, DPO and their variants and
  NLL weights), or, with `objective=None`, `jaxllm.objectives.sft` on SFT rows (`tokens`, `loss_mask`;
  `jaxllm.data.pairs.chosen_rows` turns pairs into SFT-on-preferred rows);
* a frozen reference for DPO, whose summed response log-probs are computed in one pass *before*
  training (`reference_logps`, no gradient) and travel in the batch, as the objective seam prescribes;
  they are stored in `workdir/reference_logps.npz` so a resumed run needs no reference model;
* the loop: sharded jitted steps with exact gradient accumulation, checkpoints of TrainState and
  batcher position, metrics, SIGTERM — all `fit`'s.

Pair arrays come from `jaxllm.data.pairs`; candidates to build pairs from are decoded with
`jaxllm.serve.Engine`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jaxllm import configs
from jaxllm.data.pairs import PAIR_KEYS, check_pairs
from jaxllm.model import llama
from jaxllm.objectives.preference import PreferenceConfig, make_preference_loss, make_reference_logps
from jaxllm.objectives.sft import SFT_KEYS, make_sft_loss
from jaxllm.parallel import rules
from jaxllm.train import checkpoint, optim
from jaxllm.train.finetune import finetune
from jaxllm.train.loop import FitResult, LoopConfig

OBJECTIVE_KINDS = ("cpo", "dpo", "sft")
REFERENCE_FILE = "reference_logps.npz"


@dataclasses.dataclass(frozen=True)
class PreferenceTrainConfig:
    """A preference-training run.

    `objective`: the pair loss; None trains SFT on rows. `batch_size` is the global number of rows
    (pairs) per optimizer step (split into `grad_accum` micro-batches). Each epoch visits the rows in a
    fresh permutation drawn from `seed` (drop-last). Every `log_every` steps a record of window-mean
    metrics is written, every `checkpoint_every` steps a checkpoint (the last `keep_checkpoints` kept;
    one always at the end and on SIGTERM). `mesh` is a `jaxllm.parallel.mesh` spec.
    """

    model: llama.LlamaConfig
    objective: PreferenceConfig | None = PreferenceConfig()
    optimizer: optim.OptimizerConfig = optim.OptimizerConfig(learning_rate=1e-4, warmup_steps=0, min_lr_ratio=1.0,
                                                             weight_decay=0.01)
    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    mesh: str = "fsdp:-1"

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")

    @property
    def needs_reference(self) -> bool:
        return self.objective is not None and self.objective.kind == "dpo"

    def loop_config(self, verbose: bool = True) -> LoopConfig:
        return LoopConfig(steps=self.steps, seed=self.seed, mesh=self.mesh, grad_accum=self.grad_accum,
                          log_every=self.log_every, checkpoint_every=self.checkpoint_every,
                          keep_checkpoints=self.keep_checkpoints, verbose=verbose)


def logits_fn(model_cfg: llama.LlamaConfig):
    """`(params, tokens_BT, positions_BT, segment_ids_BT) -> logits_BTV` of the Llama `model_cfg`."""
    return functools.partial(llama.forward, model_cfg)


def make_loss_fn(cfg: PreferenceTrainConfig):
    """The train-step loss_fn of `cfg.objective` (SFT when None)."""
    if cfg.objective is None:
        return make_sft_loss(logits_fn(cfg.model))
    return make_preference_loss(logits_fn(cfg.model), cfg.objective)


# ----------------------------------------------------------------------------- reference log-probs

def _pairs_digest(pairs: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in PAIR_KEYS:
        digest.update(np.ascontiguousarray(pairs[key]).tobytes())
    return digest.hexdigest()


def reference_logps(model_cfg: llama.LlamaConfig, ref_params, pairs: Mapping[str, np.ndarray], *,
                    batch_size: int = 64) -> dict[str, np.ndarray]:
    """The frozen reference's summed response log-probs of every pair: {"ref_chosen_logps",
    "ref_rejected_logps"} float32 [N], in one jitted pass of `batch_size` pairs (the last batch
    padded with repeats, so one shape compiles)."""
    n = check_pairs(pairs)
    ref_fn = jax.jit(make_reference_logps(logits_fn(model_cfg)))
    out = {"ref_chosen_logps": [], "ref_rejected_logps": []}
    for start in range(0, n, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), n - 1)
        logps = jax.device_get(ref_fn(ref_params, {k: np.asarray(v)[rows] for k, v in pairs.items()}))
        for key in out:
            out[key].append(logps[key][:min(batch_size, n - start)])
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def _with_reference(cfg: PreferenceTrainConfig, pairs, workdir: pathlib.Path, reference_params) -> dict:
    """`pairs` plus the reference log-probs, read from workdir when an earlier call stored them for the
    same pairs, else computed from `reference_params` and stored."""
    path = workdir / REFERENCE_FILE
    digest = _pairs_digest(pairs)
    if path.exists():
        stored = np.load(path)
        if str(stored["digest"]) != digest:
            raise ValueError(f"{path} holds reference log-probs of different pairs; use a fresh workdir")
        return {**pairs, "ref_chosen_logps": stored["ref_chosen_logps"], "ref_rejected_logps": stored["ref_rejected_logps"]}
    if reference_params is None:
        raise ValueError("DPO needs reference params (or a workdir with stored reference log-probs), got None")
    logps = reference_logps(cfg.model, reference_params, pairs)
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, digest=np.asarray(digest), **logps)
    os.replace(tmp, path)
    return {**pairs, **logps}


# ----------------------------------------------------------------------------- parameters

def param_shardings(model_cfg: llama.LlamaConfig, mesh) -> Any:
    """NamedShardings of the model's params on `mesh` by the logical rules."""
    mesh_rules = rules.mesh_rules(rules.DEFAULT_RULES, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_rules):
        abstract = jax.eval_shape(lambda r: llama.init_params(model_cfg, r, boxed=True), jax.random.key(0))
    return rules.param_shardings(abstract, mesh, mesh_rules)


def load_params(directory: str | os.PathLike, model_cfg: llama.LlamaConfig, mesh) -> Any:
    """The params of the newest checkpoint in `directory` (e.g. a pre-training workdir's
    `checkpoints`), restored alone onto `mesh` and verified (`checkpoint.restore_params`)."""
    abstract = jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            param_shardings(model_cfg, mesh),
                            jax.eval_shape(lambda: llama.init_params(model_cfg, jax.random.key(0))))
    return checkpoint.restore_params(directory, abstract)


# ----------------------------------------------------------------------------- the run

def fit_preference(cfg: PreferenceTrainConfig, data: Mapping[str, np.ndarray], workdir: str | os.PathLike, *,
                   params=None, reference_params=None, devices: Sequence[jax.Device] | None = None,
                   until_step: int | None = None, verbose: bool = True) -> FitResult:
    """Trains `cfg` on `data` (pair arrays; SFT rows when `cfg.objective` is None) in `workdir`
    through the one loop, resuming from its newest good checkpoint.

    `params`: the policy's starting point (host or device arrays, copied; None: random init from
    `cfg.seed`). `reference_params`: DPO's frozen reference (default: the starting params); its
    log-probs are computed once before the first step and stored in the workdir. `until_step` ends
    this call early, with a checkpoint (the schedule still spans `cfg.steps`). Raises
    FloatingPointError naming the step at a non-finite loss, ValueError on data that does not fit the
    config or mesh.
    """
    workdir = pathlib.Path(workdir)
    if cfg.objective is None:
        missing = [k for k in SFT_KEYS if k not in data]
        if missing:
            raise ValueError(f"SFT data lacks {missing}; it has {sorted(data)} "
                             "(jaxllm.data.pairs.chosen_rows makes SFT rows of pairs)")
    else:
        check_pairs(data)
    if cfg.needs_reference:
        reference = params if reference_params is None else reference_params
        if reference is None and not (workdir / REFERENCE_FILE).exists():
            reference = llama.init_params(cfg.model, jax.random.key(cfg.seed))  # the init the run starts from
        data = _with_reference(cfg, data, workdir, reference)
    return finetune(make_loss_fn(cfg), cfg.model, data, cfg.optimizer, cfg.batch_size, workdir, cfg.loop_config(verbose),
                    params=params, devices=devices, until_step=until_step)


# ----------------------------------------------------------------------------- config files

def config_dict(*, model: Mapping[str, Any], objective: Mapping[str, Any] | None = None,
                optimizer: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                **fields) -> ml_collections.ConfigDict:
    """A complete ConfigDict for `from_dict` (`jaxllm.configs.config_dict` of `PreferenceTrainConfig`):
    `objective.nll_weight` None = the kind's default; `objective.kind` "sft" = no preference term.
    `extra` sections (e.g. `data`, `init_checkpoint`) belong to the caller."""
    return configs.config_dict(PreferenceTrainConfig, model=model, objective=objective or {}, optimizer=optimizer,
                               extra=extra, **fields)


def from_dict(d: Mapping[str, Any]) -> PreferenceTrainConfig:
    """`PreferenceTrainConfig` from a nested mapping shaped like `config_dict()` (sections that are not
    fields of the config belong to the caller and are ignored)."""
    fields = {f.name for f in dataclasses.fields(PreferenceTrainConfig)}
    d = {k: v for k, v in d.items() if k in fields}
    objective = dict(d.get("objective") or {})
    kind = objective.get("kind", "cpo")
    if kind not in OBJECTIVE_KINDS:
        raise ValueError(f"unknown objective kind {kind!r}; known: {list(OBJECTIVE_KINDS)}")
    if kind == "sft":
        configs.from_mapping(PreferenceConfig, {**objective, "kind": "cpo"}, "objective.")  # misspelt fields fail
        d["objective"] = None
    return configs.from_mapping(PreferenceTrainConfig, d)
