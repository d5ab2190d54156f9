r"""Extend the context window of a trained Llama-family model: RoPE transform + short long-sample SFT.

  python -m launch.extend_context --source=PATH --output=DIR [--export_hf] \
      --config.method=eabf --config.target_len=512 [--config.window=128 --config.abf_base=19650 ...]

`--source` is any of
- a jaxllm model directory (`config.json` + orbax `params/`), e.g. the output of this script;
- a Hugging Face Llama folder (`config.json` + safetensors), read by `jaxllm.model.hf.load`;
- a `jaxllm.train.loop.fit` workdir (`checkpoints/`): its newest checkpoint's params, verified
  against the checkpoint's fingerprint; the model is `--config.model.preset` plus overrides (and
  `--config.model.rope_theta` for a non-default RoPE base), as in the training config.

The fine-tuning data (`config.data`) is either the long-context retrieval task of
`jaxllm.data.tasks.long_context` at the target length (`kind="retrieval"`; its toy vocabulary,
for models trained on it), or pre-tokenised long samples (`kind="jsonl"`: one JSON object per
line with `tokens` and `loss_mask`, e.g. chats with the mask on response tokens; rows shorter
than the longest are right-padded with mask 0).

The output directory is a jaxllm model directory: `params/` (orbax) and `config.json`, which is
the HF config of the extended model (`jaxllm.model.hf.config_to_hf`: `rope_theta` and
`rope_scaling`/`rope_parameters` for the HF-expressible methods; entropy-aware ABF's logit scale
under the `jaxllm_logit_scale` key, which transformers ignores) plus a `jaxllm` entry with the
fields HF has no name for (max_len, compute dtype, remat, scan_layers). `--export_hf` also writes
`DIR/hf` with `jaxllm.model.hf.save`; for `eabf`/`eabf_all` transformers runs that folder as
plain ABF (identical up to the pretrained window, different beyond it).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from ml_collections import config_flags

from jaxllm.data.tasks import long_context
from jaxllm.methods import context_extension as ce
from jaxllm.model import hf, llama, presets, rope
from jaxllm.train import checkpoint
from jaxllm.train import config as train_config
from launch import common

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
JAXLLM_KEY = "jaxllm"
JAXLLM_FIELDS = ("max_len", "dtype", "param_dtype", "remat", "scan_layers")


def get_config() -> ml_collections.ConfigDict:
    """Every field of the run, with defaults (the paper's recipe: EABF, 100 samples, 2 epochs at
    batch 32, lr 2e-5)."""
    model = train_config.config_dict(model={"preset": ""})["model"]
    model["rope_theta"] = 0.0
    return ml_collections.ConfigDict({
        "method": "eabf", "target_len": 16384, "window": 0, "abf_base": 500_000.0, "unscaled_layers": (0, 1),
        "beta_fast": 32.0, "beta_slow": 1.0,
        "sft": ml_collections.ConfigDict(vars(ce.SFTConfig())),
        "data": {"kind": "retrieval", "path": "", "n_samples": 100, "n_pairs": 4, "answer_len": 2,
                 "filler": "corpus", "seed": 0},
        "model": model,
    })


# ----------------------------------------------------------------------------- model directories

def save_model(path: str | os.PathLike, model_cfg: llama.LlamaConfig, params) -> None:
    """Write a jaxllm model directory: orbax `params/` and `config.json` (written last, atomically,
    so a directory with a config always has complete params)."""
    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / PARAMS_DIR, params, force=True)
        ckptr.wait_until_finished()
    config = hf.config_to_hf(model_cfg)
    config[JAXLLM_KEY] = {name: getattr(model_cfg, name) for name in JAXLLM_FIELDS}
    tmp = path / f"{CONFIG_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, path / CONFIG_FILE)


def model_config_from_json(config: dict) -> llama.LlamaConfig:
    """The LlamaConfig a model directory's config.json describes."""
    return hf.config_from_hf(config, **config.get(JAXLLM_KEY, {}))


def _restore_params(params_dir: pathlib.Path, model_cfg: llama.LlamaConfig):
    abstract = jax.eval_shape(lambda: llama.init_params(model_cfg, jax.random.key(0)))
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(params_dir, abstract)


def _fit_checkpoint_params(workdir: pathlib.Path, model_cfg: llama.LlamaConfig):
    """Params of the newest checkpoint of a `fit` workdir, checked against its saved fingerprint."""
    ckpt_dir = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    if not steps:
        raise FileNotFoundError(f"no checkpoint steps in {ckpt_dir}")
    step_dir = ckpt_dir / str(steps[-1])
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    item = {"params": jax.eval_shape(lambda: llama.init_params(model_cfg, jax.random.key(0)))}
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    params = jax.tree.map(jax.numpy.asarray, restored["params"])
    expected = {k[len(".params"):]: v for k, v in meta["fingerprint"].items() if k.startswith(".params")}
    if checkpoint.fingerprint(params) != expected:
        raise ValueError(f"params restored from {step_dir} do not match the checkpoint's fingerprint")
    return params


def model_from_fields(model: dict) -> llama.LlamaConfig:
    """LlamaConfig from a config's model section: preset, non-None overrides, rope_theta (0: keep)."""
    fields = {k: v for k, v in model.items() if v is not None and k not in ("preset", "rope_theta")}
    if not model.get("preset"):
        raise ValueError("a fit workdir needs config.model.preset (and the overrides it was trained with)")
    cfg = presets.get(model["preset"], **fields)
    if model.get("rope_theta"):
        cfg = dataclasses.replace(cfg, rope=rope.default(cfg.head_dim, float(model["rope_theta"])))
    return cfg


def load_model(path: str | os.PathLike, model: dict | None = None):
    """(LlamaConfig, params) of a jaxllm model directory, an HF folder or a fit workdir (`model`:
    the config's model section, needed only for a fit workdir)."""
    path = pathlib.Path(path)
    config_path = path / CONFIG_FILE
    if (path / PARAMS_DIR).is_dir() and config_path.exists():
        model_cfg = model_config_from_json(json.loads(config_path.read_text()))
        return model_cfg, _restore_params((path / PARAMS_DIR).absolute(), model_cfg)
    if config_path.exists():
        return hf.load(str(path))
    if (path / "checkpoints").is_dir():
        model_cfg = model_from_fields(dict(model or {}))
        return model_cfg, _fit_checkpoint_params(path.absolute(), model_cfg)
    raise FileNotFoundError(f"{path} is neither a jaxllm model dir (config.json + {PARAMS_DIR}/), an HF folder "
                            f"(config.json + safetensors) nor a fit workdir (checkpoints/)")


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
    model_cfg, params = load_model(source, config.model.to_dict())
    cfg = extension_config(config)
    new_cfg = ce.extended_config(model_cfg, cfg)
    data = sft_data(config.data.to_dict(), cfg.target_len, model_cfg.vocab_size)
    params, losses = ce.sft(params, new_cfg, data, cfg.sft)
    save_model(output, new_cfg, params)
    if export_hf:
        hf.save(os.path.join(output, "hf"), new_cfg, params)
    return new_cfg, params, losses


def define_flags():
    """The command-line flags (defined only when run as a program, so importing this module for
    `save_model`/`load_model` leaves the global flag registry alone)."""
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
    app.run(main)
