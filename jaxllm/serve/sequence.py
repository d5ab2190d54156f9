"""What the scheduler schedules: one sample of one request (`Sequence`, with its `Status`), the
plan of one pass (`StepPlan`), and the validation of a request's prompt."""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence as SequenceABC

import numpy as np

from jaxllm.serve.cache import RaggedBatch
from jaxllm.serve.sampling import LogitAdjust, SamplingParams, SamplingRows, logit_adjust, sampling_rows


def check_prompt(request_index: int | str, tokens: SequenceABC[int], vocab_size: int | None) -> None:
    """ValueError naming the request and the value when `tokens` is empty or holds an id that is not
    an integer in [0, vocab_size)."""
    if not tokens:
        raise ValueError(f"request {request_index}: empty prompt")
    for t in tokens:
        if not isinstance(t, (int, np.integer)) or t < 0 or (vocab_size is not None and t >= vocab_size):
            vocab = f" (vocabulary size {vocab_size})" if vocab_size is not None else ""
            raise ValueError(f"request {request_index}: invalid token id {t!r}{vocab}")


class Status(enum.Enum):
    WAITING = "waiting"    # queued, no blocks
    PREFILL = "prefill"    # admitted, prompt (or recompute) chunks pending
    DECODE = "decode"      # one pending token: the last sampled one
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One sample of one request: its tokens (prompt, then output), and how many are cached.

    `key` names the random stream of its samples (with seed, sample index and token index).
    `prompt_key`, when given, replaces the prompt's ids in prefix-cache lookups: a request whose
    prompt is several token streams (one per ensemble member) is cached under ids naming all of
    them. `num_cached_tokens`: prompt tokens found in the prefix cache at first admission.
    """
    seq_id: int
    request_index: int
    sample_index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    key: int = 0
    prompt_key: list[int] | None = None
    logprobs: list[float] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0
    finish_reason: str | None = None  # "stop" | "length"
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    forks: list[Sequence] = dataclasses.field(default_factory=list)  # samples to fork once the prompt is in

    @property
    def prompt(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def cache_ids(self) -> list[int]:
        """The ids prefix caching hashes: `prompt_key` (or the prompt), then the output."""
        return self.token_ids if self.prompt_key is None else self.prompt_key + self.output

    @property
    def max_kv_tokens(self) -> int:
        """Tokens whose K/V is ever cached: all but the last sampled one."""
        return self.num_prompt_tokens + self.params.max_tokens - 1


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One pass: row s of `batch` feeds `num_tokens[s]` tokens of `seqs[s]`."""
    seqs: tuple[Sequence, ...]
    num_tokens: tuple[int, ...]
    batch: RaggedBatch

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(self.num_tokens)

    def sampling_rows(self) -> SamplingRows:
        """Sampling inputs for every row of `batch` (padding rows greedy)."""
        return sampling_rows([s.params for s in self.seqs], [s.key for s in self.seqs],
                             [s.sample_index for s in self.seqs],
                             [s.num_tokens - s.num_prompt_tokens for s in self.seqs],
                             len(self.batch.context_len_S))

    def logit_adjust(self, vocab_size: int) -> LogitAdjust | None:
        """Penalty and bias inputs of the pass, or None when no row asks for them."""
        if not any(s.params.adjusts_logits for s in self.seqs):
            return None
        return logit_adjust([s.params for s in self.seqs], [s.prompt for s in self.seqs],
                            [s.output for s in self.seqs], len(self.batch.context_len_S), vocab_size)
