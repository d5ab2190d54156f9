"""A `tokenizer.json` tokenizer (Hugging Face `tokenizers` library, as Llama 3 and Mistral ship
theirs) behind the interface of `jaxllm.data.tokenizer.Tokenizer`.

Special tokens come from the folder's `tokenizer_config.json` (`bos_token`, `eos_token`,
`pad_token`, `unk_token`), else from `config.json` (`bos_token_id`, `eos_token_id`; the first of
a list), else from the usual piece names ("<s>", "</s>", "<|begin_of_text|>", "<|end_of_text|>").
`encode` never applies the tokenizer's own post-processor: bos/eos are added only when asked, as
with the SentencePiece tokenizer, so both feed the same chat template.
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Sequence

import tokenizers

from jaxllm.data.tokenizer import TOKENIZERS_FILE, Tokenizer

CONFIG_FILE = "tokenizer_config.json"
_FALLBACK = {"bos": ("<s>", "<|begin_of_text|>"), "eos": ("</s>", "<|end_of_text|>"),
             "unk": ("<unk>",), "pad": ("<pad>", "<|finetune_right_pad_id|>")}


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class HFTokenizer:
    """A `tokenizers.Tokenizer` with Llama-style special ids and the project's chat template."""

    def __init__(self, json_text: str, special: dict[str, int | None]):
        self._tok = tokenizers.Tokenizer.from_str(json_text)
        self._json = json_text
        self._special = dict(special)
        vocab = self.vocab_size
        for name, token_id in special.items():
            if token_id is not None and not 0 <= token_id < vocab:
                raise ValueError(f"{name} id {token_id} is outside the tokenizer's vocabulary of {vocab}")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> HFTokenizer:
        """Reads `directory/tokenizer.json` and the special tokens (see the module docstring)."""
        path = pathlib.Path(directory)
        if not (path / TOKENIZERS_FILE).is_file():
            raise FileNotFoundError(f"no {TOKENIZERS_FILE} in {path}")
        json_text = (path / TOKENIZERS_FILE).read_text()
        tok = tokenizers.Tokenizer.from_str(json_text)
        names = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
        model_config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        special = {}
        for kind in ("bos", "eos", "unk", "pad"):
            token = _content(names.get(f"{kind}_token"))
            token_id = tok.token_to_id(token) if token else None
            if token_id is None:
                config_id = model_config.get(f"{kind}_token_id")
                token_id = config_id[0] if isinstance(config_id, list) and config_id else config_id
            if token_id is None:
                found = [tok.token_to_id(p) for p in _FALLBACK[kind] if tok.token_to_id(p) is not None]
                token_id = found[0] if found else None
            special[kind] = token_id
        return cls(json_text, special)

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` and the special tokens' `tokenizer_config.json`."""
        path = pathlib.Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / TOKENIZERS_FILE).write_text(self._json)
        names = {f"{kind}_token": self._tok.id_to_token(i) for kind, i in self._special.items() if i is not None}
        (path / CONFIG_FILE).write_text(json.dumps(names, indent=2))

    def __getstate__(self):
        return self._json, self._special

    def __setstate__(self, state):
        self.__init__(*state)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _id(self, kind: str) -> int:
        token_id = self._special[kind]
        if token_id is None:
            raise ValueError(f"this tokenizer defines no {kind} token")
        return token_id

    @property
    def bos_id(self) -> int:
        return self._id("bos")

    @property
    def eos_id(self) -> int:
        return self._id("eos")

    @property
    def unk_id(self) -> int:
        return self._id("unk")

    @property
    def pad_id(self) -> int:
        """The pad id, else unk, else eos: a valid embedding row that every mask excludes."""
        for kind in ("pad", "unk", "eos"):
            if self._special[kind] is not None:
                return self._special[kind]
        raise ValueError("this tokenizer defines no pad, unk or eos token")

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally framed by bos/eos."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [self.encode(t, bos, eos) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens decode to nothing."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    apply_chat = Tokenizer.apply_chat  # the template only uses encode, bos_id and eos_id
