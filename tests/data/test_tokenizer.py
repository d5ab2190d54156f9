"""Tokenizer: exact round trips, Llama-style training, the shipped model, the chat template."""
import hashlib
import pathlib
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from jaxllm.data import build_tokenizer, corpus
from jaxllm.data.tokenizer import Tokenizer, check_vocab
from tests.data import shared_data_dir

TRICKY = [
    "Hello, world!",
    "",
    " ",
    "  two leading spaces and two trailing  ",
    "tabs\tinside\t\tand a trailing tab\t",
    "\n\nleading newlines, a blank line\n\nand a trailing newline\n",
    "windows\r\nline endings\r\n",
    "unicode: ünïcödé, 日本語のテキスト, Ελληνικά, emoji 🤖🎉, combining e\u0301",
    "digits 1234567890 and 3.14159e-10",
    "code:\n    def f(x):\n\treturn {'a': [1, 2]}  # comment\n",
    "control \x00 \x07 \x1b[0m and nbsp\u00a0and zero-width\u200bspace",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


@pytest.fixture(scope="module")
def stdlib_text(tmp_path_factory):
    """A few hundred KB of real prose (stdlib docstrings) in a file."""
    root = corpus.stdlib_dir()
    names = ["argparse.py", "collections/__init__.py", "json/__init__.py", "typing.py",
             "pathlib.py", "functools.py", "subprocess.py", "inspect.py"]
    text = "\n\n".join(corpus.module_text(root / n) for n in names)
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_random_unicode(tok):
    rng = np.random.default_rng(0)
    pool = [chr(c) for c in [*range(0x20, 0x7F), 0x9, 0xA, 0xE9, 0x3B1, 0x416, 0x4E2D,
                             0x1F600, 0xFFFD, 0x10FFFF]]
    for _ in range(50):
        text = "".join(rng.choice(pool, size=rng.integers(0, 80)))
        assert tok.decode(tok.encode(text)) == text


def test_batch_matches_single_and_special_framing(tok):
    texts = TRICKY[:5]
    batch = tok.encode_batch(texts, bos=True, eos=True)
    assert batch == [tok.encode(t, bos=True, eos=True) for t in texts]
    assert all(ids[0] == tok.bos_id and ids[-1] == tok.eos_id for ids in batch)
    assert tok.decode_batch(batch) == texts  # control tokens decode to nothing
    assert tok.decode(np.asarray(batch[0], np.int32)) == texts[0]


def test_shipped_model(tok):
    assert tok.vocab_size == 4096
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    path = pathlib.Path(build_tokenizer.ASSET)
    assert path.stat().st_size < 200_000
    proto = spm.SentencePieceProcessor(model_file=str(path))
    assert proto.encode("Return the number of items.") == tok.encode("Return the number of items.")


def test_shipped_model_is_reproducible(tmp_path, tmp_path_factory):
    data_dir = shared_data_dir(tmp_path_factory)
    docs = corpus.documents(data_dir)
    if corpus.digest(docs) != build_tokenizer.CORPUS_SHA256:
        pytest.skip(f"this interpreter's stdlib gives another corpus than Python "
                    f"{build_tokenizer.SHIPPED_PYTHON}, which the shipped model was trained on")
    build_tokenizer.build(tmp_path / "rebuilt.model", data_dir)
    rebuilt = (tmp_path / "rebuilt.model").read_bytes()
    assert hashlib.sha256(rebuilt).digest() == hashlib.sha256(
        build_tokenizer.ASSET.read_bytes()).digest()


def test_train_llama_style_model(tmp_path, stdlib_text):
    trained = Tokenizer.train([stdlib_text], vocab_size=512, out_prefix=tmp_path / "m")
    loaded = Tokenizer.load(tmp_path / "m.model")
    assert loaded.model_proto == trained.model_proto
    assert loaded.vocab_size == 512
    assert (loaded.unk_id, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 2, 3)
    # Read back with SentencePiece itself, not through the wrapper.
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert sp.id_to_piece(1) == "<s>" and sp.id_to_piece(2) == "</s>"
    assert sp.piece_to_id("\n") > 3 and sp.piece_to_id("\t") > 3  # user-defined pieces
    for text in TRICKY:
        assert loaded.decode(loaded.encode(text)) == text


def test_training_is_deterministic(tmp_path, stdlib_text):
    a = Tokenizer.train([stdlib_text], vocab_size=400, out_prefix=tmp_path / "a")
    b = Tokenizer.train([stdlib_text], vocab_size=400, out_prefix=tmp_path / "b")
    assert a.model_proto == b.model_proto


def test_matches_hf_llama_tokenizer(tmp_path, tok):
    """HF's LlamaTokenizer reads the same file: same special ids, same ids on prose."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.model").write_bytes(tok.model_proto)
    hf = transformers.LlamaTokenizer.from_pretrained(str(tmp_path))
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert len(hf) == tok.vocab_size
    sentences = ["Return a new dictionary initialized from an optional positional argument.",
                 "The quick brown fox jumps over the lazy dog 42 times.",
                 "Raise ValueError if the file does not exist.\nOtherwise return None."]
    for s in sentences:
        assert hf.encode(s, add_special_tokens=False) == tok.encode(s)


def test_llama2_model_without_pad_maps_pad_to_unk(tmp_path, stdlib_text):
    spm.SentencePieceTrainer.train(input=str(stdlib_text), model_prefix=str(tmp_path / "l2"),
                                   model_type="bpe", vocab_size=300, pad_id=-1, minloglevel=2)
    t = Tokenizer.load(tmp_path / "l2.model")
    assert (t.unk_id, t.bos_id, t.eos_id) == (0, 1, 2)
    assert t.pad_id == t.unk_id == 0


def test_pickle_round_trip(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.model_proto == tok.model_proto
    assert clone.encode(TRICKY[7]) == tok.encode(TRICKY[7])


def test_load_and_train_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.load(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        Tokenizer.train([tmp_path / "missing.txt"], 300, out_prefix=tmp_path / "x")
    (tmp_path / "t.txt").write_text("some text\n")
    with pytest.raises(ValueError, match="wordpiece"):
        Tokenizer.train([tmp_path / "t.txt"], 300, "wordpiece", out_prefix=tmp_path / "x")


def test_check_vocab(tok):
    check_vocab(tok, 4096)
    check_vocab(tok, 32000)
    with pytest.raises(ValueError, match="4096.*512"):
        check_vocab(tok, 512)


CHAT = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "It serializes an object to a JSON formatted str."},
    {"role": "user", "content": "And\tjson.loads?\n"},
    {"role": "assistant", "content": " It parses a JSON document, ünïcödé included.\n"},
]


def _runs(mask):
    """(start, stop) of the maximal runs of 1s."""
    padded = np.concatenate([[0], mask, [0]])
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2], edges[1::2]))


def test_chat_masks_exactly_the_assistant_turns(tok):
    ids, mask = tok.apply_chat(CHAT)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id and mask[0] == 0
    runs = _runs(np.asarray(mask))
    replies = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert len(runs) == len(replies)
    for (start, stop), reply in zip(runs, replies):
        assert ids[stop - 1] == tok.eos_id
        assert tok.decode(ids[start:stop - 1]) == reply
    # Everything unmasked holds the headers and the system/user contents, in order.
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    pos = 0
    for m in CHAT:
        if m["role"] != "assistant":
            pos = unmasked.index(m["content"], pos) + len(m["content"])
    assert "serializes" not in unmasked
    # The template, spelled out with the tokenizer's own pieces.
    expected = [tok.bos_id]
    for m in CHAT:
        expected += tok.encode(f"<|{m['role']}|>\n") + tok.encode(m["content"]) + [tok.eos_id]
    assert ids == expected


def test_chat_generation_prompt(tok):
    ids, mask = tok.apply_chat(CHAT[:2], add_generation_prompt=True)
    header = tok.encode("<|assistant|>\n")
    assert ids[-len(header):] == header and not any(mask)


@pytest.mark.parametrize("messages, match", [
    ([], "at least one message"),
    ([{"role": "robot", "content": "hi"}], "robot"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}], "system"),
    ([{"role": "user", "content": 3}], "int"),
])
def test_chat_rejects_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat(messages)
