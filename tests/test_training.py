"""End to end on tiny synthetic data: train, validate, checkpoint, resume, evaluate (CPU, seconds)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import compose, preempt_run_during_step, requires_java, signal_during_step, tiny_overrides

from captioning.evaluation.evaluate import evaluate_checkpoint
from captioning.loggers.jsonl import read_jsonl
from captioning.runtime.checkpoint import load_checkpoint
from captioning.runtime.preemption import PREEMPTION_EXIT_CODE
from captioning.training.recipe import train

pytestmark = [requires_java(), pytest.mark.java]


def test_tiny_run_trains_validates_and_evaluates(tiny_data_root, tmp_path):
    cfg = compose(
        tiny_overrides(tiny_data_root)
        + ["trainer.max_steps=20", "trainer.val_every_n_steps=10", "trainer.metrics=[BLEU,METEOR,ROUGE-L,CIDEr]"]
    )
    summary = train(cfg, tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert all("step" in r and r["train/teacher_forcing_prob"] == 1.0 for r in records)
    assert any("test/CIDEr" in r for r in records)
    train_records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_records] == list(range(2, 21, 2))
    assert train_records[-1]["train/loss"] < train_records[0]["train/loss"]  # it learns
    val = [r for r in records if "val/CIDEr" in r]
    assert [r["step"] for r in val] == [10, 20]
    for key in ("val/BLEU-1", "val/BLEU-4", "val/METEOR", "val/ROUGE-L", "val/CIDEr"):
        assert all(0 <= r[key] <= 10 for r in val), key
    assert (tmp_path / "checkpoints" / "last.pt").is_file() and (tmp_path / "checkpoints" / "best.pt").is_file()
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] == summary["best_step"]
    assert set(best) >= {"model", "optimizer", "lr_scheduler", "scaler", "step", "epoch", "rng", "vocab", "config"}

    test = summary["test"]
    for key in (
        "test/BLEU-1",
        "test/BLEU-2",
        "test/BLEU-3",
        "test/BLEU-4",
        "test/METEOR",
        "test/ROUGE-L",
        "test/CIDEr",
        "test/most_common_caption/CIDEr",
    ):
        assert key in test and 0 <= test[key] <= 10
    for key in ("nll_tf", "nll_free", "nll_gap", "acc_tf", "acc_free", "acc_gap"):
        assert f"test/reference_likelihood/{key}" in test and all(f"val/reference_likelihood/{key}" in r for r in val)
    for key in ("error_tf", "error_free", "excess_error", "free_correct"):  # synthetic data: the oracle
        assert f"test/exposure_oracle/{key}" in test and all(f"val/exposure_oracle/{key}" in r for r in val)
    assert "test/exposure_oracle/swap_gap" in test and not any("val/exposure_oracle/swap_gap" in r for r in val)
    for name in ("reference_likelihood", "exposure_oracle"):
        assert (tmp_path / f"test_{name}.png").is_file() and (tmp_path / f"test_{name}.json").is_file()
    results = json.loads((tmp_path / "results_test_beam.json").read_text())
    assert len(results) == 10 and all(set(r) == {"image_id", "caption"} for r in results)
    written = json.loads((tmp_path / "test_metrics.json").read_text())
    assert written["test/CIDEr"] == test["test/CIDEr"]

    # Synthetic data: every evaluation judges the captions against the exact scenes, the reference row too.
    from captioning.scenes.generator import load_scenes
    from captioning.scenes.truth import scene_metrics

    scenes = load_scenes(tiny_data_root)
    truth = scene_metrics({r["image_id"]: r["caption"] for r in results}, scenes)
    assert test["test/scene/correct"] == truth["scene/correct"]
    assert test["test/scene/grammatical"] == truth["scene/grammatical"]
    caption = written["most_common_caption"]
    assert (
        test["test/most_common_caption/scene/correct"]
        == scene_metrics({r["image_id"]: caption for r in results}, scenes)["scene/correct"]
    )
    assert all("val/scene/correct" in r for r in val)

    # Evaluating the best checkpoint again reproduces the training run's figures exactly.
    again = evaluate_checkpoint(tmp_path / "checkpoints" / "best.pt", "test", cfg.decode, device=torch.device("cpu"))
    assert again.keyed() == test


def test_trainer_metrics_choose_what_validation_and_the_test_compute(tiny_data_root, tmp_path):
    """trainer.metrics=[BLEU,CIDEr]: validation and the final test give BLEU-1..4 and CIDEr only, and no METEOR JVM
    is started."""
    from captioning.metrics import coco

    coco.close_meteor()  # another test of this process may have left one running
    cfg = compose(tiny_overrides(tiny_data_root) + ["trainer.max_steps=3", "trainer.metrics=[BLEU,CIDEr]"])
    summary = train(cfg, tmp_path)
    coco_figures = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    expected = coco_figures - {"METEOR", "ROUGE-L"}
    val = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "val/CIDEr" in r]
    assert len(val) == 1 and {k.removeprefix("val/") for k in val[0]} & coco_figures == expected
    test = {k.removeprefix("test/") for k in summary["test"]}
    assert test & coco_figures == expected
    assert {k.removeprefix("most_common_caption/") for k in test if k.startswith("most_common")} & coco_figures == (
        expected
    )
    assert coco._shared_meteor is None


def _param_vector(path):
    state = load_checkpoint(path)["model"]
    return torch.cat([v.flatten().float() for v in state.values()])


@pytest.mark.parametrize(
    "schedule",
    [["schedule=teacher_forcing", "model.decoder.dropout=0.3"], ["schedule=inverse_sigmoid", "schedule.k=2"]],
)
def test_resume_after_preemption_equals_straight_run(tiny_data_root, tmp_path, monkeypatch, schedule):
    overrides = (
        tiny_overrides(tiny_data_root)
        + schedule
        + [
            "trainer.max_steps=8",
            "trainer.val_every_n_steps=4",
            "trainer.log_every_n_steps=1",
            "data.batch_size=4",
            "trainer.evaluate_after_training=false",
        ]
    )
    straight = train(compose(overrides), tmp_path / "straight")
    assert straight["steps"] == 8

    # A SIGTERM during step 3 (mid-epoch, not at a validation): the run saves after that step and exits.
    first = preempt_run_during_step(monkeypatch, compose(overrides), tmp_path / "resumed", 3)
    assert first["preempted"] and first["exit_code"] == PREEMPTION_EXIT_CODE and first["steps"] == 3
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 3
    second = train(compose(overrides), tmp_path / "resumed")  # trainer.resume=auto picks up last.pt
    assert second["steps"] == 8 and not second["preempted"]

    def losses(run):
        return {r["step"]: r["train/loss"] for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "train/loss" in r}

    assert losses("straight") == losses("resumed")
    assert torch.equal(
        _param_vector(tmp_path / "straight" / "checkpoints" / "last.pt"),
        _param_vector(tmp_path / "resumed" / "checkpoints" / "last.pt"),
    )
    records = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    probs = [r["train/teacher_forcing_prob"] for r in records if "train/loss" in r]
    assert probs == [
        r["train/teacher_forcing_prob"]
        for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")
        if "train/loss" in r
    ]  # the schedule position survives the resume


def test_sigusr1_saves_then_hands_over_to_the_launchers_handler(tiny_data_root, tmp_path, monkeypatch):
    """Under submitit, SIGUSR1's handler requeues the job: it must run only after our checkpoint is on disk."""
    calls = []

    def launcher_handler(signum, frame):
        calls.append((signum, (tmp_path / "checkpoints" / "last.pt").is_file()))

    previous = signal.signal(signal.SIGUSR1, launcher_handler)
    signal_during_step(monkeypatch, 1, signal.SIGUSR1)
    try:
        summary = train(compose(tiny_overrides(tiny_data_root)), tmp_path)
        assert summary["preempted"] and summary["requeue"] == "previous handler" and summary["steps"] == 1
        assert calls == [(signal.SIGUSR1, True)]
        assert signal.getsignal(signal.SIGUSR1) is launcher_handler  # ours is gone again
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_deferred_scoring_needs_no_java_and_scores_the_same_later(tiny_data_root, tmp_path, monkeypatch):
    """trainer.scoring=deferred (GPU nodes without Java) + tools/score_runs.py == scoring during training."""
    import importlib.util

    from captioning import metrics

    overrides = tiny_overrides(tiny_data_root) + ["trainer.max_steps=6", "trainer.val_every_n_steps=6"]
    now = train(compose(overrides), tmp_path / "now")

    def no_java():
        raise AssertionError("deferred scoring must not need Java")

    monkeypatch.setattr(metrics, "check_java", no_java)
    deferred_dir = tmp_path / "sweep" / "0"
    deferred = train(compose(overrides + ["trainer.scoring=deferred"]), deferred_dir)
    monkeypatch.undo()
    assert (deferred_dir / "val_results" / "step_00000006.json").is_file()
    assert not (deferred_dir / "test_metrics.json").exists() and "test/CIDEr" not in deferred["test"]

    # Hydra writes the composed config next to the run; score_runs reads it from there.
    (deferred_dir / ".hydra").mkdir()
    from omegaconf import OmegaConf

    OmegaConf.save(compose(overrides + ["trainer.scoring=deferred"]), deferred_dir / ".hydra" / "config.yaml")
    spec = importlib.util.spec_from_file_location(
        "score_runs", Path(__file__).parent.parent / "tools" / "score_runs.py"
    )
    score_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score_runs)
    assert score_runs.main([str(tmp_path / "sweep")]) == 0
    scored = json.loads((deferred_dir / "test_metrics.json").read_text())
    for key, value in now["test"].items():
        if key.startswith("test/") and not key.startswith(("test/reference_likelihood", "test/exposure_oracle")):
            assert scored[key] == pytest.approx(value, abs=1e-12), key
    val_now = [r for r in read_jsonl(tmp_path / "now" / "metrics.jsonl") if "val/CIDEr" in r]
    val_later = [r for r in read_jsonl(deferred_dir / "metrics.jsonl") if "val/CIDEr" in r]
    assert [(r["step"], r["val/CIDEr"], r["train/teacher_forcing_prob"]) for r in val_now] == [
        (r["step"], r["val/CIDEr"], r["train/teacher_forcing_prob"]) for r in val_later
    ]
    assert score_runs.main([str(tmp_path / "sweep")]) == 0  # idempotent: already scored


