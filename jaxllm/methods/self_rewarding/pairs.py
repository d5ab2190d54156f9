"""AI-feedback preference pairs (arXiv 2401.10020 §2.3): per prompt the highest- vs the
lowest-scored candidate, with the statistics that show whether the judge is usable.

A candidate whose score is NaN (no valid judgement) is dropped; a prompt is dropped when fewer
than 2 candidates are left or when the best score equals the worst (a tie carries no
preference). Among equal best (or worst) scores the first candidate wins
(`jaxllm.data.preference.select_pair`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxllm.data.preference import select_pair

HISTOGRAM_BINS = np.arange(7) - 0.5  # scores rounded to 0, 1, ..., 5


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float


@dataclasses.dataclass(frozen=True)
class PairStats:
    """prompts_in / pairs_out; tie_rate and few_valid_rate: shares of prompts dropped for a tie or
    for fewer than 2 valid candidates; invalid_rate: share of candidates without a valid score;
    score_histogram: counts of valid candidate scores rounded half up to 0..5; mean chosen / rejected
    response length in characters (NaN without pairs)."""

    prompts_in: int
    pairs_out: int
    tie_rate: float
    few_valid_rate: float
    invalid_rate: float
    score_histogram: tuple[int, ...]
    mean_chosen_len: float
    mean_rejected_len: float


def score_histogram(scores) -> tuple[int, ...]:
    """Counts of the finite scores rounded (half up) to the integers 0..5."""
    scores = np.asarray(scores, np.float64).ravel()
    counts, _ = np.histogram(scores[np.isfinite(scores)], bins=HISTOGRAM_BINS)
    return tuple(int(c) for c in counts)


def build_pairs(prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                scores: Sequence[Sequence[float]]) -> tuple[list[PreferencePair], PairStats]:
    """(pairs, stats) from `candidates[i][j]` of `prompts[i]` with `scores[i][j]` (NaN = invalid)."""
    if not len(prompts) == len(candidates) == len(scores):
        raise ValueError(f"got {len(prompts)} prompts, {len(candidates)} candidate lists and {len(scores)} score lists")
    pairs, ties, few, invalid, total = [], 0, 0, 0, 0
    for i, (prompt, cands, row) in enumerate(zip(prompts, candidates, scores)):
        row = np.asarray(row, np.float64)
        if row.shape != (len(cands),):
            raise ValueError(f"prompt {i}: {len(cands)} candidates but scores of shape {row.shape}")
        valid = np.isfinite(row)
        total += len(cands)
        invalid += int((~valid).sum())
        if valid.sum() < 2:
            few += 1
            continue
        kept = [j for j in range(len(cands)) if valid[j]]
        picked = select_pair(kept, row[kept])
        if picked is None:
            ties += 1
            continue
        best, worst = picked
        pairs.append(PreferencePair(prompt, cands[best], cands[worst], float(row[best]), float(row[worst])))
    n = len(prompts)
    all_scores = [s for row in scores for s in row]
    stats = PairStats(
        prompts_in=n, pairs_out=len(pairs), tie_rate=ties / n if n else float("nan"),
        few_valid_rate=few / n if n else float("nan"), invalid_rate=invalid / total if total else float("nan"),
        score_histogram=score_histogram(all_scores),
        mean_chosen_len=float(np.mean([len(p.chosen) for p in pairs])) if pairs else float("nan"),
        mean_rejected_len=float(np.mean([len(p.rejected) for p in pairs])) if pairs else float("nan"))
    return pairs, stats
