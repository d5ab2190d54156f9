"""What every absl entry point does first: reject stray arguments, quiet library logging, and join
a multi-host job when the environment asks for one."""
from absl import app, flags
from absl import logging as absl_logging

from jaxllm.parallel import distributed


def start(argv, *, multihost: bool = False) -> None:
    """Call at the top of `main(argv)`. orbax logs every save at INFO, so logging drops to WARNING
    unless `--verbosity` is given. `multihost` runs `jax.distributed.initialize()` when the
    environment describes several hosts (a TPU VM pod), before any device is touched."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    if multihost:
        distributed.maybe_initialize()
