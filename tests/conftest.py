"""Shared fixtures: a small synthetic COCO-format data set and config composition."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")  # no test ever talks to the network
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parent.parent
TINY = {"num_train": 60, "num_val": 10, "num_test": 10, "image_size": 32, "seed": 0}


def requires_java():
    return pytest.mark.skipif(shutil.which("java") is None,
                              reason="no Java runtime on PATH: pycocoevalcap's tokenizer and METEOR need it")


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    from captioning.data.synthetic import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("synthetic") / "tiny", **TINY)


def tiny_overrides(root: Path) -> list[str]:
    """A run that trains in seconds on CPU."""
    return [f"data.root={root}", *(f"data.synthetic.{k}={v}" for k, v in TINY.items()), "data.image_size=32",
            "data.batch_size=6", "data.eval_batch_size=10", "data.num_workers=0", "data.word_count_threshold=2",
            "model.decoder.embed_dim=32", "model.decoder.hidden_dim=32", "trainer.max_steps=6",
            "trainer.val_every_n_steps=3", "trainer.log_every_n_steps=2", "trainer.progress_bar=false",
            "trainer.device=cpu", "decode.beam_size=2"]


def compose(overrides: list[str] = (), config_name: str = "config"):
    from hydra import compose as hydra_compose, initialize_config_dir

    from captioning.config import config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def preempt_run_during_step(monkeypatch, cfg, run_dir: Path, step: int) -> dict:
    """Train with a SIGTERM sent during the forward pass of optimizer step `step`, as SLURM would."""
    import signal

    from captioning.training import objective
    from captioning.training.loop import train

    calls = {"n": 0}
    original = objective.CaptionLoss.forward

    def forward_then_signal(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(objective.CaptionLoss, "forward", forward_then_signal)
    try:
        return train(cfg, run_dir)
    finally:
        monkeypatch.setattr(objective.CaptionLoss, "forward", original)
