"""Local-SGD on the embedded corpus: a small Llama LM, pretrained briefly, then trained by k workers.

Shared by `launch/local_sgd.py` and the mini-reproduction in `experiments/local_sgd/`.

Data: `jaxllm.data.corpus.documents()` split by `corpus.train_val_split` into training and
held-out documents; held-out documents alternate between validation (curves) and test (final
numbers). Every part is tokenised with the shipped tokenizer (<s> doc </s>) and packed into rows
of `seq_len` by `jaxllm.data.sources.lm_batches` ("concat" packing). Per seed, training rows are
shuffled; the first pretrain_steps · batch_size rows pretrain the model on one worker (the
paper's shared pretraining phase), the rest are cut into the config's shards (sizes proportional
to `shard_sizes`), each an `ArrayShard`.
"""

import dataclasses
import functools
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
import optax

from jaxllm import configs
from jaxllm.data import corpus
from jaxllm.data.epochs import IndexedBatches
from jaxllm.data.sources import lm_batches
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.methods.local_sgd.config import LocalSGDConfig
from jaxllm.methods.local_sgd.task import ArrayShard, EvalLoss, ShardSchedule, WorkerTask
from jaxllm.model import llama
from jaxllm.train.lm import lm_loss_fn
from jaxllm.train.optim import OptimizerConfig, decay_mask, make_optimizer
from jaxllm.train.loop import LoopConfig, fit

Rows = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class CorpusLMConfig:
    """The LM side of a Local-SGD run on the embedded corpus.

    batch_size: rows per inner step (and per pretraining step). eval_batches: validation batches of
    eval_batch_size rows per curve point (0: all). heldout_fraction: documents held out
    (`corpus.train_val_split`). pretrain: AdamW warm-up/cosine over pretrain_steps (0: none).
    inner: the workers' AdamW; its learning_rate, warmup_steps and min_lr_ratio define the per-shard
    schedule (warm-up, then cosine over each shard's share of total_local_steps).
    """

    model: llama.LlamaConfig
    seq_len: int = 32
    batch_size: int = 8
    eval_batch_size: int = 16
    eval_batches: int = 8
    heldout_fraction: float = 0.04
    pretrain_steps: int = 150
    pretrain: OptimizerConfig = OptimizerConfig(learning_rate=3e-3, warmup_steps=30)
    inner: OptimizerConfig = OptimizerConfig(learning_rate=2e-3, warmup_steps=10)

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "eval_batch_size"):
            if getattr(self, name) < (2 if name == "seq_len" else 1):
                raise ValueError(f"{name}={getattr(self, name)} is too small")
        if self.eval_batches < 0 or self.pretrain_steps < 0:
            raise ValueError(f"eval_batches={self.eval_batches} and pretrain_steps={self.pretrain_steps} must be >= 0")
        if self.seq_len > self.model.max_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds the model's max_len={self.model.max_len}")
        if self.inner.min_lr_ratio <= 0:
            raise ValueError(f"inner.min_lr_ratio={self.inner.min_lr_ratio} must be > 0 (per-shard schedules end "
                             f"above zero so that training can go on past their end)")


    @classmethod
    def from_dict(cls, model: Mapping[str, Any], lm: Mapping[str, Any]) -> "CorpusLMConfig":
        """From config mappings: `model` = {"preset": name, field: override or None}, `lm` = this
        class's fields with `pretrain` / `inner` as OptimizerConfig mappings. Unknown fields raise."""
        if "model" in lm:
            raise ValueError("the lm section cannot hold a model; pass it as `model`")
        return configs.from_mapping(cls, {"model": model, **lm})


@dataclasses.dataclass(frozen=True)
class CorpusSplits:
    """Packed rows ({tokens, segment_ids, positions, loss_mask}: [S, seq_len]) of each part."""

    train: Rows
    validation: Rows
    test: Rows


@dataclasses.dataclass(frozen=True, eq=False)
class CorpusLM:
    """One seed's ready-to-train setup: pretrained params, the worker task, and the evaluations."""

    params: object
    task: WorkerTask
    eval_fn: EvalLoss  # validation loss (curves)
    test_fn: EvalLoss  # test loss (final numbers)
    pretrain_loss: float  # mean training loss of the last 10 pretraining steps (NaN without pretraining)


def _pack(docs: list[str], tokenizer: Tokenizer, seq_len: int) -> Rows:
    batches = lm_batches([{"text": d} for d in docs], tokenizer, batch_size=1, seq_len=seq_len, shuffle=False,
                         num_epochs=1, shard_index=0, shard_count=1)
    return jax.tree.map(lambda *rows: np.concatenate(rows), *list(batches))


