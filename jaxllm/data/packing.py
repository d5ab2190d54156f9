"""Packing variable-length token sequences into fixed-length rows for causal LM training.

Input elements are {"tokens": int32[L], "loss_mask": int32[L]} (loss_mask 1 on tokens that may be
scored). Output rows, each of length T:

* `tokens` int32: the packed ids; padding holds the tokenizer's pad id.
* `segment_ids` int32: 1, 2, ... for the sequences in the row, 0 on padding (attention never
  crosses segments).
* `positions` int32: position within the segment, restarting at 0 for each segment.
* `loss_mask` float32: 1 on scored target tokens: the element's loss_mask, but 0 at position 0 of
  every segment (nothing in the row predicts it) and 0 on padding.

Strategies (grain does the packing):

* "concat": `ConcatThenSplitIterDataset`. Sequences are laid end to end and cut every T tokens:
  no padding until the stream ends and no token is lost, but a sequence longer than what is left
  of a row continues in the next row as a new segment with positions restarting at 0 (its first
  token there is then unscored). The choice for pretraining.
* "first_fit": `FirstFitPackIterDataset` over `num_bins` rows at a time. Sequences are never
  split; a sequence longer than T is truncated to its first T tokens. The choice for
  prompt/response data, where a split would separate a response from its prompt.
* "none": one sequence per row, truncated to T and padded.
"""
from __future__ import annotations

import functools

import grain
import numpy as np

PACKINGS = ("concat", "first_fit", "none")
_LENGTH_KEYS = ("tokens", "loss_mask")


def pack(ds: grain.IterDataset, *, seq_len: int, packing: str = "concat", num_bins: int = 1,
         seed: int = 0, pad_id: int = 0) -> grain.IterDataset:
    """Packs a stream of sequences into rows of `seq_len` (see module docstring)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (one context and one target token), got {seq_len}")
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    lengths = {k: seq_len for k in _LENGTH_KEYS}
    if packing == "concat":
        ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
    elif packing == "first_fit":
        ds = ds.map(functools.partial(_truncate, seq_len=seq_len))
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct=lengths, num_packing_bins=num_bins, seed=seed, shuffle_bins=False)
    else:
        ds = ds.map(functools.partial(_pad_single, seq_len=seq_len))
    return ds.map(functools.partial(_finish_row, pad_id=pad_id))


def _truncate(element: dict, seq_len: int) -> dict:
    return {k: element[k][:seq_len] for k in _LENGTH_KEYS}


def _pad_single(element: dict, seq_len: int) -> dict:
    """One sequence as a row in grain's packed layout ({key}, {key}_segment_ids,
    {key}_positions)."""
    n = min(len(element["tokens"]), seq_len)
    row = {k: np.zeros(seq_len, np.int32) for k in _LENGTH_KEYS}
    for k in _LENGTH_KEYS:
        row[k][:n] = element[k][:n]
    row["tokens_segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    row["tokens_positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32)
    return row


def _finish_row(row: dict, pad_id: int) -> dict:
    """grain's packed layout -> the row format of the module docstring."""
    segment_ids = row["tokens_segment_ids"].astype(np.int32)
    positions = row["tokens_positions"].astype(np.int32)
    real = segment_ids > 0
    return {
        "tokens": np.where(real, row["tokens"], pad_id).astype(np.int32),
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": (row["loss_mask"] * real * (positions > 0)).astype(np.float32),
    }