def test_encoder_unfreezes_after_n_steps_with_its_own_learning_rate(tiny_data_root, tmp_path):
    overrides = tiny_overrides(tiny_data_root) + [
        "model.encoder.trainable=false",
        "model.encoder.unfreeze_after_steps=3",
        "optim.encoder_lr=0.05",
        "trainer.max_steps=3",
        "trainer.val_every_n_steps=3",
        "trainer.evaluate_after_training=false",
    ]
    train(compose(overrides), tmp_path / "three")
    initial = {
        k: v
        for k, v in load_checkpoint(tmp_path / "three" / "checkpoints" / "last.pt")["model"].items()
        if k.startswith("encoder.")
    }
    from captioning.models.captioner import build_captioner

    torch.manual_seed(0)
    fresh = build_captioner(compose(overrides).model, 10)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in initial.items() if "conv" in k)  # frozen: untouched
    summary = train(
        compose(
            overrides[:-3]
            + ["trainer.max_steps=5", "trainer.val_every_n_steps=5", "trainer.evaluate_after_training=false"]
        ),
        tmp_path / "five",
    )
    assert summary["steps"] == 5
    state = load_checkpoint(tmp_path / "five" / "checkpoints" / "last.pt")
    after = {k: v for k, v in state["model"].items() if k.startswith("encoder.") and "conv" in k}
    assert any(not torch.equal(v, initial[k]) for k, v in after.items())  # trained from step 3 on
    encoder_group = [g for g in state["optimizer"]["param_groups"] if g.get("name") == "encoder"][0]
    assert encoder_group["initial_lr"] == 0.05  # its own rate (then cosine-decayed like the decoder's)
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == 6e-3  # conf/optim/adam.yaml
    records = read_jsonl(tmp_path / "five" / "metrics.jsonl")
    assert all(
        0 <= r["train/data_wait_fraction"] <= 1 and r["train/images_per_s"] > 0 for r in records if "train/loss" in r
    )


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_data_root):
    """trainer.compile=true wraps the objective in torch.compile, and compiled steps give the eager losses. The
    steps run on a feature-input model (compiling a whole CNN costs most of a minute on 2 cores)."""
    import torch._dynamo

    from captioning.models.captioner import Captioner
    from captioning.models.decoder import RNNDecoder
    from captioning.models.encoder import PrecomputedFeatures
    from captioning.runtime.distributed import DistInfo
    from captioning.training.engine import wrap_for_training
    from captioning.training.objectives import CrossEntropyObjective

    cfg = compose(tiny_overrides(tiny_data_root) + ["trainer.compile=true"])
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = Captioner(PrecomputedFeatures(16), RNNDecoder(30, 16, 24))
        objective = CrossEntropyObjective(model)
        forward = wrap_for_training(objective, cfg, DistInfo(), torch.device("cpu")) if compiled else objective
        assert (forward is not objective) == compiled and callable(forward)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(1)
        losses[compiled] = []
        for _ in range(3):
            features, targets = (
                torch.randn(4, 16, generator=generator),
                torch.randint(3, 30, (4, 2, 7), generator=generator),
            )
            loss, _ = forward(features, targets, 1.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[compiled].append(loss.item())
    torch._dynamo.reset()
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_resume_drops_metrics_logged_after_the_checkpoint(tiny_data_root, tmp_path, monkeypatch):
    """After a SIGKILL the log may run ahead of last.pt; the resumed run must not log those steps twice."""
    overrides = tiny_overrides(tiny_data_root) + [
        "trainer.max_steps=6",
        "trainer.val_every_n_steps=3",
        "trainer.log_every_n_steps=1",
        "trainer.evaluate_after_training=false",
    ]
    assert preempt_run_during_step(monkeypatch, compose(overrides), tmp_path, 3)["steps"] == 3
    with open(tmp_path / "metrics.jsonl", "a") as f:  # what a run killed at step 5 had logged beyond last.pt
        f.write('{"step": 4, "train/loss": 9.0}\n{"step": 5, "train/loss": 9.0}\n')
    train(compose(overrides), tmp_path)
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(r["train/loss"] != 9.0 for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r)
