"""tools/exposure_study.py: its statistics on hand-made numbers, and the whole command on a tiny configuration."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import tiny_overrides

spec = importlib.util.spec_from_file_location(
    "exposure_study", Path(__file__).parent.parent / "tools" / "exposure_study.py"
)
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def test_holm_adjusts_step_down_and_stays_monotone():
    adjusted = study.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1, running maximum
    assert adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})
    assert study.holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}


def test_paired_difference_pairs_by_seed():
    row = {0: 0.5, 1: 0.7, 2: 0.6, 7: 9.0}  # seed 7 has no baseline: left out
    baseline = {0: 0.4, 1: 0.5, 2: 0.5, 3: 0.1}
    cell = study.paired_difference(row, baseline)
    diffs = [0.1, 0.2, 0.1]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.302653 * sd / math.sqrt(3)  # t(0.975, 2)
    assert cell["seeds"] == [0, 1, 2] and cell["n"] == 3
    assert (cell["mean"], cell["low"], cell["high"]) == pytest.approx((mean, mean - half, mean + half), abs=1e-6)
    # p-value: the interval just excludes 0 at 95% iff p < 0.05
    assert (cell["p"] < 0.05) == (cell["low"] > 0)
    assert study.paired_difference({0: 1.0}, {0: 0.0}) is None
    constant = study.t_interval([0.25, 0.25, 0.25])
    assert constant["low"] == constant["high"] == 0.25 and constant["p"] == 0.0


def test_excess_slope_of_hand_built_curves():
    per_position = {
        "position": [1, 2, 3, 4, 5],
        "excess": [0.0, 0.1, 0.2, None, 0.4],
        "free_scored": [10, 10, 10, 0, 10],
    }
    assert study.excess_slope(per_position) == pytest.approx(0.1)  # excess = 0.1 (t - 1) where scored
    flat = {"position": [1, 2, 3], "excess": [0.05, 0.05, 0.05], "free_scored": [3, 1, 2]}
    assert study.excess_slope(flat) == pytest.approx(0.0)
    # the weights: a heavy late point with a large excess pulls the slope up
    weighted = {"position": [1, 2, 3], "excess": [0.0, 0.0, 0.3], "free_scored": [1, 1, 100]}
    unweighted = {"position": [1, 2, 3], "excess": [0.0, 0.0, 0.3], "free_scored": [1, 1, 1]}
    assert study.excess_slope(unweighted) == pytest.approx(0.15)
    assert study.excess_slope(weighted) != pytest.approx(study.excess_slope(unweighted))
    assert math.isnan(study.excess_slope({"position": [4], "excess": [0.2], "free_scored": [5]}))


def test_ten_seeds_where_an_interval_lies_within_its_width_of_zero():
    assert study.needs_more_seeds({"mean": 0.01, "low": -0.02, "high": 0.04})
    assert study.needs_more_seeds({"mean": 0.05, "low": 0.01, "high": 0.09})  # width 0.08 >= 0.05
    assert not study.needs_more_seeds({"mean": 0.10, "low": 0.08, "high": 0.12})
    assert not study.needs_more_seeds(None)
    near, far = {"mean": 0.01, "low": -0.02, "high": 0.04}, {"mean": 0.5, "low": 0.45, "high": 0.55}
    table = {
        "baseline": {"scene/correct": {}, "AccErr": {}},
        "a": {"scene/correct": {"diff": far}, "AccErr": {"diff": near}},  # one primary metric near 0 is enough
        "b": {"scene/correct": {"diff": far}, "AccErr": {"diff": far}},
        "c": {"scene/correct": {"diff": far}, "AccErr": {"diff": far}},
    }
    assert study.rows_needing_seeds(table, ["baseline", "a", "b", "c"]) == ["a"]
    contrasts = {"c - b": {"scene/correct": near, "AccErr": far}}  # a contrast near 0: both of its rows
    assert study.rows_needing_seeds(table, ["baseline", "a", "b", "c"], contrasts) == ["a", "b", "c"]


def test_table_holm_families_are_the_primary_and_the_secondary_metrics():
    values = {row: {name: {} for name, *_ in study.METRICS} for row in ("baseline", "a", "b")}
    for seed in range(4):
        for row, shift in (("baseline", 0.0), ("a", 0.1), ("b", 0.0)):
            for name, *_ in study.METRICS:
                values[row][name][seed] = 0.5 + shift + 0.01 * ((seed * 7 + len(row)) % 3)
    table = study.build_table(values)
    primary = [(r, n) for r in ("a", "b") for n, _, _, p in study.METRICS if p]
    raw = {f"{r}\t{n}": table[r][n]["diff"]["p"] for r, n in primary}
    assert {f"{r}\t{n}": table[r][n]["diff"]["p_holm"] for r, n in primary} == pytest.approx(study.holm(raw))
    assert "diff" not in table["baseline"]["scene/correct"]
    assert table["a"]["scene/correct"]["own"]["n"] == 4


def test_contrasts_pair_each_target_with_the_papers_targets_by_seed():
    rows = ("baseline", "ss_paper", "ss_optimal_completion", "ss_oracle_repair")  # ss_oracle_mask did not run
    values = {row: {name: {} for name, *_ in study.METRICS} for row in rows}
    for seed in range(5):
        for row, shift in zip(rows, (0.9, 0.5, 0.8, 0.5)):
            for name, *_ in study.METRICS:
                values[row][name][seed] = shift + 0.01 * ((seed * 3 + len(row)) % 4)
    contrasts = study.build_contrasts(values)
    assert set(contrasts) == {"ss_optimal_completion - ss_paper", "ss_oracle_repair - ss_paper"}
    primary = [name for name, _, _, p in study.METRICS if p]
    oc = contrasts["ss_optimal_completion - ss_paper"]["scene/correct"]
    expected = study.paired_difference(
        values["ss_optimal_completion"]["scene/correct"], values["ss_paper"]["scene/correct"]
    )
    assert set(contrasts["ss_oracle_repair - ss_paper"]) == set(primary)
    assert oc["mean"] == pytest.approx(expected["mean"]) and oc["seeds"] == [0, 1, 2, 3, 4]
    raw = {f"{k}\t{n}": cells[n]["p"] for k, cells in contrasts.items() for n in primary}
    adjusted = {f"{k}\t{n}": cells[n]["p_holm"] for k, cells in contrasts.items() for n in primary}
    assert adjusted == pytest.approx(study.holm(raw))  # one family: 2 contrasts x 2 primary metrics
    lines = study.contrast_rows(contrasts)
    assert lines[0] == "| contrast (same schedule) | " + " | ".join(primary) + " |"
    assert lines[2].startswith(f"| ss_optimal_completion - ss_paper | **{oc['mean']:+.3f} [")  # bold: p < 0.05


def test_the_overview_puts_one_metric_of_several_tables_side_by_side():
    def study_record(shifts: dict, seeds: dict) -> dict:
        values = {row: {name: {} for name, *_ in study.METRICS} for row in shifts}
        for row, shift in shifts.items():
            for seed in range(seeds.get(row, 4)):
                for name, *_ in study.METRICS:
                    values[row][name][seed] = shift + 0.01 * ((seed * 5 + len(row)) % 3)
        return {"table": study.build_table(values), "contrasts": study.build_contrasts(values)}

    first = study_record({"baseline": 0.9, "ss_paper": 0.5, "ss_optimal_completion": 0.8}, {})
    second = study_record({"baseline": 0.4, "ss_paper": 0.3, "ocd": 0.1}, {"ocd": 3})  # another table's rows
    lines = study.overview_rows({"A": first, "B": second}, "scene/correct")
    assert lines[0] == "| scene/correct | A | B |"
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    assert list(rows) == [
        "baseline",
        "ss_paper - baseline",
        "ss_optimal_completion - baseline",
        "ocd - baseline",
        "ss_optimal_completion - ss_paper",
    ]
    own = first["table"]["baseline"]["scene/correct"]["own"]
    assert rows["baseline"][0] == f"{own['mean']:.3f} [{own['low']:.3f}, {own['high']:.3f}]"
    paper = second["table"]["ss_paper"]["scene/correct"]["diff"]
    assert rows["ss_paper - baseline"][1].startswith(f"**{paper['mean']:+.3f} [")
    assert rows["ocd - baseline"][0] == "-" and rows["ocd - baseline"][1].endswith(", 3 seeds |")
    assert rows["ss_optimal_completion - baseline"][1] == "- |"  # B has no such row
    oc = first["contrasts"]["ss_optimal_completion - ss_paper"]["scene/correct"]
    assert rows["ss_optimal_completion - ss_paper"][0].startswith(f"**{oc['mean']:+.3f} [")


@pytest.mark.slow
def test_the_study_command_on_a_tiny_configuration(tiny_data_root, tmp_path, capsys, monkeypatch):
    """2 rows x 2 seeds x 4 steps, then re-read without training: the finished runs are reused. The runs read the
    scenes' true labels (no CNN)."""
    monkeypatch.setenv("CAPTIONING_CACHE", str(tmp_path / "cache"))
    overrides = [
        o
        for o in tiny_overrides(tiny_data_root)
        if not o.startswith(("trainer.max_steps=", "trainer.val_every_n_steps=", "model.encoder."))
    ]
    arguments = [
        "table",
        "--untuned",
        "--data",
        "synthetic",
        "--input",
        "true_labels",
        "--rows",
        "baseline",
        "ss_paper",
        "--seeds",
        "2",
        "--max-seeds",
        "2",
        "--steps",
        "4",
        "--validations",
        "1",
        "--jobs",
        "1",
        "--sweep-dir",
        str(tmp_path / "sweep"),
        "--out-dir",
        str(tmp_path / "out"),
        "--",
        *overrides,
    ]
    assert study.main(arguments) == 0
    record = json.loads((tmp_path / "out" / "exposure_study_synthetic_true_labels.json").read_text())
    table = record["table"]
    assert set(table) == {"baseline", "ss_paper"}
    assert sorted(table["baseline"]["scene/correct"]["values"]) == ["0", "1"]
    assert table["ss_paper"]["AccErr"]["diff"]["seeds"] == [0, 1]
    assert {"command", "commit", "dirty", "machine", "date"} <= set(record) and record["training_seconds"] > 0
    run = json.loads((tmp_path / "sweep" / "ss_paper" / "seed_0" / "study_run.json").read_text())
    assert run["returncode"] == 0 and "experiment=scheduled_sampling" in run["command"]
    assert run["machine"] == study.machine() and record["run_machines"] == {study.machine(): 4}
    assert len(record["plots"]) == 2 and all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in record["plots"])
    markdown = (tmp_path / "out" / "exposure_study_synthetic_true_labels.md").read_text()
    assert "Primary metrics: scene/correct, AccErr" in markdown and "| ss_paper | config | 2 |" in markdown
    assert "Earlier, the same study's runs so far" not in markdown and "machine" not in markdown.split("Protocol")[1]
    config = json.loads((tmp_path / "sweep" / "ss_paper" / "seed_1" / "config.json").read_text())
    assert config["experiment_name"] == "ss_paper" and config["seed"] == 1
    stamp = (tmp_path / "sweep" / "baseline" / "seed_0" / "test_metrics.json").stat().st_mtime
    capsys.readouterr()
    assert study.main(arguments) == 0  # resumes: nothing to train
    assert "started" not in capsys.readouterr().out
    again = json.loads((tmp_path / "out" / "exposure_study_synthetic_true_labels.json").read_text())
    assert [h["date"] for h in again["history"]] == [record["date"]] and record["history"] == []
    markdown = (tmp_path / "out" / "exposure_study_synthetic_true_labels.md").read_text()
    assert f"Earlier, the same study's runs so far: `{record['command']}`" in markdown
    assert (tmp_path / "sweep" / "baseline" / "seed_0" / "test_metrics.json").stat().st_mtime == stamp
    record = again
    assert study.main([*arguments[:1], "--table-only", *arguments[1:]]) == 0  # the table re-read from the runs
    rebuilt = json.loads((tmp_path / "out" / "exposure_study_synthetic_true_labels.json").read_text())
    assert rebuilt["table"] == record["table"] and "rebuilt_by" in rebuilt and "rebuilt_by" not in record
    for key in ("date", "seconds", "command", "commit"):  # the provenance of the runs' table stays
        assert rebuilt[key] == record[key]
    with pytest.raises(SystemExit):  # no tuning file and not --untuned: a clear stop
        study.main([a for a in arguments if a != "--untuned"])


