"""The feature cache: extract once (resumable), train and evaluate on features, predict from images."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, requires_java, tiny_overrides

from captioning.data.features import FeatureStore

spec = importlib.util.spec_from_file_location(
    "extract_features", Path(__file__).parent.parent / "tools" / "extract_features.py"
)
extract_features = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extract_features)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A local weights file, as air-gapped clusters use (random values: no download here)."""
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(7)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def frozen(weights) -> list[str]:
    return ["model.encoder.name=resnet18", "model.encoder.trainable=false", f"model.encoder.weights={weights}"]


@pytest.fixture(scope="module")
def store(tiny_data_root, tmp_path_factory, frozen):
    out = tmp_path_factory.mktemp("features") / "r18"
    code = extract_features.main(
        ["--out", str(out), "--batch-size", "16", "--device", "cpu", *tiny_overrides(tiny_data_root), *frozen]
    )
    assert code == 0
    return out


def test_store_holds_the_frozen_encoders_features(store, tiny_data_root, frozen, weights):
    from captioning.data.build import eval_dataset, load_records
    from captioning.models.encoder import ImageEncoder

    features = FeatureStore(store)
    assert features.complete() and features.feature_dim == 512 and len(features.row_of) == 80
    cfg = compose(tiny_overrides(tiny_data_root) + frozen)
    record = load_records(cfg.data)["val"][0]
    encoder = ImageEncoder("resnet18", str(weights), trainable=False).eval()
    with torch.no_grad():
        expected = encoder(eval_dataset([record], cfg.data)[0]["image"][None])[0]
    torch.testing.assert_close(features.get(record.image_id), expected, rtol=1e-2, atol=1e-2)  # float16


def test_extraction_resumes_and_refuses_other_settings(store, tiny_data_root, tmp_path, frozen):
    done = np.load(store / "done.npy")
    partial = tmp_path / "partial"
    import shutil

    shutil.copytree(store, partial)
    marks = done.copy()
    marks[::2] = False  # as if killed half way
    np.save(partial / "done.npy", marks)
    extracted = extract_features.extract(
        partial, compose(tiny_overrides(tiny_data_root) + frozen), 16, torch.device("cpu")
    )
    assert extracted["extracted_now"] == 40 and np.load(partial / "done.npy").all()
    assert np.array_equal(np.load(partial / "features.npy"), np.load(store / "features.npy"))
    code = extract_features.main(
        ["--out", str(partial), "--device", "cpu", *tiny_overrides(tiny_data_root), *frozen, "data.image_size=48"]
    )
    assert code == 1


@requires_java()
@pytest.mark.java
def test_training_on_cached_features_then_predict_from_images(store, tiny_data_root, tmp_path, frozen):
    from captioning.predict import predict
    from captioning.training.recipe import train

    overrides = (
        tiny_overrides(tiny_data_root)
        + frozen
        + [f"data.features={store}", "trainer.max_steps=4", "trainer.val_every_n_steps=4"]
    )
    summary = train(compose(overrides), tmp_path / "run")
    assert summary["steps"] == 4 and 0 <= summary["test"]["test/CIDEr"] <= 10
    rows = predict(
        tmp_path / "run" / "checkpoints" / "best.pt",
        [tiny_data_root / "val2014"],
        compose([], config_name="predict").decode,
        "cpu",
        output=tmp_path / "out.jsonl",
    )
    assert len(rows) == len(list((tiny_data_root / "val2014").glob("*.jpg"))) and all("captions" in r for r in rows)
    with pytest.raises(Exception, match="data.features"):
        from captioning.config import validate_train_config

        validate_train_config(compose(tiny_overrides(tiny_data_root) + [f"data.features={store}"]))  # trainable
