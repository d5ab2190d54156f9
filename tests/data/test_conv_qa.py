"""Synthetic conversational QA: follow-ups need the history, splits share no document, determinism."""
import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig

import pytest

from jaxllm.data.tasks import conv_qa

MODULES = ("textwrap", "argparse", "json/__init__", "pickle", "heapq", "shutil", "tempfile", "tarfile", "csv",
           "fractions", "statistics", "difflib", "calendar", "datetime", "queue", "sched", "gzip", "imaplib",
           "ftplib", "smtplib", "uuid", "ipaddress", "configparser", "optparse", "enum", "graphlib", "contextlib",
           "functools", "operator", "random", "base64", "getopt", "plistlib", "pprint", "hmac")


def stdlib_documents():
    """Real text: the docstrings of a few stdlib modules, one document per module."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for name in MODULES:
        with open(os.path.join(root, name + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        docs.append("\n\n".join(doc for node in ast.walk(tree)
                                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                                for doc in [ast.get_docstring(node)] if doc))
    return docs


@pytest.fixture(scope="module")
def docs():
    return stdlib_documents()


@pytest.fixture(scope="module")
def data(docs):
    return conv_qa.generate(docs, conv_qa.ConvQAConfig(seed=0))


def words(text):
    return {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)}


def all_turns(data):
    return [(d, i, t) for split in conv_qa.SPLITS for d in data.dialogues[split] for i, t in enumerate(d.turns)]


def test_chunk_words():
    text = " ".join(f"w{i}" for i in range(1000))
    chunks = conv_qa.chunk_words(text, 300)
    assert [len(c.split()) for c in chunks] == [333, 334, 333]
    assert " ".join(chunks) == text
    assert conv_qa.chunk_words("one two\nthree", 300) == ["one two\nthree"]
    assert conv_qa.chunk_words("  \n ", 300) == []


def test_follow_ups_need_the_history(data):
    follow_ups = [(d, i, t) for d, i, t in all_turns(data) if t.needs_history and t.answerable]
    assert len(follow_ups) >= 30
    for dialogue, i, turn in follow_ups:
        entity = turn.entity.lower()
        assert i > 0
        assert entity not in words(turn.question), turn.question
        assert entity in words(turn.rewrite), turn.rewrite
        earlier = [t for t in dialogue.turns[:i] if not t.needs_history]
        assert entity in words(earlier[-1].question), "the most recent named entity is the one referred to"
        assert entity in words(" ".join(c for _, c in dialogue.history(i)))
        gold = data.chunks[turn.gold_chunk]
        assert entity in words(gold.text)


def test_turns_point_at_their_gold_chunk(data):
    for dialogue, _, turn in all_turns(data):
        if not turn.answerable:
            assert turn.gold_chunk == -1 and turn.answer_span is None and turn.answer == conv_qa.REFUSAL
            doc_chunks = [c for c in data.chunks if c.doc_id == dialogue.doc_id]
            assert all(turn.aspect.lower() not in words(c.text) for c in doc_chunks)
            continue
        gold = data.chunks[turn.gold_chunk]
        assert gold.doc_id == dialogue.doc_id
        start, end = turn.answer_span
        assert gold.text[start:end] == turn.answer and turn.aspect.lower() in words(turn.answer)
        both = [c.chunk_id for c in data.chunks
                if {turn.entity.lower(), turn.aspect.lower()} <= words(c.text)]
        assert both == [turn.gold_chunk], "entity + aspect identify the gold chunk in the whole corpus"
    turns = [t for _, _, t in all_turns(data)]
    assert any(not t.answerable for t in turns)
    assert any(not t.needs_history for _, i, t in all_turns(data) if i > 0), "some follow-ups switch entity"


def test_split_by_document_without_leakage(data):
    splits = conv_qa.SPLITS
    assert all(data.doc_ids[s] and data.dialogues[s] for s in splits)
    for a in splits:
        for b in splits:
            if a < b:
                assert not set(data.doc_ids[a]) & set(data.doc_ids[b])
    for s in splits:
        for dialogue in data.dialogues[s]:
            assert dialogue.doc_id in data.doc_ids[s]
            assert all(data.chunks[t.gold_chunk].doc_id in data.doc_ids[s] for t in dialogue.turns if t.answerable)


def digest(data):
    return hashlib.sha256(repr(data).encode()).hexdigest()


def test_deterministic_per_seed_across_processes(docs, data, tmp_path):
    assert digest(conv_qa.generate(docs, conv_qa.ConvQAConfig(seed=0))) == digest(data)
    assert digest(conv_qa.generate(docs, conv_qa.ConvQAConfig(seed=1))) != digest(data)
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    script = ("import hashlib, json, sys; from jaxllm.data.tasks import conv_qa; "
              "d = conv_qa.generate(json.load(open(sys.argv[1])), conv_qa.ConvQAConfig(seed=0)); "
              "print(hashlib.sha256(repr(d).encode()).hexdigest())")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "docs.json")], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest(data)


def test_history_pairs(data):
    dialogue = next(d for d in data.dialogues["train"] if len(d.turns) >= 3)
    history = dialogue.history(2)
    assert [r for r, _ in history] == ["user", "assistant", "user", "assistant"]
    assert history[2] == ("user", dialogue.turns[1].question)
    assert history[3] == ("assistant", dialogue.turns[1].answer)
    with pytest.raises(ValueError, match="turn index"):
        dialogue.history(len(dialogue.turns))


def test_bad_input():
    with pytest.raises(ValueError, match="empty corpus"):
        conv_qa.generate([])
    with pytest.raises(ValueError, match="empty corpus"):
        conv_qa.generate(["", "  "])
    with pytest.raises(ValueError, match="too few"):
        conv_qa.generate(stdlib_documents()[:2])
    with pytest.raises(ValueError, match="min_turns"):
        conv_qa.ConvQAConfig(min_turns=3, max_turns=2)
