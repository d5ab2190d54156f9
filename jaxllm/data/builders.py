"""Local TFDS datasets for the project's own data: JSONL files, generated tasks, the embedded corpus.

Each is prepared once as a regular TFDS dataset in array_record format (no TensorFlow needed) at
`{data_dir}/{name}/{fingerprint}/1.0.0` and opened as random-access sources, one per split, that
grain reads (`jaxllm.data.sources.lm_batches`). The config name is a fingerprint of the inputs
(file contents, generator code and seed, corpus digest), so changed inputs build a new dataset
instead of silently reusing a stale one. Anything that reads TFDS can open the result too, e.g.
`tfds.data_source(f"{name}/{fingerprint}", split="train", data_dir=data_dir)`.

Feature types are inferred from the first example of the first split: str -> `Text`, int ->
int64 `Scalar`, float -> float32 `Scalar`, bool -> bool `Scalar`, list of one of those ->
`Sequence`. Text comes back as bytes (UTF-8).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import pathlib
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxllm.data import corpus, paths
from jaxllm.data.jsonl import jsonl_objects

VERSION = "1.0.0"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

Example = Mapping[str, Any]
Sources = dict[str, Sequence[Mapping[str, Any]]]


class _IterableBuilder(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
    """`AdhocBuilder` fed plain iterables of (key, example). The parent's split generation
    first tests for `tf.data.Dataset`, which imports TensorFlow; this one never does."""

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: iter(examples) for split, examples in self._split_datasets.items()}


class _Keyed:
    """Re-iterable (index, example) pairs from a zero-argument example-iterator factory, so
    nothing is generated unless the dataset is actually being prepared."""

    def __init__(self, make: Callable[[], Iterable[Example]]):
        self._make = make

    def __iter__(self) -> Iterator[tuple[int, Example]]:
        return enumerate(self._make())


def build(name: str, splits: Mapping[str, Callable[[], Iterable[Example]]], *, fingerprint: str,
          data_dir: str | os.PathLike | None = None, description: str = "") -> Sources:
    """Prepares (once per fingerprint) and opens a local TFDS dataset.

    `splits` maps split names to factories of example iterables; examples are stored in
    generation order. Returns {split: random-access source}.
    """
    if not _NAME.match(name):
        raise ValueError(f"dataset name must be snake_case ([a-z][a-z0-9_]*), got {name!r}")
    if not splits:
        raise ValueError(f"dataset {name!r} needs at least one split, got none")
    first = next(iter(next(iter(splits.values()))()), None)
    if first is None:
        raise ValueError(f"dataset {name!r}: split {next(iter(splits))!r} has no examples")
    builder = _IterableBuilder(
        name=name, version=VERSION, config=f"h{fingerprint[:16]}", features=infer_features(first),
        split_datasets={s: _Keyed(make) for s, make in splits.items()},
        data_dir=paths.data_dir(data_dir),
        description=description or f"jaxllm local dataset {name}", file_format="array_record",
        disable_shuffling=True)
    builder.download_and_prepare()
    # A read-only builder over the prepared files: unlike the builder above, its sources pickle
    # (grain worker processes receive them).
    reader = tfds.builder_from_directory(builder.data_dir)
    return {split: reader.as_data_source(split) for split in splits}


def infer_features(example: Example) -> tfds.features.FeaturesDict:
    """TFDS features for an example of str/int/float/bool values or lists of them."""
    return tfds.features.FeaturesDict({k: _feature(k, v) for k, v in example.items()})


def _feature(key: str, value: Any):
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"field {key!r}: cannot infer a type from an empty list")
        return tfds.features.Sequence(_feature(key, value[0]))
    if isinstance(value, str):
        return tfds.features.Text()
    if isinstance(value, (bool, np.bool_)):
        return tfds.features.Scalar(np.bool_)
    if isinstance(value, (int, np.integer)):
        return tfds.features.Scalar(np.int64)
    if isinstance(value, (float, np.floating)):
        return tfds.features.Scalar(np.float32)
    raise ValueError(f"field {key!r}: unsupported value type {type(value).__name__}")


def jsonl_dataset(name: str, files: str | os.PathLike | Sequence[str | os.PathLike]
                  | Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]], *,
                  fields: Sequence[str] = ("text",),
                  data_dir: str | os.PathLike | None = None) -> Sources:
    """A TFDS dataset of string `fields` read from JSON-lines files.

    `files` is one path, a list of paths (both become split "train"), or {split: path(s)}.
    Every line is one JSON object that must hold each field as a string; other keys are ignored,
    blank lines are skipped.
    """
    if not isinstance(files, Mapping):
        files = {"train": files}
    split_files = {s: _path_list(f) for s, f in files.items()}
    if not fields:
        raise ValueError("jsonl_dataset needs at least one field, got none")
    h = hashlib.sha256(json.dumps(["jsonl", list(fields)]).encode())
    for split, split_paths in split_files.items():
        for p in split_paths:
            if not p.is_file():
                raise FileNotFoundError(f"JSONL file not found: {p}")
            h.update(split.encode() + b"\0" + _file_sha256(p))
    return build(name, {s: (lambda ps=ps: _read_jsonl(ps, fields)) for s, ps in split_files.items()},
                 fingerprint=h.hexdigest(), data_dir=data_dir,
                 description=f"JSONL fields {list(fields)}")


def task_dataset(name: str, example_fn: Callable[[np.random.Generator], Example], *,
                 num_examples: Mapping[str, int], seed: int = 0,
                 data_dir: str | os.PathLike | None = None) -> Sources:
    """A TFDS dataset from a generated task (see `jaxllm.data.tasks`).

    Example i of split s is `example_fn(np.random.default_rng([seed, crc32(s), i]))`, so every
    example is reproducible on its own. The fingerprint covers the seed, the split sizes and the
    source file of `example_fn`'s module: editing the task module rebuilds the dataset.
    """
    for split, n in num_examples.items():
        if n < 1:
            raise ValueError(f"num_examples[{split!r}] must be >= 1, got {n}")
    source_file = inspect.getsourcefile(example_fn)
    code = pathlib.Path(source_file).read_bytes() if source_file else b""
    h = hashlib.sha256(json.dumps(["task", example_fn.__module__, example_fn.__qualname__, seed,
                                   sorted(num_examples.items())]).encode() + code)

    def make(split: str, n: int) -> Iterator[Example]:
        salt = zlib.crc32(split.encode())
        return (example_fn(np.random.default_rng([seed, salt, i])) for i in range(n))

    return build(name, {s: (lambda s=s, n=n: make(s, n)) for s, n in num_examples.items()},
                 fingerprint=h.hexdigest(), data_dir=data_dir,
                 description=f"generated by {example_fn.__module__}.{example_fn.__qualname__}")


def corpus_dataset(data_dir: str | os.PathLike | None = None,
                   val_fraction: float = 0.02) -> Sources:
    """The embedded corpus (`jaxllm.data.corpus`) as TFDS dataset `jaxllm_corpus` with splits
    "train" and "validation" (`corpus.train_val_split`), one {"text": ...} example per document."""
    docs = corpus.documents(data_dir)
    train, val = corpus.train_val_split(docs, val_fraction)
    fingerprint = hashlib.sha256(f"{corpus.digest(docs)}:{val_fraction}".encode()).hexdigest()
    return build("jaxllm_corpus",
                 {"train": lambda: ({"text": d} for d in train),
                  "validation": lambda: ({"text": d} for d in val)},
                 fingerprint=fingerprint, data_dir=data_dir,
                 description="Python standard library docstrings and manual (PSF License)")


def _path_list(files) -> list[pathlib.Path]:
    if isinstance(files, (str, os.PathLike)):
        return [pathlib.Path(files)]
    return [pathlib.Path(f) for f in files]


def _file_sha256(path: pathlib.Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def _read_jsonl(files: Sequence[pathlib.Path], fields: Sequence[str]) -> Iterator[Example]:
    for path in files:
        for lineno, record in jsonl_objects(path):
            for k in fields:
                if not isinstance(record.get(k), str):
                    raise ValueError(f"{path}:{lineno}: field {k!r} must be a string, got {record.get(k)!r:.80}")
            yield {k: record[k] for k in fields}
