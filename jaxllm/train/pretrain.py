"""Pre-training from a `TrainConfig`: the data pipeline, model init and AdamW schedule that a config
names, handed to the one loop (`jaxllm.train.loop.fit`). `launch/train.py` runs it."""
from __future__ import annotations

import os
from collections.abc import Sequence

import jax

from jaxllm.data import builders, shards, sources
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.model import flops, llama, model_dir
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.train import hooks as hooks_lib
from jaxllm.train import lm, optim
from jaxllm.train.config import DataConfig, TrainConfig
from jaxllm.train.loop import FitResult, LoopConfig, fit


def open_source(cfg: DataConfig) -> Sequence:
    """The random-access record source `cfg` names."""
    data_dir = cfg.data_dir or None
    if cfg.source == "corpus":
        return builders.corpus_dataset(data_dir)[cfg.split]
    if cfg.source == "jsonl":
        files = [f.strip() for f in cfg.files.split(",") if f.strip()]
        return builders.jsonl_dataset("jaxllm_jsonl", files, fields=(cfg.text_key,), data_dir=data_dir)[cfg.split]
    return sources.catalog_source(cfg.name, cfg.split, data_dir=data_dir)


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    return Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else Tokenizer.default()


def loop_config(cfg: TrainConfig, schedule=None) -> LoopConfig:
    """The `fit` settings of a pre-training config (MFU from the model's FLOPs per token)."""
    return LoopConfig(steps=cfg.steps, seed=cfg.seed, mesh=cfg.mesh, grad_accum=cfg.grad_accum,
                      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                      keep_checkpoints=cfg.keep_checkpoints, learning_rate=schedule,
                      tokens_per_step=cfg.batch_size * cfg.seq_len,
                      flops_per_token=flops.train_flops_per_token(cfg.model, cfg.seq_len), peak_flops=cfg.peak_flops)


def lm_stream(cfg: TrainConfig, tokenizer: Tokenizer) -> shards.ShardedBatches:
    """The packed LM batches of `cfg.data` (`sources.lm_batches`): this process's rows of global
    batches of `cfg.batch_size`, drawn from data shards that a resumed run keeps whatever its
    process count (`jaxllm.data.shards`)."""
    source = open_source(cfg.data)
    return shards.ShardedBatches(lambda index, count, rows: sources.lm_batches(
        source, tokenizer, batch_size=rows, seq_len=cfg.seq_len, seed=cfg.seed, shuffle=cfg.data.shuffle,
        packing=cfg.data.packing, text_key=cfg.data.text_key, worker_count=cfg.data.worker_count,
        shard_index=index, shard_count=count), global_batch=cfg.batch_size)


def pretrain(cfg: TrainConfig, workdir: str | os.PathLike, *, devices: Sequence[jax.Device] | None = None,
             until_step: int | None = None) -> FitResult:
    """Trains `cfg` in `workdir` through `fit` (resuming from its newest good checkpoint): packed
    LM batches of `cfg.data`, the NLL of `jaxllm.train.lm`, `optim.make_optimizer`, and at the last
    step a sample of `cfg.sample_tokens` tokens after `cfg.sample_prompt` in the final record. A
    checkpoint resumes with any process count that divides the one that started the run. The
    workdir records the model (`config.json`, tokenizer: `jaxllm.model.record_model`), so
    `jaxllm.model.load_model(workdir)` reads its newest checkpoint back.
    ValueError on a config that does not fit the mesh or tokenizer; see `fit` for the rest."""
    devices = list(jax.devices() if devices is None else devices)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    cfg.check_data_parallel(mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count())
    tokenizer = load_tokenizer(cfg.data)
    cfg.check_vocab(tokenizer.vocab_size)
    if jax.process_index() == 0:
        model_dir.record_model(workdir, cfg.model, tokenizer)
    batches = lm_stream(cfg, tokenizer)
    optimizer, schedule = optim.make_optimizer(cfg.optimizer, cfg.steps)
    hooks = []
    if cfg.sample_tokens:
        hooks.append(hooks_lib.sample_hook(cfg.model, tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                                           at_step=cfg.steps, temperature=cfg.sample_temperature, seed=cfg.seed))
    return fit(lm.lm_loss_fn(cfg.model), optimizer, batches,
               lambda rng: llama.init_params(cfg.model, rng, boxed=True), workdir, loop_config(cfg, schedule),
               hooks=hooks, devices=devices, until_step=until_step)
