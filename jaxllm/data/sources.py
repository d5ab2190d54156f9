"""Data sources and the LM batch stream: TFDS (catalog or local) read through grain.

Sources are random-access sequences of records (`tfds.data_source` results, the local datasets of
`jaxllm.data.builders`, or any list of dicts). `lm_batches` turns one into the iterator the
training loop consumes:

    source -> this host's shard -> shuffle (reshuffled every epoch) -> repeat -> tokenize
           -> pack into rows (`jaxllm.data.packing`) -> batch [B, T]

The iterator is a `grain.DatasetIterator`: `get_state()` returns a small JSON-able dict that goes
into the checkpoint, and `set_state(state)` on a freshly built iterator (same arguments) resumes
exactly where it stopped.

Catalog datasets (`c4/en`, `wmt14_translate/de-en`, `coqa`, ...) are read by name from a TFDS
data dir in array_record format, which needs no TensorFlow. Preparing one (`download=True`, or
`tfds build NAME --file_format=array_record --data_dir=DIR`), or converting a tfrecord copy with
`tfds convert_format`, runs TFDS's own builder code, which may need TensorFlow (and Apache Beam for
c4): do that once, with the `tf` extra installed, on any machine.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from jaxllm.data import packing as packing_lib
from jaxllm.data.tokenizer import Tokenizer

# TFDS modules whose builders (c4, wmt*, coqa, glue, gsm8k, ...) import without TensorFlow but are
# only registered when TensorFlow is installed; importing them registers the names.
_CATALOG_MODULES = ("text", "translate", "question_answering", "summarization")


def catalog_source(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
                   download: bool = False):
    """Random-access source for split `split` of TFDS catalog dataset `name` ("c4/en:3.1.0",
    "wmt14_translate/de-en", "coqa", ...) stored under `data_dir` (None: TFDS's default).

    With `download=False` (the default) nothing touches the network: a dataset that is not
    prepared raises FileNotFoundError naming the directory it was looked for in.
    """
    for module in _CATALOG_MODULES:
        importlib.import_module(f"tensorflow_datasets.{module}")
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if download:
        builder.download_and_prepare(file_format="array_record")
    try:
        return builder.as_data_source(split)
    except KeyError as e:
        if builder.info.splits:
            raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; it has "
                             f"{sorted(builder.info.splits)}") from e
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared under {builder.data_dir}; prepare it with "
            f"`tfds build {name} --file_format=array_record --data_dir=...` or pass "
            "download=True") from e
    except NotImplementedError as e:
        raise ValueError(
            f"TFDS dataset {name!r} under {builder.data_dir} is stored as "
            f"{builder.info.file_format.value}, which has no random access; convert it with "
            "`tfds convert_format --out_file_format=array_record` or rebuild it with "
            "--file_format=array_record") from e


@dataclasses.dataclass(frozen=True)
class TextTokens:
    """Record -> {"tokens", "loss_mask"}: the text in field `key` encoded as <s> text </s>, every
    token scorable. Picklable, so it runs in grain worker processes."""

    tokenizer: Tokenizer
    key: str = "text"

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if self.key not in record:
            raise ValueError(f"record has no field {self.key!r}; fields: {sorted(record)}")
        text = record[self.key]
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if not isinstance(text, str):
            raise ValueError(f"field {self.key!r} must be text, got {type(text).__name__}")
        tokens = np.asarray(self.tokenizer.encode(text, bos=True, eos=True), np.int32)
        return {"tokens": tokens, "loss_mask": np.ones_like(tokens)}


def lm_batches(source: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *, batch_size: int,
               seq_len: int, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
               shard_index: int | None = None, shard_count: int | None = None,
               packing: str = "concat", text_key: str = "text",
               tokenize: Callable[[Mapping[str, Any]], Mapping[str, np.ndarray]] | None = None,
               read_threads: int = 1, worker_count: int = 0) -> grain.DatasetIterator:
    """Batches of packed token rows for causal LM training, as a checkpointable grain iterator.

    Yields {"tokens", "segment_ids", "positions": int32 [B, T], "loss_mask": float32 [B, T]}
    with B = `batch_size` rows *per process* and T = `seq_len`; see `jaxllm.data.packing` for the
    row format and the `packing` strategies ("concat", "first_fit", "none").

    Sharding: process `shard_index` of `shard_count` (default: this JAX process of all of them)
    reads examples shard_index, shard_index + shard_count, ... of the first
    len(source) // shard_count * shard_count, so every host sees the same number of examples per
    epoch and no example twice. Shuffling is within the shard, seeded by `seed`, with a new order
    every epoch. `num_epochs=None` repeats forever; with a finite count the last partial batch is
    dropped. Multi-host jobs should repeat forever and stop by step count, since packing can give
    hosts different numbers of rows per epoch.

    `tokenize` maps a record to {"tokens": int32[L], "loss_mask": int[L]} (default: `TextTokens`
    on field `text_key`). `read_threads` threads read and tokenize ahead of the consumer (one
    already outruns a small model on a 2-core host; grain's default of 16 is slower there).
    `worker_count` > 0 tokenizes and packs in that many grain worker processes: the functions
    must be picklable, the program needs a `__main__` guard, and absl flags must be parsed (run
    under `absl.app.run`), as grain reads its own flags in the workers.
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
    if len(source) < shard_count:
        raise ValueError(f"source has {len(source)} examples, fewer than shard_count={shard_count}")
    ds = grain.MapDataset.source(source)
    ds = ds[: len(ds) // shard_count * shard_count][shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(tokenize or TextTokens(tokenizer, text_key))
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=16 * read_threads)
    ds = packing_lib.pack(ds.to_iter_dataset(read), seq_len=seq_len, packing=packing,
                          num_bins=batch_size, seed=seed, pad_id=tokenizer.pad_id)
    ds = ds.batch(batch_size, drop_remainder=True)
    if worker_count > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(ds)
