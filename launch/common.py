"""What every absl entry point does first: reject stray arguments, quiet library logging, and join
a multi-process job when the environment asks for one."""
import logging
import os
import sys

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


# Errors a user can cause with a flag, a config field or an input file: each names the bad value in
# its message, which is all a user needs; a traceback would bury it.
USER_ERRORS = (ValueError, TypeError, KeyError, OSError, FloatingPointError)


def run(main) -> None:
    """`absl.app.run(main)`, except that a user error ends the process with one line on stderr,
    `error: <what>`, and exit status 2 instead of a traceback (JAXLLM_TRACEBACK=1 or an explicit
    `--verbosity` keeps the traceback, for debugging). OSError covers missing, unreadable and
    unwritable paths and a full disk. Flags are parsed here too: a misspelt or mistyped flag or
    config field, or a config file that fails to load, is one line, not ml_collections' traceback."""

    def guarded(argv):
        try:
            return main(argv)
        except USER_ERRORS as err:
            _fail(err)

    app.run(guarded, flags_parser=_parse_flags)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        traced = "Traceback (most recent call last):" in lines
        message = f"{lines[0]} {lines[-1]}" if traced else " ".join(lines)  # the flag, and the error it raised
        print(f"error: {message} (--helpfull lists the flags)", file=sys.stderr, flush=True)
        sys.exit(2)
    except USER_ERRORS + (AttributeError,) as err:  # ml_collections: a misspelt config field
        _fail(err)


def _fail(err: BaseException) -> None:
    if os.environ.get("JAXLLM_TRACEBACK") or ("verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present):
        raise err
    message = err
    while isinstance(message, (KeyError, AttributeError)) and message.args:  # ml_collections wraps KeyErrors
        message = message.args[0]
    message = " ".join(str(message).split())
    print(f"error: {type(err).__name__}: {message} (JAXLLM_TRACEBACK=1 shows where)", file=sys.stderr, flush=True)
    # A failed checkpoint write leaves orbax's background tasks holding the same error; asyncio would
    # log each as "Task exception was never retrieved" at exit, after the one line above.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.exit(2)
