"""A real multi-process run: two `launch.train` processes on this machine, joined by
`jax.distributed` (coordinator on loopback, gloo CPU collectives), 4 fake devices each, one global
`fsdp:8` mesh. Its loss curve equals the single-process 8-device run's, and the checkpoint both
processes wrote resumes in one process, which continues the 2-process run's loss curve."""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxllm.model import llama
from jaxllm.train import checkpoint, pretrain
from jaxllm.train.config import TrainConfig
from tests.trajectory import assert_same_trajectory

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 6
# One example per row, unshuffled: every step's global batch holds the same 8 examples whether
# one process reads them all or two read alternate ones (the mean loss does not depend on the
# order of rows).
FIELDS = dict(steps=STEPS, batch_size=8, seq_len=32, log_every=1, checkpoint_every=3, peak_flops=1e11,
              sample_tokens=0, mesh="fsdp:8")


def overrides(data_file):
    flags = [f"--config.{k}={v}" for k, v in FIELDS.items()]
    return flags + ["--config.model.preset=tiny", "--config.data.source=jsonl", f"--config.data.files={data_file}",
                    "--config.data.shuffle=False", "--config.data.packing=none"]


def train_config(data_file):
    from ml_collections import config_flags  # the launcher's own flag parsing, in-process
    from absl import flags
    argv = ["train", f"--config={ROOT / 'experiments/pretrain/config.py'}", *overrides(data_file)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return TrainConfig.from_dict(values.config.to_dict())


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    words = (ROOT / "README.md").read_text().split()
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(words[i:i + 40])}) + "\n" for i in range(0, 40 * 64, 40)))
    return path


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_equals_single_process_and_its_checkpoint_resumes_in_one(tmp_path, data_file):
    reference = pretrain.pretrain(train_config(data_file), tmp_path / "single")  # this process: 8 fake devices
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="2", PYTHONPATH=str(ROOT))
    workdir = tmp_path / "multi"
    procs = [subprocess.Popen([sys.executable, "-m", "launch.train", "--config=experiments/pretrain/config.py",
                               f"--workdir={workdir}", *overrides(data_file)], cwd=ROOT,
                              env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    assert "'fsdp': 8" in out  # one global mesh over both processes' devices
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    multi = {r["step"]: r["loss"] for r in records}
    assert sorted(multi) == list(range(1, STEPS + 1))
    for step, loss in reference.losses.items():
        assert abs(multi[step] - loss) <= 1e-5 * abs(loss), (step, multi[step], loss)
    assert reference.losses[STEPS] < reference.losses[1]  # it trained

    # The checkpoint both processes wrote (each its own shards) is whole: one process reads it.
    cfg = train_config(data_file).model
    abstract = jax.eval_shape(lambda rng: llama.init_params(cfg, rng), jax.random.key(0))
    params = checkpoint.restore_params(workdir / "checkpoints", abstract)
    # Same trajectory up to reduction order (tests/trajectory.py says why no element-wise bound
    # holds); `fit` starts from the first half of its seed's key, and the distance travelled must be
    # a small part of that start, or this is not the runs' start.
    start = llama.init_params(cfg, jax.random.split(jax.random.key(train_config(data_file).seed))[0])
    for a, s in zip(jax.tree.leaves(reference.state.params), jax.tree.leaves(start)):
        assert np.linalg.norm(np.asarray(a) - np.asarray(s)) < 0.5 * np.linalg.norm(np.asarray(s))
    assert_same_trajectory(params, reference.state.params, start)

    # The whole run resumes in one process: from step 3 (step 6 removed), its 8 devices read both
    # processes' data shards, so steps 4-6 see the 2-process run's global batches, row for row.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(workdir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / str(STEPS))
    assert sorted(p.name for p in (resumed_dir / "checkpoints" / "3" / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    resumed = pretrain.pretrain(train_config(data_file), resumed_dir)
    assert sorted(resumed.losses) == [4, 5, 6]
    for step, loss in resumed.losses.items():
        assert abs(multi[step] - loss) <= 1e-5 * abs(loss), (step, multi[step], loss)
    assert_same_trajectory(resumed.state.params, params, start)
