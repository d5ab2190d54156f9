"""Long-context probes: sample layout parsed back independently, depth control, filler
provenance, masks, and bucketed perplexity against a float64 hand computation."""
import numpy as np
import pytest

from jaxllm.data.tasks import long_context as lc

VOCAB = lc.TaskVocab(n_keys=16, n_values=10)
TASK = lc.RetrievalConfig(vocab=VOCAB, n_pairs=3, answer_len=2, n_queries=2)
STREAM = VOCAB.encode_text("The quick brown fox jumps over the lazy dog.\n" * 40)


def parse(row):
    """Independent reading of a row: {key: values} of its stored pairs, [(query key, answer,
    index of the answer's first token)], and the index of the first QUERY."""
    pairs, i = {}, 1
    assert row[0] == lc.BOS
    while row[i] != lc.QUERY:
        if row[i] == lc.KEY:
            pairs[int(row[i + 1])] = tuple(int(v) for v in row[i + 2:i + 2 + TASK.answer_len])
            i += TASK.pair_len
        else:
            assert row[i] >= VOCAB.text_offset, f"non-text token {row[i]} in the filler"
            i += 1
    first_query, queries = i, []
    while i < len(row):
        assert row[i] == lc.QUERY
        queries.append((int(row[i + 1]), tuple(int(v) for v in row[i + 2:i + TASK.pair_len]), i + 2))
        i += TASK.pair_len
    return pairs, queries, first_query


@pytest.mark.parametrize("stream", [STREAM, None], ids=["corpus_like", "random"])
@pytest.mark.parametrize("length", [TASK.min_length(), 64, 301])
def test_rows_hold_the_answer_of_the_queried_key(stream, length):
    s = lc.retrieval_samples(np.random.default_rng(0), 8, length, TASK, stream)
    assert s["tokens"].shape == (8, length) and s["tokens"].dtype == np.int32
    for r, row in enumerate(s["tokens"]):
        pairs, queries, _ = parse(row)
        assert len(pairs) == TASK.n_pairs  # distinct keys
        assert len(queries) == TASK.n_queries and len({q[0] for q in queries}) == TASK.n_queries
        for (key, answer, start), positions in zip(queries, s["answer_positions"][r]):
            assert VOCAB.key_offset <= key < VOCAB.value_offset
            assert all(VOCAB.value_offset <= v < VOCAB.text_offset for v in answer)
            assert pairs[key] == answer
            np.testing.assert_array_equal(positions, [start, start + 1])
        n = s["needle_start"][r]
        assert row[n] == lc.KEY and row[n + 1] == queries[0][0]  # the depth-placed pair is asked first
        np.testing.assert_array_equal(np.flatnonzero(s["answer_mask"][r]), np.sort(s["answer_positions"][r].ravel()))


def test_depth_places_the_queried_pair():
    n_filler = 200 - 1 - (TASK.n_pairs + TASK.n_queries) * TASK.pair_len
    depths = np.linspace(0, 1, 11)
    s = lc.retrieval_samples(np.random.default_rng(1), 11, 200, TASK, STREAM, depth=depths)
    assert s["needle_start"][0] == 1  # depth 0: right after BOS
    filler_before = s["needle_start"] - 1 - np.array(
        [(np.flatnonzero(row[1:n] == lc.KEY)).size * TASK.pair_len for row, n in zip(s["tokens"], s["needle_start"])])
    np.testing.assert_array_equal(filler_before, np.round(depths * n_filler))
    with pytest.raises(ValueError, match="depth must lie in"):
        lc.retrieval_samples(np.random.default_rng(1), 2, 200, TASK, STREAM, depth=1.5)


