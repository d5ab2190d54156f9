r"""Create or reuse a Cloud TPU VM pod, install this project on every worker, run one command on all.

Everything after ``--`` is the command, started in the project folder on every worker at once
with ``JAXLLM_DISTRIBUTED=1`` so ``jaxllm.parallel.distributed.maybe_initialize`` connects the hosts:

  python -m launch.tpu_pod --name=my-pod --zone=us-central2-b --project=my-project \
      --create --accelerator_type=v4-32 --version=tpu-ubuntu2204-base --source=. \
      -- python3 -m launch.train --config=experiments/pretrain/config.py --workdir=/tmp/run

``--source`` is a local checkout (copied with scp) or a git URL (cloned on the workers, ``--ref``
checked out); leave it out to reuse what a previous call installed. ``--dry_run`` prints the
exact commands instead of running them. The commands themselves come from ``jaxllm.parallel.pod``.
"""

import os
import shlex
import subprocess

from absl import flags

from jaxllm.parallel import pod
from launch import common

_NAME = flags.DEFINE_string("name", None, "TPU VM (pod slice) name.", required=True)
_ZONE = flags.DEFINE_string("zone", None, "Cloud zone, e.g. us-central2-b.", required=True)
_PROJECT = flags.DEFINE_string("project", None, "Cloud project; gcloud's default when unset.")
_CREATE = flags.DEFINE_bool("create", False, "Create the TPU VM first.")
_ACCELERATOR_TYPE = flags.DEFINE_string("accelerator_type", None, "With --create: e.g. v4-32, v5p-128, v5litepod-16.")
_VERSION = flags.DEFINE_string("version", None, "With --create: TPU runtime version, e.g. tpu-ubuntu2204-base.")
_SPOT = flags.DEFINE_bool("spot", False, "With --create: a Spot (preemptible) TPU VM.")
_SOURCE = flags.DEFINE_string("source", None, "Local checkout or git URL to install on every worker.")
_REF = flags.DEFINE_string("ref", None, "Git ref to check out when --source is a git URL.")
_REMOTE_DIR = flags.DEFINE_string("remote_dir", "jaxllm", "Project folder under each worker's home.")
_WORKER = flags.DEFINE_string("worker", "all", "Workers to act on: all, an index, a list or a range.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")


def main(argv):
    source = _SOURCE.value
    if source is not None and not pod.is_git_url(source):
        if not os.path.isdir(source):
            raise FileNotFoundError(f"--source {source!r} is neither a git URL nor a local folder")
        source = os.path.abspath(source)
    steps = pod.plan(
        pod.TpuPod(_NAME.value, _ZONE.value, _PROJECT.value),
        argv[1:],
        create=_CREATE.value,
        accelerator_type=_ACCELERATOR_TYPE.value,
        version=_VERSION.value,
        spot=_SPOT.value,
        source=source,
        ref=_REF.value,
        remote_dir=_REMOTE_DIR.value,
        worker=_WORKER.value,
    )
    for step in steps:
        print(shlex.join(step), flush=True)
        if not _DRY_RUN.value:
            subprocess.run(step, check=True)


if __name__ == "__main__":
    common.run(main)
