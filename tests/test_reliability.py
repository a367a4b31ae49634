"""Runs that survive a cluster: checkpoints on their own clock, one generation kept back, non-finite steps
skipped or stopped, an unwritable or full run folder found early (CPU, tiny data, no Java: deferred scoring)."""

from __future__ import annotations

import errno
import json
import logging
import math

import pytest
import torch
from conftest import compose, preempt_run_during_step, tiny_overrides

from captioning.evaluation import validation
from captioning.runtime.checkpoint import CheckpointWriteError, load_checkpoint, previous_path
from captioning.training import engine
from captioning.training.engine import NonFiniteLossError
from captioning.training.objectives import CrossEntropyObjective
from captioning.training.recipe import train

DEFERRED = ["trainer.scoring=deferred", "trainer.evaluate_after_training=false", "trainer.log_every_n_steps=1"]


def overrides(root, *more):
    return tiny_overrides(root) + DEFERRED + list(more)


def params(path):
    return torch.cat([v.flatten().float() for v in load_checkpoint(path)["model"].values()])


def test_checkpoints_by_steps_keep_one_generation_back(tiny_data_root, tmp_path):
    train(
        compose(
            overrides(
                tiny_data_root,
                "trainer.max_steps=5",
                "trainer.val_every_n_steps=100",
                "trainer.checkpoint_every_n_steps=2",
            )
        ),
        tmp_path,
    )
    last = tmp_path / "checkpoints" / "last.pt"
    # validation at the last step (5) saves last.pt; the step cadence saved at 2 and 4 before it
    assert load_checkpoint(last)["step"] == 5 and load_checkpoint(previous_path(last))["step"] == 4


def test_a_truncated_last_checkpoint_resumes_from_the_previous_one(tiny_data_root, tmp_path, caplog, monkeypatch):
    cfg = compose(overrides(tiny_data_root, "trainer.max_steps=6", "trainer.val_every_n_steps=3"))
    straight = tmp_path / "straight"
    train(cfg, straight)
    run = tmp_path / "run"
    assert preempt_run_during_step(monkeypatch, cfg, run, 4)["steps"] == 4
    last = run / "checkpoints" / "last.pt"  # step 4 (the preemption save); last.prev.pt is step 3's
    assert load_checkpoint(previous_path(last))["step"] == 3
    last.write_bytes(last.read_bytes()[:1000])  # a failing file system
    with caplog.at_level(logging.WARNING):
        summary = train(cfg, run)
    assert any("last.pt is not usable" in r.getMessage() for r in caplog.records)
    assert summary["steps"] == 6
    assert torch.equal(params(run / "checkpoints" / "last.pt"), params(straight / "checkpoints" / "last.pt"))
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the records after step 3 were written again, once


def test_no_usable_checkpoint_says_what_to_do(tiny_data_root, tmp_path):
    cfg = compose(overrides(tiny_data_root, "trainer.max_steps=2", "trainer.val_every_n_steps=1"))
    train(cfg, tmp_path)
    for name in ("last.pt", "last.prev.pt", "best.pt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"garbage")
    with pytest.raises(
        ValueError, match=r"no usable checkpoint.*last\.pt.*last\.prev\.pt.*best\.pt.*trainer\.resume=never"
    ):
        train(cfg, tmp_path)


def test_a_diverging_run_stops_with_the_step_and_keeps_only_finite_numbers(tiny_data_root, tmp_path):
    diverging = overrides(
        tiny_data_root,
        "optim.optimizer.lr=1e20",
        "optim.grad_clip_norm=null",
        "trainer.max_steps=40",
        "trainer.val_every_n_steps=5",
        "trainer.max_nonfinite_in_a_row=3",
    )
    cfg = compose(diverging)
    with pytest.raises(NonFiniteLossError, match=r"not finite at step \d+ \(loss (nan|inf)\).*learning rate"):
        train(cfg, tmp_path)
    # Saving at every step: the end-to-end CNN's BatchNorm statistics go bad with the weights (buffers, not
    # parameters); a skipped step keeps them as they were, and no checkpoint is written with a non-finite tensor.
    every_step = tmp_path / "every_step"
    with pytest.raises(NonFiniteLossError, match=r"training diverged.*not finite.*learning rate"):
        train(compose(diverging + ["trainer.checkpoint_every_n_steps=1"]), every_step)
    for path in (every_step / "checkpoints").glob("*.pt"):
        assert torch.isfinite(params(path)).all(), path
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # valid JSON
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for r in records for v in r.values())
    assert any(r.get("train/nonfinite_steps", 0) >= 3 for r in records)
    for path in (tmp_path / "checkpoints").glob("*.pt"):
        assert torch.isfinite(params(path)).all(), path


def test_one_nonfinite_step_is_skipped_and_counted(tiny_data_root, tmp_path, monkeypatch):
    forward = CrossEntropyObjective.forward
    calls = {"n": 0}

    def nan_at_third(self, *args, **kwargs):
        loss, stats = forward(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), stats

    monkeypatch.setattr(CrossEntropyObjective, "forward", nan_at_third)
    weights = {}
    original_step = engine.apply_update_if

    def spy(run, finite):
        before = [p.detach().clone() for p in run.model.parameters()]
        original_step(run, finite)
        weights[run.progress.step + 1] = all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))

    monkeypatch.setattr(engine, "apply_update_if", spy)
    summary = train(compose(overrides(tiny_data_root, "trainer.max_steps=5", "trainer.val_every_n_steps=5")), tmp_path)
    assert summary["steps"] == 5
    assert weights == {1: False, 2: False, 3: True, 4: False, 5: False}  # only step 3 changed nothing
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    counts = [r["train/nonfinite_steps"] for r in records if "train/nonfinite_steps" in r]
    assert counts == [0, 0, 1, 1, 1]
    assert [("train/loss" in r) for r in records if "train/nonfinite_steps" in r] == [True, True, False, True, True]


