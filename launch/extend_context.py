r"""Extend the context window of a trained Llama-family model: RoPE transform + short long-sample SFT.

  python -m launch.extend_context --source=PATH --output=DIR [--export_hf] \
      --config.method=eabf --config.target_len=512 [--config.window=128 --config.abf_base=19650 ...]

`--source` is any model source of `jaxllm.model.load_model`: a jaxllm model directory (e.g. the
output of this script), a `launch.train` workdir (its newest checkpoint; the run recorded its model
config) or a Hugging Face Llama folder. Its tokenizer, when it carries one, travels to the output.

The fine-tuning data (`config.data`) is either the long-context retrieval task of
`jaxllm.data.tasks.long_context` at the target length (`kind="retrieval"`; its toy vocabulary,
for models trained on it), or pre-tokenised long samples (`kind="jsonl"`: one JSON object per
line with `tokens` and `loss_mask`, e.g. chats with the mask on response tokens; rows shorter
than the longest are right-padded with mask 0).

The output directory is a jaxllm model directory (`jaxllm.model.save_model`: `config.json` with the
full extended `LlamaConfig`, orbax `params/`, the tokenizer). `--export_hf` also writes `DIR/hf`
(`jaxllm.model.hf.save`, as `launch.export_hf` does); for `eabf`/`eabf_all` transformers runs that
folder as plain ABF (identical up to the pretrained window, different beyond it).
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxllm.data.tasks import long_context
from jaxllm.methods import context_extension as ce
from jaxllm.model import hf, load_model, load_tokenizer, rope, save_model
from launch import common

def get_config() -> ml_collections.ConfigDict:
    """Every field of the run, with defaults (the paper's recipe: EABF, 100 samples, 2 epochs at
    batch 32, lr 2e-5)."""
    return ml_collections.ConfigDict({
        "method": "eabf", "target_len": 16384, "window": 0, "abf_base": 500_000.0, "unscaled_layers": (0, 1),
        "beta_fast": 32.0, "beta_slow": 1.0,
        "sft": ml_collections.ConfigDict(vars(ce.SFTConfig())),
        "data": {"kind": "retrieval", "path": "", "n_samples": 100, "n_pairs": 4, "answer_len": 2,
                 "filler": "corpus", "seed": 0},
    })


# ----------------------------------------------------------------------------- data and recipe

def extension_config(config: ml_collections.ConfigDict) -> ce.ContextExtensionConfig:
    return ce.ContextExtensionConfig(
        method=config.method, target_len=config.target_len, window=config.window, abf_base=config.abf_base,
        unscaled_layers=tuple(config.unscaled_layers), beta_fast=config.beta_fast, beta_slow=config.beta_slow,
        sft=ce.SFTConfig(**config.sft.to_dict()))


def sft_data(data: dict, target_len: int, vocab_size: int) -> dict:
    """{"tokens", "loss_mask"} [N, T] from the config's data section."""
    if data["kind"] == "retrieval":
        task = long_context.RetrievalConfig(n_pairs=data["n_pairs"], answer_len=data["answer_len"])
        if task.vocab.size > vocab_size:
            raise ValueError(f"the retrieval task needs vocab_size >= {task.vocab.size}, the model has {vocab_size}")
        if data["filler"] not in long_context.FILLERS:
            raise ValueError(f"data.filler must be one of {long_context.FILLERS}, got {data['filler']!r}")
        stream = long_context.corpus_stream("train", task.vocab) if data["filler"] == "corpus" else None
        s = long_context.retrieval_samples(np.random.default_rng(data["seed"]), data["n_samples"], target_len,
                                           task, stream)
        return {"tokens": s["tokens"], "loss_mask": s["answer_mask"]}
    if data["kind"] == "jsonl":
        if not os.path.exists(data["path"]):
            raise FileNotFoundError(f"data.path {data['path']!r} does not exist")
        with open(data["path"]) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        T = max(len(r["tokens"]) for r in rows)
        tokens, mask = np.zeros((len(rows), T), np.int32), np.zeros((len(rows), T), np.float32)
        for i, r in enumerate(rows):
            if len(r["loss_mask"]) != len(r["tokens"]):
                raise ValueError(f"row {i} of {data['path']} has {len(r['tokens'])} tokens and "
                                 f"{len(r['loss_mask'])} mask entries")
            tokens[i, :len(r["tokens"])], mask[i, :len(r["tokens"])] = r["tokens"], r["loss_mask"]
        return {"tokens": tokens, "loss_mask": mask}
    raise ValueError(f"data.kind must be 'retrieval' or 'jsonl', got {data['kind']!r}")


def run(config: ml_collections.ConfigDict, source: str, output: str, export_hf: bool = False):
    """Load, extend, save (and export). Returns (extended config, params, per-step SFT losses)."""
    model_cfg, params = load_model(source)
    try:
        tokenizer = load_tokenizer(source)
    except FileNotFoundError:
        tokenizer = None  # e.g. a model of the retrieval task's toy vocabulary
    cfg = extension_config(config)
    new_cfg = ce.extended_config(model_cfg, cfg)
    data = sft_data(config.data.to_dict(), cfg.target_len, model_cfg.vocab_size)
    params, losses = ce.sft(params, new_cfg, data, cfg.sft, os.path.join(output, "sft"))
    save_model(output, new_cfg, params, tokenizer=tokenizer)
    if export_hf:
        hf.save(os.path.join(output, "hf"), new_cfg, params, tokenizer=tokenizer)
    return new_cfg, params, losses


def define_flags():
    """The command-line flags (defined only when run as a program, so importing this module for
    `run` leaves the global flag registry alone)."""
    config_flags.DEFINE_config_dict("config", get_config(), lock_config=True)
    flags.DEFINE_string("source", None, "Model to extend: jaxllm model dir, HF folder or fit workdir.")
    flags.DEFINE_string("output", None, "Directory for the extended model.")
    flags.DEFINE_bool("export_hf", False, "Also write an HF folder to OUTPUT/hf.")
    flags.mark_flags_as_required(["source", "output"])


def main(argv):
    common.start(argv)
    FLAGS = flags.FLAGS
    new_cfg, _, losses = run(FLAGS.config, FLAGS.source, FLAGS.output, FLAGS.export_hf)
    print(f"extended to {new_cfg.max_len} tokens with {FLAGS.config.method}: {rope.to_hf(new_cfg.rope)}")
    print(f"SFT losses: {[round(l, 4) for l in losses]}")
    print(f"saved to {FLAGS.output}" + (f" (HF folder {FLAGS.output}/hf)" if FLAGS.export_hf else ""))


if __name__ == "__main__":
    define_flags()
    common.run(main)
