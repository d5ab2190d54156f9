"""Frozen configuration of a pre-training run.

`TrainConfig` is what the library reads. Config files (`experiments/*/config.py`) build an
ml_collections `ConfigDict` with `config_dict(...)` and `TrainConfig.from_dict` reads it back,
both through the one config bridge, `jaxllm.configs`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from jaxllm import configs
from jaxllm.model.llama import LlamaConfig
from jaxllm.train.optim import OptimizerConfig

DATA_SOURCES = ("corpus", "jsonl", "tfds")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training text comes from and how it becomes [B, T] rows.

    `source`: "corpus" (the embedded Python-stdlib corpus, `jaxllm.data.builders.corpus_dataset`),
    "jsonl" (comma-separated JSON-lines `files`, field `text_key`) or "tfds" (catalog dataset
    `name` prepared under `data_dir`). `tokenizer`: a SentencePiece model path, "" for the shipped
    one. `packing`: see `jaxllm.data.packing`.
    """

    source: str = "corpus"
    name: str = ""
    files: str = ""
    split: str = "train"
    data_dir: str = ""
    tokenizer: str = ""
    text_key: str = "text"
    packing: str = "concat"
    shuffle: bool = True
    worker_count: int = 0

    def __post_init__(self):
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source must be one of {DATA_SOURCES}, got {self.source!r}")
        if self.source == "jsonl" and not self.files:
            raise ValueError("data.source 'jsonl' needs data.files (comma-separated paths), got ''")
        if self.source == "tfds" and not self.name:
            raise ValueError("data.source 'tfds' needs data.name (a TFDS catalog name), got ''")
        if self.worker_count < 0:
            raise ValueError(f"data.worker_count must be >= 0, got {self.worker_count}")




@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A pre-training run.

    `batch_size` is global (all processes, before splitting into `grad_accum` micro-batches);
    `mesh` is a `jaxllm.parallel.mesh` spec. Every `log_every` steps a metrics record is written,
    every `checkpoint_every` steps a checkpoint (the last `keep_checkpoints` are kept; one is
    always written at the end and on SIGTERM). `peak_flops` (FLOP/s of all devices) overrides the
    MFU denominator; 0 means table peak for TPU/GPU, measured matmul peak for CPU. At the end,
    `sample_tokens` tokens are sampled after `sample_prompt` (0 disables).
    """

    model: LlamaConfig
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    mesh: str = "fsdp:-1"
    peak_flops: float = 0.0
    sample_prompt: str = ""
    sample_tokens: int = 64
    sample_temperature: float = 0.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.seq_len > self.model.max_len:
            raise ValueError(f"seq_len {self.seq_len} is longer than the model's max_len {self.model.max_len}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.sample_tokens >= self.model.max_len:
            raise ValueError(f"sample_tokens {self.sample_tokens} must be below the model's max_len {self.model.max_len}")
        if self.peak_flops < 0 or self.sample_tokens < 0 or self.sample_temperature < 0:
            raise ValueError(f"peak_flops {self.peak_flops}, sample_tokens {self.sample_tokens} and "
                             f"sample_temperature {self.sample_temperature} must be >= 0")

    def check_data_parallel(self, data_parallel_size: int, process_count: int = 1) -> None:
        """ValueError unless each of the `grad_accum` micro-batches splits evenly over the
        data-parallel devices and the batch over the processes that load it."""
        micro = self.batch_size // self.grad_accum
        if micro % data_parallel_size:
            raise ValueError(f"batch_size {self.batch_size} (micro-batch {micro} with grad_accum "
                             f"{self.grad_accum}) is not divisible by the data-parallel size {data_parallel_size}")
        if self.batch_size % process_count:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by the process count {process_count}")

    def check_vocab(self, tokenizer_vocab_size: int) -> None:
        """ValueError if the tokenizer can emit ids the model has no embedding for."""
        if tokenizer_vocab_size > self.model.vocab_size:
            raise ValueError(f"tokenizer vocab_size {tokenizer_vocab_size} is larger than the model's "
                             f"vocab_size {self.model.vocab_size}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """From a nested mapping (e.g. `ConfigDict.to_dict()`) shaped like `config_dict()`."""
        return configs.from_mapping(cls, d)


def config_dict(*, model: Mapping[str, Any], **fields) -> ml_collections.ConfigDict:
    """A complete ConfigDict for `TrainConfig.from_dict` (`jaxllm.configs.config_dict`): every field
    present, model overrides as typed placeholders; `model` needs "preset"."""
    return configs.config_dict(TrainConfig, model=model, **fields)
