"""A small logger protocol: every backend receives the same calls; metric keys are `split/name`."""

from __future__ import annotations

from typing import Any, Protocol


class Logger(Protocol):
    def log_config(self, config: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None: ...
    def finish(self) -> None: ...


class MultiLogger:
    """Fans each call out to several loggers."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log_config(self, config: dict) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        for logger in self.loggers:
            logger.log_table(name, columns, rows, step)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()


class NullLogger:
    """What non-zero ranks get: every call does nothing."""

    def log_config(self, config: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None: ...
    def finish(self) -> None: ...
