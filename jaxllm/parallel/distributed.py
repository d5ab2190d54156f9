"""Multi-host start-up: ``jax.distributed.initialize`` only when the environment asks for it.

On a multi-host system (a TPU pod slice of more than one VM, a multislice job, a Slurm or Open MPI
job, or any launcher that sets ``JAX_COORDINATOR_ADDRESS``) every host runs the same program and
JAX must connect the hosts before it first touches a device; on one machine it must not try.
``maybe_initialize()`` makes that decision from the environment, so the same entry point runs on a
laptop and on every worker of a pod. Call it first thing in ``main``, before any other JAX call.

Signals, in order:
  * explicit ``coordinator_address`` / ``num_processes`` / ``process_id`` arguments;
  * ``JAXLLM_DISTRIBUTED``: ``1`` forces initialisation (``launch/tpu_pod.py`` sets it on every
    Cloud TPU VM worker, where JAX finds the host list through the TPU metadata server rather than
    the environment), ``0`` forbids it;
  * ``JAX_COORDINATOR_ADDRESS`` (JAX's own variable) or ``MEGASCALE_COORDINATOR_ADDRESS`` (multislice);
  * ``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` listing more than one host (GKE TPU pods);
  * ``SLURM_NTASKS`` or ``OMPI_COMM_WORLD_SIZE`` above 1.

JAX reads ``JAX_COORDINATOR_ADDRESS`` itself but not the process count or id; for a hand-started
job (several processes on one machine, or hosts without a cluster manager JAX detects) set
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` too and they are passed on. After connecting, the
process count JAX reports is checked against the one asked for. On CPU the processes exchange
data through gloo collectives (JAX's CPU default).
"""

import os
from collections.abc import Mapping

import jax

_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


def _count(value: str | None) -> int:
    return len([host for host in (value or "").split(",") if host.strip()])


def wants_distributed(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` describes a multi-process job that needs ``jax.distributed``."""
    forced = environ.get("JAXLLM_DISTRIBUTED", "").strip().lower()
    if forced in _TRUE:
        return True
    if forced in _FALSE:
        return False
    if forced:
        raise ValueError(f"JAXLLM_DISTRIBUTED must be one of {_TRUE + _FALSE}, got {forced!r}")
    if environ.get("JAX_COORDINATOR_ADDRESS") or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
    if _count(hosts) > 1:
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        value = environ.get(name, "").strip()
        if value:
            if not value.isdigit():
                raise ValueError(f"{name} must be a process count, got {value!r}")
            if int(value) > 1:
                return True
    return False


def process_args(environ: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(num_processes, process_id) from ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, validated;
    (None, None) when neither is set."""
    raw = {name: environ.get(name, "").strip() for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    if not any(raw.values()):
        return None, None
    missing = [name for name, value in raw.items() if not value]
    if missing:
        raise ValueError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID go together; {missing[0]} is not set")
    for name, value in raw.items():
        if not value.isdigit():
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    count, index = int(raw["JAX_NUM_PROCESSES"]), int(raw["JAX_PROCESS_ID"])
    if not 0 <= index < count:
        raise ValueError(f"JAX_PROCESS_ID={index} is not in [0, JAX_NUM_PROCESSES={count})")
    return count, index


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Initialise ``jax.distributed`` if asked to; return whether it is initialised.

    Idempotent: a second call, or a call after someone else initialised it, does nothing. Unset
    arguments are filled in by JAX's cluster auto-detection (Cloud TPU, GKE, Slurm, Open MPI).
    """
    if jax.distributed.is_initialized():
        return True
    explicit = any(arg is not None for arg in (coordinator_address, num_processes, process_id))
    if not (explicit or wants_distributed(os.environ)):
        return False
    env_count, env_index = process_args(os.environ)
    num_processes = env_count if num_processes is None else num_processes
    process_id = env_index if process_id is None else process_id
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    if num_processes is not None and jax.process_count() != num_processes:
        raise ValueError(f"asked for {num_processes} processes but the job has {jax.process_count()}")
    return True
