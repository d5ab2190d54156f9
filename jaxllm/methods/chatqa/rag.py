"""ChatQA's retrieval-augmented generation and answer metrics.

`rag_generate`: top-k chunks for the multi-turn query from a `Retriever`, the prompt rendered as in
training, greedy generation through `jaxllm.serve.Engine`. `answer_metrics` scores answers (SQuAD
exact match and token F1 on answerable turns) and refusals.
"""
from __future__ import annotations

import collections
import dataclasses
import string
from collections.abc import Sequence

import numpy as np

from jaxllm.data.tokenizer import Tokenizer
from jaxllm.methods.chatqa.prompts import ANSWER_INSTRUCTION, REFUSAL, SYSTEM_PROMPT, ChatExample, fit_example
from jaxllm.methods.chatqa_retriever import Retriever
from jaxllm.model import llama
from jaxllm.serve import Engine, SamplingParams

REFUSAL_MARKER = "cannot find the answer"  # what `is_refusal` looks for in a normalised output


@dataclasses.dataclass(frozen=True)
class RAGConfig:
    """Inference: `top_k` chunks as context, prompts cut to `max_prompt_len` tokens (`fit_example`),
    greedy answers of at most `max_new_tokens`; engine sizing (`token_budget` tokens per pass,
    `max_seqs` sequences in flight, `num_blocks` KV blocks of 16 tokens)."""

    top_k: int = 5
    max_prompt_len: int = 448
    max_new_tokens: int = 64
    token_budget: int = 512
    max_seqs: int = 32
    num_blocks: int = 1024

    def __post_init__(self):
        for name in ("top_k", "max_prompt_len", "max_new_tokens", "token_budget", "max_seqs", "num_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"RAGConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class RAGOutput:
    """One answer: its text, the retrieved chunk ids and scores (best first), and the prompt length."""

    answer: str
    chunk_ids: tuple[int, ...]
    scores: tuple[float, ...]
    prompt_tokens: int


def rag_generate(retriever: Retriever, engine, tokenizer: Tokenizer, chunk_texts: Sequence[str],
                 requests: Sequence[tuple[Sequence[tuple[str, str]], str]], cfg: RAGConfig, *,
                 system: str = SYSTEM_PROMPT, instruction: str = ANSWER_INSTRUCTION) -> list[RAGOutput]:
    """Answers to (history, question) requests: the multi-turn query retrieves the top-k chunks of
    `chunk_texts` (indexed by `retriever`), the ChatQA prompt is rendered and fitted to
    cfg.max_prompt_len, and `engine` (a `jaxllm.serve.Engine`) decodes greedily until </s>."""
    if not requests:
        return []
    queries = [retriever.query_text(history, question) for history, question in requests]
    scores_QK, ids_QK = retriever.search(queries, cfg.top_k)
    prompts = []
    for (history, question), ids in zip(requests, ids_QK.tolist()):
        example = ChatExample(context=tuple(chunk_texts[c] for c in ids), history=tuple(map(tuple, history)),
                              question=question, instruction=instruction)
        prompts.append(fit_example(tokenizer, example, cfg.max_prompt_len, system)[1])
    sampling = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=0.0, stop_tokens=(tokenizer.eos_id,))
    completions = engine.generate(prompts, sampling)
    out = []
    for prompt, completion, scores, ids in zip(prompts, completions, scores_QK.tolist(), ids_QK.tolist()):
        tokens = [t for t in completion.tokens if t != tokenizer.eos_id]
        out.append(RAGOutput(tokenizer.decode(tokens).strip(), tuple(ids), tuple(scores), len(prompt)))
    return out


def make_engine(model_cfg: llama.LlamaConfig, params, cfg: RAGConfig):
    """A `jaxllm.serve.Engine` for `model_cfg` sized by `cfg`."""
    return Engine(model_cfg, params, token_budget=cfg.token_budget, max_seqs=cfg.max_seqs, num_blocks=cfg.num_blocks,
                  max_model_len=min(model_cfg.max_len, cfg.max_prompt_len + cfg.max_new_tokens))


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between normalised texts (1.0 when both are empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def is_refusal(text: str) -> bool:
    """Whether an output declines to answer: its normalised text contains the normalised REFUSAL_MARKER."""
    return normalize_answer(REFUSAL_MARKER) in normalize_answer(text)


def answer_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Answer quality; a reference equal to REFUSAL marks an unanswerable turn.

    Answerable turns: `exact_match` and `f1` (SQuAD, refusals score 0), `answered` (fraction not
    refused). Unanswerable turns: `refusal_accuracy` (fraction refused). `unanswerable_avg`: the mean
    of `answered` and `refusal_accuracy` (ChatQA's unanswerable metric). Counts `n_answerable`,
    `n_unanswerable`; a metric over no turns is NaN.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    answerable = [(p, r) for p, r in zip(predictions, references) if r != REFUSAL]
    unanswerable = [p for p, r in zip(predictions, references) if r == REFUSAL]
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
    out = {"exact_match": mean([float(normalize_answer(p) == normalize_answer(r)) for p, r in answerable]),
           "f1": mean([token_f1(p, r) for p, r in answerable]),
           "answered": mean([float(not is_refusal(p)) for p, _ in answerable]),
           "refusal_accuracy": mean([float(is_refusal(p)) for p in unanswerable]),
           "n_answerable": float(len(answerable)), "n_unanswerable": float(len(unanswerable))}
    out["unanswerable_avg"] = (out["answered"] + out["refusal_accuracy"]) / 2
    return out


