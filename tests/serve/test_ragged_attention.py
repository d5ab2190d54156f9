"""The engine with the Pallas TPU `ragged_paged_attention` kernel: its sharded step compiles for a
TPU slice from this host, and it refuses a CPU backend and heads narrower than 128 lanes. (Its
numerics are not checked here: jax 0.10.2's TPU interpreter cannot read the kernel's reshaped refs,
AttributeError: 'ReshapeTransform' object has no attribute 'indices'.)"""
import importlib.util

import jax
import pytest

from jaxllm.model import kernels, llama, presets
from jaxllm.serve import Engine, SamplingParams
from jaxllm.serve.ragged_attention import ragged_paged_attention

ENGINE = dict(block_size=4, num_blocks=32, max_seqs=4, token_budget=16, buckets=(16,), context_buckets=())


def test_ragged_kernel_needs_a_tpu_and_a_lane_wide_head():
    cfg = presets.get("tiny", n_layers=1, d_model=512)
    engine = Engine(cfg, llama.init_params(cfg, jax.random.key(0)), attention=ragged_paged_attention, **ENGINE)
    with pytest.raises(ValueError, match="needs a TPU backend, but this program runs on 'cpu'"):
        engine.generate([[1, 2]], SamplingParams(max_tokens=1))
    cfg = presets.get("tiny", n_layers=1)  # head dim 16
    engine = Engine(cfg, llama.init_params(cfg, jax.random.key(0)), attention=ragged_paged_attention, **ENGINE)
    with kernels.interpret_mode(), pytest.raises(ValueError, match="multiple of 128, got 16"):
        engine.generate([[1, 2]], SamplingParams(max_tokens=1))


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install 'jaxllm[tpu]')")
def test_sharded_engine_step_with_the_kernel_compiles_for_tpu():
    from jaxllm.serve import aot as serve_aot
    cfg = presets.get("tiny", d_model=512, n_heads=4, n_kv_heads=2, dtype="bfloat16", param_dtype="bfloat16")
    report = serve_aot.compile_serve_step(cfg, "v5e:2x2", "tensor:4", num_blocks=64, block_size=16, token_budget=32,
                                          max_seqs=8, context_len=256, attention=ragged_paged_attention)
    assert report.fits and report.kernel_calls >= 1
