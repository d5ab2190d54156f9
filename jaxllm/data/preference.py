"""Preference pairs on the host: best-vs-worst pair selection and joint prompt+response tokenisation.

Joint tokenisation. Tokenising prompt and response separately can split text differently from what the model
sees at generation time (BPE merges across the boundary, e.g. "...hel" + "lo" -> "hello"), and can give the
chosen and rejected sequences different prompt tokens. Here each response is tokenised *together* with its
prompt, and the boundary is recovered as the longest common prefix of the token ids of `prompt` alone and of
`prompt + response`. Those prefix tokens decode to a prefix of the prompt, so they are prompt-only; every
token after the prefix (including a token merged across the boundary) is scored. Hence every response
character lies in a scored token, whatever the tokenizer merges. The common prefix of the chosen and the
rejected sequence is identical prompt tokens (`prompt_len`); each side's mask starts at its own boundary.
"""
from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


class PairTokenizer(Protocol):
    """What pair building needs from a tokenizer (`jaxllm.data.tokenizer.Tokenizer` has it)."""

    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


def select_pair(candidates: Sequence[T], scores, *, drop_ties: bool = True) -> tuple[T, T] | None:
    """(chosen, rejected) = (best, worst) of N ≥ 2 scored candidates; the middle ones are dropped.

    Tie-breaking is by position: among equal best (or equal worst) scores the first candidate wins (the
    ALMA-R code's `argmax`/`argmin` over its fixed order reference, GPT-4, ALMA). When the best score equals
    the worst (all candidates tie) there is no preference: None with `drop_ties`, else the first candidate
    twice (ALMA-R code behaviour: only the NLL term then acts). Average several scorers before calling.
    """
    scores_N = np.asarray(scores, dtype=np.float64)
    if scores_N.ndim != 1 or scores_N.shape[0] != len(candidates):
        raise ValueError(f"scores shape {scores_N.shape} does not match {len(candidates)} candidates")
    if len(candidates) < 2:
        raise ValueError(f"need at least 2 candidates to build a pair, got {len(candidates)}")
    if not np.all(np.isfinite(scores_N)):
        raise ValueError(f"scores must be finite, got {scores_N.tolist()}")
    best, worst = int(np.argmax(scores_N)), int(np.argmin(scores_N))
    if scores_N[best] == scores_N[worst] and drop_ties:
        return None
    return candidates[best], candidates[worst]


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _joint_encode(tokenizer: PairTokenizer, prompt: str, response: str, add_bos: bool) -> tuple[list[int], int]:
    """Ids of prompt+response+EOS and the index of the first response token (see module docstring)."""
    if not response:
        raise ValueError(f"empty response for prompt {prompt[:80]!r}")
    prompt_ids = tokenizer.encode(prompt, bos=add_bos, eos=False)
    full_ids = tokenizer.encode(prompt + response, bos=add_bos, eos=False)
    start = _common_prefix_len(prompt_ids, full_ids)
    if start == len(full_ids):
        raise ValueError(f"response {response!r} adds no tokens after prompt {prompt[:80]!r}")
    if start == 0:
        raise ValueError(f"nothing precedes response {response[:80]!r}: give a prompt or add_bos=True")
    return list(full_ids) + [tokenizer.eos_id], start


def tokenize_pair(
    tokenizer: PairTokenizer,
    prompt: str,
    chosen: str,
    rejected: str,
    *,
    max_len: int = 512,
    max_prompt_len: int = 256,
    add_bos: bool = True,
) -> dict:
    """Jointly tokenised (prompt + chosen, prompt + rejected) with EOS appended and response loss masks.

    Returns {"chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask"} (int32 numpy, unpadded;
    mask 1 on response tokens incl. EOS, 0 on prompt) and "prompt_len": the number of leading prompt tokens
    the two sequences share. When the longer sequence exceeds `max_len`, the shared prompt is cut from the
    left (after BOS) to `max_prompt_len` tokens, identically on both sides; responses still too long are
    cut from the right (losing EOS), as TRL does.
    """
    if not 0 < max_prompt_len < max_len:
        raise ValueError(f"need 0 < max_prompt_len < max_len, got max_prompt_len={max_prompt_len}, max_len={max_len}")
    responses = {"chosen": chosen, "rejected": rejected}
    sides = {name: _joint_encode(tokenizer, prompt, text, add_bos) for name, text in responses.items()}
    prompt_len = min(start for _, start in sides.values())
    keep = int(add_bos)
    drop = 0
    if max(len(ids) for ids, _ in sides.values()) > max_len:
        drop = max(0, prompt_len - max_prompt_len)
    out = {"prompt_len": prompt_len - drop}
    for name, (ids, start) in sides.items():
        ids = (ids[:keep] + ids[keep + drop:])[:max_len]
        mask = np.zeros(len(ids), np.int32)
        mask[start - drop:] = 1
        if not mask.any():
            raise ValueError(f"{name} response {responses[name][:80]!r} does not fit max_len={max_len}")
        out[f"{name}_tokens"] = np.asarray(ids, np.int32)
        out[f"{name}_mask"] = mask
    return out


def collate_pairs(pairs: Sequence[dict], *, pad_id: int, length: int | None = None, multiple: int = 1) -> dict:
    """Pad tokenised pairs into one batch of numpy arrays [B, T], chosen and rejected sharing T.

    T is the longest sequence rounded up to `multiple` (bucketing keeps jit shapes few), or `length` when
    given. Keys: {chosen,rejected}_{tokens,mask,positions,segment_ids}; padding has token `pad_id`, mask 0,
    segment id 0 (real tokens 1); positions are 0..T-1.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    if pad_id < 0:
        raise ValueError(f"pad_id must be a valid token id (>= 0), got {pad_id}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    longest = max(len(p[f"{side}_tokens"]) for p in pairs for side in ("chosen", "rejected"))
    padded_len = -(-longest // multiple) * multiple
    if length is not None:
        if longest > length:
            raise ValueError(f"a pair has {longest} tokens, more than length={length}")
        padded_len = length
    batch = {}
    for side in ("chosen", "rejected"):
        tokens_BT = np.full((len(pairs), padded_len), pad_id, np.int32)
        mask_BT = np.zeros((len(pairs), padded_len), np.int32)
        segment_ids_BT = np.zeros((len(pairs), padded_len), np.int32)
        for row, pair in enumerate(pairs):
            n = len(pair[f"{side}_tokens"])
            tokens_BT[row, :n] = pair[f"{side}_tokens"]
            mask_BT[row, :n] = pair[f"{side}_mask"]
            segment_ids_BT[row, :n] = 1
        batch[f"{side}_tokens"] = tokens_BT
        batch[f"{side}_mask"] = mask_BT
        batch[f"{side}_positions"] = np.broadcast_to(np.arange(padded_len, dtype=np.int32), tokens_BT.shape).copy()
        batch[f"{side}_segment_ids"] = segment_ids_BT
    return batch
