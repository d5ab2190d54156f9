"""Import HF BERT checkpoints (`config.json` + `model.safetensors`) as `encoder.BertEncoder` params.

No torch: tensors are read with `safetensors` directly. Works for `BertModel` folders (names like
`encoder.layer.0.attention.self.query.weight`) and task-head checkpoints (`bert.`-prefixed names);
pooler and task heads are ignored since the encoder returns last hidden states. torch `Linear`
weights are [out, in]; they become kernels [in, out] with the head axis split out for attention.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxllm.model.encoder import BertConfig

SUPPORTED_MODEL_TYPES = ("bert",)
SUPPORTED_ACTIVATIONS = ("gelu",)
_IGNORED_BUFFERS = ("embeddings.position_ids",)


def config_from_hf(hf: Mapping, *, dtype: str = "float32", param_dtype: str = "float32") -> BertConfig:
    """`BertConfig` of an HF BERT `config.json` dict; ValueError for architectures the encoder does
    not implement (another model type, a non-erf activation, relative positions, a decoder)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported architecture: model_type={model_type!r} "
                         f"(architectures={hf.get('architectures')}); supported: {SUPPORTED_MODEL_TYPES}")
    act = hf.get("hidden_act", "gelu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act={act!r}; supported: {SUPPORTED_ACTIVATIONS} (exact erf GELU)")
    positions = hf.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise ValueError(f"unsupported position_embedding_type={positions!r}; only 'absolute' is implemented")
    if hf.get("is_decoder", False):
        raise ValueError("unsupported BERT config with is_decoder=True; the encoder is bidirectional")
    return BertConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
        max_len=hf["max_position_embeddings"], n_token_types=hf.get("type_vocab_size", 2),
        norm_eps=hf.get("layer_norm_eps", 1e-12), pad_id=hf.get("pad_token_id") or 0,
        dtype=dtype, param_dtype=param_dtype)


def _linear(shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """torch Linear weight [out, in] → kernel [in, out] reshaped to `shape`."""
    return lambda w: w.T.reshape(shape)


def _reshape(shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda w: w.reshape(shape)


def _tensor_map(cfg: BertConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...], Callable]]:
    """(HF name, param path, HF shape, HF → param conversion) for every tensor the encoder needs."""
    D, H, K, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    out = [
        ("embeddings.word_embeddings.weight", ("embed", "token"), (cfg.vocab_size, D), _reshape((cfg.vocab_size, D))),
        ("embeddings.position_embeddings.weight", ("embed", "position"), (cfg.max_len, D), _reshape((cfg.max_len, D))),
        ("embeddings.token_type_embeddings.weight", ("embed", "token_type"), (cfg.n_token_types, D),
         _reshape((cfg.n_token_types, D))),
        ("embeddings.LayerNorm.weight", ("embed", "norm", "scale"), (D,), _reshape((D,))),
        ("embeddings.LayerNorm.bias", ("embed", "norm", "bias"), (D,), _reshape((D,))),
    ]
    for i in range(cfg.n_layers):
        hf, ours = f"encoder.layer.{i}.", f"layers_{i}"
        for proj in ("query", "key", "value"):
            out += [(f"{hf}attention.self.{proj}.weight", (ours, "attn", proj[0], "kernel"), (D, D), _linear((D, H, K))),
                    (f"{hf}attention.self.{proj}.bias", (ours, "attn", proj[0], "bias"), (D,), _reshape((H, K)))]
        out += [
            (f"{hf}attention.output.dense.weight", (ours, "attn", "o", "kernel"), (D, D), _linear((H, K, D))),
            (f"{hf}attention.output.dense.bias", (ours, "attn", "o", "bias"), (D,), _reshape((D,))),
            (f"{hf}attention.output.LayerNorm.weight", (ours, "attn_norm", "scale"), (D,), _reshape((D,))),
            (f"{hf}attention.output.LayerNorm.bias", (ours, "attn_norm", "bias"), (D,), _reshape((D,))),
            (f"{hf}intermediate.dense.weight", (ours, "up", "kernel"), (F, D), _linear((D, F))),
            (f"{hf}intermediate.dense.bias", (ours, "up", "bias"), (F,), _reshape((F,))),
            (f"{hf}output.dense.weight", (ours, "down", "kernel"), (D, F), _linear((F, D))),
            (f"{hf}output.dense.bias", (ours, "down", "bias"), (D,), _reshape((D,))),
            (f"{hf}output.LayerNorm.weight", (ours, "mlp_norm", "scale"), (D,), _reshape((D,))),
            (f"{hf}output.LayerNorm.bias", (ours, "mlp_norm", "bias"), (D,), _reshape((D,))),
        ]
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_bert(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str = "float32"):
    """(BertConfig, params) of the HF BERT checkpoint folder `path`.

    Raises FileNotFoundError when config.json or model.safetensors is absent, ValueError for an
    unsupported architecture, and one ValueError listing every missing tensor, every tensor whose
    shape differs from what the config implies (name, expected and actual shape) and every
    unexpected encoder tensor (e.g. more layers than `num_hidden_layers`).
    """
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    weights_file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no HF config: {config_file!r} does not exist")
    if not os.path.isfile(weights_file):
        raise FileNotFoundError(f"no HF weights: {weights_file!r} does not exist (only model.safetensors "
                                "is read; convert torch .bin checkpoints to safetensors first)")
    with open(config_file) as f:
        cfg = config_from_hf(json.load(f), dtype=dtype, param_dtype=param_dtype)

    with safe_open(weights_file, framework="flax") as f:
        names = set(f.keys())
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in names else ""
        problems, params, used = [], {}, set()
        for hf_name, param_path, shape, convert in _tensor_map(cfg):
            name = prefix + hf_name
            used.add(name)
            if name not in names:
                problems.append(f"missing tensor {name!r} (expected shape {shape})")
                continue
            actual = tuple(f.get_slice(name).get_shape())
            if actual != shape:
                problems.append(f"tensor {name!r} has shape {actual}, expected {shape}")
                continue
            _set(params, param_path, jnp.asarray(convert(f.get_tensor(name)), cfg.storage_dtype))
    encoder_names = {n for n in names if n.startswith((prefix + "embeddings.", prefix + "encoder."))}
    unexpected = sorted(encoder_names - used - {prefix + b for b in _IGNORED_BUFFERS})
    problems += [f"unexpected tensor {n!r} (not implied by {config_file!r})" for n in unexpected]
    if problems:
        raise ValueError(f"checkpoint {weights_file!r} does not match its config: " + "; ".join(problems))
    return cfg, params
