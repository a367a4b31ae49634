"""Input brought from outside (issue 25): checkpoints that run no code, photos the right way up, typo'd `+` keys,
partial results, one-line errors, portable run folders, predict's rule, data folders not filled silently."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, requires_java, tiny_overrides
from PIL import Image

from captioning.runtime.checkpoint import (
    UnsafeCheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from captioning.training.recipe import train

REPO = Path(__file__).resolve().parent.parent


def run_cli(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600, env=environment, cwd=REPO
    )


def one_line_error(result: subprocess.CompletedProcess, code: int, *phrases: str) -> str:
    """The command exited with `code` and said, on stderr, exactly one line (no traceback) with every phrase."""
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def photo(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


# -- 1. checkpoints that run no code ---------------------------------------------------------------------------


class Payload:
    """Unpickling it creates the file it names: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_pickled_payload_is_refused_and_creates_nothing(tmp_path, photo):
    marker = tmp_path / "created_by_the_checkpoint"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "vocab": {"itos": ["<pad>"]}, "config": {}, "step": 0, "payload": Payload(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match="convert_checkpoint"):
        load_checkpoint(evil)
    result = run_cli("captioning.predict", f"checkpoint={evil}", f"inputs=[{photo}]", "device=cpu")
    one_line_error(result, 2, str(evil), "could run code", "python -m captioning.runtime.convert_checkpoint")
    assert not marker.exists()


def old_format(checkpoint: dict) -> dict:
    """A checkpoint as the code before weights-only loading wrote it: numpy random state, OmegaConf config."""
    from omegaconf import OmegaConf

    old = dict(checkpoint)
    old["rng"] = [{**state, "numpy": np.random.get_state()} for state in checkpoint["rng"]]
    old["config"] = OmegaConf.create(checkpoint["config"])
    return old


def test_an_old_checkpoint_is_refused_naming_the_conversion_then_converted_once(checkpoint, tmp_path):
    current = load_checkpoint(checkpoint)
    old_path = tmp_path / "old.pt"
    torch.save(old_format(current), old_path)
    with pytest.raises(UnsafeCheckpointError, match=r"python -m captioning\.runtime\.convert_checkpoint .*old\.pt"):
        load_checkpoint(old_path)
    result = run_cli("captioning.runtime.convert_checkpoint", str(old_path))
    assert result.returncode == 0 and "converted" in result.stdout, result.stderr
    converted = load_checkpoint(old_path)
    assert converted["config"] == current["config"] and converted["step"] == current["step"]
    assert all(torch.equal(converted["model"][k], v) for k, v in current["model"].items())
    np.random.set_state(old_format(current)["rng"][0]["numpy"])
    expected = np.random.rand(5)
    restore_rng_state(converted["rng"][0])
    assert np.array_equal(np.random.rand(5), expected)
    one_line_error(run_cli("captioning.runtime.convert_checkpoint", str(tmp_path / "missing.pt")), 2, "missing.pt")


def test_random_states_survive_a_weights_only_round_trip(tmp_path):
    np.random.seed(3)
    torch.manual_seed(3)
    state = capture_rng_state()
    save_checkpoint({"model": {}, "vocab": {}, "config": {}, "step": 1, "rng": [state]}, tmp_path / "c.pt")
    expected = (np.random.rand(4), torch.rand(4))
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"][0])
    assert np.array_equal(np.random.rand(4), expected[0]) and torch.equal(torch.rand(4), expected[1])