def test_on_nonfinite_stop_ends_at_the_first(tiny_data_root, tmp_path):
    cfg = compose(
        overrides(
            tiny_data_root,
            "optim.optimizer.lr=1e20",
            "optim.grad_clip_norm=null",
            "trainer.on_nonfinite=stop",
            "trainer.max_steps=40",
            "trainer.val_every_n_steps=40",
        )
    )
    with pytest.raises(NonFiniteLossError, match="trainer.on_nonfinite=stop"):
        train(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train/nonfinite_steps"] == 1


def test_an_unwritable_run_folder_stops_before_training(tiny_data_root, tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the checkpoint folder should be")
    with pytest.raises(CheckpointWriteError, match="not writable"):
        train(compose(overrides(tiny_data_root)), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists() or "train/loss" not in (tmp_path / "metrics.jsonl").read_text()


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tiny_data_root, tmp_path, monkeypatch):
    import captioning.runtime.checkpoint as checkpoint_module

    real_save, saves = torch.save, {"n": 0}

    def save_until_full(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] >= 3:  # the third write (step 4's last.pt) finds the disk full halfway
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_full)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device.*left intact.*last\.pt"):
        train(compose(overrides(tiny_data_root, "trainer.max_steps=6", "trainer.val_every_n_steps=2")), tmp_path)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    folder = tmp_path / "checkpoints"
    assert load_checkpoint(folder / "last.pt")["step"] == 2  # saves 1-2: last.pt and best.pt at step 2
    assert not list(folder.glob(".*.tmp"))  # no partial file left behind


@pytest.mark.java
def test_a_scorer_that_dies_is_restarted_once_then_the_validation_is_recorded_as_failed(
    tiny_data_root, tmp_path, monkeypatch
):
    real_score, calls = validation.score, {"n": 0}

    def flaky(references, predictions, **options):  # the 1st validation: dies once; the 2nd: dies twice
        calls["n"] += 1
        if calls["n"] in (1, 3, 4):
            raise RuntimeError("METEOR process exited unexpectedly (exit code 137)")
        return real_score(references, predictions, **options)

    monkeypatch.setattr(validation, "score", flaky)
    cfg = compose(
        tiny_overrides(tiny_data_root)
        + ["trainer.max_steps=4", "trainer.val_every_n_steps=2", "trainer.evaluate_after_training=false"]
    )
    summary = train(cfg, tmp_path)
    assert summary["steps"] == 4 and summary["best_step"] == 2
    validations = [
        r
        for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
        if "val/reference_likelihood/nll_tf" in r
    ]
    assert "val/CIDEr" in validations[0] and "val/scoring_failed" not in validations[0]  # restarted, scored
    assert validations[1]["val/scoring_failed"] == 1.0 and "val/CIDEr" not in validations[1]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 4


def test_a_run_killed_before_its_first_checkpoint_starts_clean(tiny_data_root, tmp_path):
    """No checkpoint yet: the records the killed attempt logged and its cut-short checkpoint write are dropped."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n{"step": 2, "train/loss": 9.0}\n')
    train(
        compose(
            overrides(
                tiny_data_root, "trainer.max_steps=4", "trainer.val_every_n_steps=4", "trainer.log_every_n_steps=1"
            )
        ),
        tmp_path,
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert all(r["train/loss"] != 9.0 for r in records if "train/loss" in r)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


TIMING = ("train/captions_per_s", "train/images_per_s", "train/tokens_per_s", "train/data_wait_fraction")


def test_a_run_resumed_between_two_records_logs_the_uninterrupted_records(tiny_data_root, tmp_path, monkeypatch):
    """Records every 3 steps, checkpoints every 4: the run killed during step 7 resumes from step 4, in the middle
    of a logging window (steps 4-6). The checkpoint carries the window (and the non-finite count: step 2 is NaN),
    so every record is the uninterrupted run's, apart from the wall-clock rates."""
    from captioning.training.caption_task import CaptionTask

    real_step = CaptionTask.step

    def step(task, run, batch, kill_at=None):
        if run.progress.step + 1 == kill_at:
            raise RuntimeError("killed")
        if run.progress.step + 1 != 2:
            return real_step(task, run, batch)
        forward = task.train_forward

        def nan_forward(*args, **kwargs):
            loss, stats = forward(*args, **kwargs)
            return loss * float("nan"), stats

        task.train_forward = nan_forward
        try:
            return real_step(task, run, batch)
        finally:
            task.train_forward = forward

    cfg = compose(
        overrides(
            tiny_data_root,
            "trainer.max_steps=9",
            "trainer.val_every_n_steps=9",
            "trainer.log_every_n_steps=3",
            "trainer.checkpoint_every_n_steps=4",
        )
    )
    with monkeypatch.context() as patch:
        patch.setattr(CaptionTask, "step", step)
        train(cfg, tmp_path / "straight")
        patch.setattr(CaptionTask, "step", lambda task, run, batch: step(task, run, batch, kill_at=7))
        with pytest.raises(RuntimeError, match="killed"):
            train(cfg, tmp_path / "resumed")
        assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 4
        patch.setattr(CaptionTask, "step", step)
        train(cfg, tmp_path / "resumed")

    def records(run):
        return [
            {k: v for k, v in r.items() if k not in TIMING}
            for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        ]

    straight = records("straight")
    assert [r["step"] for r in straight if "train/lr" in r] == [3, 6, 9]
    assert [r["train/nonfinite_steps"] for r in straight if "train/lr" in r] == [1, 1, 1]
    assert records("resumed") == straight
