"""OpenAI API request models and response objects for `jaxllm.serve.api_server`.

Requests are validated strictly (unknown fields and wrong types are errors naming the field).
Fields are OpenAI's, plus vLLM's extras `top_k`, `repetition_penalty`, `ignore_eos`,
`stop_token_ids`, and `timeout` (seconds before the request is aborted). Responses, stream chunks
and log-prob objects have OpenAI's shapes: legacy `{"tokens", "token_logprobs", "top_logprobs",
"text_offset"}` on `/v1/completions`, `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`
on chat. Tokens are named by their text (SentencePiece's "▁" as a space).
"""
from __future__ import annotations

import json
import random
import re
import time
import uuid
from typing import Annotated, Literal

import pydantic
from pydantic import Field

from jaxllm.serve.engine import Engine
from jaxllm.serve.outputs import Completion, TokenEvent
from jaxllm.serve.sampling import MAX_LOGPROBS, SamplingParams

_STRICT = pydantic.ConfigDict(extra="forbid", strict=True)
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class StreamOptions(pydantic.BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Common(pydantic.BaseModel):
    """Fields both endpoints take."""
    model_config = _STRICT
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**32)] | None = None
    user: str | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    timeout: Annotated[float, Field(gt=0.0)] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: None = None
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def num_top(self) -> int:
        return self.logprobs or 0


class ContentPart(pydantic.BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(pydantic.BaseModel):
    model_config = _STRICT
    role: str
    content: str | list[ContentPart]
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: None = None
    echo: Literal[False] = False

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs

    @property
    def num_top(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0


class BadField(ValueError):
    """A request value that cannot be served; `param` names the field."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "n", "best_of", "stop", "logprobs", "seed",
           "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "stop_token_ids", "prompt")


def param_of(message: str) -> str | None:
    """The request field an engine error message names first (None if none)."""
    hits = [(m.start(), f) for f in _FIELDS if (m := re.search(rf"\b{f}\b", message))]
    if hits:
        return min(hits)[1]
    return "prompt" if "token id" in message or "prompt" in message else None


# ---- requests -> engine --------------------------------------------------------------------------

def completion_prompts(body: CompletionRequest, tokenizer) -> list[list[int]]:
    """Token ids of each prompt (text is encoded with BOS)."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt, bos=True)]
    if not prompt:
        raise BadField("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], str):
        return [tokenizer.encode(p, bos=True) for p in prompt]
    return [list(p) for p in prompt]


def chat_prompt(body: ChatRequest, tokenizer) -> list[int]:
    """The conversation through the tokenizer's chat template, ending in the assistant header."""
    messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                 else "".join(part.text for part in m.content)} for m in body.messages]
    try:
        return tokenizer.apply_chat(messages, add_generation_prompt=True)[0]
    except ValueError as err:
        raise BadField(f"messages: {err}", "messages") from None


def sampling_params(body, prompt: list[int], engine: Engine, tokenizer, defaults: dict, *,
                    chat: bool) -> SamplingParams | None:
    """SamplingParams of one prompt (None for `echo` with max_tokens 0: score only). max_tokens
    (default `defaults["max_tokens"]`) is capped by the context left after the prompt."""
    where = "messages" if chat else "prompt"
    context = engine.cfg.max_model_len
    if context is not None and len(prompt) >= context:
        raise BadField(f"{where} of {len(prompt)} tokens leaves no room in the model's context of {context} "
                       "tokens", where)
    max_tokens = (body.max_completion_tokens if chat else None) or body.max_tokens
    max_tokens = defaults.get("max_tokens", 16) if max_tokens is None else max_tokens
    if max_tokens == 0:
        if body.echo:
            return None
        raise BadField("max_tokens must be at least 1 (0 only with echo)", "max_tokens")
    if context is not None:
        max_tokens = min(max_tokens, context - len(prompt))
    if body.stream and body.echo:
        raise BadField("echo cannot be streamed", "echo")
    if body.stream and body.best_of is not None and body.best_of > body.n:
        raise BadField("best_of > n cannot be streamed", "best_of")
    try:
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    except ValueError:
        raise BadField(f"logit_bias keys must be token ids, got {sorted(body.logit_bias)[:3]}", "logit_bias") from None
    stop = tuple(body.stop_token_ids or ())
    if not body.ignore_eos:
        stop += (tokenizer.eos_id,)
    pick = lambda value, name, fallback: value if value is not None else defaults.get(name, fallback)  # noqa: E731
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=pick(body.temperature, "temperature", 1.0),
            top_p=pick(body.top_p, "top_p", 1.0), top_k=pick(body.top_k, "top_k", 0), stop_tokens=stop,
            seed=body.seed if body.seed is not None else random.getrandbits(32), n=body.n, best_of=body.best_of,
            stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()), logprobs=body.num_top,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty or 1.0, logit_bias=bias)
    except ValueError as err:
        raise BadField(str(err), param_of(str(err))) from None


