"""What the engine hands out: finished samples (`Completion`) and streamed tokens (`TokenEvent`)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Completion:
    """One finished sample: generated `tokens`, the log-probability of each under the distribution
    it was sampled from, why it ended ("stop": a stop token, kept in `tokens`, or a stop string;
    "length": max_tokens), and how many prompt tokens were served from the prefix cache. With a
    tokenizer: `text` (cut before a stop string). `top_logprobs`: per token, the requested number
    of (token, logprob) alternatives, most likely first."""
    request_id: int
    sample_index: int
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    num_cached_tokens: int
    text: str | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One token produced by `Engine.step` (finish_reason set on a sample's last token). `text`:
    the sample's text handed out with this token (with a tokenizer; may lag behind the tokens
    while a stop string could be starting); `top_logprobs` as in `Completion`."""
    request_id: int
    sample_index: int
    token: int
    logprob: float
    finish_reason: str | None
    text: str = ""
    top_logprobs: tuple[tuple[int, float], ...] = ()
