"""SentencePiece tokenizer: load any Llama-style `tokenizer.model`, train new ones, chat template.

`load(directory)` reads the tokenizer a model folder carries: `tokenizer.model` as this class,
or `tokenizer.json` (Llama 3, Mistral) as `jaxllm.data.hf_tokenizer.HFTokenizer`, which has the
same interface (special ids, encode/decode, `apply_chat`, `save`).

Special ids come from the model file. Models trained here follow Llama-2's layout (unk=0 "<unk>",
bos=1 "<s>", eos=2 "</s>") and add pad=3 "<pad>". Llama-2's own model has no pad piece (pad_id -1);
for such models `pad_id` is `unk_id`, a valid embedding row that every mask excludes.

Training settings make encode/decode an exact round trip of arbitrary text: identity
normalisation (no NFKC), no whitespace collapsing, byte fallback for characters outside the
vocabulary, and newline and tab as user-defined pieces (they never merge into neighbours). As in
Llama-2, a leading "▁" (dummy prefix) is added to each encoded text and removed again by decode,
and digits are split into single pieces. Training runs on one thread: SentencePiece's BPE result
depends on the thread count, and one thread makes it reproducible.
"""
from __future__ import annotations

import importlib.resources
import io
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import sentencepiece as spm

ROLES = ("system", "user", "assistant")
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZERS_FILE = "tokenizer.json"

_TRAIN_OPTIONS = dict(
    unk_id=0, bos_id=1, eos_id=2, pad_id=3,
    unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
    byte_fallback=True, user_defined_symbols=["\n", "\t"], split_digits=True,
    allow_whitespace_only_pieces=True, character_coverage=0.99995,
    max_sentence_length=1 << 16, input_sentence_size=0, num_threads=1, minloglevel=2,
)


class Tokenizer:
    """A SentencePiece model with Llama-style special ids and a chat template."""

    def __init__(self, model_proto: bytes):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a `tokenizer.model` file (SentencePiece ModelProto)."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        return cls(path.read_bytes())

    @classmethod
    def default(cls) -> Tokenizer:
        """The tokenizer shipped in `jaxllm/assets/tokenizer.model` (BPE, 4096 pieces, trained
        on the embedded corpus by `jaxllm.data.build_tokenizer`)."""
        resource = importlib.resources.files("jaxllm") / "assets" / "tokenizer.model"
        return cls(resource.read_bytes())

    @classmethod
    def train(cls, files: Sequence[str | os.PathLike], vocab_size: int, model_type: str = "bpe",
              *, out_prefix: str | os.PathLike) -> Tokenizer:
        """Trains a Llama-style model on the lines of `files`; writes `{out_prefix}.model`.

        Every non-empty line is one training sentence (lines over 64 KiB are skipped by
        SentencePiece). `model_type` is "bpe" or "unigram".
        """
        paths = [pathlib.Path(f) for f in files]
        if not paths:
            raise ValueError("Tokenizer.train needs at least one file, got none")
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"training text not found: {p}")
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=_lines(paths), model_writer=model,
                                       model_type=model_type, vocab_size=vocab_size,
                                       **_TRAIN_OPTIONS)
        out = pathlib.Path(f"{out_prefix}.model")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(model.getvalue())
        return cls(model.getvalue())

    def save(self, directory: str | os.PathLike) -> None:
        """Write `directory/tokenizer.model`."""
        path = pathlib.Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / SENTENCEPIECE_FILE).write_bytes(self.model_proto)

    # Pickled as the model bytes, so tokenizers travel to data-loader worker processes.
    def __getstate__(self) -> bytes:
        return self.model_proto

    def __setstate__(self, state: bytes):
        self.__init__(state)

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (the content of `tokenizer.model`)."""
        return self._sp.serialized_model_proto()

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The model's pad id, or `unk_id` when the model defines none (Llama-2)."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.unk_id

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally framed by bos/eos."""
        return self._sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False,
                     eos: bool = False) -> list[list[int]]:
        return self._sp.encode(list(texts), add_bos=bos, add_eos=eos)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special (control) ids such as bos/eos/pad decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def apply_chat(self, messages: Sequence[Mapping[str, str]],
                   add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a loss mask over the assistant's tokens.

        Template (on ids; each text part is encoded on its own, so part boundaries never merge):

            <s>
            for each message:  encode("<|{role}|>\\n") + encode(content) + </s>

        `role` is "system" (first message only), "user" or "assistant". The mask is 1 on the
        content tokens of assistant turns and on the </s> that ends them, 0 elsewhere (bos,
        headers, system and user turns). With `add_generation_prompt`, the header
        `encode("<|assistant|>\\n")` is appended (mask 0) so a model continues as the
        assistant; generation stops at </s>.
        """
        if not messages:
            raise ValueError("apply_chat needs at least one message, got none")
        ids, mask = [self.bos_id], [0]
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES or (role == "system" and i > 0):
                raise ValueError(f"message {i}: role must be one of {ROLES} (system only first), "
                                 f"got {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a str, got {type(content).__name__}")
            header = self.encode(f"<|{role}|>\n")
            body = self.encode(content) + [self.eos_id]
            scored = int(role == "assistant")
            ids += header + body
            mask += [0] * len(header) + [scored] * len(body)
        if add_generation_prompt:
            header = self.encode("<|assistant|>\n")
            ids += header
            mask += [0] * len(header)
        return ids, mask


def load(directory: str | os.PathLike):
    """The tokenizer in `directory`: `tokenizer.model` (SentencePiece, preferred when both are
    present, as in Llama-2 folders) or `tokenizer.json` (`tokenizers` library). FileNotFoundError
    names a folder with neither."""
    path = pathlib.Path(directory)
    if (path / SENTENCEPIECE_FILE).is_file():
        return Tokenizer.load(path / SENTENCEPIECE_FILE)
    if (path / TOKENIZERS_FILE).is_file():
        from jaxllm.data.hf_tokenizer import HFTokenizer
        return HFTokenizer.load(path)
    raise FileNotFoundError(f"no tokenizer in {path}: expected {SENTENCEPIECE_FILE} (SentencePiece) or "
                            f"{TOKENIZERS_FILE} (tokenizers)")


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises ValueError if the tokenizer can emit ids the model has no embedding row for."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} is larger than the model's "
                         f"vocab_size {model_vocab_size}")


def _lines(paths: Sequence[pathlib.Path]) -> Iterator[str]:
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line:
                    yield line

