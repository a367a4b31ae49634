"""The fault campaign of tools/fault_campaign.py in a reduced form (4 SIGKILLs, a shorter run, three of its seven
scenarios): every scenario gives its stated outcome, and the comparison it relies on does see a difference."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# The suite runs the scenarios the unit tests (test_reliability.py) do not cover as whole runs; the tool's full
# campaign (README, Reliability) runs all seven.
REDUCED = ("sigkill_random", "truncated_last", "nonfinite_diverging")


def load_tool():
    if "fault_campaign" in sys.modules:
        return sys.modules["fault_campaign"]
    spec = importlib.util.spec_from_file_location("fault_campaign", REPO / "tools" / "fault_campaign.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_campaign"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    tool = load_tool()
    work = tmp_path_factory.mktemp("fault_campaign")
    report = tool.run_campaign(kills=4, steps=40, seed=0, work_dir=work, log=lambda line: None, wandb_init_timeout=5,
                               scenarios=list(REDUCED))
    return tool, report, work


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_scenario_of_the_reduced_campaign_passes(campaign):
    tool, report, work = campaign
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
    tool, _, work = campaign
    reference = work / "reference"
    assert tool.compare_runs(reference, reference) == []

    other = tool.Campaign(work, tool.RunPlan.for_steps(40), kills=1, seed=0, timeout=600,
                          log=lambda line: None).straight_run("seed1", ["seed=1"])
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
    tool = load_tool()
    for kwargs, message in (({"kills": 0}, "--kills"), ({"steps": 5}, "--steps"),
                            ({"scenarios": ["sigkill"]}, "unknown scenario"),
                            ({"extra_overrides": ["trainer.max_steps"]}, "not a Hydra override"),
                            ({"extra_overrides": ["hydra.run.dir=x"]}, "chooses the run folders")):
        with pytest.raises(tool.CampaignError, match=message):
            tool.run_campaign(work_dir=tmp_path, log=lambda line: None, **kwargs)
    assert tool.main(["--kills", "0"]) == 2
    assert tool.merge_overrides(["a=1", "b=2"], ["+a=3"]) == ["b=2", "+a=3"]
