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
    assert records == [{"step": 3, "train/loss": 1.5}, {"step": 4, "train/loss": 1.0}]  # numbers only: NaN left out
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
    logger = WandbLogger(
        tmp_path,
        project="captioning-test",
        group="sweep-1",
        name="baseline-seed0",
        tags=["schedule:teacher_forcing"],
        config={"seed": 0},
    )
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
    from conftest import compose, tiny_overrides

    from captioning.training.recipe import train

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose(
        tiny_overrides(tiny_data_root)
        + ["logger=wandb", "trainer.max_steps=3", "trainer.evaluate_after_training=false"]
    )
    train(cfg, tmp_path)  # no key, no mode: offline with a warning, not a crash
    run_id = (tmp_path / "wandb_run_id.txt").read_text()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert read_jsonl(tmp_path / "metrics.jsonl")  # the JSON-lines file is written too


# ----------------------------------------------------------------------------- JSON lines: one reader


def test_read_jsonl_names_a_bad_line_and_skips_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: expected a JSON object, got list"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n{not json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n{"step": 2, "train/lo')  # killed while writing its last record
    with caplog.at_level(logging.WARNING):
        assert read_jsonl(path) == [{"step": 1}]
    assert "torn last line" in caplog.text
    logger = JsonlLogger(path)  # the resumed run cuts the torn line off before appending
    logger.log_metrics({"train/loss": 1.0}, step=2)
    logger.finish()
    assert read_jsonl(path) == [{"step": 1}, {"step": 2, "train/loss": 1.0}]
    path.write_text('{"step": 1}')  # a whole last record, only its newline missing: kept
    JsonlLogger(path).finish()
    assert path.read_text() == '{"step": 1}\n'


