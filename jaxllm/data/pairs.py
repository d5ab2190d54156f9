"""Preference-pair data for training: text triplets from files or the toy translation task, tokenised
into the padded pair arrays of `jaxllm.data.preference.collate_pairs`, and the chosen side as SFT rows.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from jaxllm.data.epochs import check_rows
from jaxllm.data.jsonl import jsonl_objects
from jaxllm.data.preference import collate_pairs, tokenize_pair
from jaxllm.data.tasks import translation
from jaxllm.data.tokenizer import Tokenizer

PAIR_KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")
PAIR_SOURCES = ("translation", "jsonl")


def pair_arrays(tokenizer, triplets: Sequence[tuple[str, str, str]], *, max_len: int, max_prompt_len: int,
                length: int | None = None, multiple: int = 8) -> dict[str, np.ndarray]:
    """(prompt, chosen, rejected) texts → padded pair arrays [N, T] (joint tokenisation, EOS, masks;
    see `jaxllm.data.preference`). T is `length`, else the longest pair rounded up to `multiple`."""
    if not triplets:
        raise ValueError("no preference triplets to tokenise")
    pairs = [tokenize_pair(tokenizer, p, c, r, max_len=max_len, max_prompt_len=max_prompt_len) for p, c, r in triplets]
    return collate_pairs(pairs, pad_id=tokenizer.pad_id, length=length, multiple=multiple)


def check_pairs(pairs: Mapping[str, np.ndarray]) -> int:
    """The number of pairs; ValueError naming missing keys or disagreeing sizes."""
    missing = [k for k in PAIR_KEYS if k not in pairs]
    if missing:
        raise ValueError(f"pair data lacks {missing}; it has {sorted(pairs)}")
    return check_rows(pairs)


def chosen_rows(pairs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The chosen side of pair arrays as SFT rows (`jaxllm.objectives.sft`): tokens, loss_mask and,
    when present, positions and segment_ids (SFT on preferred responses, or on references when the
    "chosen" side holds them)."""
    missing = [k for k in PAIR_KEYS[:2] if k not in pairs]
    if missing:
        raise ValueError(f"pair data lacks {missing}; it has {sorted(pairs)}")
    names = {"tokens": "tokens", "mask": "loss_mask", "positions": "positions", "segment_ids": "segment_ids"}
    return {row_key: np.asarray(pairs[f"chosen_{key}"]) for key, row_key in names.items() if f"chosen_{key}" in pairs}


def response_rows(tokenizer, examples: Sequence[tuple[str, str]], *, max_len: int, max_prompt_len: int,
                  length: int | None = None, multiple: int = 8) -> dict[str, np.ndarray]:
    """(prompt, response) texts → SFT rows [N, T] tokenised exactly as the chosen side of a pair
    (joint tokenisation, EOS, prompt cut from the left), so SFT and preference runs see one format."""
    return chosen_rows(pair_arrays(tokenizer, [(p, r, r) for p, r in examples], max_len=max_len,
                                   max_prompt_len=max_prompt_len, length=length, multiple=multiple))


def read_triplets(path: str | os.PathLike, keys=("prompt", "chosen", "rejected")) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts from a JSON-lines file, one object per line with `keys`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference file {path} does not exist")
    triplets = []
    for number, record in jsonl_objects(path):
        missing = [k for k in keys if not isinstance(record.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{number} lacks text fields {missing}")
        triplets.append(tuple(record[k] for k in keys))
    if not triplets:
        raise ValueError(f"preference file {path} holds no records")
    return triplets


@dataclasses.dataclass(frozen=True)
class PairDataConfig:
    """Where a launched run's pairs come from.

    "translation": the toy task of `jaxllm.data.tasks.translation` — `num_sources` sources drawn from
    `seed`, candidates = gilded reference + synthetic systems with `system_error_rates` (comma-separated
    sentence error rates), best vs worst by oracle chrF. "jsonl": `files` (comma-separated) of
    {"prompt", "chosen", "rejected"} texts, tokenised with the SentencePiece model `tokenizer` ("" = the
    shipped one). Rows are `max_len` tokens, prompts cut from the left to `max_prompt_len`.
    """

    source: str = "translation"
    files: str = ""
    tokenizer: str = ""
    num_sources: int = 1000
    system_error_rates: str = "0.1,0.25"
    seed: int = 0
    max_len: int = 32
    max_prompt_len: int = 16

    def __post_init__(self):
        if self.source not in PAIR_SOURCES:
            raise ValueError(f"data.source must be one of {PAIR_SOURCES}, got {self.source!r}")
        if self.source == "jsonl" and not self.files:
            raise ValueError("data.source 'jsonl' needs data.files (comma-separated paths), got ''")
        if not 0 < self.max_prompt_len < self.max_len:
            raise ValueError(f"need 0 < data.max_prompt_len < data.max_len, got {self.max_prompt_len}, {self.max_len}")


def load_pairs(cfg: PairDataConfig) -> tuple[dict[str, np.ndarray], Tokenizer]:
    """(pair arrays [N, max_len], the tokenizer that made them) of the source `cfg` names."""
    if cfg.source == "translation":
        task = translation.TranslationTask()
        tokenizer = task.tokenizer()
        rates = [float(r) for r in cfg.system_error_rates.split(",") if r.strip()]
        sources = task.sources({"train": cfg.num_sources}, cfg.seed)["train"]
        triplets = translation.synthetic_triplets(task, sources, np.random.default_rng(cfg.seed), rates)
    else:
        tokenizer = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else Tokenizer.default()
        triplets = [t for f in cfg.files.split(",") if f.strip() for t in read_triplets(f.strip())]
    pairs = pair_arrays(tokenizer, triplets, max_len=cfg.max_len, max_prompt_len=cfg.max_prompt_len, length=cfg.max_len)
    return pairs, tokenizer
