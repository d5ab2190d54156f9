"""The one bridge between frozen dataclass configs and ml_collections config files.

Config files build a `ConfigDict` with `config_dict(Cls, model=..., **sections)`, which lists
*every* field of `Cls` with its default (nested dataclass sections included), so absl's
`--config.section.field=...` overrides work for any field while the locked dict rejects misspelt
ones; a field whose default is None becomes a typed placeholder. `from_mapping(Cls, d)` turns the
nested mapping (`ConfigDict.to_dict()`) back into frozen dataclasses: nested sections become their
dataclass, lists become tuples, a `LlamaConfig` field is a preset of `jaxllm.model.presets` plus
the non-None overrides (`model_from_dict`), and unknown fields raise ValueError naming them.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict as mlc

from jaxllm.model import presets
from jaxllm.model.llama import LlamaConfig

MODEL_OVERRIDES = {f.name: f.type for f in dataclasses.fields(LlamaConfig) if f.name != "rope"}


def _unwrap_optional(hint):
    """X for `X | None` / `Optional[X]`, else the hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def model_from_dict(model: Mapping[str, Any]) -> LlamaConfig:
    """A preset of `jaxllm.model.presets` with the non-None overrides of a config's `model` section."""
    model = dict(model)
    preset = model.pop("preset", None)
    if not preset:
        raise ValueError(f"model.preset must name a preset of jaxllm.model.presets, got {preset!r}")
    unknown = set(model) - set(MODEL_OVERRIDES)
    if unknown:
        raise ValueError(f"unknown model fields {sorted(unknown)}; known: {sorted(MODEL_OVERRIDES)}")
    return presets.get(preset, **{k: v for k, v in model.items() if v is not None})


def model_section(model: Mapping[str, Any]) -> dict:
    """The complete `model` section: "preset" plus every override field (given, or a typed
    placeholder: None keeps the preset's value)."""
    model = dict(model)
    if "preset" not in model:
        raise ValueError("model needs a 'preset' of jaxllm.model.presets")
    unknown = set(model) - set(MODEL_OVERRIDES) - {"preset"}
    if unknown:
        raise ValueError(f"unknown model fields {sorted(unknown)}; known: {sorted(MODEL_OVERRIDES)}")
    hints = typing.get_type_hints(LlamaConfig)
    return {"preset": model["preset"],
            **{name: model[name] if name in model else mlc.placeholder(hints[name]) for name in MODEL_OVERRIDES}}


def _check_known(cls, d: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown config fields {sorted(where + k for k in unknown)}; known: {sorted(known)}")


def from_mapping(cls, d: Mapping[str, Any], where: str = ""):
    """`cls` (a frozen dataclass) from a nested mapping; see the module docstring."""
    _check_known(cls, d, where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        hint = _unwrap_optional(hints[name])
        if hint is LlamaConfig and isinstance(value, Mapping):
            value = model_from_dict(value)
        elif dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = from_mapping(hint, value, f"{where}{name}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _defaults(cls, instance=None) -> dict:
    """Every field of `cls` except `model`: values of `instance` (or the class defaults), nested
    dataclasses as dicts, None defaults as typed placeholders."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "model":
            continue
        if f.default is None:
            out[f.name] = mlc.placeholder(_unwrap_optional(hints[f.name]))
            continue
        value = getattr(instance, f.name) if instance is not None else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if value is dataclasses.MISSING:
            raise ValueError(f"{cls.__name__}.{f.name} has no default; pass it")
        out[f.name] = _defaults(type(value), value) if dataclasses.is_dataclass(value) else value
    return out


def config_dict(cls, *, model: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
                **fields) -> ml_collections.ConfigDict:
    """A complete ConfigDict for `from_mapping(cls, ...)`: the `model` section (`model_section`),
    then every other field of `cls` with its default, overridden by `fields` (a nested section by
    a partial mapping). `extra` holds sections that belong to the caller (passed through as given)."""
    base = _defaults(cls)
    _check_known(cls, {k: v for k, v in fields.items()}, "")
    hints = typing.get_type_hints(cls)
    for name, value in fields.items():
        section = _unwrap_optional(hints[name])
        if value is None and dataclasses.is_dataclass(section):
            continue  # the section's defaults
        if dataclasses.is_dataclass(section) and isinstance(value, Mapping):
            merged = {k: v for k, v in {**base[name], **value}.items()
                      if not isinstance(v, mlc.FieldReference) or v.get() is not None}
            instance = from_mapping(section, merged, f"{name}.")
            base[name] = {**_defaults(section, instance), **{k: v for k, v in value.items()}}
        else:
            base[name] = value
    return ml_collections.ConfigDict({"model": model_section(model), **base, **dict(extra or {})})
