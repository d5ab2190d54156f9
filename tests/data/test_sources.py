"""TFDS sources (catalog under mock_data, local builders), packing and the LM batch iterator."""
import functools
import json
import socket
import zlib

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxllm.data import builders, corpus, packing, sources
from jaxllm.data.tokenizer import Tokenizer
from tests.data import shared_data_dir


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach the network fails at once instead of hanging on DNS retries."""
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline data test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


# ---------------------------------------------------------------- catalog datasets


@pytest.mark.parametrize("name, fields", [
    ("c4/en", {"text", "url", "timestamp", "content-length", "content-type"}),
    ("wmt14_translate/de-en", {"de", "en"}),
    ("coqa", {"source", "story", "questions", "answers"}),
])
def test_catalog_source_under_mock_data(tmp_path, name, fields):
    with tfds.testing.mock_data(num_examples=6):
        src = sources.catalog_source(name, "train", data_dir=tmp_path)
        assert len(src) == 6
        assert set(src[0]) == fields


def test_catalog_source_feeds_lm_batches(tmp_path, tok):
    with tfds.testing.mock_data(num_examples=8):
        src = sources.catalog_source("c4/en", "train", data_dir=tmp_path)
        texts = [_text(src[i]["text"]) for i in range(8)]
        it = sources.lm_batches(src, tok, batch_size=4, seq_len=12, shuffle=False, num_epochs=1,
                                shard_index=0, shard_count=1, packing="none")
        batches = list(it)
    assert len(batches) == 2
    rows = np.concatenate([b["tokens"] for b in batches])
    for row, seg, text in zip(rows, np.concatenate([b["segment_ids"] for b in batches]), texts):
        expected = tok.encode(text, bos=True, eos=True)[:12]
        np.testing.assert_array_equal(row[seg > 0], expected)


def test_catalog_source_not_prepared_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        sources.catalog_source("coqa", "train", data_dir=tmp_path)


# ---------------------------------------------------------------- local builders

NOTES = [
    {"text": "First note.\nIt has two lines.", "id": 1},
    {"text": "  Indented ünïcödé note with\ttabs 🤖", "id": 2, "extra": [1, 2]},
    {"text": "", "id": 3},
    {"text": "Last note of the first file.", "id": 4},
]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def test_jsonl_builder_reads_offline(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", NOTES[:2])
    b = _write_jsonl(tmp_path / "b.jsonl", NOTES[2:])
    test = _write_jsonl(tmp_path / "test.jsonl", [{"text": "held out", "id": 9}])
    data_dir = tmp_path / "data"
    ds = builders.jsonl_dataset("notes", {"train": [a, b], "test": test}, data_dir=data_dir)
    assert [_text(ds["train"][i]["text"]) for i in range(len(ds["train"]))] == [
        n["text"] for n in NOTES]
    assert set(ds["train"][0]) == {"text"}
    assert [_text(ds["test"][0]["text"])] == ["held out"]
    # A regular TFDS dataset: readable by name without our code.
    (config,) = [p.name for p in (data_dir / "notes").iterdir() if not p.name.startswith(".")]
    by_name = tfds.data_source(f"notes/{config}", split="test", data_dir=data_dir)
    assert _text(by_name[0]["text"]) == "held out"
    # Prepared once: a second call reuses the files; changed input builds a new dataset.
    info = next(data_dir.glob("notes/*/1.0.0/dataset_info.json"))
    stamp = info.stat().st_mtime_ns
    builders.jsonl_dataset("notes", {"train": [a, b], "test": test}, data_dir=data_dir)
    assert info.stat().st_mtime_ns == stamp
    _write_jsonl(test, [{"text": "changed", "id": 9}])
    changed = builders.jsonl_dataset("notes", {"train": [a, b], "test": test}, data_dir=data_dir)
    assert _text(changed["test"][0]["text"]) == "changed"


def test_jsonl_builder_several_fields(tmp_path):
    pairs = [{"prompt": f"Q{i}?", "response": f"A{i}.", "score": i} for i in range(5)]
    path = _write_jsonl(tmp_path / "pairs.jsonl", pairs)
    ds = builders.jsonl_dataset("pairs", path, fields=("prompt", "response"),
                                data_dir=tmp_path / "data")["train"]
    assert [(_text(ds[i]["prompt"]), _text(ds[i]["response"])) for i in range(5)] == [
        (p["prompt"], p["response"]) for p in pairs]


def test_jsonl_builder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        builders.jsonl_dataset("x", tmp_path / "missing.jsonl", data_dir=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text'"):
        builders.jsonl_dataset("bad", bad, data_dir=tmp_path)
    with pytest.raises(ValueError, match="Bad-Name"):
        builders.jsonl_dataset("Bad-Name", bad, data_dir=tmp_path)


def addition_example(rng):
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    return {"question": f"{a}+{b}=", "answer": str(a + b), "operands": [a, b],
            "hard": bool(a + b > 100), "scale": 0.5}


def test_task_builder_reproduces_the_generator(tmp_path):
    sizes = {"train": 12, "test": 4}
    ds = builders.task_dataset("addition", addition_example, num_examples=sizes, seed=3,
                               data_dir=tmp_path)
    for split, n in sizes.items():
        assert len(ds[split]) == n
        for i in range(n):
            want = addition_example(np.random.default_rng([3, zlib.crc32(split.encode()), i]))
            got = ds[split][i]
            assert _text(got["question"]) == want["question"]
            assert _text(got["answer"]) == want["answer"]
            assert list(got["operands"]) == want["operands"]
            assert bool(got["hard"]) == want["hard"] and got["scale"] == want["scale"]
    other = builders.task_dataset("addition", addition_example, num_examples=sizes, seed=4,
                                  data_dir=tmp_path)
    assert [_text(other["train"][i]["question"]) for i in range(12)] != [
        _text(ds["train"][i]["question"]) for i in range(12)]


def _prompt_answer_tokens(record, tokenizer):
    prompt = tokenizer.encode(_text(record["question"]), bos=True)
    answer = tokenizer.encode(_text(record["answer"]), eos=True)
    tokens = np.asarray(prompt + answer, np.int32)
    return {"tokens": tokens, "loss_mask": (np.arange(len(tokens)) >= len(prompt)).astype(np.int32)}


def test_generated_task_trains_on_answers_only(tmp_path, tok):
    src = builders.task_dataset("addition", addition_example, num_examples={"train": 16},
                                data_dir=tmp_path)["train"]
    it = sources.lm_batches(src, tok, batch_size=4, seq_len=32, shuffle=False, num_epochs=1,
                            shard_index=0, shard_count=1, packing="first_fit",
                            tokenize=functools.partial(_prompt_answer_tokens, tokenizer=tok))
    scored = []
    for batch in it:
        for row, mask, seg in zip(batch["tokens"], batch["loss_mask"], batch["segment_ids"]):
            for s in range(1, seg.max() + 1):
                scored.append(tok.decode(row[(seg == s) & (mask > 0)]))
    assert sorted(scored) == sorted(_text(src[i]["answer"]) for i in range(16))


def test_corpus_dataset_holds_the_corpus(tmp_path_factory):
    data_dir = shared_data_dir(tmp_path_factory)
    train, val = corpus.train_val_split(corpus.documents(data_dir))
    ds = builders.corpus_dataset(data_dir)
    assert set(ds) == {"train", "validation"}
    assert [_text(ds["validation"][i]["text"]) for i in range(len(val))] == val
    assert len(ds["train"]) == len(train)
    assert _text(ds["train"][len(train) - 1]["text"]) == train[-1]


# ---------------------------------------------------------------- packing


def _sequences(n, seq_len, seed=0):
    """Sequences of unique token ids (so every token is traceable), lengths 1 .. 2*seq_len."""
    rng = np.random.default_rng(seed)
    lengths = [1, seq_len, seq_len + 3, *rng.integers(1, 2 * seq_len, size=n - 3)]
    out, start = [], 10
    for length in lengths:
        tokens = np.arange(start, start + length, dtype=np.int32)
        out.append({"tokens": tokens, "loss_mask": rng.integers(0, 2, length).astype(np.int32)})
        start += length
    return out


def _pack_all(seqs, **kwargs):
    return list(packing.pack(grain.MapDataset.source(seqs).to_iter_dataset(), **kwargs))


def _check_rows(rows, seqs, seq_len, pad_id):
    """Row invariants; returns the segments (token arrays) in row order."""
    raw_mask = {int(t): int(m) for s in seqs for t, m in zip(s["tokens"], s["loss_mask"])}
    segments = []
    for row in rows:
        assert {k: (v.shape, v.dtype) for k, v in row.items()} == {
            "tokens": ((seq_len,), np.int32), "segment_ids": ((seq_len,), np.int32),
            "positions": ((seq_len,), np.int32), "loss_mask": ((seq_len,), np.float32)}
        seg, pos, tokens = row["segment_ids"], row["positions"], row["tokens"]
        n_real = int(np.sum(seg > 0))
        assert np.all(seg[:n_real] > 0) and np.all(seg[n_real:] == 0)  # padding only at the end
        np.testing.assert_array_equal(np.unique(seg[:n_real]), np.arange(1, seg.max() + 1))
        assert np.all(np.diff(seg[:n_real]) >= 0)
        np.testing.assert_array_equal(tokens[n_real:], pad_id)
        np.testing.assert_array_equal(row["loss_mask"][n_real:], 0)
        for s in range(1, seg.max() + 1):
            where = seg == s
            np.testing.assert_array_equal(pos[where], np.arange(where.sum()))
            want = [raw_mask[int(t)] for t in tokens[where]]
            want[0] = 0  # nothing in the row predicts a segment's first token
            np.testing.assert_array_equal(row["loss_mask"][where], want)
            segments.append(tokens[where])
    return segments


def test_concat_packing_keeps_every_token_in_order():
    seqs = _sequences(40, seq_len=16)
    rows = _pack_all(seqs, seq_len=16, packing="concat", pad_id=3)
    segments = _check_rows(rows, seqs, 16, pad_id=3)
    np.testing.assert_array_equal(np.concatenate(segments),
                                  np.concatenate([s["tokens"] for s in seqs]))
    assert all(np.all(r["segment_ids"] > 0) for r in rows[:-1])  # only the last row is padded


def test_first_fit_packing_never_splits_a_sequence():
    seqs = _sequences(40, seq_len=16, seed=1)
    rows = _pack_all(seqs, seq_len=16, packing="first_fit", num_bins=4, pad_id=0)
    segments = _check_rows(rows, seqs, 16, pad_id=0)
    assert sorted(tuple(s) for s in segments) == sorted(tuple(s["tokens"][:16]) for s in seqs)
    assert len(rows) < len(seqs)  # several sequences share rows


def test_no_packing_is_one_sequence_per_row():
    seqs = _sequences(10, seq_len=16, seed=2)
    rows = _pack_all(seqs, seq_len=16, packing="none", pad_id=3)
    segments = _check_rows(rows, seqs, 16, pad_id=3)
    assert len(rows) == len(segments) == len(seqs)
    for segment, s in zip(segments, seqs):
        np.testing.assert_array_equal(segment, s["tokens"][:16])


# ---------------------------------------------------------------- lm_batches

WORDS = "the of a data model token batch text corpus shard state epoch row".split()
TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 11)) + f" #{i}"
         for i in range(37)]
RECORDS = [{"text": t} for t in TEXTS]


def _id_tokens(record):
    """Tokens that name their record: three copies of its index."""
    return {"tokens": np.full(3, record["id"], np.int32), "loss_mask": np.ones(3, np.int32)}


def test_lm_batches_rows_match_packing_of_tokenized_text(tok):
    it = sources.lm_batches(RECORDS, tok, batch_size=3, seq_len=20, shuffle=False, num_epochs=1)
    batches = list(it)
    stream = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
    full = np.concatenate([tok.encode(t, bos=True, eos=True) for t in TEXTS])
    assert len(full) - len(stream) < 3 * 20  # only the dropped last partial batch is missing
    np.testing.assert_array_equal(stream, full[:len(stream)])
    for b in batches:
        assert b["tokens"].shape == (3, 20) and b["loss_mask"].dtype == np.float32
        np.testing.assert_array_equal(b["loss_mask"][:, 0], 0)


def test_shards_are_disjoint_and_cover_the_data(tok):
    records = [{"id": i} for i in range(11)]
    seen = []
    for index in range(2):
        it = sources.lm_batches(records, tok, batch_size=1, seq_len=3, shuffle=True,
                                num_epochs=1, shard_index=index, shard_count=2, packing="none",
                                tokenize=_id_tokens)
        seen.append(sorted(int(b["tokens"][0, 0]) for b in it))
    assert len(seen[0]) == len(seen[1]) == 5  # 11 // 2 examples per shard, the 11th dropped
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0] + seen[1]) == set(range(10))


def test_shuffle_is_seeded_and_reshuffles_each_epoch(tok):
    records = [{"id": i} for i in range(8)]

    def order(seed):
        it = sources.lm_batches(records, tok, batch_size=1, seq_len=3, seed=seed, num_epochs=2,
                                shard_index=0, shard_count=1, packing="none", tokenize=_id_tokens)
        return [int(b["tokens"][0, 0]) for b in it]

    first = order(0)
    assert first == order(0) and first != order(1)
    assert sorted(first[:8]) == sorted(first[8:]) == list(range(8))
    assert first[:8] != first[8:]


@pytest.mark.parametrize("packing_name", packing.PACKINGS)
def test_iterator_state_round_trip(tok, packing_name):
    kwargs = dict(batch_size=3, seq_len=16, seed=7, num_epochs=None, shard_index=0,
                  shard_count=1, packing=packing_name)
    it = sources.lm_batches(RECORDS, tok, **kwargs)
    for _ in range(9):  # past the end of the first epoch for every strategy
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(4)]
    resumed = sources.lm_batches(RECORDS, tok, **kwargs)
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(4)]):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_text_tokens_reads_bytes_and_names_missing_fields(tok):
    out = sources.TextTokens(tok)({"text": "héllo".encode()})
    np.testing.assert_array_equal(out["tokens"], tok.encode("héllo", bos=True, eos=True))
    with pytest.raises(ValueError, match="'body'"):
        sources.TextTokens(tok, "body")({"text": "x"})


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=1), "seq_len"),
    (dict(batch_size=0), "batch_size"),
    (dict(packing="greedy"), "greedy"),
    (dict(shard_index=2, shard_count=2), "shard_index"),
    (dict(num_epochs=0), "num_epochs"),
])
def test_lm_batches_rejects_bad_arguments(tok, kwargs, match):
    args = dict(batch_size=2, seq_len=8, shard_index=0, shard_count=1) | kwargs
    with pytest.raises(ValueError, match=match):
        sources.lm_batches(RECORDS, tok, **args)


def test_lm_batches_rejects_too_small_source(tok):
    with pytest.raises(ValueError, match="fewer than shard_count=4"):
        sources.lm_batches(RECORDS[:3], tok, batch_size=1, seq_len=8, shard_index=0,
                           shard_count=4)
