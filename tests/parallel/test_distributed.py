"""Multi-host start-up: when the environment asks for jax.distributed, and a real two-process run."""
import os
import socket
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxllm.parallel.distributed import maybe_initialize, process_args, wants_distributed  # noqa: E402

SIGNALS = [
    "JAXLLM_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
    "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, False),
        ({"TPU_WORKER_HOSTNAMES": "t1v-n-0"}, False),
        ({"TPU_WORKER_HOSTNAMES": "t1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3"}, True),
        ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, True),
        ({"SLURM_NTASKS": "1"}, False),
        ({"SLURM_NTASKS": "16"}, True),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
        ({"JAXLLM_DISTRIBUTED": "1"}, True),
        ({"JAXLLM_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "a,b"}, False),
    ],
)
def test_wants_distributed(environ, expected):
    assert wants_distributed(environ) is expected


@pytest.mark.parametrize("environ, name", [({"JAXLLM_DISTRIBUTED": "maybe"}, "'maybe'"), ({"SLURM_NTASKS": "x"}, "'x'")])
def test_wants_distributed_rejects_bad_values(environ, name):
    with pytest.raises(ValueError, match=name):
        wants_distributed(environ)


def test_process_count_and_id_from_the_environment():
    assert process_args({}) == (None, None)
    assert process_args({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}) == (2, 1)


@pytest.mark.parametrize("environ, message", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID is not set"),
    ({"JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES is not set"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES must be a non-negative integer, got 'two'"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"JAX_PROCESS_ID=2 is not in \[0, JAX_NUM_PROCESSES=2\)"),
])
def test_bad_process_count_or_id_is_named(environ, message):
    with pytest.raises(ValueError, match=message):
        process_args(environ)


def test_single_process_is_a_no_op(monkeypatch):
    for name in SIGNALS:
        monkeypatch.delenv(name, raising=False)
    assert maybe_initialize() is False
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1


def test_two_processes_connect_and_second_call_is_a_no_op():
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    script = (
        "import sys, jax\n"
        "from jaxllm.parallel.distributed import maybe_initialize\n"
        f"first = maybe_initialize('localhost:{port}', 2, int(sys.argv[1]))\n"
        "print(first, maybe_initialize(), jax.process_count(), jax.process_index(), flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in SIGNALS + ["XLA_FLAGS"]}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(i)], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    results = [worker.communicate(timeout=120) for worker in workers]
    for i, (worker, (out, err)) in enumerate(zip(workers, results)):
        assert worker.returncode == 0, err
        assert out.split() == ["True", "True", "2", str(i)]
