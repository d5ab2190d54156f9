"""Fine-tuning a Llama model on in-memory rows: the short caller of the one loop that SFT, DPO/CPO,
ChatQA's stages and context-extension tuning share.

`finetune` batches the rows with the seeded epoch batcher (`jaxllm.data.epochs.EpochBatches`),
builds the AdamW schedule of an `OptimizerConfig` over the run's steps, and starts from given
params (copied onto the mesh, sharded by the model's logical axes) or a fresh init, then hands
everything to `jaxllm.train.loop.fit` (checkpoints, resume, SIGTERM, metrics in the workdir).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from jaxllm.data.epochs import EpochBatches
from jaxllm.model import llama
from jaxllm.train import optim
from jaxllm.train.loop import FitResult, Hook, LoopConfig, fit
from jaxllm.train.step import LossFn


def start_params(model_cfg: llama.LlamaConfig, params, seed: int):
    """What `fit` starts from: `params` boxed with the model's logical axes (so they are sharded like
    a fresh init), or, when None, an init from `key(seed)` (the key fine-tuning runs have always
    drawn their random init from, kept so their numbers reproduce)."""
    if params is None:
        return lambda rng: llama.init_params(model_cfg, jax.random.key(seed), boxed=True)
    return llama.box_params(model_cfg, params)


def finetune(loss_fn: LossFn, model_cfg: llama.LlamaConfig, rows: Mapping[str, np.ndarray],
             optimizer: optim.OptimizerConfig, batch_size: int, workdir: str | os.PathLike, loop_config: LoopConfig, *,
             params=None, hooks: Sequence[Hook] = (), devices: Sequence[jax.Device] | None = None,
             until_step: int | None = None) -> FitResult:
    """Trains `loss_fn` on batches of `batch_size` rows of `rows` (epochs in permutations drawn from
    `loop_config.seed`) from `params` (None: random init), with AdamW of `optimizer` scheduled over
    `loop_config.steps`, through `fit` in `workdir` (the learning rate is logged)."""
    tx, schedule = optim.make_optimizer(optimizer, loop_config.steps)
    batches = EpochBatches(rows, batch_size, loop_config.seed)
    return fit(loss_fn, tx, batches, start_params(model_cfg, params, loop_config.seed), workdir,
               dataclasses.replace(loop_config, learning_rate=schedule), hooks=hooks, devices=devices,
               until_step=until_step)