def test_tuning_reads_the_best_validation_and_picks_the_learning_rate(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"step": 2, "train/loss": 1.0},
        {"step": 5, "val/scene/correct": 0.4},
        {"step": 10, "val/scene/correct": 0.7},
        {"step": 15, "val/scene/correct": 0.7},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert study.best_validation(run) == (0.7, 10)  # the first of equal bests, as the checkpoint rule keeps it
    assert study.tuning_finished(run, 15) and not study.tuning_finished(run, 20)
    assert study.best_validation(tmp_path / "missing") is None
    grid = {
        "0.003": {"val/scene/correct": 0.8, "step": 10},
        "0.006": {"val/scene/correct": 0.9, "step": 10},
        "0.012": None,
    }
    assert study.choose_lr(grid) == 0.006
    assert study.choose_lr({"0.003": {"val/scene/correct": 0.9}, "0.006": {"val/scene/correct": 0.9}}) == 0.003
    assert study.choose_lr({"0.003": None}) is None


def test_a_table_counts_its_runs_per_machine_and_says_when_they_differ(tmp_path):
    """A table resumed on another machine mixes float results (AVX2 against AVX-512): the record counts the runs per
    machine from each run's RUN_RECORD, and the table says so; runs from before the per-run record are counted."""
    machines = {("baseline", 0): "CPU A, 2 cores, AVX512", ("baseline", 1): "CPU B, 2 cores, AVX2"}
    machines |= {("ss_paper", 0): "CPU A, 2 cores, AVX512", ("ss_paper", 1): None}
    for (row, seed), name in machines.items():
        out = study.st.run_dir(tmp_path, row, seed)
        out.mkdir(parents=True)
        (out / study.RUN_RECORD).write_text(json.dumps({"seconds": 1.0} | ({"machine": name} if name else {})))
    counts = study.run_machines(tmp_path, ["baseline", "ss_paper"], range(3))  # seed 2: no run, not counted
    assert counts == {"CPU A, 2 cores, AVX512": 2, "CPU B, 2 cores, AVX2": 1, study.NOT_RECORDED: 1}
    line = study.machine_lines(counts)[0]
    assert line.startswith("**The runs ran on more than one machine**") and "1 on CPU B, 2 cores, AVX2" in line
    one = study.run_machines(tmp_path, ["ss_paper"], range(2))
    assert study.machine_lines(one)[0] == (
        "1 of the runs predate the study's record of each run's machine; the other 1 ran on CPU A, 2 cores, AVX512."
    )
    assert study.machine_lines({"CPU A, 2 cores, AVX512": 4}) == []


