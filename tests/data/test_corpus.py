"""Embedded corpus: real, deterministic, cached, split reproducibly."""
import json
import random
import textwrap

import pytest

from jaxllm.data import corpus, paths
from tests.data import shared_data_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return shared_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def docs(data_dir):
    return corpus.documents(data_dir)


def test_corpus_is_real_prose_of_useful_size(docs):
    assert len(docs) > 300
    assert sum(map(len, docs)) > 2_000_000
    text = "\n".join(docs)
    # Known sentences from the json module docstring and the manual's "if" statement topic.
    assert "JSON (JavaScript Object Notation)" in text
    assert "The \"if\" statement is used for conditional execution" in text
    words = text.split()
    assert sum(w.isalpha() for w in words) / len(words) > 0.5
    assert all(len(d) >= corpus.MIN_DOC_CHARS for d in docs)


def test_source_files_skip_tests_and_third_party():
    root = corpus.stdlib_dir()
    files = [p.relative_to(root) for p in corpus.source_files()]
    assert files == sorted(files, key=lambda p: p.as_posix())
    names = {p.as_posix() for p in files}
    assert {"json/__init__.py", "argparse.py", "email/message.py"} <= names
    for p in files:
        assert not set(p.parts[:-1]) & corpus.SKIP_DIRS, p


def test_cache_and_determinism(docs, data_dir):
    cached = corpus.cache_path(data_dir)
    assert cached.is_relative_to(data_dir) and cached.exists()
    assert json.loads(cached.read_text(encoding="utf-8")) == docs
    assert corpus.documents(data_dir) == docs
    assert corpus.build_documents() == docs  # a fresh extraction gives the same corpus
    assert corpus.digest(docs) == corpus.digest(list(docs))
    assert corpus.digest(docs[1:]) != corpus.digest(docs)


def test_module_text_order_and_cleaning(tmp_path):
    source = textwrap.dedent('''\
        #!/usr/bin/env python
        # -*- coding: utf-8 -*-
        """Module docstring.

            Indented detail.
        """
        # A comment paragraph
        # of two lines.
        x = 1  # trailing comments are code notes, not prose

        # a single comment line is dropped
        class A:
            """Class doc."""

            def f(self):
                """Method doc."""
        ''')
    path = tmp_path / "m.py"
    path.write_text(source)
    assert corpus.module_text(path) == ("Module docstring.\n\nIndented detail.\n\n"
                                        "A comment paragraph\nof two lines.\n\n"
                                        "Class doc.\n\nMethod doc.")
    (tmp_path / "bad.py").write_text("print 'python 2'\n")
    assert corpus.module_text(tmp_path / "bad.py") == ""


def test_train_val_split(docs):
    train, val = corpus.train_val_split(docs, 0.05)
    assert len(train) + len(val) == len(docs)
    assert 0.01 < len(val) / len(docs) < 0.12
    assert set(train).isdisjoint(val)
    assert [d for d in docs if d in set(val)] == val  # order preserved
    shuffled = list(docs)
    random.Random(0).shuffle(shuffled)
    train2, val2 = corpus.train_val_split(shuffled, 0.05)
    assert set(val2) == set(val) and set(train2) == set(train)
    assert corpus.train_val_split(docs, 0.0) == (docs, [])
    with pytest.raises(ValueError, match="1.5"):
        corpus.train_val_split(docs, 1.5)


def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "env"))
    assert paths.data_dir() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert paths.data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv(paths.ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.data_dir() == tmp_path / "home" / ".cache" / "jaxllm"
