"""The training run's loggers (JSON lines always, W&B when configured; rank 0 only) and its name, group, tags."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from captioning.loggers.base import MultiLogger, NullLogger
from captioning.loggers.jsonl import JsonlLogger


class TaggedLogger:
    """Every metrics record carries the current `tags()` (the objective's per-step settings, e.g.
    `train/teacher_forcing_prob`), so any chart or table can put a metric next to the schedule position it
    was measured at."""

    def __init__(self, logger, tags):
        self.logger, self.tags = logger, tags

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log_metrics({**self.tags(), **metrics}, step)

    def __getattr__(self, name):
        return getattr(self.logger, name)


def open_run_logger(cfg: DictConfig, run_dir: Path, is_main: bool, config: dict, tags):
    """JSON lines into RUN_DIR/metrics.jsonl (+ W&B) on rank 0; a logger that drops everything elsewhere."""
    if not is_main:
        return NullLogger()
    loggers = [JsonlLogger(run_dir / "metrics.jsonl")]
    if cfg.logger.wandb is not None:
        from captioning.loggers.wandb_logger import WandbLogger

        w = cfg.logger.wandb
        loggers.append(
            WandbLogger(
                run_dir,
                w.project,
                w.entity,
                run_group(cfg),
                w.name or run_name(cfg),
                list(w.tags) + run_tags(cfg),
                w.mode,
                "train",
                config,
                num_table_images=w.num_table_images,
                thumbnail_size=w.thumbnail_size,
            )
        )
    logger = TaggedLogger(MultiLogger(loggers), tags)
    logger.log_config(config)
    return logger


def run_name(cfg: DictConfig) -> str:
    """A readable run name: the job's command-line overrides inside a Hydra job (`experiment=baseline,seed=1`),
    else the experiment (or schedule) and the seed."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().job.override_dirname
        if overrides:
            return overrides
    except ValueError:  # not inside a Hydra job (tests call train() directly)
        pass
    return f"{cfg.experiment_name or cfg.schedule.name}-seed{cfg.seed}"


def run_group(cfg: DictConfig) -> str | None:
    """logger.wandb.group, else, in a multirun, the sweep folder's name: the runs of one sweep share a group."""
    if cfg.logger.wandb.group:
        return cfg.logger.wandb.group
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return Path(hydra_cfg.sweep.dir).as_posix().replace("/", "_").strip("_")
    except ValueError:
        pass
    return None


def run_tags(cfg: DictConfig) -> list[str]:
    return [f"schedule:{cfg.schedule.name}", f"decode:{cfg.decode.strategy}", f"data:{cfg.data.name}"]
