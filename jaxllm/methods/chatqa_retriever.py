"""ChatQA's multi-turn retriever: queries built from a dialogue, and a dual encoder fine-tuned on
(history + current question → gold chunk) with InfoNCE over in-batch and hard negatives.

Both towers start from one pretrained sentence encoder (`retrieval.Encoder`, e.g. MiniLM); training
runs through the one loop, `jaxllm.train.loop.fit`. With `train_context_tower=False` the context tower is
frozen: its chunk embeddings are computed once and travel in the batch, only the query tower runs,
and an index built before training stays valid. `Retriever` serves the tuned towers for RAG.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxllm.data.epochs import EpochBatches
from jaxllm.data.tasks.conv_qa import Chunk, Dialogue
from jaxllm.methods import retrieval
from jaxllm.methods.retrieval import DualEncoder, Encoder, Index
from jaxllm.objectives.contrastive import info_nce_loss
from jaxllm.train import optim
from jaxllm.train.loop import LoopConfig, fit

QUERY_MODES = ("last", "history", "rewrite")


def dialogue_turns(dialogues: Sequence[Dialogue]) -> list[tuple[Dialogue, int]]:
    """Every (dialogue, turn index) in order: the unit of queries, examples and evaluation."""
    return [(d, t) for d in dialogues for t in range(len(d.turns))]


def turn_query(dialogue: Dialogue, t: int, mode: str, tokenizer_or_len_fn: Any, max_tokens: int) -> str:
    """Retriever input for turn t: "history" = `retrieval.build_query` over the turns before it and its
    question; "last" = the question alone, "rewrite" = the oracle self-contained rewrite (both in the
    same "user: ..." form)."""
    if mode not in QUERY_MODES:
        raise ValueError(f"unknown query mode {mode!r}; known: {QUERY_MODES}")
    turn = dialogue.turns[t]
    history = dialogue.history(t) if mode == "history" else []
    question = turn.rewrite if mode == "rewrite" else turn.question
    return retrieval.build_query(history, question, tokenizer_or_len_fn, max_tokens)


# ----------------------------------------------------------------------------- retriever

@dataclasses.dataclass(frozen=True)
class RetrieverConfig:
    """Dual-encoder fine-tuning: `steps` of `batch_size` (query, gold chunk) pairs, each with
    `hard_negatives` other chunks of the gold chunk's document; queries cut to `max_query_len`
    tokens, chunks to `max_context_len`. InfoNCE temperature τ (0.05 suits normalised embeddings)."""

    steps: int = 200
    batch_size: int = 16
    hard_negatives: int = 1
    temperature: float = 0.05
    max_query_len: int = 64
    max_context_len: int = 128
    train_context_tower: bool = True
    optimizer: optim.OptimizerConfig = optim.OptimizerConfig(learning_rate=2e-5, warmup_steps=20, min_lr_ratio=0.1,
                                                             weight_decay=0.01)
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_query_len", "max_context_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"RetrieverConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hard_negatives < 0 or not self.temperature > 0:
            raise ValueError(f"need hard_negatives >= 0 and temperature > 0, got {self.hard_negatives}, "
                             f"{self.temperature}")


@dataclasses.dataclass(frozen=True)
class RetrievalPair:
    """A fine-tuning pair: query text and its gold chunk id."""

    query: str
    chunk_id: int


def retrieval_pairs(dialogues: Sequence[Dialogue], tokenizer_or_len_fn: Any, max_query_len: int,
                    mode: str = "history") -> list[RetrievalPair]:
    """(query, gold chunk) of every answerable turn of `dialogues`, queries built by `turn_query`."""
    return [RetrievalPair(turn_query(d, t, mode, tokenizer_or_len_fn, max_query_len), d.turns[t].gold_chunk)
            for d, t in dialogue_turns(dialogues) if d.turns[t].answerable]


@dataclasses.dataclass
class RetrieverFit:
    """A fine-tuned dual encoder: its definition, params ({"query", "context"}) and one record per
    logged window (step, window-mean loss / accuracy / grad_norm, seconds per step)."""

    dual: DualEncoder
    params: dict
    history: list[dict]


def frozen_context_loss_fn(dual: DualEncoder, *, temperature: float) -> Callable:
    """loss_fn(query_params, batch, rng) -> (loss, aux): `retrieval.contrastive_loss_fn`'s InfoNCE with
    the context side given as embeddings computed beforehand by a frozen context tower
    (`context_emb_BD`, optional `negative_emb_BND`), so only the query tower is run and trained."""
    if dual.shared:
        raise ValueError("a frozen context tower needs separate towers; got a shared dual encoder")

    def loss_fn(params, batch, rng):
        del rng  # the encoder has no dropout
        q_BD = dual.encode_queries({"query": params}, batch["query_tokens_BT"], batch["query_mask_BT"])
        return info_nce_loss(q_BD, batch["context_emb_BD"], temperature=temperature,
                             negatives_BND=batch.get("negative_emb_BND"), context_ids_B=batch["context_ids_B"])

    return loss_fn


def _hard_negatives(rng: np.random.Generator, gold_B: Sequence[int], chunks: Sequence[Chunk],
                    doc_chunks: Mapping[int, list[int]], n: int, pool: np.ndarray) -> np.ndarray:
    """[B, n] chunk ids: other chunks of each gold chunk's document (`doc_chunks`: doc id → chunk
    ids), topped up from `pool`."""
    out = np.zeros((len(gold_B), n), np.int64)
    for i, gold in enumerate(gold_B):
        same = [c for c in doc_chunks[chunks[gold].doc_id] if c != gold]
        picked = [same[j] for j in rng.permutation(len(same))[:n]]
        while len(picked) < n:
            c = int(pool[rng.integers(len(pool))])
            if c != gold and c not in picked:
                picked.append(c)
        out[i] = picked
    return out


def fit_retriever(encoder: Encoder, pairs: Sequence[RetrievalPair], chunks: Sequence[Chunk], cfg: RetrieverConfig,
                  workdir: str | os.PathLike, *, context_emb_ND=None, verbose: bool = True) -> RetrieverFit:
    """Fine-tunes a dual encoder whose towers both start from `encoder` on `pairs` (chunk ids index
    `chunks`; hard negatives are other chunks of the gold chunk's document, else any pair's gold chunk),
    through the one loop on one device (checkpoints and metrics in `workdir`, resumable). Each epoch
    visits the pairs in a permutation drawn from (seed, epoch), drop-last (`EpochBatches`); the
    negatives of batch k are drawn from (seed, 1, k).

    With `cfg.train_context_tower` both towers train (`retrieval.contrastive_loss_fn` on
    `retrieval.make_batch`); otherwise the context tower stays `encoder`'s and its chunk embeddings
    (`context_emb_ND` over all `chunks`, computed when None) are looked up per batch.
    """
    if len(pairs) < cfg.batch_size:
        raise ValueError(f"{len(pairs)} pairs are fewer than batch_size {cfg.batch_size}")
    bad = [p.chunk_id for p in pairs if not 0 <= p.chunk_id < len(chunks)]
    if bad:
        raise ValueError(f"pair chunk ids {bad[:5]} are not ids of the {len(chunks)} chunks")
    dual, params = retrieval.dual_from_encoder(encoder)
    optimizer, schedule = optim.make_optimizer(cfg.optimizer, cfg.steps)
    pool = np.unique([p.chunk_id for p in pairs])
    doc_chunks = collections.defaultdict(list)
    for c in chunks:
        doc_chunks[c.doc_id].append(c.chunk_id)
    q_len, c_len = cfg.max_query_len, cfg.max_context_len
    if cfg.train_context_tower:
        loss_fn = retrieval.contrastive_loss_fn(dual, temperature=cfg.temperature)
    else:
        if context_emb_ND is None:
            context_emb_ND = tower_encoder(encoder, params, "context", c_len).encode([c.text for c in chunks])
        context_emb_ND = np.asarray(context_emb_ND, np.float32)
        if context_emb_ND.shape != (len(chunks), dual.context_cfg.d_model):
            raise ValueError(f"context_emb_ND has shape {context_emb_ND.shape}, expected "
                             f"({len(chunks)}, {dual.context_cfg.d_model})")
        loss_fn = frozen_context_loss_fn(dual, temperature=cfg.temperature)
        frozen_context, params = params["context"], params["query"]

    def batch_at(rows: np.ndarray, draw: int) -> dict:
        rng = np.random.default_rng([cfg.seed, 1, draw])
        queries = [pairs[i].query for i in rows]
        gold_B = np.asarray([pairs[i].chunk_id for i in rows])
        negatives = None
        if cfg.hard_negatives:
            negatives = _hard_negatives(rng, gold_B, chunks, doc_chunks, cfg.hard_negatives, pool)
        if cfg.train_context_tower:
            neg_texts = None if negatives is None else [[chunks[c].text for c in row] for row in negatives]
            return retrieval.make_batch(encoder, queries, [chunks[c].text for c in gold_B], gold_B,
                                        negatives=neg_texts, max_query_len=q_len, max_context_len=c_len)
        q = encoder.tokenize(queries, max_len=q_len, pad_to=q_len)
        batch = {"query_tokens_BT": q.tokens_BT, "query_mask_BT": q.mask_BT,
                 "context_emb_BD": context_emb_ND[gold_B], "context_ids_B": gold_B.astype(np.int32)}
        if negatives is not None:
            batch["negative_emb_BND"] = context_emb_ND[negatives]
        return batch

    loop_config = LoopConfig(steps=cfg.steps, seed=cfg.seed, mesh="fsdp:1", log_every=cfg.log_every,
                             checkpoint_every=cfg.steps, keep_checkpoints=1, learning_rate=schedule, verbose=verbose)
    result = fit(loss_fn, optimizer, EpochBatches(len(pairs), cfg.batch_size, cfg.seed, fetch=batch_at), params,
                 workdir, loop_config, devices=jax.devices()[:1])
    tuned = jax.device_get(result.state.params)
    params = tuned if cfg.train_context_tower else {"query": tuned, "context": frozen_context}
    return RetrieverFit(dual=dual, params=params, history=result.history)


def tower_encoder(encoder: Encoder, dual_params: Mapping[str, Any], tower: str, max_seq_length: int) -> Encoder:
    """An `Encoder` (tokenizer, pooling and normalisation of `encoder`) running one tower of a dual
    encoder's params ("query" or "context"), cutting texts at `max_seq_length` tokens."""
    if tower not in dual_params:
        raise ValueError(f"no {tower!r} tower in the dual-encoder params (towers: {sorted(dual_params)})")
    return Encoder(encoder.cfg, dual_params[tower], encoder.tokenizer, max_seq_length=max_seq_length,
                   pooling=encoder.pooling)


