"""JSON-lines and W&B logging, offline."""
from __future__ import annotations

import json
import logging
import math

import pytest

from captioning.loggers.jsonl import JsonlLogger, read_jsonl
from captioning.loggers.wandb_logger import resolve_mode


def test_jsonl_records_have_step_and_survive_nan(tmp_path):
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    logger.log_metrics({"train/loss": 1.5, "val/CIDEr": math.nan}, step=3)
    logger.log_config({"seed": 1})
    logger.finish()
    again = JsonlLogger(tmp_path / "metrics.jsonl")  # a resumed run appends
    again.log_metrics({"train/loss": 1.0}, step=4)
    again.finish()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records == [{"step": 3, "train/loss": 1.5, "val/CIDEr": "nan"}, {"step": 4, "train/loss": 1.0}]
    assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 1}


def test_wandb_mode_without_key_or_mode_falls_back_to_offline(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    with caplog.at_level(logging.WARNING):
        assert resolve_mode(None) == "offline"
    assert "no API key" in caplog.text
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(None) == "online"
    assert resolve_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match="logger.wandb.mode"):
        resolve_mode("sometimes")


def test_wandb_logger_offline_writes_a_run_and_resumes_the_same_id(monkeypatch, tmp_path):
    from captioning.loggers.wandb_logger import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(tmp_path, project="captioning-test", group="sweep-1", name="baseline-seed0",
                         tags=["schedule:teacher_forcing"], config={"seed": 0})
    logger.log_metrics({"train/loss": 2.0, "train/teacher_forcing_prob": 1.0}, step=1)
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    logger.log_table("val/samples", ["image", "generated", "references"], [[image, "a cat", "a cat | a dog"]], step=1)
    run_id = logger.run.id
    logger.finish()
    assert (tmp_path / "wandb_run_id.txt").read_text() == run_id
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    resumed = WandbLogger(tmp_path, project="captioning-test", mode="offline")
    assert resumed.run.id == run_id
    resumed.finish()


@pytest.mark.java
def test_training_run_with_wandb_offline(tiny_data_root, tmp_path, monkeypatch):
    import shutil

    if shutil.which("java") is None:
        pytest.skip("no Java runtime on PATH: validation needs pycocoevalcap's tokenizer")
    from captioning.training.loop import train
    from conftest import compose, tiny_overrides

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose(tiny_overrides(tiny_data_root) + ["logger=wandb", "trainer.max_steps=3",
                                                    "trainer.evaluate_after_training=false"])
    train(cfg, tmp_path)  # no key, no mode: offline with a warning, not a crash
    run_id = (tmp_path / "wandb_run_id.txt").read_text()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert read_jsonl(tmp_path / "metrics.jsonl")  # the JSON-lines file is written too
