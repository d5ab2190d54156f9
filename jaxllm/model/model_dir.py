"""The one model format: a folder any entry point loads with `load_model(source)`.

A jaxllm model directory holds
- `config.json`: the model's HF config (`jaxllm.model.hf.config_to_hf`, so tools that read HF
  configs see the architecture) plus, under `"jaxllm"`, the full `LlamaConfig` with its `RopeSpec`
  field by field (`config_to_dict`), which is what jaxllm reads back: every field round-trips
  exactly, including RoPE transforms HF has no name for (entropy-aware ABF's logit scale);
- `params/`: the parameters as an orbax checkpoint;
- the tokenizer: `tokenizer.model` (SentencePiece) or `tokenizer.json` (`tokenizers` library).

`load_model(source) -> (LlamaConfig, params)` accepts three kinds of source:
- a model directory (written by `save_model`);
- a `launch.train` workdir (or its `checkpoints/` folder): `config.json` and the tokenizer recorded
  by `record_model` at the start of the run, params of the newest verified checkpoint;
- an HF Llama/Mistral folder (`config.json` + safetensors, `jaxllm.model.hf.load`).
`load_tokenizer(source)` gives the tokenizer any of them carries.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import typing
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.model import hf, llama, rope
from jaxllm.train import checkpoint

PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
CONFIG_FILE = "config.json"
JAXLLM_KEY = "jaxllm"
_NESTED = {"rope": rope.RopeSpec, "logit_scale": rope.LogitScale, "dynamic": rope.DynamicNTK}


# ----------------------------------------------------------------------------- config <-> JSON

def config_to_dict(cfg: llama.LlamaConfig) -> dict:
    """Every field of `cfg` (RopeSpec included) as JSON-compatible values."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _from_dict(cls, d: dict):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    if set(d) - known:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(set(d) - known)}")
    fields = {}
    for name, value in d.items():
        if name in _NESTED and value is not None:
            value = _from_dict(_NESTED[name], value)
        elif "tuple" in str(hints[name]):
            value = _tuples(value)
        fields[name] = value
    return cls(**fields)


def config_from_dict(d: dict) -> llama.LlamaConfig:
    """Inverse of `config_to_dict`: `config_from_dict(config_to_dict(cfg)) == cfg`."""
    return _from_dict(llama.LlamaConfig, d)


def config_json(cfg: llama.LlamaConfig) -> dict:
    """The `config.json` of a model directory: HF config + the exact jaxllm config."""
    return {**hf.config_to_hf(cfg), JAXLLM_KEY: {"config": config_to_dict(cfg)}}


def _read_config(config_path: pathlib.Path) -> dict:
    try:
        return json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read model config {config_path}: {err}") from err


def _jaxllm_config(config: dict, config_path: pathlib.Path) -> llama.LlamaConfig:
    try:
        return config_from_dict(config[JAXLLM_KEY]["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{config_path} has no valid '{JAXLLM_KEY}.config' entry: {err!r}") from err


# ----------------------------------------------------------------------------- write

def _write_config(path: pathlib.Path, cfg: llama.LlamaConfig) -> None:
    tmp = path / f"{CONFIG_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(config_json(cfg), indent=2))
    os.replace(tmp, path / CONFIG_FILE)


def record_model(workdir: str | os.PathLike, cfg: llama.LlamaConfig, tokenizer=None) -> None:
    """Record the model of a training run in its workdir (config.json and tokenizer), so
    `load_model(workdir)` restores its newest checkpoint without being told the config.
    ValueError when the workdir already records a different model (a resumed run must not
    change it)."""
    path = pathlib.Path(workdir).absolute()
    path.mkdir(parents=True, exist_ok=True)
    if (path / CONFIG_FILE).is_file():
        recorded = _jaxllm_config(_read_config(path / CONFIG_FILE), path / CONFIG_FILE)
        if recorded != cfg:
            raise ValueError(f"{path} records a different model in {CONFIG_FILE} than this run's: {recorded} "
                             f"vs {cfg}; use a new workdir")
    if tokenizer is not None:
        tokenizer.save(path)
    _write_config(path, cfg)


def save_model(path: str | os.PathLike, cfg: llama.LlamaConfig, params, tokenizer=None) -> None:
    """Write a model directory: orbax `params/`, the tokenizer (any object with `save(directory)`,
    e.g. `jaxllm.data.tokenizer.Tokenizer`) and `config.json`, written last and atomically, so a
    directory with a config always has complete params."""
    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / PARAMS_DIR, params, force=True)
        ckptr.wait_until_finished()
    record_model(path, cfg, tokenizer)


