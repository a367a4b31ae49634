"""Shared fixtures: a small synthetic COCO-format data set and config composition."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")  # no test ever talks to the network
os.environ.setdefault("WANDB_SILENT", "true")
# pyproject's addopts run the suite in two pytest-xdist workers: one thread each, in the worker and in the processes
# its tests start, shares the two cores without oversubscribing them; a single process (-n 0) uses two.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)

REPO = Path(__file__).resolve().parent.parent
TINY = {"num_train": 60, "num_val": 10, "num_test": 10, "image_size": 32, "seed": 0}


def requires_java():
    return pytest.mark.skipif(
        shutil.which("java") is None, reason="no Java runtime on PATH: pycocoevalcap's tokenizer and METEOR need it"
    )


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    from captioning.scenes.generator import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("synthetic") / "tiny", **TINY)


@pytest.fixture(scope="module")
def checkpoint(tiny_data_root, tmp_path_factory) -> Path:
    """A small captioner that reads images (no cache), trained for 3 steps: its best.pt."""
    from captioning.training.recipe import train

    run_dir = tmp_path_factory.mktemp("run")
    train(
        compose(tiny_overrides(tiny_data_root) + ["trainer.max_steps=3", "trainer.evaluate_after_training=false"]),
        run_dir,
    )
    return run_dir / "checkpoints" / "best.pt"


def tiny_overrides(root: Path) -> list[str]:
    """A run that trains in seconds on CPU: a tiny CNN (ShuffleNet v2 x0.5, 0.3M parameters, 6x faster than the
    default ResNet-18 here) trained end to end from the JPEGs (no scene-label pretraining: tests of it add it
    back), tiny decoder without attention (the averaged feature has no parts), tiny data, and no METEOR (its JVM
    takes seconds to start in every process that scores). Tests about the CNN itself use the default encoder, tests of
    the METEOR figures ask for it."""
    return [
        f"data.root={root}",
        *(f"data.synthetic.{k}={v}" for k, v in TINY.items()),
        "data.image_size=32",
        "model.encoder.name=shufflenet_v2_x0_5",
        "model.encoder.pool=avg",
        "model.encoder.pretrain=null",
        "model.decoder.attention=false",
        "data.batch_size=6",
        "data.eval_batch_size=10",
        "data.num_workers=0",
        "data.word_count_threshold=2",
        "model.decoder.embed_dim=32",
        "model.decoder.hidden_dim=32",
        "trainer.max_steps=6",
        "trainer.val_every_n_steps=3",
        "trainer.log_every_n_steps=2",
        "trainer.progress_bar=false",
        "trainer.device=cpu",
        "trainer.metrics=[BLEU,ROUGE-L,CIDEr]",
        "decode.beam_size=2",
    ]


def compose(overrides: list[str] = (), config_name: str = "config", return_hydra_config: bool = False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from captioning.config import config_dir, register_resolvers

    register_resolvers()  # ${run_folder:} in hydra.run.dir, as the entry point registers it
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def signal_during_step(monkeypatch, step: int, signum: int = signal.SIGTERM) -> None:
    """The process receives `signum` during optimizer step `step` (1-based), as SLURM would send it: the run
    finishes that step, then saves and stops. Undone by monkeypatch at the end of the test."""
    from captioning.training.caption_task import CaptionTask

    original = CaptionTask.step

    def step_with_signal(task, run, batch):
        if run.progress.step + 1 == step:
            os.kill(os.getpid(), signum)
        return original(task, run, batch)

    monkeypatch.setattr(CaptionTask, "step", step_with_signal)


def preempt_run_during_step(monkeypatch, cfg, run_dir: Path, step: int) -> dict:
    """Train with a SIGTERM during optimizer step `step`; the patch is undone afterwards."""
    from captioning.training import recipe

    with monkeypatch.context() as patch:
        signal_during_step(patch, step)
        return recipe.train(cfg, run_dir)
