"""Checks of the `logger` group (conf/logger/*.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig

from captioning.checks import require


def validate_logger(cfg: DictConfig) -> None:
    w = cfg.logger.wandb
    if w is not None:
        require(
            w.mode in (None, "online", "offline", "disabled"),
            "logger.wandb.mode",
            "must be online, offline, disabled or null",
            w.mode,
        )
        require(bool(w.project), "logger.wandb.project", "must be set", w.project)
