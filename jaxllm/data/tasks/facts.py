"""Key → value facts: the task of the proxy-tuning mini-reproduction (arXiv 2401.08565).

A *world* (drawn once from `world_seed`) assigns each of `num_facts` pseudo-word keys one of
`num_values` pseudo-word values; `num_unknown` further keys exist as words but have no value.

- **Pretraining** text (`pretraining_documents`): every fact stated once in each of several
  surface forms ("the value of K is V .", "K has the value V .", ...), shuffled into short
  documents with filler sentences; unknown keys occur only in filler, never with a value. The
  question/answer markers of the tuning format never occur in it.
- **Tuning** (`tuning_examples`): a response format the pretraining never shows — prompt
  "Q: value of K ?", response "A: V ." for a known key and the refusal "A: unknown ." for an
  unknown one.
- **Evaluation**: `splits` gives disjoint key sets, so held-out questions ask about facts seen in
  pretraining but never in tuning. `score` reads a completion three ways: exact match of the
  formatted answer, format accuracy (the response has the "A: <word> ." shape, whatever the word),
  and fact accuracy (the first value word — or "unknown" — anywhere in the completion is the right
  one, so a base model that answers in pretraining style still gets credit for knowing the fact).
  `cloze` prompts ("the value of K is") measure what an untuned base recalls.

Text is lower-case words separated by single spaces, punctuation as separate words, so a
SentencePiece model trained on the corpus keeps word boundaries.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping, Sequence

import numpy as np

SURFACE_FORMS = (
    "the value of {key} is {value} .",
    "{key} has the value {value} .",
    "{value} is the value that {key} holds .",
    "ask about {key} and you will hear {value} .",
)
QUESTION = "Q: value of {key} ?"
ANSWER = "A: {value} ."
REFUSAL_WORD = "unknown"
CLOZE = "the value of {key} is"
_ANSWER_RE = re.compile(r"^A: (\S+) \.$")

_KEY_SYLLABLES = [c + v for c in "bdgkmnprstvz" for v in "aeiou"]
_VALUE_SYLLABLES = [c + v for c in "fhjlwxy" for v in "aeiouy"]
_FILLER = {
    "det": ("the", "a", "one", "every", "that"),
    "adj": ("old", "quiet", "green", "small", "bright", "cold", "heavy", "slow"),
    "noun": ("river", "stone", "garden", "window", "market", "road", "letter", "tower", "boat", "field"),
    "verb": ("sits", "waits", "turns", "falls", "stays", "moves", "shines", "rests"),
    "prep": ("near", "under", "beside", "behind", "across", "above"),
}
_FILLER_FORMS = (
    "{det} {adj} {noun} {verb} {prep} the {noun2} .",
    "{det} {noun} {verb} and the {adj} {noun2} {verb2} .",
    "we saw {det} {adj} {noun} {prep} the {noun2} .",
)
_UNKNOWN_FORMS = ("the word {key} was written {prep} the {noun} .", "nobody has recorded a value for {key} .")


def _words(syllables: Sequence[str], n: int, rng: np.random.Generator, syllables_per_word: int) -> list[str]:
    """`n` distinct pseudo-words of `syllables_per_word` syllables, none of them a filler word."""
    pool = len(syllables) ** syllables_per_word
    if n > pool // 2:
        raise ValueError(f"{n} words requested from only {pool} {syllables_per_word}-syllable words; "
                         f"at most {pool // 2}")
    reserved = filler_words() | {REFUSAL_WORD}
    words = []
    for p in rng.choice(pool, size=min(pool, n + 64), replace=False):
        parts = []
        for _ in range(syllables_per_word):
            p, r = divmod(int(p), len(syllables))
            parts.append(syllables[r])
        if "".join(parts) not in reserved:
            words.append("".join(parts))
    return words[:n]


@dataclasses.dataclass(frozen=True)
class FactsTask:
    """The world: `facts` (key → value), `values` and `unknown_keys`, drawn from `world_seed`."""

    num_facts: int = 400
    num_values: int = 24
    num_unknown: int = 80
    world_seed: int = 0

    def __post_init__(self):
        if self.num_facts < 1 or self.num_values < 2 or self.num_unknown < 0:
            raise ValueError(f"need num_facts >= 1, num_values >= 2, num_unknown >= 0, got "
                             f"{self.num_facts}, {self.num_values}, {self.num_unknown}")
        rng = np.random.default_rng(self.world_seed)
        keys = _words(_KEY_SYLLABLES, self.num_facts + self.num_unknown, rng, 3)
        values = _words(_VALUE_SYLLABLES, self.num_values, rng, 2)
        assignment = rng.integers(0, self.num_values, self.num_facts)
        object.__setattr__(self, "facts", {k: values[i] for k, i in zip(keys[:self.num_facts], assignment)})
        object.__setattr__(self, "values", tuple(values))
        object.__setattr__(self, "unknown_keys", tuple(keys[self.num_facts:]))

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.facts)

    def target(self, key: str) -> str:
        """The value of a known key, `REFUSAL_WORD` for an unknown one; ValueError otherwise."""
        if key in self.facts:
            return self.facts[key]
        if key in self.unknown_keys:
            return REFUSAL_WORD
        raise ValueError(f"key {key!r} is neither a fact nor an unknown key of this world")

    def splits(self, sizes: Mapping[str, int], unknown_sizes: Mapping[str, int] | None = None,
               seed: int = 0) -> dict[str, list[str]]:
        """Disjoint key sets per split name: `sizes[name]` known keys, plus `unknown_sizes[name]`
        unknown keys, drawn without replacement from `seed` (known first, then unknown, per split).
        ValueError when the world has too few keys."""
        unknown_sizes = dict(unknown_sizes or {})
        for name, table, pool in (("known", sizes, self.keys), ("unknown", unknown_sizes, self.unknown_keys)):
            if sum(table.values()) > len(pool):
                raise ValueError(f"splits ask for {sum(table.values())} {name} keys but the world has {len(pool)}")
        rng = np.random.default_rng(seed)
        known, unknown = list(rng.permutation(self.keys)), list(rng.permutation(self.unknown_keys))
        out = {}
        for name in dict.fromkeys([*sizes, *unknown_sizes]):
            n, m = sizes.get(name, 0), unknown_sizes.get(name, 0)
            out[name] = [str(k) for k in known[:n] + unknown[:m]]
            known, unknown = known[n:], unknown[m:]
        return out

    def pretraining_documents(self, rng: np.random.Generator, *, statements_per_doc: int = 4,
                              filler_per_doc: int = 2) -> list[str]:
        """Every fact in every surface form once, plus two filler mentions of each unknown key,
        shuffled into documents of `statements_per_doc` statements and `filler_per_doc` filler
        sentences (one document per line; no question or answer markers)."""
        sentences = [form.format(key=k, value=v) for k, v in self.facts.items() for form in SURFACE_FORMS]
        sentences += [form.format(key=k, **_pick(rng)) for k in self.unknown_keys for form in _UNKNOWN_FORMS]
        order = rng.permutation(len(sentences))
        docs = []
        for start in range(0, len(order), statements_per_doc):
            doc = [sentences[i] for i in order[start:start + statements_per_doc]]
            doc += [filler_sentence(rng) for _ in range(filler_per_doc)]
            docs.append(" ".join(rng.permutation(doc)))
        return docs


def _pick(rng: np.random.Generator) -> dict[str, str]:
    out = {name: str(rng.choice(words)) for name, words in _FILLER.items()}
    out["noun2"], out["verb2"] = str(rng.choice(_FILLER["noun"])), str(rng.choice(_FILLER["verb"]))
    return out


def filler_sentence(rng: np.random.Generator) -> str:
    """A random sentence of filler words (no keys, no values)."""
    return str(rng.choice(_FILLER_FORMS)).format(**_pick(rng))


def filler_words() -> frozenset[str]:
    """Every word filler and surface forms can use (for checks that keys and values avoid them)."""
    forms = " ".join(SURFACE_FORMS + _FILLER_FORMS + _UNKNOWN_FORMS)
    fixed = {w for w in re.sub(r"\{\w+\}", " ", forms).split()}
    return frozenset(fixed | set(itertools.chain.from_iterable(_FILLER.values())))


def question(key: str) -> str:
    """The tuning/evaluation prompt for `key`."""
    return QUESTION.format(key=key)


def answer(task: FactsTask, key: str) -> str:
    """The formatted response for `key`: its value, or the refusal for an unknown key."""
    return ANSWER.format(value=task.target(key))


def cloze(key: str) -> str:
    """A pretraining-style prompt whose continuation is the key's value (base-model recall)."""
    return CLOZE.format(key=key)


