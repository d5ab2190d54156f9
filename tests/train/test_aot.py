"""Ahead-of-time compilation of the training step for a TPU topology (needs libtpu)."""
import importlib.util

import pytest

from jaxllm.model import presets
from jaxllm.train import aot

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install 'jaxllm[tpu]')")


@needs_libtpu
def test_small_model_compiles_for_small_tpu_topology():
    cfg = presets.get("tiny", scan_layers=True, remat="full", dtype="bfloat16")
    report = aot.compile_train_step(cfg, "v5e:2x2", "data:2,fsdp:2", batch=8, seq_len=128)
    assert report.chips == 4 and report.fits
    assert report.hbm_bytes == 16 * aot.GiB
    params_bytes = cfg.num_params() * 4
    # arguments hold params + two AdamW moments (f32) sharded over fsdp:2 (TPU tiling pads tiny arrays)
    assert report.argument_bytes >= 3 * params_bytes / 2
    assert "FITS" in report.summary()


@pytest.mark.slow
@needs_libtpu
def test_oversized_program_does_not_fit():
    cfg = presets.get("llama2_7b", n_layers=4, scan_layers=True, remat="none")
    report = aot.compile_train_step(cfg, "v5e:2x2", "fsdp:4", batch=64, seq_len=4096)
    assert not report.fits and "DOES NOT FIT" in report.summary()


@needs_libtpu
def test_unknown_topology_is_named():
    with pytest.raises(ValueError, match="v9z:3x3"):
        aot.compile_train_step(presets.get("tiny"), "v9z:3x3", "fsdp:-1", batch=8, seq_len=64)


@needs_libtpu
def test_splash_training_step_compiles_for_tpu_with_the_kernel():
    """The splash kernel lowers for the TPU from this CPU host (head_dim 128, the lane width)."""
    cfg = presets.get("tiny", d_model=256, n_heads=2, n_kv_heads=2, scan_layers=True, remat="full",
                      dtype="bfloat16", attention="splash", attention_block_q=128, attention_block_kv=128)
    report = aot.compile_train_step(cfg, "v5e:2x2", "data:2,fsdp:2", batch=8, seq_len=256)
    assert report.fits and report.kernel_calls >= 1  # forward and backward splash kernels in the program
    xla = aot.compile_train_step(presets.get("tiny", d_model=256, n_heads=2, n_kv_heads=2, scan_layers=True),
                                 "v5e:2x2", "data:2,fsdp:2", batch=8, seq_len=256)
    assert xla.kernel_calls == 0


@needs_libtpu
def test_batch_that_does_not_split_over_the_mesh_is_named_before_lowering():
    with pytest.raises(ValueError, match=r"global batch 8 with grad_accum 1 .* data-parallel size 16"):
        aot.compile_train_step(presets.get("llama2_70b"), "v5p:2x2x4", "fsdp:16", batch=8, seq_len=4096)


@needs_libtpu
def test_sharded_engine_step_compiles_for_tpu_and_reports_the_pool():
    from jaxllm.serve import aot as serve_aot
    cfg = presets.get("tiny", dtype="bfloat16", param_dtype="bfloat16")  # 4 heads, 2 kv heads
    report = serve_aot.compile_serve_step(cfg, "v5e:2x2", "tensor:4", num_blocks=64, block_size=16,
                                          token_budget=32, max_seqs=8, context_len=256)
    assert report.fits and report.chips == 4
    # 2 kv heads < 4 shards: each repeated on two chips, one per chip; K and V, 2 layers, head dim 16, bf16
    assert report.kv_bytes_per_token == 2 * 2 * 1 * 16 * 2
    assert report.pool_bytes == 64 * 16 * report.kv_bytes_per_token
    want = (report.hbm_bytes - report.weight_bytes - report.temp_bytes) // report.kv_bytes_per_token
    assert report.max_pool_tokens == want > 0
    with pytest.raises(ValueError, match="'tensor' of size 4 does not divide the model's n_heads=6"):
        serve_aot.compile_serve_step(presets.get("tiny", n_heads=6, n_kv_heads=2, d_model=96), "v5e:2x2",
                                     "tensor:4", num_blocks=8)
