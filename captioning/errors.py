"""The error every configuration check raises: a leaf module, so that each layer's checks can raise it without
importing the config orchestrator (captioning.config) or one another."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work, with its key named: `key message (got value)`."""
