"""The config orchestrator: where the Hydra configs live, the resolvers they use, and `validate_train_config`,
which runs every group's checks before any heavy work. The checks themselves sit beside the code that owns each
group (data/checks.py, models/checks.py, schedules/checks.py, decoding/checks.py, training/checks.py,
loggers/checks.py); they raise captioning.errors.ConfigError, with the key named. Only the entry points and
training/ import this module (tests/test_architecture.py)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from captioning.checks import positive_int, require
from captioning.data.checks import validate_data
from captioning.decoding.checks import decode_kwargs, validate_decode
from captioning.errors import ConfigError
from captioning.loggers.checks import validate_logger
from captioning.models.checks import validate_model
from captioning.schedules.checks import validate_schedule
from captioning.training.checks import (
    check_task_matches_data,
    validate_language_model,
    validate_objective,
    validate_optim,
    validate_trainer,
)

__all__ = [
    "ConfigError",
    "check_task_matches_data",
    "config_dir",
    "decode_kwargs",
    "register_resolvers",
    "validate_decode",
    "validate_train_config",
]

# Where the Hydra configs live: inside the installed package (wheel), else the checkout's conf/.
_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> str:
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"captioning: Hydra configs not found next to {_PACKAGE_DIR} (reinstall the package)")


def register_resolvers() -> None:
    """`${run_folder:}` in hydra.run.dir: DATE/TIME, or slurm-JOBID in a plain SLURM batch job (a requeued job
    finds its checkpoints again; runtime.cluster.run_folder_name). Called by the entry points (captioning.train)
    and by whatever composes conf/config.yaml with its hydra node (the tests' compose helper); importing this
    module registers nothing. Registering again keeps the first registration (one timestamp per process, as Hydra's
    ${now:} gives)."""
    import time

    from captioning.runtime.cluster import run_folder_name

    started = time.strftime("%Y-%m-%d/%H-%M-%S")
    if not OmegaConf.has_resolver("run_folder"):
        OmegaConf.register_new_resolver("run_folder", lambda: run_folder_name(now=started))


def validate_train_config(cfg: DictConfig) -> None:
    """All checks for a training run; cheap (no data, no model)."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"missing mandatory config value(s): {sorted(missing)}")
    positive_int(cfg, "seed", minimum=0)
    task = OmegaConf.select(cfg, "task.name", default="caption")
    require(task in ("caption", "lm"), "task", "must be caption or lm", task)
    if task == "lm":
        validate_language_model(cfg)  # its data and objective
    else:
        validate_data(cfg)
        validate_objective(cfg)
    validate_model(cfg)
    validate_schedule(cfg)
    validate_decode(cfg)
    validate_optim(cfg)
    validate_trainer(cfg)
    validate_logger(cfg)