def test_filler_is_one_contiguous_slice_of_the_stream_and_masks_are_text_only():
    s = lc.retrieval_samples(np.random.default_rng(2), 4, 150, TASK, STREAM)
    joined = STREAM.tobytes()
    for row, lm_mask in zip(s["tokens"], s["lm_mask"]):
        _, _, query_at = parse(row)
        text = []
        i = 1
        while i < query_at:
            if row[i] == lc.KEY:
                i += TASK.pair_len
            else:
                text.append(row[i])
                i += 1
        assert np.asarray(text, STREAM.dtype).tobytes() in joined
        is_text = row >= VOCAB.text_offset
        expected = np.zeros(len(row))
        expected[1:] = is_text[1:] & is_text[:-1]
        expected[s["answer_positions"][0].ravel()] = 1
        np.testing.assert_array_equal(lm_mask, expected)


def test_samples_are_deterministic_in_the_seed():
    a = lc.retrieval_samples(np.random.default_rng(5), 3, 90, TASK, STREAM)
    b = lc.retrieval_samples(np.random.default_rng(5), 3, 90, TASK, STREAM)
    c = lc.retrieval_samples(np.random.default_rng(6), 3, 90, TASK, STREAM)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], c["tokens"])


def test_text_encoding_round_trip_and_substitutions():
    text = "def f(x):\n    return {'a': x ~ 1}\n"
    ids = VOCAB.encode_text(text)
    assert ids.min() >= VOCAB.text_offset and ids.max() < VOCAB.size
    assert VOCAB.decode_text(ids) == text
    assert VOCAB.decode_text(VOCAB.encode_text("a\tb é")) == "a b ?"
    assert VOCAB.decode_text([lc.BOS, VOCAB.key_offset + 3, VOCAB.value_offset]) == "⟨bos⟩⟨k3⟩⟨v0⟩"


def test_lm_rows_are_stream_windows():
    rows = lc.lm_rows(np.random.default_rng(3), 5, 33, STREAM)
    assert np.all(rows["tokens"][:, 0] == lc.BOS) and np.all(rows["loss_mask"][:, 0] == 0)
    assert np.all(rows["loss_mask"][:, 1:] == 1)
    for row in rows["tokens"]:
        assert row[1:].astype(STREAM.dtype).tobytes() in STREAM.tobytes()


def test_position_buckets_and_perplexity_against_float64():
    np.testing.assert_array_equal(lc.position_buckets(1024, 128), [0, 128, 256, 512, 1024])
    np.testing.assert_array_equal(lc.position_buckets(200, 128), [0, 128, 200])
    np.testing.assert_array_equal(lc.position_buckets(100, 128), [0, 100])
    rng = np.random.default_rng(4)
    nll = rng.uniform(0, 5, size=(3, 8)).astype(np.float32)
    mask = (rng.uniform(size=(3, 8)) > 0.3).astype(np.float32)
    mask[:, 0] = 0
    mask[0, 1] = 1
    edges = [0, 2, 4, 8]
    expected = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        vals = [float(nll[b, t]) for b in range(3) for t in range(lo, hi) if mask[b, t]]
        expected.append(np.exp(sum(vals) / len(vals)))
    np.testing.assert_allclose(lc.bucket_perplexity(nll, mask, edges), expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"bucket \[0, 1\) has no scored tokens"):
        lc.bucket_perplexity(nll, mask, [0, 1, 8])


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="length 10 is shorter"):
        lc.retrieval_samples(np.random.default_rng(0), 1, 10, TASK)
    with pytest.raises(ValueError, match="n_pairs must be in"):
        lc.RetrievalConfig(vocab=VOCAB, n_pairs=17)
    with pytest.raises(ValueError, match="n_queries must be in"):
        lc.RetrievalConfig(vocab=VOCAB, n_pairs=2, n_queries=3)
    with pytest.raises(ValueError, match="filler stream has 5 tokens"):
        lc.retrieval_samples(np.random.default_rng(0), 1, 64, TASK, STREAM[:5])
    with pytest.raises(ValueError, match="split must be"):
        lc.corpus_stream("test")
