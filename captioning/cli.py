"""Shared start-up for the Hydra entry points: user errors end the run with one clear line; everything
else (a CUDA out-of-memory, an NCCL failure, a bug) keeps its traceback."""
from __future__ import annotations

import functools
import logging
import sys

log = logging.getLogger("captioning")


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user can fix from the message alone: a bad config value, a missing file, bad input data, no Java.
    Our own checks raise ValueError (ConfigError and BadInputError are ValueErrors) with the key or file named; a
    run folder that cannot take a checkpoint and a diverged run end the same way (exit 2, one message)."""
    from captioning.metrics.java import JavaMissingError
    from captioning.runtime.checkpoint import CheckpointWriteError
    from captioning.training.recipe import NonFiniteLossError

    return (ValueError, FileNotFoundError, JavaMissingError, CheckpointWriteError, NonFiniteLossError)


def exit_on_user_error(fn):
    """Inside a @hydra.main task: a user error exits with status 2 and its message (Hydra would otherwise
    print a traceback); an integer return value becomes the exit status. Other exceptions propagate."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            code = fn(*args, **kwargs)
        except user_errors() as e:
            log.error("%s", e)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        if isinstance(code, int) and code:
            sys.exit(code)
        return code

    return wrapper
