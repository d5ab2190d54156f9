"""Toy translation with "gilded" references: the task of the CPO mini-reproduction (spec cpo.md §6).

The source language has *head* words and *modifier* words; each source word has exactly one target
word (a fixed dictionary). One reordering rule applies: a modifier directly before a head word
follows that head in the target ("red car" → "car-t red-t", as adjectives in French), so a
translator has to look one word ahead. Sources have 4–10 words.

References are "gilded": a fraction of them (30 % by default) carries one error — a dropped word or
a word replaced by another target word — the way human references in WMT/FLORES are not all
perfect. Quality is measured against the *true* mapping (`translate`), which plays the role of
the reference-free QE models of ALMA-R: sentence chrF (`chrf`, the sacreBLEU formula) and exact
match (`exact_match`, a second metric that pair building does not use).

Text is whitespace-separated words; `WordTokenizer` maps each word to one id and has what
`jaxllm.data.preference.tokenize_pair` needs (`encode(text, bos, eos)`, `bos_id`, `eos_id`), so a
prompt `"<source> =>"` and a response `" <target>"` tokenise jointly into
`BOS source… => target… EOS`.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Sequence

import numpy as np

from jaxllm.data.preference import select_pair

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "=>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, SEP_ID = range(len(SPECIALS))
SEPARATOR = SPECIALS[SEP_ID]
_SOURCE_SYLLABLES = [c + v for c in "bdgkmnprstvz" for v in "aeiou"]
_TARGET_SYLLABLES = [c + v for c in "fhjlqwxy" for v in "aeiouy"]


def _words(syllables: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """`n` distinct two-syllable pseudo-words."""
    pool = ["".join(p) for p in itertools.permutations(syllables, 2)]
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


@dataclasses.dataclass(frozen=True)
class TranslationTask:
    """The dictionary and reordering rule (drawn once from `lexicon_seed`) and the sentence shape.

    `modifier_prob`: probability that a source word is a modifier. `reference_error_rate`: fraction of
    gilded references with one error; `drop_prob`: share of those errors that drop a word (the rest
    substitute one).
    """

    n_heads: int = 24
    n_modifiers: int = 16
    min_words: int = 4
    max_words: int = 10
    modifier_prob: float = 0.4
    reference_error_rate: float = 0.3
    drop_prob: float = 0.5
    lexicon_seed: int = 0

    def __post_init__(self):
        if self.n_heads < 1 or self.n_modifiers < 1:
            raise ValueError(f"need n_heads >= 1 and n_modifiers >= 1, got {self.n_heads}, {self.n_modifiers}")
        if not 2 <= self.min_words <= self.max_words:
            raise ValueError(f"need 2 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        for name in ("modifier_prob", "reference_error_rate", "drop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        n = self.n_heads + self.n_modifiers
        pool = len(_TARGET_SYLLABLES) * (len(_TARGET_SYLLABLES) - 1)
        if n > pool:
            raise ValueError(f"n_heads + n_modifiers = {n} exceeds the {pool} two-syllable target pseudo-words")
        rng = np.random.default_rng(self.lexicon_seed)
        source, target = _words(_SOURCE_SYLLABLES, n, rng), _words(_TARGET_SYLLABLES, n, rng)
        object.__setattr__(self, "heads", tuple(source[:self.n_heads]))
        object.__setattr__(self, "modifiers", tuple(source[self.n_heads:]))
        object.__setattr__(self, "dictionary", dict(zip(source, target)))

    @property
    def target_words(self) -> tuple[str, ...]:
        return tuple(self.dictionary.values())

    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer(tuple(self.dictionary) + self.target_words)

    def sample_source(self, rng: np.random.Generator) -> list[str]:
        """A random source sentence (list of words)."""
        n = int(rng.integers(self.min_words, self.max_words + 1))
        is_modifier = rng.random(n) < self.modifier_prob
        return [str(rng.choice(self.modifiers)) if m else str(rng.choice(self.heads)) for m in is_modifier]

    def translate(self, source: Sequence[str]) -> list[str]:
        """The true translation: word by word, each modifier directly before a head moved after it."""
        unknown = [w for w in source if w not in self.dictionary]
        if unknown:
            raise ValueError(f"source words {unknown} are not in the task's dictionary")
        out, i = [], 0
        while i < len(source):
            word = source[i]
            if word in self.modifiers and i + 1 < len(source) and source[i + 1] in self.heads:
                out += [self.dictionary[source[i + 1]], self.dictionary[word]]
                i += 2
            else:
                out.append(self.dictionary[word])
                i += 1
        return out

    def corrupt(self, target: Sequence[str], rng: np.random.Generator) -> list[str]:
        """`target` with one error: a dropped word (probability `drop_prob`, when more than one word
        is left) or a word replaced by a different target word."""
        out = list(target)
        i = int(rng.integers(len(out)))
        if len(out) > 1 and rng.random() < self.drop_prob:
            del out[i]
        else:
            others = [w for w in self.target_words if w != out[i]]
            out[i] = str(rng.choice(others))
        return out

    def gild(self, target: Sequence[str], rng: np.random.Generator, error_rate: float | None = None) -> list[str]:
        """A "gilded" reference: `target` with one error with probability `error_rate` (default
        `reference_error_rate`), else unchanged."""
        rate = self.reference_error_rate if error_rate is None else error_rate
        return self.corrupt(target, rng) if rng.random() < rate else list(target)

    def example(self, rng: np.random.Generator) -> dict:
        """One example in the `jaxllm.data.tasks` convention: source, true target, gilded reference."""
        source = self.sample_source(rng)
        target = self.translate(source)
        return {"source": " ".join(source), "target": " ".join(target),
                "reference": " ".join(self.gild(target, rng))}

    def sources(self, sizes: dict[str, int], seed: int) -> dict[str, list[list[str]]]:
        """Disjoint splits of distinct source sentences, e.g. {"train": 2000, "test": 500}, drawn
        from `seed` (split order as given)."""
        if any(n < 0 for n in sizes.values()):
            raise ValueError(f"split sizes must be >= 0, got {sizes}")
        rng = np.random.default_rng(seed)
        seen: set[tuple[str, ...]] = set()
        out: dict[str, list[list[str]]] = {}
        for name, n in sizes.items():
            split = []
            for _ in range(100 * n + 100):
                if len(split) == n:
                    break
                sentence = self.sample_source(rng)
                if tuple(sentence) not in seen:
                    seen.add(tuple(sentence))
                    split.append(sentence)
            if len(split) < n:
                raise ValueError(f"cannot draw {n} distinct new sources for split {name!r}: the language is too small")
            out[name] = split
        return out


def build_triplets(task: TranslationTask, sources: Sequence[Sequence[str]],
                   candidates: Sequence[Sequence[Sequence[str]]]) -> tuple[list[tuple[str, str, str]], list[dict]]:
    """ALMA-R pair building with the oracle as the quality model: for each source, its candidate
    translations (e.g. reference, stronger system, weaker system) are scored by chrF against the true
    mapping; best = chosen, worst = rejected, the middle dropped; sources whose candidates all tie are
    dropped. Returns the (prompt, chosen, rejected) texts and, per kept pair, {"source": index,
    "chosen": candidate index, "rejected": candidate index, "chosen_exact": bool}."""
    if len(sources) != len(candidates):
        raise ValueError(f"{len(sources)} sources but {len(candidates)} candidate lists")
    triplets, info = [], []
    for i, (source, cands) in enumerate(zip(sources, candidates)):
        truth = " ".join(task.translate(source))
        scores = [chrf(" ".join(c), truth) for c in cands]
        indices = select_pair(list(range(len(cands))), scores, drop_ties=True)
        if indices is None:
            continue
        chosen, rejected = (cands[k] for k in indices)
        triplets.append((prompt(source), response(chosen), response(rejected)))
        info.append({"source": i, "chosen": indices[0], "rejected": indices[1],
                     "chosen_exact": " ".join(chosen) == truth})
    return triplets, info


def synthetic_triplets(task: TranslationTask, sources: Sequence[Sequence[str]], rng: np.random.Generator,
                       system_error_rates: Sequence[float] = (0.1, 0.25)) -> list[tuple[str, str, str]]:
    """Pairs from (gilded reference, one synthetic system per error rate): a system translates with the
    true mapping and makes one error in that share of sentences (spec cpo.md §6, the synthetic variant)."""
    candidates = []
    for source in sources:
        truth = task.translate(source)
        candidates.append([task.gild(truth, rng)] + [task.gild(truth, rng, rate) for rate in system_error_rates])
    return build_triplets(task, sources, candidates)[0]


def prompt(source: Sequence[str]) -> str:
    """The translation prompt of a source sentence; its response is `response(target)`."""
    return " ".join(source) + " " + SEPARATOR


def response(target: Sequence[str]) -> str:
    return " " + " ".join(target)


class WordTokenizer:
    """One id per whitespace-separated word: the specials of `SPECIALS`, then `words` in order."""

    bos_id, eos_id, pad_id, unk_id = BOS_ID, EOS_ID, PAD_ID, UNK_ID

    def __init__(self, words: Sequence[str]):
        vocab = list(SPECIALS) + list(words)
        duplicates = [w for w, c in collections.Counter(vocab).items() if c > 1]
        if duplicates:
            raise ValueError(f"duplicate words {duplicates}")
        if any(not w or any(ch.isspace() for ch in w) for w in vocab):
            raise ValueError("words must be non-empty and contain no whitespace")
        self.vocab = tuple(vocab)
        self._ids = {w: i for i, w in enumerate(vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        unknown = [w for w in text.split() if w not in self._ids]
        if unknown:
            raise ValueError(f"words {unknown} are not in the vocabulary")
        return [BOS_ID] * bos + [self._ids[w] for w in text.split()] + [EOS_ID] * eos

    def decode(self, ids) -> str:
        """Words of `ids`, skipping padding, BOS and EOS; ids past the vocabulary (a model's vocab may be
        padded to a round size) read as `<unk>`."""
        words = (self.vocab[i] if i < len(self.vocab) else SPECIALS[UNK_ID] for i in map(int, ids))
        return " ".join(w for w in words if w not in (SPECIALS[PAD_ID], SPECIALS[BOS_ID], SPECIALS[EOS_ID]))


def _char_ngrams(text: str, n: int) -> collections.Counter:
    return collections.Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf(hypothesis: str, reference: str, *, order: int = 6, beta: float = 2.0) -> float:
    """Sentence chrF in [0, 100] as sacreBLEU 2.x computes it (whitespace removed, character n-grams
    1..`order`, precision and recall averaged over the orders both strings have, F-beta)."""
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    precisions, recalls = [], []
    for n in range(1, order + 1):
        hyp_ngrams, ref_ngrams = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        n_hyp, n_ref = sum(hyp_ngrams.values()), sum(ref_ngrams.values())
        if n_hyp and n_ref:
            match = sum((hyp_ngrams & ref_ngrams).values())
            precisions.append(match / n_hyp)
            recalls.append(match / n_ref)
    if not precisions:
        return 0.0
    p, r = float(np.mean(precisions)), float(np.mean(recalls))
    if p + r == 0:
        return 0.0
    return 100.0 * (1 + beta ** 2) * p * r / (beta ** 2 * p + r)


def exact_match(hypothesis: str, reference: str) -> float:
    """1.0 when the word sequences are equal, else 0.0."""
    return float(hypothesis.split() == reference.split())
