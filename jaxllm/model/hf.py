"""Hugging Face checkpoint interop for Llama-family models (safetensors, no torch).

`load(path)` reads `config.json` plus `model.safetensors` or sharded `model-0000x-of-0000y.safetensors`
with `model.safetensors.index.json`. Passing `shardings` (a tree of `jax.sharding.Sharding` shaped
like the params, e.g. from `jaxllm.parallel.rules`) builds every array with
`jax.make_array_from_callback`: each device reads only its own slice through safetensors' lazy
`get_slice`, so a 70B checkpoint never needs a full host copy. `save(path, config, params, tokenizer=...)` writes a
folder that `transformers.LlamaForCausalLM.from_pretrained` loads.

BERT encoders (retrieval) are read by `load_bert` from `jaxllm.model.hf_bert`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import numpy as np
import safetensors
import safetensors.numpy

from jaxllm.model import rope
from jaxllm.model.llama import LlamaConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


# ----------------------------------------------------------------------------- config

def config_from_hf(hf: dict, **overrides) -> LlamaConfig:
    """LlamaConfig from an HF config dict; raises for architectures jaxllm does not implement."""
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"unsupported architecture {archs}; supported: {SUPPORTED_ARCHITECTURES}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"HF config sets {flag}=True, which jaxllm's Llama does not implement")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; jaxllm's Llama uses silu")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    spec = rope.from_hf(hf, head_dim)
    max_len = hf.get("max_position_embeddings", 2048)
    if spec.dynamic is not None:  # HF's dynamic window is max_position_embeddings; allow extrapolation
        max_len = int(max_len * spec.dynamic.factor)
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    cfg = LlamaConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim,
                      d_ff=hf["intermediate_size"], rope=spec, max_len=max_len,
                      norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings")),
                      param_dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32")
    return dataclasses.replace(cfg, **overrides)


def config_to_hf(cfg: LlamaConfig) -> dict:
    max_pos = cfg.rope.dynamic.window if cfg.rope.dynamic is not None else cfg.max_len
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": max_pos,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "dtype": cfg.param_dtype,
        **rope.to_hf(cfg.rope),
    }


# ----------------------------------------------------------------------------- tensor layout

@dataclasses.dataclass(frozen=True)
class _Map:
    """How one jaxllm tensor (per layer) is laid out in an HF tensor.

    kind "same": identical; "t": HF [out, in] = ours.T; "heads_in": ours [D, N, K] = HF [N*K, D];
    "heads_out": ours [H, K, D] = HF [D, H*K].
    """

    hf_name: str
    kind: str


def _layer_maps(cfg: LlamaConfig) -> dict[tuple[str, ...], _Map]:
    return {
        ("attn_norm", "scale"): _Map("input_layernorm.weight", "same"),
        ("mlp_norm", "scale"): _Map("post_attention_layernorm.weight", "same"),
        ("attn", "q"): _Map("self_attn.q_proj.weight", "heads_in"),
        ("attn", "k"): _Map("self_attn.k_proj.weight", "heads_in"),
        ("attn", "v"): _Map("self_attn.v_proj.weight", "heads_in"),
        ("attn", "o"): _Map("self_attn.o_proj.weight", "heads_out"),
        ("mlp", "gate"): _Map("mlp.gate_proj.weight", "t"),
        ("mlp", "up"): _Map("mlp.up_proj.weight", "t"),
        ("mlp", "down"): _Map("mlp.down_proj.weight", "t"),
    }


def _top_maps(cfg: LlamaConfig) -> dict[tuple[str, ...], _Map]:
    maps = {("embed", "embedding"): _Map("model.embed_tokens.weight", "same"),
            ("final_norm", "scale"): _Map("model.norm.weight", "same")}
    if not cfg.tie_embeddings:
        maps[("lm_head",)] = _Map("lm_head.weight", "t")
    return maps


def _hf_shape(m: _Map, shape: tuple[int, ...]) -> tuple[int, ...]:
    if m.kind == "same":
        return shape
    if m.kind == "t":
        return shape[::-1]
    if m.kind == "heads_in":
        d, n, k = shape
        return (n * k, d)
    d = shape[2]
    return (d, shape[0] * shape[1])


def _read_block(m: _Map, read: Callable, index: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Our tensor's block `index` (slices over `shape`), reading only the HF rows/cols it needs."""
    idx = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
    if m.kind == "same":
        return read(idx)
    if m.kind == "t":
        return read(idx[::-1]).T
    if m.kind == "heads_in":
        d, n, k = idx
        K = shape[2]
        block = read((slice(n.start * K, n.stop * K), d))  # [n*K, d]
        block = block.reshape(n.stop - n.start, K, -1).transpose(2, 0, 1)
        return block[:, :, k]
    h, k, d = idx
    K = shape[1]
    block = read((d, slice(h.start * K, h.stop * K)))  # [d, h*K]
    block = block.reshape(-1, h.stop - h.start, K).transpose(1, 2, 0)
    return block[:, k, :]


def _to_hf_tensor(m: _Map, x: np.ndarray) -> np.ndarray:
    if m.kind == "same":
        return x
    if m.kind == "t":
        return x.T
    if m.kind == "heads_in":
        d, n, k = x.shape
        return x.transpose(1, 2, 0).reshape(n * k, d)
    h, k, d = x.shape
    return x.transpose(2, 0, 1).reshape(d, h * k)


