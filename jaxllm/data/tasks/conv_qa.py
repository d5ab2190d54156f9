"""Synthetic multi-turn conversational QA over a real document corpus (ChatQA's retriever task).

Documents (by default the embedded stdlib corpus, `jaxllm.data.corpus.documents()`) are cut into
~300-word chunks; every chunk is a retrieval target. Per document, a few *key entities* are picked
(words frequent in it and rare elsewhere, tf·idf). A *fact* is an (entity, aspect word, chunk)
triple such that the chunk is the only one in the whole corpus holding both words; its answer is
the first sentence of the chunk containing the aspect. Aspects also occur in other documents, so
the aspect alone does not identify the chunk.

A dialogue stays on one document. Its first turn names the entity ("In deque, what is said about
rotation?"); follow-ups refer back by pronoun or ellipsis ("What about maxlen?") and need the
history to be resolved — the property ChatQA's multi-turn retriever exploits. Some follow-ups
switch to another entity of the document by name, and some ask about an aspect the document never
mentions (unanswerable; the answer is `REFUSAL`). Each turn records the gold chunk, an oracle
self-contained rewrite, the answer and its character span in the gold chunk.

Documents are split into train / validation / test, so no document (nor its chunks' answers) is
shared between splits. Everything is deterministic given the documents and the seed.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

REFUSAL = "Sorry. I cannot find the answer based on the context."
SPLITS = ("train", "val", "test")

# (question as asked, oracle rewrite); {E} = entity, {A} = aspect.
EXPLICIT_TEMPLATES = (
    "In {E}, what is said about {A}?",
    "What does the documentation of {E} say about {A}?",
    "How is {A} described for {E}?",
    "Tell me about {A} in {E}.",
)
FOLLOWUP_TEMPLATES = (
    ("What about {A}?", "What about {A} in {E}?"),
    ("And what does it say about {A}?", "And what does {E} say about {A}?"),
    ("How is {A} described for it?", "How is {A} described for {E}?"),
    ("Does it mention {A}?", "Does {E} mention {A}?"),
    ("And regarding {A}?", "And regarding {A} in {E}?"),
)
STOPWORDS = frozenset("""
a about above after again against all also although am an and any are as at be because been before
being below between both but by can cannot could did do does doing done down during each either else
even every few for from further had has have having he her here hers him his how however if in into
is it its itself just least less like made make many may me might more most much must my need needs
neither never no nor not now of off often on once one only or other otherwise our out over own per
rather same see she should since so some such than that the their them then there therefore these
they this those though through thus to too two under until up upon us use used uses using very via
was way we well were what when where whether which while who whom whose why will with within without
would yet you your true false none self return returns value values default object objects argument
arguments function functions method methods class classes module modules given call called new first
""".split())
_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_TEMPLATE_WORDS = frozenset(w.lower() for t in EXPLICIT_TEMPLATES + sum(FOLLOWUP_TEMPLATES, ())
                            for w in _WORD_RE.findall(t.replace("{E}", "").replace("{A}", "")))
MIN_WORD_CHARS = 4


@dataclasses.dataclass(frozen=True)
class Chunk:
    chunk_id: int  # index into ConvQAData.chunks
    doc_id: int  # index into the input documents
    text: str


@dataclasses.dataclass(frozen=True)
class Turn:
    """One user turn and its reference answer.

    `gold_chunk` is -1 and `answer_span` None when the turn is unanswerable (then answer = REFUSAL).
    `needs_history`: the question refers to its entity by pronoun/ellipsis, so only the dialogue
    history (or the oracle `rewrite`) says what it is about.
    """

    question: str
    rewrite: str
    answer: str
    answer_span: tuple[int, int] | None
    gold_chunk: int
    answerable: bool
    needs_history: bool
    entity: str
    aspect: str


@dataclasses.dataclass(frozen=True)
class Dialogue:
    doc_id: int
    turns: tuple[Turn, ...]

    def history(self, t: int) -> list[tuple[str, str]]:
        """(role, content) pairs of the turns before turn `t`, oldest first: each user question
        followed by its assistant answer."""
        if not 0 <= t < len(self.turns):
            raise ValueError(f"turn index {t} out of range for a dialogue of {len(self.turns)} turns")
        return [pair for turn in self.turns[:t] for pair in (("user", turn.question), ("assistant", turn.answer))]


@dataclasses.dataclass(frozen=True)
class ConvQAConfig:
    """Generator settings. Probabilities are per follow-up turn; fractions are of usable documents
    (those with at least one entity holding `min_turns` facts)."""

    chunk_words: int = 300
    dialogues_per_doc: int = 2
    min_turns: int = 2
    max_turns: int = 5
    entities_per_doc: int = 3
    switch_prob: float = 0.15
    unanswerable_prob: float = 0.1
    max_answer_words: int = 60
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.chunk_words < 1 or self.dialogues_per_doc < 1 or self.entities_per_doc < 1:
            raise ValueError(f"chunk_words, dialogues_per_doc and entities_per_doc must be >= 1: {self}")
        if not 1 <= self.min_turns <= self.max_turns:
            raise ValueError(f"need 1 <= min_turns={self.min_turns} <= max_turns={self.max_turns}")
        if self.switch_prob < 0 or self.unanswerable_prob < 0 or self.switch_prob + self.unanswerable_prob > 1:
            raise ValueError(f"switch_prob={self.switch_prob} and unanswerable_prob={self.unanswerable_prob} "
                             "must be >= 0 with a sum <= 1")
        if self.val_fraction < 0 or self.test_fraction < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction={self.val_fraction} and test_fraction={self.test_fraction} "
                             "must be >= 0 with a sum < 1")


@dataclasses.dataclass(frozen=True)
class ConvQAData:
    """All chunks of the corpus (the retrieval index, distractor documents included) and the
    dialogues and document ids of each split."""

    chunks: tuple[Chunk, ...]
    dialogues: dict[str, tuple[Dialogue, ...]]
    doc_ids: dict[str, tuple[int, ...]]


def chunk_words(text: str, words: int = 300) -> list[str]:
    """`text` cut into round(n / words) pieces of near-equal word counts (one piece when shorter),
    each an exact substring from its first to its last word, so line breaks and sentences survive."""
    if words < 1:
        raise ValueError(f"words must be >= 1, got {words}")
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    if not spans:
        return []
    n_chunks = max(1, round(len(spans) / words))
    cuts = [round(i * len(spans) / n_chunks) for i in range(n_chunks + 1)]
    return [text[spans[a][0]:spans[b - 1][1]] for a, b in zip(cuts[:-1], cuts[1:])]


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def _content_word(w: str) -> bool:
    return len(w.strip("_")) >= MIN_WORD_CHARS and w not in STOPWORDS and w not in _TEMPLATE_WORDS


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text` (split after . ! ? + whitespace, or at blank lines)."""
    spans, start = [], 0
    for m in list(_SENTENCE_END_RE.finditer(text)) + [None]:
        end = len(text) if m is None else m.start()
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
        start = end if m is None else m.end()
    return spans


