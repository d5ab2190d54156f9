"""Command lines that create a Cloud TPU VM pod, install this project on it and run a job.

A TPU pod slice is several VMs ("workers"); a JAX job on it is the same program started on every
worker (``gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...``), which then connect
through ``jax.distributed`` (see ``distributed.maybe_initialize``). Everything here only builds
argv lists, so the plan can be printed (``launch/tpu_pod.py --dry_run``) and tested; running
them is the launcher's business.
"""

import dataclasses
import re
import shlex
from collections.abc import Sequence

_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_ACCELERATOR = re.compile(r"v\d+[a-z]*-\d+")
_WORKER = re.compile(r"all|\d+([,-]\d+)*")
REMOTE_ARCHIVE = "jaxllm-src.tar.gz"


@dataclasses.dataclass(frozen=True)
class TpuPod:
    """Where the pod lives: its name, zone and (optionally) the Cloud project."""

    name: str
    zone: str
    project: str | None = None

    def __post_init__(self):
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"TPU name {self.name!r} must be lowercase letters, digits and '-', starting with a letter")
        if not self.zone or not re.fullmatch(r"[a-z0-9-]+", self.zone):
            raise ValueError(f"zone {self.zone!r} is not a Cloud zone name like 'us-central2-b'")


def _gcloud(pod: TpuPod, verb: str, *args: str) -> list[str]:
    project = [f"--project={pod.project}"] if pod.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={pod.zone}", *project]


def _check_worker(worker: str) -> str:
    if not _WORKER.fullmatch(worker):
        raise ValueError(f"worker {worker!r} must be 'all', an index, a list '1,4' or a range '1-3'")
    return worker


def _check_remote_dir(remote_dir: str) -> str:
    parts = remote_dir.split("/")
    if not remote_dir or remote_dir.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"remote_dir {remote_dir!r} must be a plain relative path under the workers' home")
    return remote_dir


def create_command(pod: TpuPod, accelerator_type: str, version: str, spot: bool = False) -> list[str]:
    """``gcloud ... tpu-vm create`` for a pod of ``accelerator_type`` (e.g. ``v5p-128``) on runtime ``version``."""
    if not _ACCELERATOR.fullmatch(accelerator_type or ""):
        raise ValueError(f"accelerator type {accelerator_type!r} is not like 'v4-32', 'v5p-128' or 'v5litepod-16'")
    if not version:
        raise ValueError(f"creating TPU {pod.name!r} needs a runtime version, e.g. 'tpu-ubuntu2204-base'")
    flags = [f"--accelerator-type={accelerator_type}", f"--version={version}"] + (["--spot"] if spot else [])
    return _gcloud(pod, "create", pod.name, *flags)


def ssh_command(pod: TpuPod, remote_command: str, worker: str = "all") -> list[str]:
    """Run one shell command line on the chosen workers (all of them by default)."""
    return _gcloud(pod, "ssh", pod.name, f"--worker={_check_worker(worker)}", f"--command={remote_command}")


def scp_command(pod: TpuPod, local_path: str, remote_path: str, worker: str = "all") -> list[str]:
    """Copy a local file to ``remote_path`` (relative to home) on the chosen workers."""
    return _gcloud(pod, "scp", local_path, f"{pod.name}:{remote_path}", f"--worker={_check_worker(worker)}")


def is_git_url(source: str) -> bool:
    """Whether ``source`` names a git remote (cloned on the workers) rather than a local checkout."""
    return "://" in source or source.startswith("git@")


def setup_commands(
    pod: TpuPod, source: str, remote_dir: str = "jaxllm", ref: str | None = None, worker: str = "all"
) -> list[list[str]]:
    """Put the project on every worker and ``pip install -e '.[tpu]'`` it there.

    ``source`` is a git URL (cloned if absent; ``ref``, default the remote's HEAD, fetched and
    checked out, so a second setup updates the workers) or a
    local checkout (packed with ``tar`` without ``.git`` and caches, copied with ``scp``, unpacked).
    """
    remote_dir = _check_remote_dir(remote_dir)
    target = shlex.quote(remote_dir)
    if is_git_url(source):
        fetch = (
            f"(test -d {target}/.git || git clone {shlex.quote(source)} {target}) && "
            f"git -C {target} fetch origin {shlex.quote(ref or 'HEAD')} && "
            f"git -C {target} checkout --force --detach FETCH_HEAD"
        )
        steps = [ssh_command(pod, fetch, worker)]
    else:
        if ref is not None:
            raise ValueError(f"ref {ref!r} applies to a git URL source, not the local checkout {source!r}")
        archive = f"/tmp/{pod.name}-{REMOTE_ARCHIVE}"
        excludes = [f"--exclude={pattern}" for pattern in (".git", "__pycache__", "*.egg-info", ".jax_cache", "workdir")]
        steps = [
            ["tar", "-czf", archive, *excludes, "-C", source, "."],
            scp_command(pod, archive, REMOTE_ARCHIVE, worker),
            ssh_command(
                pod, f"mkdir -p {target} && tar -xzf {REMOTE_ARCHIVE} -C {target} && rm {REMOTE_ARCHIVE}", worker
            ),
        ]
    install = f"cd {target} && python3 -m pip install --upgrade pip && python3 -m pip install -e '.[tpu]'"
    return steps + [ssh_command(pod, install, worker)]


def run_command(pod: TpuPod, command: Sequence[str], remote_dir: str = "jaxllm", worker: str = "all") -> list[str]:
    """Start ``command`` (an argv list) in ``remote_dir`` on every worker, with multi-host init on."""
    if not command:
        raise ValueError("the command to run on the pod is empty")
    target = shlex.quote(_check_remote_dir(remote_dir))
    return ssh_command(pod, f"cd {target} && JAXLLM_DISTRIBUTED=1 {shlex.join(command)}", worker)


def plan(
    pod: TpuPod,
    command: Sequence[str] = (),
    *,
    create: bool = False,
    accelerator_type: str | None = None,
    version: str | None = None,
    spot: bool = False,
    source: str | None = None,
    ref: str | None = None,
    remote_dir: str = "jaxllm",
    worker: str = "all",
) -> list[list[str]]:
    """All commands, in order: create the pod (if ``create``), set it up (if ``source``), run ``command``."""
    steps = []
    if create:
        steps.append(create_command(pod, accelerator_type, version, spot))
    if source is not None:
        steps += setup_commands(pod, source, remote_dir, ref, worker)
    if command:
        steps.append(run_command(pod, command, remote_dir, worker))
    if not steps:
        raise ValueError(f"nothing to do for TPU {pod.name!r}: ask to create it, give a source to set up, or a command")
    return steps
