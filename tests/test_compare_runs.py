"""tools/compare_runs.py on a fake Hydra sweep: grouping, mean ± std by hand, plots, missing runs."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "compare_runs.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_runs"] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


cr = _load_tool()

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# row -> (folder per seed, experiment_name, schedule.name, test metrics per seed or None, eps curve)
ROWS = {
    "teacher_forcing": (
        ["0", "1", "2"],
        "MISSING",
        "teacher_forcing",
        [
            {"BLEU-4": 0.30, "METEOR": 0.25, "CIDEr": 0.90},
            {"BLEU-4": 0.32, "METEOR": 0.26, "CIDEr": 1.00},
            {"BLEU-4": 0.34, "METEOR": 0.27, "CIDEr": 1.10},
        ],
        [1.0, 1.0, 1.0, 1.0, 1.0],
    ),
    "ss_inverse_sigmoid_k10": (
        ["3", "4", "5"],
        "ss_inverse_sigmoid_k10",
        "inverse_sigmoid",
        [
            {"BLEU-4": 0.31, "METEOR": 0.26, "CIDEr": 0.80},
            None,  # crashed run: no test_metrics.json
            {"BLEU-4": 0.35, "METEOR": 0.26, "CIDEr": 0.90},
        ],
        [0.9, 0.8, 0.7, 0.6, 0.5],
    ),
    "always_sampling": (  # nested one level, experiment_name explicitly null
        ["part2/0", "part2/1", "part2/10"],
        None,
        "always_sampling",
        [
            {"BLEU-4": 0.20, "METEOR": 0.20, "CIDEr": 0.50},
            {"BLEU-4": 0.21, "METEOR": 0.20, "CIDEr": 0.60},
            {"BLEU-4": 0.25, "METEOR": 0.20, "CIDEr": 0.70},
        ],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ),
}


def _write_run(run_dir, experiment_name, schedule_name, seed, test, eps):
    (run_dir / ".hydra").mkdir(parents=True)
    config = f"schedule:\n  name: {schedule_name}\n  k: 10\nseed: {seed}\noptim:\n  lr: 0.0004\n"
    if experiment_name != "MISSING":
        config = f"experiment_name: {experiment_name if experiment_name else 'null'}\n" + config
    (run_dir / ".hydra" / "config.yaml").write_text(config)
    lines = []
    for step in range(5):
        lines.append({"step": step, "train/loss": 3.0 - 0.1 * step, "train/teacher_forcing_prob": eps[step]})
        if step in (2, 4):  # validation lines carry only val keys; CIDEr differs per seed
            lines.append({"step": step, "val/CIDEr": (0.5 if step == 2 else 0.8) + 0.1 * seed, "val/BLEU-4": 0.2})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    if test is not None:
        full = {f"test/{k}": v for k, v in test.items()}
        full.update({"test/BLEU-1": 0.7, "test/ROUGE-L": 0.5})
        (run_dir / "test_metrics.json").write_text(json.dumps(full))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun" / "2024-05-01" / "12-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for folders, experiment_name, schedule_name, tests, eps in ROWS.values():
        for seed, (folder, test) in enumerate(zip(folders, tests)):
            _write_run(root / folder, experiment_name, schedule_name, seed, test, eps)
    return root


def test_runs_found_and_grouped(sweep):
    runs = cr.load_local_runs(sweep)
    assert [r.run_id for r in runs] == ["0/", "1/", "2/", "3/", "4/", "5/", "part2/0/", "part2/1/", "part2/10/"]
    assert {r.run_id: r.row for r in runs}["4/"] == "ss_inverse_sigmoid_k10"
    assert {r.run_id: r.row for r in runs}["part2/10/"] == "always_sampling"  # null experiment_name
    assert {r.run_id: r.row for r in runs}["0/"] == "teacher_forcing"  # no experiment_name at all
    assert [r.seed for r in runs] == [0, 1, 2] * 3


def test_table_numbers_by_hand(sweep):
    table = cr.aggregate_table(cr.load_local_runs(sweep), ["BLEU-4", "METEOR", "CIDEr"])
    rows = {row["run"]: row for row in table["rows"]}
    assert [row["run"] for row in table["rows"]] == ["always_sampling", "ss_inverse_sigmoid_k10", "teacher_forcing"]
    assert {name: row["n_seeds"] for name, row in rows.items()} == {
        "always_sampling": 3,
        "ss_inverse_sigmoid_k10": 2,
        "teacher_forcing": 3,
    }

    def check(row, metric, mean, std):
        cell = rows[row]["metrics"][metric]
        assert cell["mean"] == pytest.approx(mean, abs=1e-12)
        assert cell["std"] == pytest.approx(std, abs=1e-9)

    # teacher_forcing: deviations (-0.02, 0, 0.02) -> var 0.0008 / 2 = 0.0004 -> std 0.02
    check("teacher_forcing", "BLEU-4", 0.32, 0.02)
    check("teacher_forcing", "METEOR", 0.26, 0.01)
    check("teacher_forcing", "CIDEr", 1.00, 0.1)
    # two seeds: std = |a - b| / sqrt(2)
    check("ss_inverse_sigmoid_k10", "BLEU-4", 0.33, 0.028284271247)  # 0.04 / sqrt(2)
    check("ss_inverse_sigmoid_k10", "METEOR", 0.26, 0.0)
    check("ss_inverse_sigmoid_k10", "CIDEr", 0.85, 0.070710678119)  # 0.1 / sqrt(2)
    # always_sampling BLEU-4: deviations (-0.02, -0.01, 0.03) -> 0.0014 / 2 = 0.0007 -> 0.0264575...
    check("always_sampling", "BLEU-4", 0.22, 0.026457513111)
    check("always_sampling", "METEOR", 0.20, 0.0)
    check("always_sampling", "CIDEr", 0.60, 0.1)

    assert table["missing"] == [
        {"run": "4/", "row": "ss_inverse_sigmoid_k10", "seed": 1, "reason": "test_metrics.json missing"}
    ]
    assert table["warnings"] == []


def test_cli_writes_table_and_plots(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert cr.main([str(sweep), "--out-dir", str(out)]) == 0
    stdout, stderr = capsys.readouterr()

    md = (out / "table.md").read_text()
    lines = md.splitlines()
    assert lines[0] == "| run | n seeds | BLEU-4 | METEOR | CIDEr |"
    assert lines[2] == "| always_sampling | 3 | 0.220 ± 0.026 | 0.200 ± 0.000 | 0.600 ± 0.100 |"
    assert lines[3] == "| ss_inverse_sigmoid_k10 | 2 | 0.330 ± 0.028 | 0.260 ± 0.000 | 0.850 ± 0.071 |"
    assert lines[4] == "| teacher_forcing | 3 | 0.320 ± 0.020 | 0.260 ± 0.010 | 1.000 ± 0.100 |"
    assert "4/ (row ss_inverse_sigmoid_k10, seed 1): test_metrics.json missing" in md
    assert lines[3] in stdout and "4/" in stdout  # table and the missing run are printed
    assert "4/ has no test metrics" in stderr

    table = json.loads((out / "table.json").read_text())
    assert table["metrics"] == ["BLEU-4", "METEOR", "CIDEr"]
    assert table["rows"][1]["metrics"]["CIDEr"]["values"] == [0.80, 0.90]
    assert table["rows"][1]["run_ids"] == ["3/", "5/"]
    assert table["missing"][0]["run"] == "4/"

    for name in ("teacher_forcing_prob.png", "val_cider.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        import matplotlib.image

        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_default_out_dir_and_metric_selection(sweep, capsys):
    assert cr.main([str(sweep), "--metrics", "test/BLEU-1", "ROUGE-L"]) == 0
    capsys.readouterr()
    md = (sweep / "table.md").read_text().splitlines()
    assert md[0] == "| run | n seeds | BLEU-1 | ROUGE-L |"
    assert md[2] == "| always_sampling | 3 | 0.700 ± 0.000 | 0.500 ± 0.000 |"
    assert (sweep / "val_cider.png").read_bytes()[:8] == PNG_MAGIC


def test_curves_mean_and_band_over_seeds(sweep):
    runs = cr.load_local_runs(sweep)
    cider = cr.curves(runs, "val/CIDEr")
    # every row has seeds 0, 1, 2 logging 0.5 + 0.1 * seed at step 2 and 0.8 + 0.1 * seed at step 4
    # (the crashed run 4/ still logged its validation curve)
    for row in ROWS:
        assert cider[row]["step"] == [2, 4]
        assert cider[row]["mean"] == pytest.approx([0.6, 0.9])
        assert cider[row]["min"] == pytest.approx([0.5, 0.8])
        assert cider[row]["max"] == pytest.approx([0.7, 1.0])
        assert cider[row]["n"] == [3, 3]
    eps = cr.curves(runs, "train/teacher_forcing_prob")
    assert eps["ss_inverse_sigmoid_k10"]["step"] == [0, 1, 2, 3, 4]
    assert eps["ss_inverse_sigmoid_k10"]["mean"] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])
    assert eps["always_sampling"]["mean"] == [0.0] * 5


def test_single_seed_std_blank_and_duplicate_seed_warning():
    runs = [
        cr.RunRecord("a/", "solo", 0, {"test/CIDEr": 0.912345}),
        cr.RunRecord("b/", "dup", 0, {"test/CIDEr": 0.5}),
        cr.RunRecord("c/", "dup", 0, {"test/CIDEr": 0.7}),
        cr.RunRecord("d/", "dead", 3, None, "test_metrics.json missing"),
    ]
    table = cr.aggregate_table(runs, ["CIDEr"])
    md = cr.format_markdown(table)
    assert "| solo | 1 | 0.912 |" in md
    assert "| dead | 0 | — |" in md
    assert table["rows"][2]["metrics"]["CIDEr"]["std"] is None
    assert any("'dup'" in w and "seed" in w for w in table["warnings"])


def test_mean_std():
    assert cr.mean_std([]) == (None, None)
    assert cr.mean_std([2.0]) == (2.0, None)
    mean, std = cr.mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(1.2909944487358056)  # sqrt(5/3)


class FakeWandbRun:
    """A W&B run as wandb.Api() returns it, fed from a local run record: its history holds every record in
    the order it was logged, `_step` counting log calls (W&B's own x axis), the optimizer step in
    `step_key`. Validation records come last, as tools/score_runs.py logs deferred scores after training, and
    `_step` starts at 100 (a resumed run): `_step` is never the optimizer step."""

    def __init__(self, record, test, step_key="trainer/step"):
        self.id, self.name, self.state = record.run_id.strip("/").replace("/", "-"), "run", "finished"
        self.config = {"schedule": {"name": "x"}, "experiment_name": record.row, "seed": record.seed}
        self.summary = dict(test or {})
        if test is None:
            self.state = "crashed"
        train = [h for h in record.history if not any(k.startswith("val/") for k in h)]
        val = [h for h in record.history if any(k.startswith("val/") for k in h)]
        self.rows = []
        for n, h in enumerate(train + val):
            row = {k: v for k, v in h.items() if k != "step"}
            row["_step"] = 100 + n
            if step_key is not None:
                row[step_key] = h["step"]
            self.rows.append(row)
        self.queries = []

    def history(self, keys, samples, pandas):
        """Like the real one: only rows holding every key asked for, with those keys and `_step`."""
        assert pandas is False
        self.queries.append(list(keys))
        return [{"_step": r["_step"], **{k: r[k] for k in keys}} for r in self.rows if all(k in r for k in keys)]


class FakeApi:
    def __init__(self, runs):
        self._runs = runs
        self.calls = []

    def runs(self, path, filters):
        self.calls.append((path, filters))
        return self._runs


def test_wandb_source_gives_same_table_and_curves_against_the_optimizer_step(sweep, tmp_path):
    """The W&B reader feeds the same aggregation; exercised with an in-memory stand-in for the API."""
    local = cr.load_local_runs(sweep)
    fakes = [FakeWandbRun(r, r.test_metrics) for r in local]
    api = FakeApi(fakes)
    remote = cr.load_wandb_runs("me/captioning", "sweep-1", api=api)
    assert api.calls == [("me/captioning", {"group": "sweep-1"})]
    assert ["trainer/step", "val/CIDEr"] in fakes[0].queries  # asks for the optimizer step with each curve
    local_table = cr.aggregate_table(local)
    remote_table = cr.aggregate_table(remote)
    assert [r["metrics"] for r in remote_table["rows"]] == [r["metrics"] for r in local_table["rows"]]
    assert [m["reason"] for m in remote_table["missing"]] == ["no test/* metrics in the run summary (state: crashed)"]
    cider = cr.curves(remote, "val/CIDEr")
    assert cider == cr.curves(local, "val/CIDEr")
    assert cider["teacher_forcing"]["step"] == [2, 4]  # optimizer steps, not the _step of those records
    assert cr.curves(remote, "train/teacher_forcing_prob") == cr.curves(local, "train/teacher_forcing_prob")

    table = cr.write_outputs(remote, tmp_path / "report", list(cr.DEFAULT_METRICS), "wandb:me/captioning")
    written = json.loads((tmp_path / "report" / "table.json").read_text())
    assert written["curves"] == table["curves"]
    assert written["curves"]["val/CIDEr"]["ss_inverse_sigmoid_k10"]["step"] == [2, 4]
    assert written["curves"]["val/CIDEr"]["ss_inverse_sigmoid_k10"]["mean"] == pytest.approx([0.6, 0.9])
    assert written["curves"]["train/teacher_forcing_prob"]["ss_inverse_sigmoid_k10"]["step"] == [0, 1, 2, 3, 4]


def test_wandb_runs_logged_with_plain_step_still_read_and_step_never_used(sweep):
    local = cr.load_local_runs(sweep)
    legacy = cr.load_wandb_runs("p", "g", api=FakeApi([FakeWandbRun(r, r.test_metrics, "step") for r in local]))
    assert cr.curves(legacy, "val/CIDEr") == cr.curves(local, "val/CIDEr")
    # A history with W&B's `_step` alone has no optimizer step: no curve rather than a wrong one.
    bare = cr.load_wandb_runs("p", "g", api=FakeApi([FakeWandbRun(r, r.test_metrics, None) for r in local]))
    assert all(r.history == [] for r in bare)
    assert cr.curves(bare, "val/CIDEr") == {}


def test_interpolated_experiment_name_is_resolved(tmp_path):
    run = tmp_path / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "experiment_name: ss_${schedule.name}_k${schedule.k}\nschedule:\n  name: inverse_sigmoid\n  k: 10\n"
        "seed: ${base_seed}\nbase_seed: 7\n"
    )
    (record,) = cr.load_local_runs(tmp_path)
    assert (record.row, record.seed) == ("ss_inverse_sigmoid_k10", 7)
    assert record.test_metrics is None and record.history == []
    (run / ".hydra" / "config.yaml").write_text("experiment_name: ${nowhere.key}\n")
    with pytest.raises(ValueError, match="cannot resolve experiment_name"):
        cr.load_local_runs(tmp_path)


def test_flat_wandb_config_keys():
    assert cr.row_and_seed({"schedule.name": "linear", "seed": 4}, "x") == ("linear", 4)
    assert cr.row_and_seed({"schedule/name": "linear"}, "x") == ("linear", None)
    with pytest.raises(ValueError, match="neither experiment_name nor schedule.name"):
        cr.row_and_seed({"seed": 1}, "runs/7")


def test_bad_metrics_line_names_file_and_line(sweep, capsys):
    with open(sweep / "1" / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    assert cr.main([str(sweep)]) == 1
    assert "metrics.jsonl:8: not valid JSON" in capsys.readouterr().err


def test_empty_sweep_exits_1(tmp_path):
    (tmp_path / "notes").mkdir()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 1
    assert "no runs found" in result.stderr and str(tmp_path) in result.stderr


def test_missing_sweep_dir_exits_1(tmp_path, capsys):
    assert cr.main([str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