def test_a_table_with_other_settings_than_its_tuning_is_refused(tmp_path, capsys):
    tuning = {
        "rows": {"baseline": {"lr": 0.003, "grid": {}}},
        "data": "synthetic_long",
        "input": "true_labels",
        "steps": 300,
        "validations": 2,
        "overrides": [],
    }
    (tmp_path / "exposure_study_lr_synthetic_long_true_labels.json").write_text(json.dumps(tuning))
    arguments = ["table", "--data", "synthetic_long", "--input", "true_labels", "--rows", "baseline"]
    arguments += ["--out-dir", str(tmp_path), "--sweep-dir", str(tmp_path / "sweep"), "--validations", "2"]
    with pytest.raises(SystemExit) as stop:
        study.main([*arguments, "--steps", "1000", "--", "model.decoder.attention=false"])
    message = capsys.readouterr().err
    assert stop.value.code == 2 and "--steps 1000 (tuned with 300)" in message
    assert "overrides after -- ['model.decoder.attention=false'] (tuned with [])" in message
    with pytest.raises(SystemExit) as stop:  # nor are rows tuned with other settings added to the file
        study.main(["tune", *arguments[1:], "--steps", "1000"])
    assert stop.value.code == 2 and "--steps 1000 (tuned with 300)" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()  # nothing trained


