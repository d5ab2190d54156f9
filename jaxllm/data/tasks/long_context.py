"""Long-context probes for small models: key–value retrieval buried in filler, and perplexity by
position bucket on the embedded corpus.

Everything is token ids in a fixed toy vocabulary (`TaskVocab`), so no tokenizer is involved:

    0 PAD · 1 BOS · 2 KEY · 3 QUERY · key tokens · value tokens · text characters

Text is character-level: printable ASCII plus newline (tabs become spaces, anything else `?`).
The filler comes either from the embedded corpus (`jaxllm.data.corpus.documents()`, the Python
standard library's docstrings and reference topics; real prose, so a model also learns a language
model from it) or is generated as uniformly random characters (no corpus needed, e.g. in tests).

A retrieval sample of length T is

    BOS filler … KEY k₁ v₁…vₘ … filler … KEY k₂ v… … filler QUERY k₁ v₁…vₘ [QUERY k₂ v…]

with `n_pairs` stored pairs (distinct keys; `n_pairs=1` is the passkey task) at random places,
the first one at a chosen relative depth of the filler region (0 = right after BOS, 1 = just
before the queries), and `n_queries` queries at the end asking the first `n_queries` pairs, the
depth-placed one first. Each answer is the m value tokens after its query; `answer_mask` marks
them (the only scored tokens of a fine-tuning sample). Greedy decoding reproduces an answer iff
every answer token is the argmax given the gold prefix, so accuracy needs one forward pass.
`lm_mask` additionally marks the predictable text tokens, for pre-training on the same rows.
"""
from __future__ import annotations

import dataclasses

import numpy as np

PAD, BOS, KEY, QUERY = 0, 1, 2, 3
NUM_SPECIAL = 4
TEXT_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
FILLERS = ("corpus", "random")


@dataclasses.dataclass(frozen=True)
class TaskVocab:
    """Sizes of the key and value alphabets; the text characters follow them."""

    n_keys: int = 64
    n_values: int = 64

    def __post_init__(self):
        if self.n_keys < 1 or self.n_values < 2:
            raise ValueError(f"need n_keys >= 1 and n_values >= 2, got {self.n_keys}, {self.n_values}")

    @property
    def key_offset(self) -> int:
        return NUM_SPECIAL

    @property
    def value_offset(self) -> int:
        return NUM_SPECIAL + self.n_keys

    @property
    def text_offset(self) -> int:
        return self.value_offset + self.n_values

    @property
    def size(self) -> int:
        """Smallest model vocab_size that covers every id."""
        return self.text_offset + len(TEXT_CHARS)

    def encode_text(self, text: str) -> np.ndarray:
        """Character ids of `text` (tab → space, characters outside TEXT_CHARS → '?')."""
        codes = np.frombuffer(text.replace("\t", " ").encode("utf-32-le"), np.uint32).astype(np.int64)
        index = np.full(0x110000, TEXT_CHARS.index("?"), np.int32)
        index[[ord(c) for c in TEXT_CHARS]] = np.arange(len(TEXT_CHARS))
        return index[codes] + self.text_offset

    def decode_text(self, ids) -> str:
        """Inverse of `encode_text` for text ids; other ids show as ⟨name⟩."""
        names = {PAD: "⟨pad⟩", BOS: "⟨bos⟩", KEY: "⟨key⟩", QUERY: "⟨query⟩"}
        out = []
        for i in np.asarray(ids).tolist():
            if i >= self.text_offset:
                out.append(TEXT_CHARS[i - self.text_offset])
            elif i >= self.value_offset:
                out.append(f"⟨v{i - self.value_offset}⟩")
            elif i >= self.key_offset:
                out.append(f"⟨k{i - self.key_offset}⟩")
            else:
                out.append(names[i])
        return "".join(out)


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """Shape of the retrieval task: `n_pairs` stored key–value pairs (1 = passkey), `answer_len`
    value tokens per key, `n_queries` of the pairs asked at the end."""

    vocab: TaskVocab = TaskVocab()
    n_pairs: int = 4
    answer_len: int = 2
    n_queries: int = 1

    def __post_init__(self):
        if not 1 <= self.n_pairs <= self.vocab.n_keys:
            raise ValueError(f"n_pairs must be in [1, n_keys={self.vocab.n_keys}], got {self.n_pairs}")
        if self.answer_len < 1:
            raise ValueError(f"answer_len must be >= 1, got {self.answer_len}")
        if not 1 <= self.n_queries <= self.n_pairs:
            raise ValueError(f"n_queries must be in [1, n_pairs={self.n_pairs}], got {self.n_queries}")

    @property
    def pair_len(self) -> int:
        return 2 + self.answer_len  # KEY k v…

    def min_length(self) -> int:
        """Shortest sample: BOS, all pairs back to back, the queries and their answers."""
        return 1 + (self.n_pairs + self.n_queries) * self.pair_len


def text_stream(docs: list[str], vocab: TaskVocab = TaskVocab()) -> np.ndarray:
    """All documents as one id stream, separated by blank lines."""
    return vocab.encode_text("\n\n".join(docs))


def corpus_stream(split: str = "train", vocab: TaskVocab = TaskVocab(), data_dir=None) -> np.ndarray:
    """The embedded corpus as a character-id stream; `split` "train" or "val" (the corpus module's
    deterministic document split, so evaluation text is never trained on)."""
    from jaxllm.data import corpus

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train, val = corpus.train_val_split(corpus.documents(data_dir))
    return text_stream(train if split == "train" else val, vocab)


def _filler(rng: np.random.Generator, n: int, vocab: TaskVocab, stream: np.ndarray | None) -> np.ndarray:
    if stream is None:
        return rng.integers(vocab.text_offset, vocab.size, size=n)
    if len(stream) < n:
        raise ValueError(f"filler stream has {len(stream)} tokens, a sample needs {n}")
    start = rng.integers(0, len(stream) - n + 1)
    return stream[start:start + n]