def test_no_torch_load_trusts_a_file():
    """Every torch.load in the package, tools and tests reads weights only (the converter alone trusts, by name)."""
    offenders = []
    for path in [*REPO.glob("captioning/**/*.py"), *REPO.glob("tools/*.py"), *REPO.glob("tests/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line and path.name != "test_outside_input.py":
                if not (path.name == "convert_checkpoint.py" and "the explicit trust" in line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}")
    assert offenders == []


# -- 2. photos the right way up --------------------------------------------------------------------------------


def test_an_orientation_6_jpeg_reads_and_captions_as_the_rotated_image(checkpoint, tmp_path):
    from captioning.data.images import load_rgb
    from captioning.predict import predict

    rng = np.random.default_rng(1)
    stored = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))  # landscape, as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    tagged, untagged = tmp_path / "portrait.jpg", tmp_path / "untagged.jpg"
    stored.save(tagged, quality=95, exif=exif)
    stored.save(untagged, quality=95)
    with Image.open(untagged) as decoded:  # the very pixels the JPEG decodes to, turned as a viewer turns them
        decoded.convert("RGB").transpose(Image.Transpose.ROTATE_270).save(tmp_path / "rotated.png")
    upright = np.asarray(load_rgb(tagged, 32, 10**8))
    assert upright.shape == (64, 48, 3)  # portrait
    assert np.array_equal(upright, np.asarray(load_rgb(tmp_path / "rotated.png", 32, 10**8)))
    decode_cfg = compose(["decode=greedy"], config_name="predict").decode
    rows = predict(checkpoint, [tagged, tmp_path / "rotated.png"], decode_cfg, "cpu")
    assert rows[0]["captions"] == rows[1]["captions"]