@dataclasses.dataclass(frozen=True)
class _Fact:
    chunk_id: int
    aspect: str  # lower-cased
    span: tuple[int, int]


class _Corpus:
    """Word statistics of the chunked corpus that the fact selection needs."""

    def __init__(self, documents: Sequence[str], chunk_size: int):
        self.chunks: list[Chunk] = []
        self.doc_chunks: list[list[int]] = []
        for d, text in enumerate(documents):
            ids = []
            for piece in chunk_words(text, chunk_size):
                ids.append(len(self.chunks))
                self.chunks.append(Chunk(len(self.chunks), d, piece))
            self.doc_chunks.append(ids)
        self.chunk_words = [frozenset(w.lower() for w in _words(c.text)) for c in self.chunks]
        self.word_chunks: dict[str, set[int]] = collections.defaultdict(set)
        for c, ws in enumerate(self.chunk_words):
            for w in ws:
                self.word_chunks[w].add(c)
        self.doc_words = [frozenset().union(*(self.chunk_words[c] for c in ids)) for ids in self.doc_chunks]
        self.doc_freq = collections.Counter(w for ws in self.doc_words for w in ws)

    def entities(self, d: int, k: int) -> list[tuple[str, str]]:
        """Top-k (lower-cased, surface form) key words of document d by tf·idf, occurring >= 2 times
        in it and in at most a tenth of the documents."""
        n_docs = len(self.doc_chunks)
        forms = collections.Counter(w for c in self.doc_chunks[d] for w in _words(self.chunks[c].text))
        tf = collections.Counter()
        for form, n in forms.items():
            tf[form.lower()] += n
        max_df = max(1, n_docs // 10)
        scored = sorted((-n * math.log(n_docs / self.doc_freq[w]), w) for w, n in tf.items()
                        if n >= 2 and _content_word(w) and self.doc_freq[w] <= max_df)
        surface = {}
        for form, n in sorted(forms.items(), key=lambda fn: (-fn[1], fn[0])):
            surface.setdefault(form.lower(), form)
        return [(w, surface[w]) for _, w in scored[:k]]

    def facts(self, d: int, entity: str, exclude: frozenset[str], max_answer_words: int) -> list[_Fact]:
        """Facts (chunk, aspect, answer sentence span) of `entity` in document d: the chunk is the only
        one in the corpus holding both words, and the aspect occurs in another document too."""
        entity_chunks = self.word_chunks[entity]
        out = []
        for c in self.doc_chunks[d]:
            if c not in entity_chunks:
                continue
            text = self.chunks[c].text
            sentences = [(s, frozenset(w.lower() for w in _words(text[s[0]:s[1]]))) for s in _sentence_spans(text)]
            for aspect in sorted(self.chunk_words[c] - exclude):
                if (not _content_word(aspect) or self.doc_freq[aspect] < 2
                        or len(entity_chunks & self.word_chunks[aspect]) != 1):
                    continue
                span = next((s for s, ws in sentences if aspect in ws), None)
                if span is not None and len(text[span[0]:span[1]].split()) <= max_answer_words:
                    out.append(_Fact(c, aspect, span))
        return out


def _aspect_surface(text: str, aspect: str) -> str:
    return next(w for w in _words(text) if w.lower() == aspect)


def _foreign_aspect(doc_words: frozenset[str], foreign: list[str], rng: np.random.Generator,
                    tries: int = 100) -> str | None:
    """A word of other documents that `doc_words` lacks (None if `tries` random draws all hit it)."""
    for _ in range(tries):
        aspect = foreign[rng.integers(len(foreign))]
        if aspect not in doc_words:
            return aspect
    return None


def _dialogue(corpus: _Corpus, d: int, facts: dict[str, list[_Fact]], surface: dict[str, str],
              foreign: list[str], cfg: ConvQAConfig, rng: np.random.Generator) -> Dialogue | None:
    """One dialogue over document d, or None when its facts run out before cfg.min_turns turns."""
    unused = {e: list(fs) for e, fs in facts.items()}

    def pick(entity: str) -> _Fact:
        return unused[entity].pop(int(rng.integers(len(unused[entity]))))

    def answerable_turn(entity: str, fact: _Fact, follow_up: bool) -> Turn:
        chunk = corpus.chunks[fact.chunk_id]
        fill = {"E": surface[entity], "A": _aspect_surface(chunk.text[fact.span[0]:fact.span[1]], fact.aspect)}
        if follow_up:
            question, rewrite = (t.format(**fill) for t in FOLLOWUP_TEMPLATES[rng.integers(len(FOLLOWUP_TEMPLATES))])
        else:
            question = rewrite = EXPLICIT_TEMPLATES[rng.integers(len(EXPLICIT_TEMPLATES))].format(**fill)
        return Turn(question, rewrite, chunk.text[fact.span[0]:fact.span[1]], fact.span, fact.chunk_id, True,
                    follow_up, surface[entity], fill["A"])

    n_turns = int(rng.integers(cfg.min_turns, cfg.max_turns + 1))
    starts = [e for e, fs in facts.items() if len(fs) >= 2]
    entity = starts[rng.integers(len(starts))]
    turns = [answerable_turn(entity, pick(entity), follow_up=False)]
    while len(turns) < n_turns:
        others = [e for e in unused if e != entity and unused[e]]
        r = rng.random()
        aspect = _foreign_aspect(corpus.doc_words[d], foreign, rng) if r < cfg.unanswerable_prob else None
        if aspect is not None:
            question, rewrite = (t.format(E=surface[entity], A=aspect)
                                 for t in FOLLOWUP_TEMPLATES[rng.integers(len(FOLLOWUP_TEMPLATES))])
            turns.append(Turn(question, rewrite, REFUSAL, None, -1, False, True, surface[entity], aspect))
        elif (r < cfg.unanswerable_prob + cfg.switch_prob or not unused[entity]) and others:
            entity = others[rng.integers(len(others))]
            turns.append(answerable_turn(entity, pick(entity), follow_up=False))
        elif unused[entity]:
            turns.append(answerable_turn(entity, pick(entity), follow_up=True))
        else:
            break
    return Dialogue(d, tuple(turns)) if len(turns) >= cfg.min_turns else None


def _split_docs(doc_ids: list[int], cfg: ConvQAConfig) -> dict[str, tuple[int, ...]]:
    n = len(doc_ids)
    n_val = max(1, round(cfg.val_fraction * n)) if cfg.val_fraction > 0 else 0
    n_test = max(1, round(cfg.test_fraction * n)) if cfg.test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise ValueError(f"only {n} usable documents: too few for train/val/test fractions "
                         f"{1 - cfg.val_fraction - cfg.test_fraction:.2f}/{cfg.val_fraction}/{cfg.test_fraction}")
    perm = [doc_ids[i] for i in np.random.default_rng([cfg.seed, 0]).permutation(n)]
    parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    return {s: tuple(sorted(parts[s])) for s in SPLITS}


def generate(documents: Sequence[str] | None = None, cfg: ConvQAConfig = ConvQAConfig()) -> ConvQAData:
    """Chunks and train/val/test dialogues over `documents` (default: `jaxllm.data.corpus.documents()`).

    Raises ValueError for an empty corpus, non-string documents, or too few usable documents to
    split. Deterministic: the same documents and cfg give the same data in every process.
    """
    if documents is None:
        from jaxllm.data import corpus as corpus_lib

        documents = corpus_lib.documents()
    if isinstance(documents, str) or not all(isinstance(d, str) for d in documents):
        raise ValueError("documents must be a sequence of strings")
    if not any(d.strip() for d in documents):
        raise ValueError(f"empty corpus: {len(documents)} documents and no words")
    corpus = _Corpus(documents, cfg.chunk_words)
    foreign = sorted(w for w, n in corpus.doc_freq.items() if n >= 2 and _content_word(w))

    per_doc = {}
    for d in range(len(documents)):
        entities = corpus.entities(d, cfg.entities_per_doc)
        names = frozenset(w for w, _ in entities)
        facts = {w: corpus.facts(d, w, names, cfg.max_answer_words) for w, _ in entities}
        facts = {w: fs for w, fs in facts.items() if fs}
        if any(len(fs) >= max(2, cfg.min_turns) for fs in facts.values()):
            per_doc[d] = (facts, dict(entities))
    doc_ids = _split_docs(sorted(per_doc), cfg)

    dialogues = {}
    for split in SPLITS:
        out = []
        for d in doc_ids[split]:
            rng = np.random.default_rng([cfg.seed, 1, d])
            facts, surface = per_doc[d]
            for _ in range(cfg.dialogues_per_doc):
                dialogue = _dialogue(corpus, d, facts, surface, foreign, cfg, rng)
                if dialogue is not None:
                    out.append(dialogue)
        dialogues[split] = tuple(out)
    return ConvQAData(tuple(corpus.chunks), dialogues, doc_ids)
