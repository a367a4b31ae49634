"""The training entry: `train(cfg, run_dir)` runs the task the config names (`task.name`), each a task of the
training engine (captioning.training.engine):

    caption  captioning.training.caption_task   images and captions -> a captioner (the default)
    lm       captioning.training.language_model  a text -> the decoder as a language model

`captioning-train` (captioning/train.py) and the tests call it with a composed config.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from captioning.training import caption_task, language_model


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train the configured task; its summary dict (`exit_code` 124 after a preemption signal: requeue me)."""
    if OmegaConf.select(cfg, "task.name", default="caption") == "lm":
        return language_model.train(cfg, run_dir)
    return caption_task.train(cfg, run_dir)  # its config check names a task.name that is neither
