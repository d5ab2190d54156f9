"""What every absl entry point does first: reject stray arguments, quiet library logging, and join
a multi-process job when the environment asks for one."""
from absl import app, flags
from absl import logging as absl_logging

from jaxllm.parallel import distributed


def start(argv) -> None:
    """Call at the top of `main(argv)`. orbax logs every save at INFO, so logging drops to WARNING
    unless `--verbosity` is given. `jax.distributed.initialize()` runs when the environment
    describes a multi-process job (a TPU VM pod, Slurm, Open MPI, or `JAX_COORDINATOR_ADDRESS`
    with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`), before any device is touched."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    distributed.maybe_initialize()
