"""Shared start-up for the Hydra entry points: user errors end the run with one clear line."""
from __future__ import annotations

import functools
import logging
import sys

log = logging.getLogger("captioning")


def exit_on_user_error(fn):
    """Inside a @hydra.main task: a bad config value, missing file or bad input exits with status 2 and its
    message (Hydra would otherwise print a traceback); an integer return value becomes the exit status."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from captioning.config import ConfigError
        from captioning.data.dataset import BadInputError

        try:
            code = fn(*args, **kwargs)
        except (ConfigError, FileNotFoundError, BadInputError, ValueError, RuntimeError) as e:
            log.error("%s", e)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        if isinstance(code, int) and code:
            sys.exit(code)
        return code

    return wrapper
