"""Every COCO command of the README and the docs pages, composed as Hydra would: the COCO preset's lengths, and a
schedule that really decays (epsilon at the last step below 0.9)."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
from conftest import compose

from captioning.schedules import build_schedule_from_config

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COCO_TRAIN_IMAGES = 113_287  # Karpathy train + restval


def readme_coco_commands() -> list[str]:
    """The COCO training commands of README.md and docs/*.md."""
    text = "\n".join(page.read_text() for page in PAGES).replace("\\\n", " ")
    lines = [
        line.strip()
        for line in text.splitlines()
        if re.search(r"(captioning-train|captioning\.train)\b", line) and "coco" in line
    ]
    return list(dict.fromkeys(lines))  # a command shown on two pages is composed once


def runs_of(command: str) -> list[list[str]]:
    """The override lists of the runs one command starts (a -m sweep expands a,b,c); launcher keys dropped."""
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if w.endswith(("captioning-train", "captioning.train"))) + 1
    overrides = [w for w in words[start:] if "=" in w and not w.startswith(("hydra", "-"))]
    choices = [[f"{w.split('=', 1)[0]}={v}" for v in w.split("=", 1)[1].split(",")] for w in overrides]
    return [list(run) for run in itertools.product(*choices)]


def test_the_readme_has_coco_commands_and_all_use_the_preset():
    commands = readme_coco_commands()
    assert len(commands) >= 4
    assert all("preset=coco" in c for c in commands), [c for c in commands if "preset=coco" not in c]


@pytest.mark.parametrize("command", readme_coco_commands())
def test_each_readme_coco_command_trains_at_coco_length_with_a_decaying_schedule(command, tmp_path):
    for overrides in runs_of(command):
        overrides = [o if not o.startswith("data.features=") else f"data.features={tmp_path}" for o in overrides]
        cfg = compose(overrides)
        assert cfg.data.name == "coco" and cfg.trainer.max_epochs == 30 and cfg.trainer.max_steps is None
        assert cfg.trainer.val_max_images and cfg.trainer.checkpoint_every_minutes
        steps = COCO_TRAIN_IMAGES // cfg.data.batch_size * cfg.trainer.max_epochs
        schedule = build_schedule_from_config(dict(cfg.schedule))
        last = schedule.teacher_forcing_prob(steps - 1, cfg.trainer.max_epochs - 1)
        if schedule.name == "teacher_forcing":
            assert last == 1.0
        else:
            assert last < 0.9, (overrides, schedule.name, last)


def test_a_schedule_that_ends_near_one_warns_at_start_up(tiny_data_root, tmp_path, caplog):
    import logging

    from conftest import tiny_overrides

    from captioning.training.caption_task import setup

    with caplog.at_level(logging.WARNING):
        setup(
            compose(tiny_overrides(tiny_data_root) + ["trainer.scoring=deferred", "experiment=scheduled_sampling"]),
            tmp_path,
        ).close()
    assert any("almost pure teacher forcing" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        setup(
            compose(
                tiny_overrides(tiny_data_root)
                + ["trainer.scoring=deferred", "experiment=scheduled_sampling", "inverse_sigmoid_k=2"]
            ),
            tmp_path,
        ).close()
    assert not any("almost pure teacher forcing" in r.getMessage() for r in caplog.records)