def corpus_splits(cfg: CorpusLMConfig, tokenizer: Tokenizer | None = None) -> CorpusSplits:
    """Tokenised, packed training / validation / test rows of the embedded corpus."""
    tokenizer = tokenizer or Tokenizer.default()
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's vocab_size "
                         f"{cfg.model.vocab_size}")
    train, heldout = corpus.train_val_split(corpus.documents(), cfg.heldout_fraction)
    if len(heldout) < 2:
        raise ValueError(f"heldout_fraction={cfg.heldout_fraction} holds out {len(heldout)} documents; need >= 2")
    return CorpusSplits(*(_pack(docs, tokenizer, cfg.seq_len) for docs in (train, heldout[0::2], heldout[1::2])))


def _take(rows: Rows, index: np.ndarray) -> Rows:
    return {name: a[index] for name, a in rows.items()}


def _batches(rows: Rows, batch_size: int, limit: int) -> list[Rows]:
    count = len(rows["tokens"]) // batch_size
    count = min(count, limit) if limit else count
    if count == 0:
        raise ValueError(f"{len(rows['tokens'])} held-out rows make no batch of {batch_size}")
    return [_take(rows, np.arange(i * batch_size, (i + 1) * batch_size)) for i in range(count)]


def inner_adamw(learning_rate, *, b1: float, b2: float, eps: float, weight_decay: float, clip_norm: float):
    """The workers' AdamW (global-norm clipping, decay on matrices only, as `train.optim`)."""
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm > 0 else adamw


@functools.lru_cache(maxsize=8)
def _loss_fn(model: llama.LlamaConfig):
    """One loss function per model config, so that jitted steps and evaluations are shared."""
    return lm_loss_fn(model)


@functools.lru_cache(maxsize=8)
def _inner_optimizer(inner: OptimizerConfig):
    return functools.partial(inner_adamw, b1=inner.b1, b2=inner.b2, eps=inner.eps,
                             weight_decay=inner.weight_decay, clip_norm=inner.clip_norm)


def _pretrain(cfg: CorpusLMConfig, params, rows: Rows, seed: int):
    """(params, mean loss of the last 10 steps) after the shared pretraining phase: the LM loss on
    `rows` through the one loop on one device. A short in-memory phase, so its checkpoints go to a
    temporary directory."""
    tx, schedule = make_optimizer(cfg.pretrain, cfg.pretrain_steps)
    loop_config = LoopConfig(steps=cfg.pretrain_steps, seed=seed, mesh="fsdp:1", log_every=cfg.pretrain_steps,
                             checkpoint_every=cfg.pretrain_steps, keep_checkpoints=1, learning_rate=schedule,
                             verbose=False)
    with tempfile.TemporaryDirectory() as workdir:
        result = fit(_loss_fn(cfg.model), tx, IndexedBatches(ArrayShard(rows, cfg.batch_size, seed)), params, workdir,
                     loop_config, devices=jax.devices()[:1])
    losses = [result.losses[s] for s in sorted(result.losses)]
    return jax.device_get(result.state.params), float(np.mean(np.asarray(losses[-10:], np.float32)))


def build(cfg: CorpusLMConfig, splits: CorpusSplits, lsgd: LocalSGDConfig, seed: int) -> CorpusLM:
    """Seed `seed`'s setup: init, shuffle, pretrain, shards, per-shard schedule and evaluations."""
    rng = np.random.default_rng([seed, 2])
    order = rng.permutation(len(splits.train["tokens"]))
    pretrain_rows = cfg.pretrain_steps * cfg.batch_size
    sizes = np.asarray(lsgd.resolved_shard_sizes, dtype=np.float64)
    rest = order[pretrain_rows:]
    if len(rest) < len(sizes) * cfg.batch_size:
        raise ValueError(f"{len(order)} training rows leave {len(rest)} after pretraining: too few for "
                         f"{len(sizes)} shards of batch_size={cfg.batch_size}")
    cuts = np.round(np.cumsum(sizes)[:-1] / sizes.sum() * len(rest)).astype(int)
    shards = [ArrayShard(_take(splits.train, part), cfg.batch_size, seed=seed * 1000 + i)
              for i, part in enumerate(np.split(rest, cuts))]
    params = llama.init_params(cfg.model, jax.random.key(seed))
    pretrain_loss = float("nan")
    if cfg.pretrain_steps:
        params, pretrain_loss = _pretrain(cfg, params, _take(splits.train, order[:pretrain_rows]), seed)
    inner = cfg.inner
    per_shard_steps = max(1, lsgd.total_local_steps // len(shards))
    schedule = ShardSchedule(peak=inner.learning_rate, final=inner.learning_rate * inner.min_lr_ratio,
                             warmup=min(inner.warmup_steps, per_shard_steps - 1), total=per_shard_steps)
    loss_fn = _loss_fn(cfg.model)
    task = WorkerTask(loss_fn, _inner_optimizer(inner), schedule, shards)
    return CorpusLM(params=params, task=task,
                    eval_fn=EvalLoss(loss_fn, _batches(splits.validation, cfg.eval_batch_size, cfg.eval_batches)),
                    test_fn=EvalLoss(loss_fn, _batches(splits.test, cfg.eval_batch_size, 0)),
                    pretrain_loss=pretrain_loss)
