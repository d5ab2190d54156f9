"""The embedded corpus: English prose from the Python standard library of the running interpreter.

Every machine with Python has it, so the main training job, the experiments and the tests get
real text (about 2.9 MB, 530 documents on CPython 3.11) without a download. Two parts, in order:

* one document per module of the `.py` files under `sysconfig.get_paths()["stdlib"]` (sorted
  relative paths): its docstrings (module, class, function) and comment paragraphs (runs of two or
  more full-line comments) in source-line order; test suites (`test`, `tests`), `idlelib`,
  `turtledemo` and `site-packages` are skipped;
* the reference-manual topics shipped as `pydoc_data.topics` (the text `help()` shows), one
  document per topic, in sorted topic order.

Source and licence: the Python standard library and its documentation, (c) Python Software
Foundation, PSF License Agreement (`LICENSE.txt` in the stdlib directory). None of it is stored
in this repository: the corpus is extracted at first use (a few seconds) and cached as JSON under
the data dir (`jaxllm.data.paths.data_dir`), keyed by interpreter version and stdlib file list, so
each Python builds its own.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import pathlib
import re
import sys
import sysconfig
import tokenize

from jaxllm.data import paths

SKIP_DIRS = frozenset({"test", "tests", "idlelib", "turtledemo", "site-packages",
                       "dist-packages", "__pycache__", "pydoc_data"})
MIN_DOC_CHARS = 200
MIN_COMMENT_LINES = 2
_CODING = re.compile(r"^#.*coding[:=]")
_DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_dir() -> pathlib.Path:
    """The running interpreter's standard-library directory."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def source_files(root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """The `.py` files the corpus reads, in sorted relative-path order."""
    root = stdlib_dir() if root is None else root
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")]
        found += [pathlib.Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def comment_paragraphs(source: str) -> list[tuple[int, str]]:
    """Runs of at least MIN_COMMENT_LINES consecutive full-line comments, as (first line number,
    text with the leading '#' and one space removed, lines joined by newlines). Shebang and
    coding lines are excluded."""
    found, run, start = [], [], 0
    for lineno, line in enumerate(source.splitlines() + [""], start=1):
        stripped = line.strip()
        is_comment = stripped.startswith("#") and not stripped.startswith("#!") and not (
            lineno <= 2 and _CODING.match(stripped))
        if is_comment:
            if not run:
                start = lineno
            run.append(stripped[1:].removeprefix(" ").rstrip())
            continue
        if len(run) >= MIN_COMMENT_LINES:
            found.append((start, "\n".join(run).strip("\n")))
        run = []
    return found


def module_text(path: pathlib.Path) -> str:
    """A module's prose: its docstrings (module, class, function; dedented by
    `inspect.cleandoc`) and comment paragraphs, in source-line order, joined by blank lines.
    '' when the file does not parse."""
    try:
        with tokenize.open(path) as f:
            source = f.read()
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = comment_paragraphs(source)
    for node in ast.walk(tree):
        if isinstance(node, _DOCSTRING_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                parts.append((node.body[0].lineno, doc))
    return "\n\n".join(text for _, text in sorted(parts) if text)


def manual_topics() -> list[str]:
    """The reference-manual topics of `pydoc_data.topics`, sorted by topic name."""
    from pydoc_data import topics  # pylint: disable=import-outside-toplevel

    return [inspect.cleandoc(topics.topics[k]) for k in sorted(topics.topics)]


def build_documents(root: pathlib.Path | None = None) -> list[str]:
    """Extracts the corpus from the stdlib (no cache). Documents shorter than MIN_DOC_CHARS are
    dropped (one-line stubs carry little prose)."""
    docs = [module_text(p) for p in source_files(root)] + manual_topics()
    return [d for d in docs if len(d) >= MIN_DOC_CHARS]


def cache_path(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The JSON file the corpus is cached in, keyed by interpreter version and stdlib file list."""
    root = stdlib_dir()
    listing = "\n".join(p.relative_to(root).as_posix() for p in source_files(root))
    key = hashlib.sha256(f"{sys.version}\n{root}\n{listing}".encode()).hexdigest()[:12]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}{sys.version_info.micro}"
    return paths.data_dir(data_dir) / "corpus" / f"stdlib_docs_{tag}_{key}.json"


def documents(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The corpus as a list of documents, built at first use and cached under `data_dir`.

    The cache is written atomically (temporary file + rename), so concurrent first uses are safe.
    """
    path = cache_path(data_dir)
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    docs = build_documents()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(docs, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return docs


def digest(docs: list[str]) -> str:
    """SHA-256 of the documents (order and boundaries included): the corpus's identity."""
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8")).digest())
    return h.hexdigest()


def train_val_split(docs: list[str], val_fraction: float = 0.02) -> tuple[list[str], list[str]]:
    """Deterministic split by a hash of each document's text (independent of list order): a
    document is in validation iff the first 8 bytes of its SHA-256, as a fraction of 2**64, are
    below `val_fraction`. Order within each part is preserved."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for d in docs:
        u = int.from_bytes(hashlib.sha256(d.encode("utf-8")).digest()[:8], "big") / 2**64
        (val if u < val_fraction else train).append(d)
    return train, val
