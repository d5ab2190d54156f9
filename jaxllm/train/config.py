"""Frozen configuration of a pre-training run, and its bridge to ml_collections config files.

`TrainConfig` is what the library reads. Config files (`experiments/*/config.py`) build an
ml_collections `ConfigDict` with `config_dict(...)`, which lists *every* field with its default, so
absl's `--config.steps=...` / `--config.model.d_model=...` overrides work for any field while the
locked dict rejects misspelt ones. `TrainConfig.from_dict` turns it back into frozen dataclasses,
resolving `model.preset` plus the non-None model overrides through `jaxllm.model.presets.get`.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict as mlc

from jaxllm.model import presets
from jaxllm.model.llama import LlamaConfig
from jaxllm.train.optim import OptimizerConfig

DATA_SOURCES = ("corpus", "jsonl", "tfds")
MODEL_OVERRIDES = {f.name: f.type for f in dataclasses.fields(LlamaConfig) if f.name != "rope"}


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



def model_from_dict(model: Mapping[str, Any]) -> LlamaConfig:
    """A preset of `jaxllm.model.presets` with the non-None overrides of a config's `model` section."""
    model = dict(model)
    preset = model.pop("preset", None)
    if not preset:
        raise ValueError(f"model.preset must name a preset of jaxllm.model.presets, got {preset!r}")
    unknown = set(model) - set(MODEL_OVERRIDES)
    if unknown:
        raise ValueError(f"unknown model fields {sorted(unknown)}; known: {sorted(MODEL_OVERRIDES)}")
    return presets.get(preset, **{k: v for k, v in model.items() if v is not None})

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
        d = dict(d)
        return cls(model=model_from_dict(d.pop("model", None) or {}),
                   data=_dataclass_from(DataConfig, d.pop("data", None) or {}, "data"),
                   optimizer=_dataclass_from(OptimizerConfig, d.pop("optimizer", None) or {}, "optimizer"),
                   **_checked_fields(cls, d, ""))


def _checked_fields(cls, d: Mapping[str, Any], where: str) -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown config fields {sorted(where + k for k in unknown)}; known: {sorted(known)}")
    return dict(d)


def _dataclass_from(cls, d: Mapping[str, Any], name: str):
    return cls(**_checked_fields(cls, d, f"{name}."))


def config_dict(*, model: Mapping[str, Any], data: Mapping[str, Any] | None = None,
                optimizer: Mapping[str, Any] | None = None, **fields) -> ml_collections.ConfigDict:
    """A complete ConfigDict for `TrainConfig`: every field present (defaults unless given), model
    overrides as typed placeholders (None = keep the preset's value), so absl overrides of any
    field work and misspelt ones fail. `model` needs "preset"."""
    model = dict(model)
    unknown = set(model) - set(MODEL_OVERRIDES) - {"preset"}
    if unknown:
        raise ValueError(f"unknown model fields {sorted(unknown)}; known: {sorted(MODEL_OVERRIDES)}")
    hints = typing.get_type_hints(LlamaConfig)
    model_fields = {"preset": model.pop("preset")}
    for name in MODEL_OVERRIDES:
        model_fields[name] = model[name] if name in model else mlc.placeholder(hints[name])
    top = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name not in ("model", "data", "optimizer")}
    unknown = set(fields) - set(top)
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}; known: {sorted(top)}")
    data_fields = _checked_fields(DataConfig, dict(data or {}), "data.")
    optimizer_fields = _checked_fields(OptimizerConfig, dict(optimizer or {}), "optimizer.")
    return ml_collections.ConfigDict({
        "model": model_fields,
        "data": {**dataclasses.asdict(DataConfig()), **data_fields},
        "optimizer": {**dataclasses.asdict(OptimizerConfig()), **optimizer_fields},
        **top, **fields,
    })