class Retriever:
    """A query encoder over an inner-product `Index` of chunk embeddings: `query_text` builds the
    multi-turn query, `search` returns (scores_QK, ids_QK) best first."""

    def __init__(self, query_encoder: Encoder, index: Index, *, batch_size: int = 32):
        if query_encoder.dim != index.dim:
            raise ValueError(f"query encoder embeds in {query_encoder.dim} dims but the index holds {index.dim}")
        self.query_encoder, self.index, self.batch_size = query_encoder, index, batch_size

    @classmethod
    def build(cls, encoder: Encoder, chunk_texts: Sequence[str], *, dual_params: Mapping[str, Any] | None = None,
              max_query_len: int = 64, max_context_len: int = 128, context_emb_ND=None, backend: str = "exact",
              batch_size: int = 32) -> Retriever:
        """Towers from `dual_params` (None: `encoder`'s own weights for both); chunk embeddings from
        the context tower unless given as `context_emb_ND`."""
        params = dual_params if dual_params is not None else {"query": encoder.params, "context": encoder.params}
        if context_emb_ND is None:
            context_emb_ND = tower_encoder(encoder, params, "context", max_context_len).encode(chunk_texts, batch_size)
        return cls(tower_encoder(encoder, params, "query", max_query_len), Index(context_emb_ND, backend),
                   batch_size=batch_size)

    def query_text(self, history: Sequence[tuple[str, str]], question: str) -> str:
        return retrieval.build_query(history, question, self.query_encoder, self.query_encoder.max_seq_length)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(self.query_encoder.encode(queries, self.batch_size), k)
