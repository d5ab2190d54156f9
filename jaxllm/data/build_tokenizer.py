"""Rebuilds the shipped tokenizer, `jaxllm/assets/tokenizer.model`.

    python -m jaxllm.data.build_tokenizer [--out PATH] [--data_dir DIR]

BPE with 4096 pieces, trained by `Tokenizer.train` on the whole embedded corpus
(`jaxllm.data.corpus.documents()`, documents joined by newlines). Training is deterministic, so
the file is reproduced byte for byte wherever the corpus is the same: the corpus depends on the
interpreter's standard library, and CORPUS_SHA256 records the digest of the one the shipped file
was trained on.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile

from jaxllm.data import corpus
from jaxllm.data.tokenizer import Tokenizer

VOCAB_SIZE = 4096
MODEL_TYPE = "bpe"
SHIPPED_PYTHON = "3.11.7"
CORPUS_SHA256 = "f81887511c2d4be7ecc08f4221f5b1e6551c183dfcafc90dec57c3289315c790"
ASSET = pathlib.Path(__file__).resolve().parents[1] / "assets" / "tokenizer.model"


def build(out: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Trains the default tokenizer on the embedded corpus and writes it to `out`."""
    out = pathlib.Path(out)
    if out.suffix != ".model":
        raise ValueError(f"output path must end in .model, got {out}")
    with tempfile.TemporaryDirectory() as tmp:
        text = pathlib.Path(tmp, "corpus.txt")
        text.write_text("\n".join(corpus.documents(data_dir)), encoding="utf-8")
        return Tokenizer.train([text], VOCAB_SIZE, MODEL_TYPE, out_prefix=out.with_suffix(""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ASSET))
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)
    tok = build(args.out, args.data_dir)
    print(f"wrote {args.out}: {tok.vocab_size} pieces, corpus sha256 "
          f"{corpus.digest(corpus.documents(args.data_dir))}")


if __name__ == "__main__":
    main()
