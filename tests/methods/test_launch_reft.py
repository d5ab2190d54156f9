"""launch/reft.py end to end in a subprocess on a tiny config: SFT → ReFT → eval outputs."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxllm.model import model_dir

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_launch_reft_all_stages(tmp_path):
    import jax
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    args = ["--config=experiments/reft/config.py", f"--workdir={tmp_path}", "--stage=all", "--config.task.train=64",
            "--config.task.val=16", "--config.task.test=16", "--config.sft.epochs=3", "--config.sft.batch_size=16",
            "--config.reft.rl_epochs=1", "--config.eval_k=2"]
    proc = subprocess.run([sys.executable, "-m", "launch.reft", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert set(scores) == {"warmup", "sft_best", "reft_policy"}
    for split in scores.values():
        for s in split.values():
            assert 0.0 <= s["voting@2"] <= s["pass@2"] <= 1.0
    assert model_dir.load_config(tmp_path / "reft_value").value_head
    assert not model_dir.load_config(tmp_path / "reft_policy").value_head
    records = [json.loads(line) for line in (tmp_path / "reft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(r["engine_logp_gap"] < 1e-4 for r in records)
