"""The console scripts as a user runs them: from any working directory, with clear one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import requires_java, tiny_overrides


def run(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def script(name: str) -> list[str]:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not on PATH: install the package (pip install -e '.[test]')")
    return [path]


def test_python_module_entry_point_finds_its_configs_from_anywhere(tmp_path):
    result = run([sys.executable, "-m", "captioning.train", "--cfg", "job"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "schedule:" in result.stdout and "teacher_forcing" in result.stdout


def test_wrong_data_path_fails_in_seconds_naming_it(tmp_path):
    start = time.perf_counter()
    result = run(script("captioning-train") + ["data=coco", f"data.root={tmp_path}/no_coco_here"], tmp_path)
    assert result.returncode == 2
    assert f"{tmp_path}/no_coco_here" in result.stderr and "Traceback" not in result.stderr
    assert time.perf_counter() - start < 60


def test_missing_data_root_for_coco_names_the_key(tmp_path):
    result = run(script("captioning-train") + ["data=coco"], tmp_path)
    assert result.returncode == 2 and "data.root" in result.stderr


def test_invalid_config_value_names_the_key(tmp_path):
    result = run(script("captioning-train") + ["schedule=inverse_sigmoid", "schedule.k=0.5"], tmp_path)
    assert result.returncode == 2 and "schedule.k" in result.stderr and "Traceback" not in result.stderr


def test_missing_java_is_reported_before_any_work(tmp_path):
    # PATH is an empty folder, so no java; the interpreter is started by its own path (a symlink to it elsewhere
    # would leave a virtual environment: Python finds pyvenv.cfg beside the path it was started by)
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    result = run(
        [sys.executable, "-m", "captioning.train", f"hydra.run.dir={tmp_path}/run"],
        tmp_path,
        env={"PATH": str(empty_bin), "CAPTIONING_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 2
    assert "Java runtime not found" in result.stderr
    assert not (tmp_path / "cache").exists()  # no data generated, no model built


def test_eval_without_checkpoint_names_the_key(tmp_path):
    result = run(script("captioning-eval"), tmp_path)
    assert result.returncode == 2 and "checkpoint" in result.stderr


@requires_java()
@pytest.mark.java
@pytest.mark.slow
def test_train_then_eval_console_scripts_agree(tiny_data_root, tmp_path):
    overrides = tiny_overrides(tiny_data_root) + [
        "trainer.max_steps=10",
        "trainer.val_every_n_steps=5",
        f"hydra.run.dir={tmp_path}/run",
    ]
    trained = run(script("captioning-train") + overrides, tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "CIDEr" in trained.stdout and "most common caption" in trained.stdout
    train_metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())

    evaluated = run(
        script("captioning-eval")
        + [
            f"checkpoint={tmp_path}/run/checkpoints/best.pt",
            "decode.beam_size=2",
            "metrics=[BLEU,ROUGE-L,CIDEr]",
            f"hydra.run.dir={tmp_path}/eval",
        ],
        tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    eval_metrics = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
    for key, value in train_metrics.items():
        if key.startswith("test/"):
            assert eval_metrics[key] == value, key


@requires_java()
@pytest.mark.java
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_data_root, tmp_path):
    import signal

    overrides = tiny_overrides(tiny_data_root) + [
        "trainer.max_steps=100000",
        "trainer.val_every_n_steps=100000",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={tmp_path}/run",
    ]
    process = subprocess.Popen(
        script("captioning-train") + overrides,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 124, stderr[-2000:]
    assert "SIGTERM received" in stdout + stderr and "Traceback" not in stdout + stderr
    from captioning.runtime.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] >= 3


def test_a_bad_job_in_a_sweep_is_reported_and_the_others_still_run(tiny_data_root, tmp_path):
    """captioning-train -m: a user error in one job fails that job (one line), not the whole sweep."""
    overrides = [o for o in tiny_overrides(tiny_data_root) if not o.startswith(("trainer.max_steps", "trainer.val"))]
    result = run(
        script("captioning-train")
        + [
            "-m",
            "seed=-3,0",
            *overrides,
            "trainer.max_steps=1",
            "trainer.val_every_n_steps=1",
            "trainer.scoring=deferred",
            "trainer.evaluate_after_training=false",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        tmp_path,
    )
    assert result.returncode != 0  # the sweep reports its failed job at the end
    assert "seed must be an integer >= 0" in result.stderr
    assert (tmp_path / "sweep" / "1" / "checkpoints" / "last.pt").is_file()  # the good job (seed=0) ran after it