def _param_entries(cfg: LlamaConfig):
    """Yield (param path, per-layer HF names or one name, map, our full shape)."""
    D, H, G, K, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    shapes = {("attn_norm", "scale"): (D,), ("mlp_norm", "scale"): (D,), ("attn", "q"): (D, H, K),
              ("attn", "k"): (D, G, K), ("attn", "v"): (D, G, K), ("attn", "o"): (H, K, D),
              ("mlp", "gate"): (D, F), ("mlp", "up"): (D, F), ("mlp", "down"): (F, D)}
    top_shapes = {("embed", "embedding"): (V, D), ("final_norm", "scale"): (D,), ("lm_head",): (D, V)}
    for path, m in _top_maps(cfg).items():
        yield path, [m.hf_name], m, top_shapes[path], False
    for sub, m in _layer_maps(cfg).items():
        names = [f"model.layers.{i}.{m.hf_name}" for i in range(cfg.n_layers)]
        if cfg.scan_layers:
            yield ("layers",) + sub, names, m, (cfg.n_layers,) + shapes[sub], True
        else:
            for i, name in enumerate(names):
                yield (f"layers_{i}",) + sub, [name], m, shapes[sub], False


# ----------------------------------------------------------------------------- load / save

class _Reader:
    """Lazy access to the tensors of one checkpoint folder (single or sharded safetensors)."""

    def __init__(self, path: str):
        index_path, single = os.path.join(path, _INDEX), os.path.join(path, _SINGLE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                self.where = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        elif os.path.exists(single):
            with safetensors.safe_open(single, framework="numpy") as f:
                self.where = {k: single for k in f.keys()}
        else:
            raise FileNotFoundError(f"no {_SINGLE} or {_INDEX} in {path}")
        self._files = {}

    def handle(self, name: str):
        if name not in self.where:
            raise ValueError(f"tensor {name!r} missing from checkpoint")
        file = self.where[name]
        if file not in self._files:
            if not os.path.exists(file):
                raise FileNotFoundError(f"checkpoint shard {file} (holding {name!r}) does not exist")
            self._files[file] = safetensors.safe_open(file, framework="numpy")
        return self._files[file]

    def check_shape(self, name: str, expected: tuple[int, ...]):
        actual = tuple(self.handle(name).get_slice(name).get_shape())
        if actual != tuple(expected):
            raise ValueError(f"tensor {name!r} has shape {actual}, expected {tuple(expected)}")

    def read(self, name: str, idx: tuple[slice, ...]) -> np.ndarray:
        return self.handle(name).get_slice(name)[idx]


def load(path: str, shardings=None, dtype=None, **config_overrides):
    """(LlamaConfig, params) from an HF folder. `shardings` (optional, same tree as params) makes
    each device read only its slice. Every tensor's presence and shape is checked first."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no config.json in {path}")
    with open(config_path) as f:
        cfg = config_from_hf(json.load(f), **config_overrides)
    reader = _Reader(path)
    np_dtype = np.dtype(dtype or ("float32" if cfg.param_dtype == "float32" else cfg.param_dtype))
    params: dict = {}
    for path_keys, names, m, shape, stacked in _param_entries(cfg):
        per_layer = shape[1:] if stacked else shape
        for name in names:
            reader.check_shape(name, _hf_shape(m, per_layer))

        def block(index, names=names, m=m, shape=shape, stacked=stacked, per_layer=per_layer):
            if not stacked:
                out = _read_block(m, lambda idx: reader.read(names[0], idx), index, shape)
            else:
                layers = range(*index[0].indices(shape[0]))
                out = np.stack([_read_block(m, lambda idx, n=names[i]: reader.read(n, idx), index[1:], per_layer)
                                for i in layers])
            return np.asarray(out, np_dtype)

        full = tuple(slice(None) for _ in shape)
        sharding = _get(shardings, path_keys) if shardings is not None else None
        value = (jax.make_array_from_callback(shape, sharding, block) if sharding is not None
                 else jax.numpy.asarray(block(full)))
        _set(params, path_keys, value)
    return cfg, params


def save(path: str, cfg: LlamaConfig, params, max_shard_bytes: int = 4 << 30, tokenizer=None) -> None:
    """Write config.json and safetensors (split into several files with an index past
    `max_shard_bytes`) that transformers loads as LlamaForCausalLM, and the tokenizer (any object
    with `save(directory)`, e.g. `jaxllm.data.tokenizer.Tokenizer`) when given. A model with a
    value head is refused: LlamaForCausalLM has no place for it, and dropping it would be silent."""
    if cfg.value_head:
        raise ValueError("this model carries a value head, which an HF LlamaForCausalLM folder cannot hold; "
                         "export the policy without it (e.g. a ReFT run's reft_policy, not reft_value) or keep "
                         "the jaxllm model directory")
    os.makedirs(path, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(path)
    tensors: dict[str, np.ndarray] = {}
    for path_keys, names, m, shape, stacked in _param_entries(cfg):
        value = np.asarray(jax.device_get(_get(params, path_keys)))
        if value.shape != shape:
            raise ValueError(f"param {'/'.join(path_keys)} has shape {value.shape}, config expects {shape}")
        for i, name in enumerate(names):
            tensors[name] = np.ascontiguousarray(_to_hf_tensor(m, value[i] if stacked else value))
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        safetensors.numpy.save_file(shards[0], os.path.join(path, _SINGLE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors.numpy.save_file(shard, os.path.join(path, fname), metadata=meta)
            weight_map.update({k: fname for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(path, _INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2)


def _get(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _set(tree, keys, value):
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def load_bert(path: str, **kwargs):
    """(BertConfig, params) of an HF BERT folder; see `jaxllm.model.hf_bert.load_bert`."""
    from jaxllm.model.hf_bert import load_bert as _load_bert
    return _load_bert(path, **kwargs)
