"""ChatQA's prompt layout (arXiv 2401.10225) through `Tokenizer.apply_chat`: the system message is the
system prompt followed by the context passages (none for stage-1 data), then the alternating
user/assistant turns; an instruction is prepended to the first user turn only. Loss on the final
answer and its </s> only: `encode_examples` makes SFT rows (`tokens`, `loss_mask`) for
`jaxllm.objectives.sft`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxllm.data.tasks import conv_qa
from jaxllm.data.tokenizer import Tokenizer

REFUSAL = conv_qa.REFUSAL
SYSTEM_PROMPT = ("This is a chat between a user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions based on the context. The "
                 "assistant should also indicate when the answer cannot be found in the context.")
ANSWER_INSTRUCTION = "Please give a full and complete answer for the question."


@dataclasses.dataclass(frozen=True)
class ChatExample:
    """A conversation to render: context passages (empty for stage-1 data), the earlier turns as
    (role, content) pairs oldest first (user, assistant, user, ...), the current question and its
    answer (None for a generation prompt). `instruction` is prepended to the first user turn."""

    context: tuple[str, ...]
    history: tuple[tuple[str, str], ...]
    question: str
    answer: str | None = None
    instruction: str = ""

    def __post_init__(self):
        roles = [role for role, _ in self.history]
        expected = ["user", "assistant"] * (len(roles) // 2)
        if roles != expected:
            raise ValueError(f"history must alternate user/assistant pairs starting with user, got roles {roles}")


def chat_messages(example: ChatExample, system: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The `apply_chat` messages of `example`: system prompt + "\\n\\n"-joined context, then the turns."""
    turns = [*example.history, ("user", example.question)]
    if example.answer is not None:
        turns.append(("assistant", example.answer))
    messages = [{"role": "system", "content": "\n\n".join((system, *example.context))}]
    for i, (role, content) in enumerate(turns):
        if i == 0 and example.instruction:
            content = f"{example.instruction} {content}"
        messages.append({"role": role, "content": content})
    return messages


def render(tokenizer: Tokenizer, example: ChatExample, system: str = SYSTEM_PROMPT) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of `example`. With an answer the mask is 1 on the final answer's tokens and
    its </s> only; without one, ids are the generation prompt (ending in the assistant header, which
    is exactly the prefix the answer follows in training) and the mask is all 0."""
    messages = chat_messages(example, system)
    if example.answer is None:
        ids, _ = tokenizer.apply_chat(messages, add_generation_prompt=True)
        return ids, [0] * len(ids)
    prompt, _ = tokenizer.apply_chat(messages[:-1], add_generation_prompt=True)
    ids, mask = tokenizer.apply_chat(messages)
    return ids, [0] * len(prompt) + mask[len(prompt):]


def fit_example(tokenizer: Tokenizer, example: ChatExample, max_len: int,
                system: str = SYSTEM_PROMPT) -> tuple[ChatExample, list[int], list[int]]:
    """`example` shortened until rendered within `max_len` tokens — the oldest (user, assistant) pair
    of the history dropped first, then the last (lowest-ranked) context passage — and its rendering.
    Raises ValueError when the question and answer alone do not fit."""
    while True:
        ids, mask = render(tokenizer, example, system)
        if len(ids) <= max_len:
            return example, ids, mask
        if example.history:
            example = dataclasses.replace(example, history=example.history[2:])
        elif example.context:
            example = dataclasses.replace(example, context=example.context[:-1])
        else:
            raise ValueError(f"question {example.question[:60]!r} and its answer take {len(ids)} tokens without "
                             f"context or history, more than max_len={max_len}")


def encode_examples(tokenizer: Tokenizer, examples: Sequence[ChatExample], max_len: int, *,
                    system: str = SYSTEM_PROMPT, multiple: int = 16) -> dict[str, np.ndarray]:
    """SFT rows for `fit_sft`: {"tokens", "loss_mask"} [N, T] int32 (right-padded with
    pad_id; T = the longest fitted example rounded up to `multiple`, at most max_len)."""
    if not examples:
        raise ValueError("no examples to encode")
    rows = [fit_example(tokenizer, ex, max_len, system)[1:] for ex in examples]
    T = min(max_len, -(-max(len(ids) for ids, _ in rows) // multiple) * multiple)
    tokens_NT = np.full((len(rows), T), tokenizer.pad_id, np.int32)
    mask_NT = np.zeros((len(rows), T), np.int32)
    for i, (ids, mask) in enumerate(rows):
        tokens_NT[i, :len(ids)], mask_NT[i, :len(ids)] = ids, mask
    return {"tokens": tokens_NT, "loss_mask": mask_NT}


