"""The engine with the Pallas TPU `ragged_paged_attention` kernel: what the adapter hands the kernel
follows the kernel's contract (checked against jax's own reference implementation of it), its
sharded step compiles for a TPU slice from this host, and it refuses a CPU backend and heads
narrower than 128 lanes. (The Mosaic kernel itself is not run here: jax 0.10.2's TPU interpreter
cannot read the kernel's reshaped refs, AttributeError: 'ReshapeTransform' object has no attribute
'indices'.)"""
import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa

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


def reference_kernel(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, **block_sizes):
    """jax's `ref_ragged_paged_attention` (plain jnp, the contract its kernel is tested against in
    jax), padded to the kernel's output shape: rows past the last sequence's queries are the
    kernel's padding. It loops over `num_seqs` in Python, so the engine must run unjitted."""
    out = rpa.ref_ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale)
    return jnp.zeros_like(q).at[:out.shape[0]].set(out)


def test_adapter_meets_the_kernels_contract(monkeypatch):
    """Greedy tokens with the adapter feeding jax's reference of the kernel equal the engine's own
    attention's: the pass's rows written into the pool, K/V interleaved per kv head, query starts,
    kv lengths and page tables of a pass with a chunked prompt and decodes. (Under a mesh the
    reference cannot run: shard_map traces it, and it needs concrete lengths.)"""
    monkeypatch.setattr(rpa, "ragged_paged_attention", reference_kernel)
    cfg = presets.get("tiny", n_layers=1, d_model=256, n_heads=2, n_kv_heads=1)  # head dim 128
    params = llama.init_params(cfg, jax.random.key(1))
    prompts = [[5, 9, 2, 7, 1, 3, 8, 4, 6, 2, 11], [3, 4], [7, 7, 7, 1, 2, 9, 10]]  # 21 tokens > budget 16
    sampling = SamplingParams(max_tokens=4)
    expected = [c.tokens for c in Engine(cfg, params, **ENGINE).generate(prompts, sampling)]
    with kernels.interpret_mode(), jax.disable_jit():
        engine = Engine(cfg, params, attention=ragged_paged_attention, **ENGINE)
        assert [c.tokens for c in engine.generate(prompts, sampling)] == expected
