"""Which training a config asks for: `task=caption` (the default; captioning.training.recipe) or `task=lm` (the
decoder as a language model over text; captioning.training.language_model, which builds on the recipe). The
choice is made here, above both, so that neither task module imports the other's caller (no import circle)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """The chosen task's training run: train, validate, keep last/best checkpoints, (optionally) test. Returns its
    summary dict (`exit_code` 124 after a preemption signal: requeue me)."""
    if OmegaConf.select(cfg, "task.name", default="caption") == "lm":
        from captioning.training.language_model import train_language_model

        return train_language_model(cfg, run_dir)
    from captioning.training.recipe import train as train_captioner

    return train_captioner(cfg, run_dir)
