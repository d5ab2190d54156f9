"""Model directories: a trained or transformed model as one folder that any entry point can load.

A jaxllm model directory holds orbax `params/` and `config.json`, the model's HF config
(`jaxllm.model.hf.config_to_hf`: RoPE spec included; a logit scale HF cannot express under
`jaxllm_logit_scale`) plus a `jaxllm` entry for the fields HF has no name for (max_len, dtypes,
remat, scan_layers). `load_model` also reads an HF Llama folder and the newest checkpoint of a
`fit` workdir, so serving and context extension accept all three.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp

from jaxllm.model import hf, llama, presets, rope
from jaxllm.train import checkpoint

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
JAXLLM_KEY = "jaxllm"
JAXLLM_FIELDS = ("max_len", "dtype", "param_dtype", "remat", "scan_layers")



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
        abstract = jax.eval_shape(lambda: llama.init_params(model_cfg, jax.random.key(0)))
        return model_cfg, checkpoint.restore_params(path / "checkpoints", abstract)
    raise FileNotFoundError(f"{path} is neither a jaxllm model dir (config.json + {PARAMS_DIR}/), an HF folder "
                            f"(config.json + safetensors) nor a fit workdir (checkpoints/)")