def test_the_feature_store_key_changes_with_the_image_reader(tiny_data_root, tmp_path):
    """A store extracted before images were turned upright is not resumed as if its features were these."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("extract_features", REPO / "tools" / "extract_features.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from captioning.data.images import IMAGE_READER

    cfg = tool.compose_config(tiny_overrides(tiny_data_root) + ["model.encoder.weights=null"])
    out = tmp_path / "store"
    tool.extract(out, cfg, batch_size=40, device=torch.device("cpu"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["image_reader"] == IMAGE_READER
    del meta["image_reader"]  # as written before the EXIF orientation was applied
    (out / "meta.json").write_text(json.dumps(meta))
    cfg = tool.compose_config(tiny_overrides(tiny_data_root) + ["model.encoder.weights=null"])
    with pytest.raises(ValueError, match="holds features of other settings"):
        tool.extract(out, cfg, batch_size=40, device=torch.device("cpu"))


# -- 3. strict config under + ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, hint",
    [
        ("+trainer.max_step=10", "did you mean trainer.max_steps?"),
        ("+data.max_lenn=5", "did you mean data.max_len?"),
        ("+model.decoder.hiden_dim=8", "did you mean model.decoder.hidden_dim?"),
        ("+optim.grad_clip_nrom=1", "did you mean optim.grad_clip_norm?"),
        ("+logger.jsonl.every=3", ""),
        ("+sead=3", "did you mean seed?"),
    ],
)
def test_a_key_added_with_plus_that_no_group_declares_is_an_error(override, hint):
    from captioning.config import ConfigError
    from captioning.strict_keys import check_added_keys

    key = override[1:].split("=")[0]
    with pytest.raises(ConfigError, match=f"no config group declares the key {key}.*{hint}".replace("?", r"\?")):
        check_added_keys(compose([override]), [override])


def test_plus_still_appends_groups_and_fills_open_containers():
    from captioning.strict_keys import check_added_keys

    check_added_keys(compose([]), ["+experiment=baseline", "+debug=fast"])  # group options appended
    check_added_keys(compose([], config_name="eval"), ["+compare_overrides.beam_size=2"])
    check_added_keys(compose(["++trainer.max_steps=5"]), ["++trainer.max_steps=5"])


def test_train_exits_2_naming_a_typo_added_with_plus(tmp_path):
    result = run_cli(
        "captioning.train",
        "debug=fast",
        "+trainer.max_step=10",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"CAPTIONING_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "trainer.max_step" in result.stderr and "did you mean trainer.max_steps?" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "cache").exists()  # stopped before any work


# -- 4. partial results ----------------------------------------------------------------------------------------


@requires_java()
@pytest.mark.java
def test_partial_results_exit_non_zero_unless_allowed(tmp_path, capsys):
    from captioning.score import main as score_main

    references = {1: "a red circle on the left", 2: "two blue squares", 3: "a green triangle above a red circle"}
    annotations = tmp_path / "captions.json"
    annotations.write_text(
        json.dumps(
            {
                "images": [{"id": i} for i in references],
                "annotations": [{"id": i, "image_id": i, "caption": c} for i, c in references.items()],
            }
        )
    )
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 1, "caption": "a red circle on the left"}]))
    assert score_main([str(annotations), str(results)]) == 1
    err = capsys.readouterr().err
    assert "lacks captions for 2 of the 3 images" in err and "--allow-partial" in err and err.count("\n") == 1
    assert score_main([str(annotations), str(results), "--allow-partial"]) == 0
    assert "scored 1 of 3 images (partial results)" in capsys.readouterr().out
    written = json.loads(results.with_suffix(".scores.json").read_text())
    assert written["num_images"] == 1 and written["num_reference_images"] == 3
    assert (
        score_main([str(annotations), str(results), "--allow-partial", "--synthetic-root", str(tmp_path / "nowhere")])
        == 1
    )  # a bad folder is named before the scoring
    assert "nowhere" in capsys.readouterr().err


# -- 5. one line, never a traceback ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu", "device=gpu: must be auto, cpu, cuda or cuda:N"),
        ("cuda", "asks for CUDA but no CUDA device is available"),
    ],
)
def test_predict_on_a_device_that_is_not_there_says_one_line(checkpoint, photo, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli("captioning.predict", f"checkpoint={checkpoint}", f"inputs=[{photo}]", f"device={device}")
    one_line_error(result, 2, message)


def broken_checkpoints(checkpoint: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    state = load_checkpoint(checkpoint)
    empty_vocab = folder / "empty_vocab.pt"
    save_checkpoint({**state, "vocab": {}}, empty_vocab)
    config = json.loads(json.dumps(state["config"]))
    config["model"]["decoder"]["hidden_dim"] *= 2
    mismatch = folder / "mismatch.pt"
    save_checkpoint({**state, "config": config}, mismatch)
    return {
        "empty vocabulary": (empty_vocab, "has an empty vocabulary"),
        "config against weights": (mismatch, "its weights do not fit the model its config describes"),
        "a folder": (folder, "is a folder, not a checkpoint file"),
    }


def test_broken_checkpoints_are_one_line_in_predict_and_eval(checkpoint, photo, tmp_path):
    for name, (path, message) in broken_checkpoints(checkpoint, tmp_path).items():
        one_line_error(
            run_cli("captioning.predict", f"checkpoint={path}", f"inputs=[{photo}]", "device=cpu"), 2, message
        )
        result = run_cli(
            "captioning.evaluate",
            f"checkpoint={path}",
            "device=cpu",
            f"hydra.run.dir={tmp_path / ('eval_' + path.stem)}",
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr, (name, result.stderr[-2000:])
        assert message in result.stderr, (name, result.stderr[-2000:])


# -- 6. portable checkpoints -----------------------------------------------------------------------------------


def test_a_run_folder_copied_elsewhere_captions_with_the_cache_moved_away(tiny_data_root, tmp_path, monkeypatch):
    """Trained on cached scene-label features; the run folder copied, the cache renamed: predict and eval still
    caption, with the encoder files saved beside the checkpoint."""
    from captioning.evaluation.evaluate import evaluate_checkpoint
    from captioning.predict import predict

    cache = tmp_path / "cache"
    monkeypatch.setenv("CAPTIONING_CACHE", str(cache))
    off = ("model.encoder.pretrain=null", "model.decoder.attention=false")
    overrides = [o for o in tiny_overrides(tiny_data_root) if o not in off] + [
        "model.encoder.pretrain.epochs=1",
        "model.encoder.pretrain.batch_size=20",
        "model.encoder.pretrain.extra_images=0",
        "trainer.max_steps=2",
        "trainer.val_every_n_steps=2",
        "trainer.scoring=deferred",
        "trainer.evaluate_after_training=false",
    ]
    train(compose(overrides), tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert str(cache) in state["config"]["model"]["encoder"]["weights"]  # what the config says: the cache
    assert set(state["encoder_files"]) == {"weights", "label_head"}
    decode_cfg = compose(["decode=greedy"], config_name="predict").decode
    images = sorted((tiny_data_root / "val2014").glob("*.jpg"))[:3]
    before = predict(tmp_path / "run" / "checkpoints" / "best.pt", images, decode_cfg, "cpu")
    shutil.copytree(tmp_path / "run", tmp_path / "elsewhere" / "run")
    cache.rename(tmp_path / "cache_moved_away")
    copied = tmp_path / "elsewhere" / "run" / "checkpoints" / "best.pt"
    after = predict(copied, images, decode_cfg, "cpu")
    assert [r["captions"] for r in after] == [r["captions"] for r in before]
    evaluation = evaluate_checkpoint(copied, "test", decode_cfg, device=torch.device("cpu"), score_now=False)
    assert len(evaluation.captions) == 10
    shutil.rmtree(tmp_path / "elsewhere" / "run" / "checkpoints" / "encoder")
    with pytest.raises(FileNotFoundError, match="copy the run folder's checkpoints/encoder/"):
        predict(copied, images, decode_cfg, "cpu")


# -- 7. predict's rule -----------------------------------------------------------------------------------------


def test_predict_captions_every_readable_input_and_reports_failures_in_order(checkpoint, photo, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(photo, folder / "a.png")
    (folder / "b_broken.jpg").write_bytes(b"not a jpeg")
    shutil.copy(photo, folder / "c.png")
    missing = tmp_path / "missing.jpg"
    result = run_cli(
        "captioning.predict",
        f"checkpoint={checkpoint}",
        f"inputs=[{missing},{folder},{photo}]",
        "device=cpu",
        "batch_size=2",
    )
    assert result.returncode == 1, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["file"]).name for r in rows] == ["missing.jpg", "a.png", "b_broken.jpg", "c.png", "photo.png"]
    assert [("error" in r) for r in rows] == [True, False, True, False, False]
    assert rows[0]["error"] == "no such file or folder"
    summary = one_line_error(result, 1, "2 of 5 inputs could not be captioned")
    assert summary.count("missing.jpg") == 1 and summary.count("b_broken.jpg") == 1
    good = run_cli("captioning.predict", f"checkpoint={checkpoint}", f"inputs=[{photo}]", "device=cpu")
    assert good.returncode == 0 and good.stderr.strip() == "", good.stderr
    one_line_error(
        run_cli("captioning.predict", f"checkpoint={checkpoint}", f"inputs=[{missing}]", "device=cpu"),
        2,
        "no such file or folder",
    )


# -- 8. no silent writes into a named data folder --------------------------------------------------------------


def test_a_data_root_of_other_files_is_refused_and_a_new_one_is_said(tmp_path, caplog):
    from captioning.data.build import load_records

    unrelated = tmp_path / "my_photos"
    unrelated.mkdir()
    (unrelated / "holiday.jpg").write_bytes(b"x")
    cfg = compose(tiny_overrides(unrelated))
    with pytest.raises(ValueError, match=r"data\.root=.*my_photos holds other files \(holiday\.jpg\)"):
        load_records(cfg.data)
    assert sorted(p.name for p in unrelated.iterdir()) == ["holiday.jpg"]
    new = tmp_path / "new_data"
    with caplog.at_level("WARNING"):
        load_records(compose(tiny_overrides(new)).data)
    assert "does not exist: generating the synthetic data set there" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_records(compose(tiny_overrides(new)).data)  # ours now: reused, nothing said
    assert "generating" not in caplog.text
