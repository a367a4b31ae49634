"""`captioning-train` (= `python -m captioning.train`): Hydra around the plain `train(cfg, run_dir)` of
captioning.training.recipe (which runs the configured task). Nothing imports this module."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from captioning.cli import exit_on_user_error
from captioning.config import config_dir, register_resolvers
from captioning.training.recipe import train

register_resolvers()  # ${run_folder:} in hydra.run.dir (also where a launcher unpickles _hydra_main)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig

    return _train_task(cfg, HydraConfig.get().runtime.output_dir)


@exit_on_user_error
def _train_task(cfg: DictConfig, run_dir: str) -> int:
    return train(cfg, run_dir).get("exit_code", 0)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