def test_tuning_one_row_again_keeps_the_others_and_the_earlier_command(tmp_path, monkeypatch):
    """`tune --rows ss_oracle_repair` after a full tuning: that row's choice is replaced, the others stay, and the
    earlier command (its cost and rows) moves to the record's history. Training is replaced by fixed val scores."""
    scores = {"baseline": {"0.003": 0.5, "0.006": 0.6}, "ss_oracle_repair": {"0.003": 0.4, "0.006": 0.3}}

    def fake_runs(jobs, args):
        for row, _, out, _ in jobs:
            out.mkdir(parents=True, exist_ok=True)
            lr = out.name.removeprefix("lr_")
            line = {"step": args.steps, "val/scene/correct": scores[row][lr]}
            (out / "metrics.jsonl").write_text(json.dumps(line) + "\n")
            (out / study.RUN_RECORD).write_text(json.dumps({"seconds": 10.0}))
        return []

    monkeypatch.setattr(study, "run_jobs", fake_runs)
    common = ["--data", "synthetic", "--steps", "4", "--lrs", "0.003", "0.006"]
    common += ["--sweep-dir", str(tmp_path / "sweep"), "--out-dir", str(tmp_path)]
    assert study.main(["tune", "--rows", "baseline", "ss_oracle_repair", *common]) == 0
    path = tmp_path / "exposure_study_lr_synthetic_encoder.json"
    first = json.loads(path.read_text())
    assert {r: c["lr"] for r, c in first["rows"].items()} == {"baseline": 0.006, "ss_oracle_repair": 0.003}
    assert first["training_seconds"] == 40.0 and "history" not in first
    with pytest.raises(SystemExit, match=r"ss_oracle_repair: already tuned .* delete its folder .*ss_oracle_repair"):
        study.main(["tune", "--rows", "ss_oracle_repair", *common])  # its finished runs would only be read again
    assert json.loads(path.read_text()) == first
    scores["ss_oracle_repair"] = {"0.003": 0.2, "0.006": 0.8}  # the row's targets changed: tuned again
    for run in (tmp_path / "sweep" / "tune" / "ss_oracle_repair").iterdir():
        (run / "metrics.jsonl").unlink()
    assert study.main(["tune", "--rows", "ss_oracle_repair", *common]) == 0
    again = json.loads(path.read_text())
    assert {r: c["lr"] for r, c in again["rows"].items()} == {"baseline": 0.006, "ss_oracle_repair": 0.006}
    assert again["training_seconds"] == 20.0 and again["tuned_rows"] == ["ss_oracle_repair"]
    assert again["history"] == [
        {key: first[key] for key in ("command", "commit", "dirty", "machine", "date", "training_seconds", "tuned_rows")}
    ]
