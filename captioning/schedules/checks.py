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
    targets = cfg.schedule.get("targets", "reference")
    if targets == "reference":
        return
    if OmegaConf.select(cfg, "task.name", default="caption") == "lm":
        raise ConfigError(f"schedule.targets={targets}: the language model trains on reference targets only")
    if targets == "oracle" and OmegaConf.select(cfg, "data.name") != "synthetic":
        raise ConfigError(
            f"schedule.targets=oracle needs the synthetic scenes' oracle (data=synthetic); data "
            f"{OmegaConf.select(cfg, 'data.name')} has none: use schedule.targets=optimal_completion"
        )
