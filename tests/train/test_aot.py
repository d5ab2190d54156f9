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