def echo_logprobs(body, prompt: list[int], engine: Engine, chat: bool):
    """Prompt log-probs for `echo` with `logprobs` on /v1/completions, else None."""
    if chat or not body.echo or body.logprobs is None:
        return None
    return engine.prompt_logprobs(prompt, body.logprobs)


# ---- engine -> responses -------------------------------------------------------------------------

def response_meta(chat: bool, model: str) -> dict:
    prefix, kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def token_text(tokenizer, token: int) -> str:
    return tokenizer.id_to_piece(token).replace("\u2581", " ")


def _legacy_logprobs(tokenizer, tokens, logprobs, tops, offset: int = 0) -> dict:
    texts = [token_text(tokenizer, t) for t in tokens]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_logprobs": list(logprobs),
            "top_logprobs": [None if top is None else {token_text(tokenizer, t): x for t, x in top} for top in tops],
            "text_offset": offsets}


def _chat_logprobs(tokenizer, tokens, logprobs, tops) -> dict:
    def entry(t, x):
        text = token_text(tokenizer, t)
        return {"token": text, "logprob": x, "bytes": list(text.encode())}

    return {"content": [{**entry(t, x), "top_logprobs": [entry(u, y) for u, y in top]}
                        for t, x, top in zip(tokens, logprobs, tops)]}


def _tops(c_or_event, n: int):
    tops = list(c_or_event.top_logprobs)
    return tops + [()] * (n - len(tops))


def choice(c: Completion, index: int, body, prompt: list[int], echoed, tokenizer, chat: bool) -> dict:
    """One choice of a non-streamed response."""
    tops = _tops(c, len(c.tokens))
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(tokenizer, c.tokens, c.logprobs, tops) if body.logprobs else None,
                "finish_reason": c.finish_reason}
    text = c.text or ""
    logprobs = None
    if body.echo:
        prompt_text = tokenizer.decode(prompt)
        text = prompt_text + text
    if body.logprobs is not None:
        tokens, values, top = list(c.tokens), list(c.logprobs), tops
        if body.echo:
            tokens = prompt + tokens
            values = [None] + [x for x, _ in echoed] + values
            top = [None] + [t for _, t in echoed] + top
        logprobs = _legacy_logprobs(tokenizer, tokens, values, top)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}


def chat_chunk(meta: dict, index: int, delta: dict, logprobs, finish_reason) -> dict:
    return {**meta, "object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def stream_chunk(meta: dict, index: int, event: TokenEvent, body, tokenizer, chat: bool) -> dict:
    """One streamed token (its text may be empty while a stop string could be starting)."""
    tokens, values, tops = [event.token], [event.logprob], [event.top_logprobs]
    if chat:
        delta = {"content": event.text} if event.text or event.finish_reason is None else {}
        logprobs = _chat_logprobs(tokenizer, tokens, values, tops) if body.logprobs else None
        return chat_chunk(meta, index, delta, logprobs, event.finish_reason)
    logprobs = _legacy_logprobs(tokenizer, tokens, values, tops) if body.logprobs is not None else None
    return {**meta, "choices": [{"index": index, "text": event.text, "logprobs": logprobs,
                                 "finish_reason": event.finish_reason}]}


def usage(prompts: list[list[int]], completions: list[Completion]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.tokens) for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
