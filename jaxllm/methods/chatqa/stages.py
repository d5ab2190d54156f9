"""ChatQA's two instruction-tuning data stages.

* **Stage 1.** A general instruction blend generated from documents (`instruction_blend`:
  continuation, first sentence, sentence naming a keyword), no context.
* **Stage 2.** Context-enhanced examples (`context_examples`): every turn of the training dialogues
  with its top-k retrieved chunks (the gold chunk put in when retrieval missed it) and the dialogue
  so far → the answer; unanswerable turns and synthetic unanswerable ones (`synthetic_unanswerable`:
  chunks holding the answer removed) → `REFUSAL`; mixed with stage-1 examples (`mix`).
"""
from __future__ import annotations

import collections
import re
from collections.abc import Sequence

import numpy as np

from jaxllm.data.tasks.conv_qa import Dialogue
from jaxllm.methods.chatqa.prompts import ANSWER_INSTRUCTION, REFUSAL, ChatExample

STAGE1_TASKS = ("continue", "first_sentence", "keyword")

_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_KEYWORD_RE = re.compile(r"[A-Za-z]{6,}")


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


