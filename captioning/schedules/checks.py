"""Checks of the `schedule` group (conf/schedule/*.yaml): the schedule is built once, its own errors named."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from captioning.errors import ConfigError


def validate_schedule(cfg: DictConfig) -> None:
    from captioning.schedules import build_schedule_from_config

    try:
        build_schedule_from_config(OmegaConf.to_container(cfg.schedule, resolve=True))
    except ValueError as e:
        raise ConfigError(str(e)) from None