def retrieval_samples(rng: np.random.Generator, n: int, length: int, cfg: RetrievalConfig = RetrievalConfig(),
                      stream: np.ndarray | None = None, depth=None) -> dict[str, np.ndarray]:
    """`n` retrieval rows of exactly `length` tokens.

    `stream`: filler token stream (e.g. `corpus_stream()`); None draws random characters. `depth`:
    relative position of the queried pair in [0, 1] — a float for all rows, an array of n, or None
    for uniform draws. Returns int32 `tokens` [n, T], float32 `answer_mask` and `lm_mask` [n, T],
    `answer_positions` [n, n_queries, answer_len] (indices of the answer tokens), `depth` [n] and
    `needle_start` [n] (index of the depth-placed pair's KEY token).
    """
    if length < cfg.min_length():
        raise ValueError(f"length {length} is shorter than the task's minimum {cfg.min_length()}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    depths = rng.uniform(0.0, 1.0, size=n) if depth is None else np.broadcast_to(np.asarray(depth, float), (n,))
    if np.any((depths < 0) | (depths > 1)):
        raise ValueError(f"depth must lie in [0, 1], got {depths.min()}..{depths.max()}")
    vocab, m = cfg.vocab, cfg.answer_len
    n_filler = length - cfg.min_length()
    tokens = np.empty((n, length), np.int64)
    answer_mask = np.zeros((n, length), np.float32)
    lm_mask = np.zeros((n, length), np.float32)
    needle_start = np.empty(n, np.int64)
    for r in range(n):
        keys = rng.choice(vocab.n_keys, size=cfg.n_pairs, replace=False) + vocab.key_offset
        values = rng.integers(0, vocab.n_values, size=(cfg.n_pairs, m)) + vocab.value_offset
        pairs = np.concatenate([np.full((cfg.n_pairs, 1), KEY), keys[:, None], values], axis=1)
        # Filler cut points: the queried pair (index 0) at its depth, the others uniformly.
        cuts = np.concatenate([[round(depths[r] * n_filler)], rng.integers(0, n_filler + 1, size=cfg.n_pairs - 1)])
        order = np.argsort(cuts, kind="stable")
        filler = _filler(rng, n_filler, vocab, stream)
        pieces, text_flags, prev = [np.array([BOS])], [np.zeros(1, bool)], 0
        for placed, p in enumerate(order):
            if p == 0:
                needle_start[r] = 1 + cuts[p] + placed * cfg.pair_len
            pieces += [filler[prev:cuts[p]], pairs[p]]
            text_flags += [np.ones(cuts[p] - prev, bool), np.zeros(cfg.pair_len, bool)]
            prev = cuts[p]
        queries = np.concatenate([np.full((cfg.n_queries, 1), QUERY), pairs[:cfg.n_queries, 1:]], axis=1)
        pieces += [filler[prev:], queries.reshape(-1)]
        text_flags += [np.ones(n_filler - prev, bool), np.zeros(queries.size, bool)]
        tokens[r] = np.concatenate(pieces)
        is_text = np.concatenate(text_flags)
        lm_mask[r] = is_text & np.concatenate([[False], is_text[:-1]])  # text predicted from text
    query_block = length - cfg.n_queries * cfg.pair_len
    answer_positions = (query_block + cfg.pair_len * np.arange(cfg.n_queries)[:, None] + 2 + np.arange(m)[None])
    answer_mask[:, answer_positions.reshape(-1)] = 1.0
    lm_mask = np.maximum(lm_mask, answer_mask)
    return {"tokens": tokens.astype(np.int32), "answer_mask": answer_mask, "lm_mask": lm_mask,
            "answer_positions": np.broadcast_to(answer_positions, (n, cfg.n_queries, m)).copy(),
            "depth": depths.copy(), "needle_start": needle_start}


def lm_rows(rng: np.random.Generator, n: int, length: int, stream: np.ndarray) -> dict[str, np.ndarray]:
    """`n` windows of `length` consecutive stream tokens at random offsets (BOS first); `loss_mask`
    scores every token after BOS."""
    if len(stream) < length:
        raise ValueError(f"stream has {len(stream)} tokens, rows need {length - 1}")
    starts = rng.integers(0, len(stream) - length + 2, size=n)
    tokens = np.stack([np.concatenate([[BOS], stream[s:s + length - 1]]) for s in starts]).astype(np.int32)
    loss_mask = np.ones((n, length), np.float32)
    loss_mask[:, 0] = 0.0
    return {"tokens": tokens, "loss_mask": loss_mask}


def position_buckets(length: int, window: int) -> np.ndarray:
    """Bucket edges [0, c, 2c, 4c, …] up to `length` (the last bucket ends at `length`)."""
    if window < 1 or length < 1:
        raise ValueError(f"window and length must be >= 1, got {window}, {length}")
    edges = [0, window]
    while edges[-1] < length:
        edges.append(edges[-1] * 2)
    edges[-1] = length
    return np.asarray(edges if window < length else [0, length])


def bucket_perplexity(nll_BT, mask_BT, edges) -> np.ndarray:
    """exp(mean NLL) of the scored tokens in each position bucket [edges[i], edges[i+1]) (float64)."""
    nll_BT, mask_BT = np.asarray(nll_BT, np.float64), np.asarray(mask_BT, np.float64)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        count = mask_BT[:, lo:hi].sum()
        if count == 0:
            raise ValueError(f"position bucket [{lo}, {hi}) has no scored tokens")
        out.append(np.exp((nll_BT[:, lo:hi] * mask_BT[:, lo:hi]).sum() / count))
    return np.asarray(out)