def tuning_examples(task: FactsTask, keys: Sequence[str]) -> list[tuple[str, str]]:
    """(prompt, response) texts of the tuning format for `keys` (known or unknown)."""
    return [(question(k), " " + answer(task, k)) for k in keys]


# ---- scorers ---------------------------------------------------------------------------------

def formatted_value(completion: str) -> str | None:
    """The word of a completion shaped exactly "A: <word> ." (surrounding spaces ignored), else None."""
    match = _ANSWER_RE.match(completion.strip())
    return match.group(1) if match else None


def first_value(task: FactsTask, completion: str) -> str | None:
    """The first word of `completion` that is one of the world's values or `REFUSAL_WORD`."""
    answers = set(task.values) | {REFUSAL_WORD}
    return next((w for w in completion.split() if w in answers), None)


def score_one(task: FactsTask, key: str, completion: str) -> dict[str, float]:
    """{"exact", "format", "fact"} of one completion (1.0 or 0.0; see the module docstring)."""
    target = task.target(key)
    return {"exact": float(completion.strip() == ANSWER.format(value=target)),
            "format": float(formatted_value(completion) is not None),
            "fact": float(first_value(task, completion) == target)}


def score(task: FactsTask, keys: Sequence[str], completions: Sequence[str]) -> dict[str, float]:
    """Mean exact-match, format and fact accuracy over (key, completion) pairs."""
    if len(keys) != len(completions) or not keys:
        raise ValueError(f"need as many completions as keys (and at least one), got {len(completions)} "
                         f"completions for {len(keys)} keys")
    rows = [score_one(task, k, c) for k, c in zip(keys, completions)]
    return {name: float(np.mean([r[name] for r in rows])) for name in ("exact", "format", "fact")}
