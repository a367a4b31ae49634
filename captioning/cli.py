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
    from captioning.training.engine import NonFiniteLossError

    return (ValueError, FileNotFoundError, JavaMissingError, CheckpointWriteError, NonFiniteLossError)


class JobFailed(Exception):
    """A user error in one job of a multirun: Hydra records the job as failed, runs the others of the sweep, then
    reports it (a SystemExit would end the whole sweep at the first bad job)."""


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not inside a Hydra job
        return False


def exit_on_user_error(fn):
    """Inside a @hydra.main task: a `+`-added key that no config group declares is a user error
    (captioning.strict_keys); a user error exits with status 2 and its message (Hydra would otherwise
    print a traceback); an integer return value becomes the exit status. Other exceptions propagate. In a
    multirun the job fails instead (JobFailed, one line) and the sweep goes on with its other jobs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from omegaconf import DictConfig

        from captioning.strict_keys import check_added_keys

        try:
            if args and isinstance(args[0], DictConfig):
                check_added_keys(args[0])  # a typo'd key added with + is an error, not ignored
            code = fn(*args, **kwargs)
        except user_errors() as e:
            if log.hasHandlers():  # the run's log file; with logging off (captioning-predict) only the line below
                log.error("%s", e)
            print(f"error: {e}", file=sys.stderr)
            if in_multirun():
                raise JobFailed(str(e)) from None
            sys.exit(2)
        if isinstance(code, int) and code:
            if in_multirun():  # e.g. 124 after a preemption save: this job stops, the sweep's others still run
                log.warning("job ended with exit code %d", code)
                return code
            sys.exit(code)
        return code

    return wrapper
