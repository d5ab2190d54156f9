"""Cloud TPU VM pod commands: the exact gcloud argv lists, and the launcher's --dry_run output."""
import os
import shlex
import subprocess
import sys

import pytest

from jaxllm.parallel import pod

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POD = pod.TpuPod("llm-pod", "us-central2-b", "my-project")
TRAIN = ["python3", "-m", "launch.train", "--config=experiments/pretrain/config.py", "--workdir=/tmp/my run"]
TAIL = ["--zone=us-central2-b", "--project=my-project"]


def _remote(step):
    """The shell command line an ssh step runs on the workers."""
    (command,) = [arg.removeprefix("--command=") for arg in step if arg.startswith("--command=")]
    return command


def test_create_setup_from_local_checkout_and_run():
    steps = pod.plan(
        POD, TRAIN, create=True, accelerator_type="v4-32", version="tpu-ubuntu2204-base", spot=True, source="/src/jaxllm"
    )
    archive = "/tmp/llm-pod-jaxllm-src.tar.gz"
    assert steps[0] == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "llm-pod",
        "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot", *TAIL,
    ]
    assert steps[1][:3] == ["tar", "-czf", archive] and steps[1][-3:] == ["-C", "/src/jaxllm", "."]
    assert "--exclude=.git" in steps[1]
    assert steps[2] == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "llm-pod:jaxllm-src.tar.gz", "--worker=all", *TAIL,
    ]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llm-pod", "--worker=all"]
    assert steps[3][:7] == ssh and steps[3][8:] == TAIL
    assert _remote(steps[3]) == "mkdir -p jaxllm && tar -xzf jaxllm-src.tar.gz -C jaxllm && rm jaxllm-src.tar.gz"
    assert shlex.split(_remote(steps[4])) == [
        "cd", "jaxllm", "&&", "python3", "-m", "pip", "install", "--upgrade", "pip",
        "&&", "python3", "-m", "pip", "install", "-e", ".[tpu]",
    ]
    assert steps[5][:7] == ssh and steps[5][8:] == TAIL
    assert shlex.split(_remote(steps[5])) == ["cd", "jaxllm", "&&", "JAXLLM_DISTRIBUTED=1", *TRAIN]
    assert len(steps) == 6


def test_git_source_and_single_worker():
    steps = pod.plan(pod.TpuPod("p", "europe-west4-a"), source="https://example.com/jaxllm.git", ref="v0.1", worker="0")
    assert steps[0][:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "p", "--worker=0"]
    assert steps[0][8:] == ["--zone=europe-west4-a"]
    assert shlex.split(_remote(steps[0])) == [
        "(test", "-d", "jaxllm/.git", "||", "git", "clone", "https://example.com/jaxllm.git", "jaxllm)",
        "&&", "git", "-C", "jaxllm", "fetch", "origin", "v0.1",
        "&&", "git", "-C", "jaxllm", "checkout", "--force", "--detach", "FETCH_HEAD",
    ]
    assert steps[1][:7] == steps[0][:7] and steps[1][8:] == steps[0][8:]
    assert len(steps) == 2


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: pod.TpuPod("My_Pod", "us-central2-b"), "'My_Pod'"),
        (lambda: pod.TpuPod("p", ""), "zone ''"),
        (lambda: pod.plan(POD, create=True, accelerator_type="tpu-32", version="x"), "'tpu-32'"),
        (lambda: pod.plan(POD, create=True, accelerator_type="v5p-128"), "runtime version"),
        (lambda: pod.plan(POD), "nothing to do for TPU 'llm-pod'"),
        (lambda: pod.plan(POD, TRAIN, worker="first"), "'first'"),
        (lambda: pod.plan(POD, TRAIN, remote_dir="../elsewhere"), "'../elsewhere'"),
        (lambda: pod.plan(POD, source="/src", ref="main"), "ref 'main'"),
    ],
)
def test_bad_input_names_the_value(make, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        make()


def test_launcher_dry_run_prints_the_plan():
    argv = ["--name=llm-pod", "--zone=us-central2-b", "--project=my-project", "--dry_run", "--", *TRAIN]
    result = subprocess.run(
        [sys.executable, "-m", "launch.tpu_pod", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [shlex.join(pod.run_command(POD, TRAIN))]

    missing = subprocess.run(
        [sys.executable, "-m", "launch.tpu_pod", "--name=llm-pod", "--zone=us-central2-b", "--source=/no/such/dir", "--dry_run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert missing.returncode != 0 and "'/no/such/dir'" in missing.stderr