# ----------------------------------------------------------------------------- read

def _abstract_params(cfg: llama.LlamaConfig):
    return jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))


def _restore_params(params_dir: pathlib.Path, cfg: llama.LlamaConfig):
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(params_dir, _abstract_params(cfg))
    except Exception as err:  # orbax raises many types for a damaged or mismatched checkpoint
        raise ValueError(f"cannot restore the params in {params_dir} for the model of its config.json "
                         f"(corrupt or written for another model): {type(err).__name__}: {err}") from err


def _folder(source: str | os.PathLike) -> pathlib.Path:
    """The folder a source names (a workdir's `checkpoints/` stands for the workdir)."""
    path = pathlib.Path(source).absolute()
    if not path.exists():
        raise FileNotFoundError(f"model source {source} does not exist")
    if path.name == CHECKPOINTS_DIR and (path.parent / CONFIG_FILE).exists():
        return path.parent
    return path


def load_model(source: str | os.PathLike) -> tuple[llama.LlamaConfig, Any]:
    """(LlamaConfig, params) of a model directory, a `launch.train` workdir or an HF folder.

    FileNotFoundError names a source that does not exist or is none of the three, or a jaxllm
    config without params; ValueError names a config or params that cannot be read, or a config
    asking for a value head (`LlamaConfig.value_head`) that the params lack. A value head is
    saved and restored with the rest of the params."""
    path = _folder(source)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        hint = (" (a workdir written before runs recorded their model config)"
                if (path / CHECKPOINTS_DIR).is_dir() else "")
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}{hint}: not a jaxllm model directory "
                                f"(config.json + {PARAMS_DIR}/), a launch.train workdir (config.json + "
                                f"{CHECKPOINTS_DIR}/) nor an HF folder (config.json + safetensors)")
    config = _read_config(config_path)
    if JAXLLM_KEY not in config:
        return hf.load(str(path))
    cfg = _jaxllm_config(config, config_path)
    if not ((path / PARAMS_DIR).is_dir() or (path / CHECKPOINTS_DIR).is_dir()):
        raise FileNotFoundError(f"{config_path} describes a jaxllm model but {path} has neither {PARAMS_DIR}/ "
                                f"nor {CHECKPOINTS_DIR}/ with its params")

    def restore(c: llama.LlamaConfig):
        if (path / PARAMS_DIR).is_dir():
            return _restore_params(path / PARAMS_DIR, c)
        return checkpoint.restore_params(path / CHECKPOINTS_DIR, _abstract_params(c))

    try:
        return cfg, restore(cfg)
    except Exception as err:  # orbax raises many types for params that do not match the config
        if not cfg.value_head:
            raise
        try:
            restore(dataclasses.replace(cfg, value_head=False))
        except Exception:
            raise err from None
        raise ValueError(f"{config_path} asks for a value head (value_head: true) but the params in {path} have "
                         "none (saved without one): load the model without it and add a freshly initialised "
                         "head with jaxllm.model.value_head.add_value_head(cfg, params, rng)") from err


def load_config(source: str | os.PathLike) -> llama.LlamaConfig:
    """The LlamaConfig of a source, without reading its params."""
    path = _folder(source)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}")
    config = _read_config(config_path)
    return _jaxllm_config(config, config_path) if JAXLLM_KEY in config else hf.config_from_hf(config)


def load_tokenizer(source: str | os.PathLike, override: str | os.PathLike = ""):
    """The tokenizer a model directory, workdir or HF folder carries (`tokenizer.model` or
    `tokenizer.json`; see `jaxllm.data.tokenizer.load`), or `override`: "default" for the shipped
    one, a folder holding a tokenizer or a `tokenizer.model` file. FileNotFoundError names a source
    that carries none."""
    if str(override) == "default":
        return tokenizer_lib.Tokenizer.default()
    if override:
        path = pathlib.Path(override)
        return tokenizer_lib.Tokenizer.load(path) if path.is_file() else tokenizer_lib.load(path)
    return tokenizer_lib.load(_folder(source))