# ----------------------------------------------------------------------------- W&B credentials for any host


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    """Nothing of the developer's own W&B set-up leaks in: no key, no netrc, no settings file."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_api_key_of_a_self_hosted_server_is_found(no_wandb_credentials, monkeypatch, caplog):
    from captioning.loggers.wandb_logger import base_url, find_api_key

    (no_wandb_credentials / "netrc").write_text(
        "machine api.wandb.ai login user password public-key\n"
        "machine wandb.example.org:8443 login user password self-hosted-key\n"
        "machine old.example.org login user password old-style-key\n"
    )
    assert base_url() == "https://api.wandb.ai" and find_api_key() == "public-key"

    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org:8443/")
    assert base_url() == "https://wandb.example.org:8443"
    assert find_api_key() == "self-hosted-key"  # its own entry, not the public one
    assert resolve_mode(None) == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "http://old.example.org:8080")
    assert find_api_key() == "old-style-key"  # older wandb wrote the host without its port

    monkeypatch.setenv("WANDB_BASE_URL", "https://elsewhere.example.org")  # a key for other hosts only
    with caplog.at_level(logging.WARNING):
        assert find_api_key() is None and resolve_mode(None) == "offline"
    assert "no API key for https://elsewhere.example.org" in caplog.text
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # the variable counts for any host
    assert resolve_mode(None) == "online"


def test_server_from_wandb_login_host_settings_file(no_wandb_credentials):
    from captioning.loggers.wandb_logger import base_url

    (no_wandb_credentials / "netrc").write_text("machine wandb.corp.example login user password corp-key\n")
    assert resolve_mode(None) == "offline"  # no key for the public server
    settings = no_wandb_credentials / "wandb-config" / "settings"
    settings.parent.mkdir()
    settings.write_text("[default]\nbase_url = https://wandb.corp.example\n")  # what `wandb login --host` writes
    assert base_url() == "https://wandb.corp.example"
    assert resolve_mode(None) == "online"


# ----------------------------------------------------------------------------- W&B logger, with a stand-in run


class FakeRun:
    def __init__(self, kwargs, fail_logs=0):
        self.kwargs, self.id, self.fail_logs = kwargs, kwargs["id"], fail_logs
        self.logged, self.defined, self.finished = [], [], False
        self.config = {}

    def define_metric(self, name, **kwargs):
        self.defined.append((name, kwargs))

    def log(self, data):
        if self.fail_logs:
            self.fail_logs -= 1
            import wandb

            raise wandb.errors.CommError("the wandb service went away")
        self.logged.append(dict(data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """wandb.init returns FakeRuns (wandb.Image and wandb.Table stay real); `fail_logs[i]`: how many log
    calls of the i-th run raise."""
    import wandb

    state = type("FakeWandb", (), {"runs": [], "fail_logs": {}, "teardowns": 0})()

    def init(**kwargs):
        run = FakeRun(kwargs, state.fail_logs.get(len(state.runs), 0))
        state.runs.append(run)
        return run

    def teardown(*args, **kwargs):
        state.teardowns += 1

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(wandb, "teardown", teardown)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return state


def test_optimizer_step_is_logged_and_is_every_chart_x_axis(fake_wandb, tmp_path):
    from captioning.loggers.wandb_logger import RUN_ID_FILE, STEP_METRIC, WandbLogger

    logger = WandbLogger(tmp_path, project="p", group="g", name="n", tags=["t"])
    logger.log_metrics({"train/loss": 2.0}, step=7)
    logger.log_metrics({"val/CIDEr": 0.5}, step=7)
    logger.finish()
    (run,) = fake_wandb.runs
    assert STEP_METRIC == "trainer/step"
    assert run.defined == [("trainer/step", {}), ("*", {"step_metric": "trainer/step", "step_sync": True})]
    assert run.logged == [{"train/loss": 2.0, "trainer/step": 7}, {"val/CIDEr": 0.5, "trainer/step": 7}]
    assert run.kwargs["id"] == (tmp_path / RUN_ID_FILE).read_text() and run.kwargs["resume"] == "allow"
    assert json.loads((tmp_path / "wandb_run.json").read_text()) == {
        "id": run.id,
        "project": "p",
        "entity": None,
        "group": "g",
        "name": "n",
        "tags": ["t"],
        "job_type": "train",
    }
    assert run.finished


def test_table_sends_few_images_as_thumbnails(fake_wandb, tmp_path):
    from PIL import Image

    from captioning.loggers.wandb_logger import WandbLogger

    rows = []
    for i in range(10):
        path = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (640, 480), (i * 20, 0, 0)).save(path)
        rows.append([path, f"caption {i}", "a | b"])
    logger = WandbLogger(tmp_path / "run", project="p", num_table_images=3)
    jsonl = JsonlLogger(tmp_path / "run" / "metrics.jsonl")
    logger.log_table("val/samples", ["image", "generated", "references"], rows, step=5)
    jsonl.log_table("val/samples", ["image", "generated", "references"], rows, step=5)
    (run,) = fake_wandb.runs
    (record,) = run.logged
    assert record["trainer/step"] == 5
    table = record["val/samples"]
    assert len(table.data) == 3 and [r[1] for r in table.data] == ["caption 0", "caption 1", "caption 2"]
    for image, *_ in table.data:
        assert max(image.image.size) <= 128 and image.image.size == (128, 96)  # aspect kept
    assert len(json.loads((tmp_path / "run" / "val_samples.json").read_text())["rows"]) == 10  # locally: all

    WandbLogger(tmp_path / "default", project="p").log_table(
        "val/samples", ["image", "generated", "references"], rows, step=5
    )
    assert len(fake_wandb.runs[1].logged[0]["val/samples"].data) == 4  # the default is small too


def test_wandb_yaml_defaults_are_small():
    from conftest import compose

    cfg = compose(["logger=wandb"])
    assert cfg.logger.wandb.num_table_images <= 8 and cfg.logger.wandb.thumbnail_size <= 128


def test_wandb_failing_mid_run_goes_on_offline_with_one_warning(fake_wandb, tmp_path, monkeypatch, caplog):
    from captioning.loggers.wandb_logger import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "online")
    fake_wandb.fail_logs = {0: 1}
    logger = WandbLogger(tmp_path, project="p")
    with caplog.at_level(logging.WARNING, logger="captioning.loggers.wandb_logger"):
        for step in (1, 2, 3):
            logger.log_metrics({"train/loss": 1.0 / step}, step=step)
        logger.finish()
    online, offline = fake_wandb.runs
    assert online.kwargs["mode"] == "online" and offline.kwargs["mode"] == "offline"
    assert offline.kwargs["id"] == online.kwargs["id"] and offline.kwargs["resume"] == "allow"
    assert [r["trainer/step"] for r in offline.logged] == [1, 2, 3]  # the failed record is not lost
    assert offline.defined == online.defined  # the x axis again
    assert fake_wandb.teardowns == 1 and offline.finished
    warnings = [r for r in caplog.records if r.name == "captioning.loggers.wandb_logger"]
    assert len(warnings) == 1 and "offline" in warnings[0].getMessage() and "wandb sync" in warnings[0].getMessage()


def test_wandb_failing_even_offline_leaves_the_run_going(fake_wandb, tmp_path, caplog):
    from captioning.loggers.wandb_logger import WandbLogger

    fake_wandb.fail_logs = {0: 1, 1: 5}
    logger = WandbLogger(tmp_path, project="p")
    with caplog.at_level(logging.WARNING, logger="captioning.loggers.wandb_logger"):
        logger.log_metrics({"train/loss": 1.0}, step=1)
        logger.log_metrics({"train/loss": 1.0}, step=2)  # W&B is off now: nothing raises
        logger.log_table("val/samples", ["generated"], [["a cat"]], step=2)
        logger.finish()
    assert logger.run is None and len(fake_wandb.runs) == 2
    assert "without W&B" in caplog.text


# ----------------------------------------------------------------------------- W&B for real, offline


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_unreachable_server_at_start_logs_offline_with_one_warning(monkeypatch, tmp_path, caplog):
    from captioning.loggers.wandb_logger import WandbLogger

    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with caplog.at_level(logging.WARNING, logger="captioning.loggers.wandb_logger"):
        logger = WandbLogger(tmp_path, project="captioning-test", config={"seed": 0}, init_timeout=3, finish_timeout=5)
        logger.log_metrics({"train/loss": 2.0}, step=1)
        logger.log_metrics({"train/loss": 1.5}, step=2)
        logger.finish()
    warnings = [r.getMessage() for r in caplog.records if r.name == "captioning.loggers.wandb_logger"]
    assert len(warnings) == 1, warnings
    assert "starting the run failed" in warnings[0] and "offline" in warnings[0] and "wandb sync" in warnings[0]
    run_id = (tmp_path / "wandb_run_id.txt").read_text()
    assert logger.mode == "offline" and list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))


def _load_tool(name):
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_score_runs_logs_deferred_scores_into_the_saved_wandb_run(tmp_path, monkeypatch):
    """tools/score_runs.py resumes the run's own W&B run (saved id, resume="allow"), at the optimizer steps."""
    import wandb
    from omegaconf import OmegaConf

    score_runs = _load_tool("score_runs")
    run = tmp_path / "sweep" / "0"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create(
            {
                "data": {"root": "unused"},
                "logger": {
                    "wandb": {
                        "project": "captioning-test",
                        "entity": None,
                        "group": None,
                        "name": None,
                        "tags": [],
                        "mode": None,
                    }
                },
            }
        ),
        run / ".hydra" / "config.yaml",
    )
    (run / "wandb_run_id.txt").write_text("deferred0001")
    (run / "wandb_run.json").write_text(
        json.dumps(
            {
                "id": "deferred0001",
                "project": "captioning-test",
                "entity": None,
                "group": "multirun_2024-05-01_12-00-00",
                "name": "ss-seed0",
                "tags": ["schedule:inverse_sigmoid"],
                "job_type": "train",
            }
        )
    )
    (run / "metrics.jsonl").write_text(
        '{"step": 3, "train/loss": 2.0, "train/teacher_forcing_prob": 0.9}\n'
        '{"step": 6, "train/loss": 1.0, "train/teacher_forcing_prob": 0.8}\n'
    )
    (run / "val_results").mkdir()
    for step in (3, 6):
        (run / "val_results" / f"step_{step:08d}.json").write_text("[]")
    (run / "results_test_beam.json").write_text("[]")

    monkeypatch.setattr(score_runs, "check_java", lambda: None)
    monkeypatch.setattr(score_runs, "load_records", lambda cfg_data: {"train": [], "val": [], "test": []})
    monkeypatch.setattr(score_runs, "load_results", lambda path: {1: "a cat"})
    monkeypatch.setattr(score_runs, "references_of", lambda records, predictions: {1: ["a cat"]})
    monkeypatch.setattr(score_runs, "score", lambda refs, predictions: {"CIDEr": 0.5})
    monkeypatch.setattr(
        score_runs, "score_with_baseline", lambda refs, predictions, train: ({"CIDEr": 0.7}, {"CIDEr": 0.1}, "a dog")
    )

    inits, logged = [], []
    real_init = wandb.init

    class Recorded:
        def __init__(self, run):
            self._run = run

        def log(self, data, *args, **kwargs):
            logged.append(dict(data))
            return self._run.log(data, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._run, name)

    def init(**kwargs):
        inits.append(kwargs)
        return Recorded(real_init(**kwargs))

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert score_runs.main([str(tmp_path / "sweep")]) == 0

    (kwargs,) = inits
    assert kwargs["id"] == "deferred0001" and kwargs["resume"] == "allow" and kwargs["mode"] == "offline"
    assert (kwargs["project"], kwargs["group"], kwargs["name"], kwargs["tags"]) == (
        "captioning-test",
        "multirun_2024-05-01_12-00-00",
        "ss-seed0",
        ["schedule:inverse_sigmoid"],
    )
    assert [(r["trainer/step"], r.get("val/CIDEr"), r.get("test/CIDEr")) for r in logged] == [
        (3, 0.5, None),
        (6, 0.5, None),
        (6, None, 0.7),
    ]
    assert logged[0]["train/teacher_forcing_prob"] == 0.9
    assert logged[2]["test/most_common_caption/CIDEr"] == 0.1
    assert list((run / "wandb").glob("offline-run-*-deferred0001"))
    assert json.loads((run / "test_metrics.json").read_text())["test/CIDEr"] == 0.7


def test_score_runs_without_wandb_in_the_run_config_starts_no_wandb(tmp_path, monkeypatch):
    import wandb
    from omegaconf import OmegaConf

    score_runs = _load_tool("score_runs")
    run = tmp_path / "0"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create({"data": {"root": "unused"}, "logger": {"wandb": None}}), run / ".hydra" / "config.yaml"
    )

    def no_init(**kwargs):
        raise AssertionError("logger=jsonl: no W&B")

    monkeypatch.setattr(wandb, "init", no_init)
    logger = score_runs.run_logger(run, OmegaConf.load(run / ".hydra" / "config.yaml"))
    assert [type(x).__name__ for x in logger.loggers] == ["JsonlLogger"]
    logger.finish()
