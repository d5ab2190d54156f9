"""launch/train.py end to end in a subprocess (SIGTERM → checkpoint + exit 143, rerun resumes and
finishes), misspelt config fields, and the ConfigDict ↔ TrainConfig bridge."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from jaxllm.model import presets
from jaxllm.train.config import TrainConfig, config_dict

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 40
TINY = ["--config=experiments/pretrain/config.py", "--config.model.preset=tiny", "--config.model.d_model=64",
        "--config.model.d_ff=192", f"--config.steps={STEPS}",
        "--config.batch_size=8", "--config.seq_len=32", "--config.log_every=1", "--config.checkpoint_every=100",
        "--config.peak_flops=1e11", "--config.sample_tokens=4", "--config.mesh=fsdp:-1"]


def env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def launch(*args):
    return subprocess.Popen([sys.executable, "-m", "launch.train", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metric_steps(workdir):
    path = workdir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


# a subprocess launch; the loop's SIGTERM save and resume run in-process in test_loop.py and the
# launcher's kill-and-rerun in tests/reliability
@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_then_rerun_resumes_to_the_end(tmp_path):
    proc = launch(*TINY, f"--workdir={tmp_path}")
    deadline = time.time() + 240
    while not metric_steps(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped = int(out.split("SIGTERM: checkpoint at step ")[1].split()[0])
    assert 1 <= stopped < STEPS
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [str(stopped)]

    proc = launch(*TINY, f"--workdir={tmp_path}")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert f"resumed from step {stopped}" in out and f"sample after step {STEPS}:" in out
    assert metric_steps(tmp_path) == list(range(1, STEPS + 1))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [stopped, STEPS]

    # The workdir records its model: load_model reads the last checkpoint back without the config file.
    from jaxllm.data.tokenizer import Tokenizer
    from jaxllm.model import load_model, load_tokenizer
    from jaxllm.train import checkpoint

    model_cfg, params = load_model(tmp_path)
    assert model_cfg == TrainConfig.from_dict(parse_config(*TINY[1:]).to_dict()).model
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    jax.tree.map(np.testing.assert_array_equal, params, checkpoint.restore_params(tmp_path / "checkpoints", abstract))
    assert load_tokenizer(tmp_path).model_proto == Tokenizer.default().model_proto


def test_misspelt_config_field_fails_the_launch(tmp_path):
    proc = launch("--config=experiments/pretrain/config.py", "--config.model.d_modle=32", f"--workdir={tmp_path}")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0 and "d_modle" in err
    assert not (tmp_path / "checkpoints").exists()


def parse_config(*overrides):
    argv = ["train", f"--config={ROOT / 'experiments/pretrain/config.py'}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.parametrize("flag", ["--config.stepz=3", "--config.optimizer.lr=1e-3", "--config.data.sorce=jsonl"])
def test_experiment_config_is_locked(flag):
    """The flag parsing of launch/train.py, in-process: any field of the pretrain config can be
    overridden, and a field it does not have cannot be created."""
    config = parse_config("--config.steps=3", "--config.model.d_model=128", "--config.optimizer.learning_rate=1e-3",
                          "--config.data.source=jsonl")
    assert config.steps == 3 and config.model.d_model == 128 and config.data.source == "jsonl"
    with pytest.raises((AttributeError, flags.Error), match=flag.split("=")[0].rsplit(".", 1)[1]):
        parse_config(flag)


def test_config_dict_round_trips_with_typed_overrides():
    cd = config_dict(model=dict(preset="tiny", vocab_size=4096), steps=7, optimizer=dict(learning_rate=1e-3))
    cd.model.d_model = 128  # an override of a preset field left at None
    cfg = TrainConfig.from_dict(cd.to_dict())
    assert cfg.model == presets.get("tiny", vocab_size=4096, d_model=128)
    assert cfg.model.head_dim == 32 and cfg.steps == 7 and cfg.optimizer.learning_rate == 1e-3
    with pytest.raises(TypeError):
        cd.steps = "many"
    with pytest.raises(ValueError, match=r"unknown config fields \['stepz'\]"):
        config_dict(model=dict(preset="tiny"), stepz=3)
    with pytest.raises(ValueError, match=r"unknown model fields \['d_modle'\]"):
        TrainConfig.from_dict({"model": {"preset": "tiny", "d_modle": 3}})
    with pytest.raises(ValueError, match="unknown model preset 'tinyy'"):
        TrainConfig.from_dict({"model": {"preset": "tinyy"}})
