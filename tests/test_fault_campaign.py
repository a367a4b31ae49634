"""The fault campaign of tools/fault_campaign/ in a reduced form (4 SIGKILLs, a shorter run, three of its seven
scenarios): every scenario gives its stated outcome, and the comparison it relies on does see a difference. And its
entry points and the launcher's start-up check of its hook points."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import fault_campaign as tool
from tools.fault_campaign import launcher

REPO = Path(__file__).resolve().parent.parent
# The suite runs the scenarios the unit tests (test_reliability.py) do not cover as whole runs; the tool's full
# campaign (README, Reliability) runs all seven.
REDUCED = ("sigkill_random", "truncated_last", "nonfinite_diverging")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    work = tmp_path_factory.mktemp("fault_campaign")
    report = tool.run_campaign(
        kills=4, steps=40, seed=0, work_dir=work, log=lambda line: None, wandb_init_timeout=5, scenarios=list(REDUCED)
    )
    return report, work


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_scenario_of_the_reduced_campaign_passes(campaign):
    report, work = campaign
    assert [s["name"] for s in report["scenarios"]] == list(REDUCED) and set(REDUCED) <= set(tool.SCENARIOS)
    failed = {s["name"]: s["outcome"] for s in report["scenarios"] if not s["passed"]}
    assert not failed, json.dumps(failed, indent=1) + f"\n(runs and logs in {work})"
    kills = next(s for s in report["scenarios"] if s["name"] == "sigkill_random")["details"]
    assert kills["kills"] == 4 and report["kills"] == 4
    assert kills["last_pt_writes"]["clock"] > 0 and kills["last_pt_writes"]["steps"] > 0
    assert kills["differences_from_straight_run"] == [] and kills["unreadable"] == []
    assert set(report["scenarios"][0]) == {"name", "outcome", "expected", "passed", "seconds", "details"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_comparison_sees_another_seed_and_a_one_ulp_change(campaign, tmp_path):
    _, work = campaign
    reference = work / "reference"
    assert tool.compare_runs(reference, reference) == []

    other = tool.Campaign(
        work, tool.RunPlan.for_steps(40), kills=1, seed=0, timeout=600, log=lambda line: None
    ).straight_run("seed1", ["seed=1"])
    differences = tool.compare_runs(reference, other.run_dir)
    assert any(d.startswith("last.pt:model") for d in differences), differences
    assert any("train/loss records differ" in d for d in differences), differences

    copy = tmp_path / "copy"  # the same run with one weight moved by one ulp
    shutil.copytree(reference, copy)
    checkpoint = torch.load(copy / "checkpoints" / "best.pt", weights_only=True)
    name, weight = next((k, v) for k, v in checkpoint["model"].items() if v.is_floating_point())
    weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(float("inf")))
    torch.save(checkpoint, copy / "checkpoints" / "best.pt")
    differences = tool.compare_runs(reference, copy)
    assert len(differences) == 1 and differences[0].startswith(f"best.pt:model.{name}: values differ"), differences

    lines = (copy / "metrics.jsonl").read_text().splitlines()  # one loss record replayed with another value
    record = json.loads(lines[3])
    record["train/loss"] += 1e-6
    (copy / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(record)]) + "\n")
    assert any("logged twice with different values" in d for d in tool.compare_runs(reference, copy))


def test_bad_arguments_are_named(tmp_path):
    for kwargs, message in (
        ({"kills": 0}, "--kills"),
        ({"steps": 5}, "--steps"),
        ({"scenarios": ["sigkill"]}, "unknown scenario"),
        ({"extra_overrides": ["trainer.max_steps"]}, "not a Hydra override"),
        ({"extra_overrides": ["hydra.run.dir=x"]}, "chooses the run folders"),
    ):
        with pytest.raises(tool.CampaignError, match=message):
            tool.run_campaign(work_dir=tmp_path, log=lambda line: None, **kwargs)
    assert tool.main(["--kills", "0"]) == 2
    assert tool.merge_overrides(["a=1", "b=2"], ["+a=3"]) == ["b=2", "+a=3"]


@pytest.mark.parametrize("how", ["by path", "as a module"])
def test_the_command_line_starts_by_path_and_as_a_module(how, tmp_path):
    """`python tools/fault_campaign` from anywhere, `python -m tools.fault_campaign` from the checkout."""
    command, cwd = (
        ([str(REPO / "tools" / "fault_campaign")], tmp_path)
        if how == "by path"
        else (["-m", "tools.fault_campaign"], REPO)
    )
    result = subprocess.run(
        [sys.executable, *command, "--kills", "0"], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --kills must be at least 1 (got 0)"


def test_every_hook_point_of_the_launcher_exists_and_a_stale_one_is_named(monkeypatch):
    assert launcher.missing_hooks() == []
    stale = (
        ("captioning.training.recipe", "train_step_v0", "x"),
        ("captioning.training.recipe", "TrainingState.nope", "x"),
        ("torch", "save", "x"),
    )
    assert launcher.missing_hooks(stale) == [
        "captioning.training.recipe.train_step_v0",
        "captioning.training.recipe.TrainingState.nope",
    ]
    monkeypatch.setattr(launcher, "HOOKS", launcher.HOOKS + stale[:1])
    with pytest.raises(RuntimeError, match=r"missing hook point\(s\) captioning.training.recipe.train_step_v0: update"):
        tool.run_campaign(kills=1, log=lambda line: None)


def test_the_launcher_exits_at_start_up_naming_a_missing_hook_point(tmp_path):
    """A copy of launcher.py whose table names a function the library does not have: one line, its own exit code,
    before any training."""
    source = (REPO / "tools" / "fault_campaign" / "launcher.py").read_text()
    entry = '("captioning.training.caption_task", "CaptionTask.step", '
    assert source.count(entry) == 1
    copy = tmp_path / "launcher.py"
    copy.write_text(source.replace(entry, '("captioning.training.caption_task", "CaptionTask.step_renamed", '))
    result = subprocess.run(
        [sys.executable, str(copy), f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == launcher.HOOK_MISSING_EXIT_CODE, result.stderr
    assert result.stderr.strip().splitlines() == [
        "fault launcher: missing hook point(s) captioning.training.caption_task.CaptionTask.step_renamed: update HOOKS "
        "in tools/fault_campaign/launcher.py"
    ]
    assert not (tmp_path / "run").exists()
