"""Models: the Llama-family decoder, RoPE, attention, the BERT encoder, HF interop and the model
format.

    llama.py      LlamaConfig, Llama, init_params, forward
    rope.py       RopeSpec and its scaling transforms
    attention.py  dense grouped-query attention and the dense KV cache
    presets.py    named model sizes
    hf.py         HF safetensors import/export
    model_dir.py  the model format: save_model, load_model, load_tokenizer

`load_model`, `save_model`, `load_config` and `load_tokenizer` are importable from `jaxllm.model`
directly; they load on first use, so importing `jaxllm.model.llama` does not pull in orbax.
"""
import importlib

_EXPORTS = {"load_model": "model_dir", "save_model": "model_dir", "load_config": "model_dir",
            "load_tokenizer": "model_dir", "record_model": "model_dir"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxllm.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"jaxllm.model.{_EXPORTS[name]}"), name)
