"""The exposure-bias data set (data=synthetic_long): long scenes in the one grammar, and the true-label input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose

from captioning.scenes import generator as long_scenes
from captioning.scenes import pretraining as scene_features
from captioning.scenes.generator import (
    caption_scene,
    ensure_synthetic,
    load_scenes,
    sample_scene,
)
from captioning.scenes.grammar import COLORS, SceneOracle, check_caption, tokenize

LONG = {"num_train": 30, "num_val": 6, "num_test": 6, "image_size": 32, "seed": 0}


@pytest.fixture(scope="module")
def long_root(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("long") / "data", kind="long", **LONG)


def _images(root):
    return json.loads((root / "dataset_coco.json").read_text())["images"]


def test_long_scenes_have_4_to_6_objects_and_captions_of_25_to_40_words_naming_all_in_order(long_root):
    scenes = load_scenes(long_root)
    counts = set()
    for image in _images(long_root):
        scene = scenes[image["cocoid"]]
        counts.add(len(scene.objects))
        assert 4 <= len(scene.objects) <= 6 and scene.layout in ("horizontal", "vertical")
        assert len({o.shape for o in scene.objects}) == len(scene.objects)
        along = [o.cx if scene.layout == "horizontal" else o.cy for o in scene.objects]
        assert along == sorted(along)  # reading order
        for sentence in image["sentences"]:
            assert 25 <= len(sentence["tokens"]) <= 40
            colours = [w for w in sentence["tokens"] if w in COLORS]
            assert colours == [o.color for o in scene.objects]  # every object named, in reading order
    assert counts == {4, 5, 6}


def test_oracle_next_words_and_checker_agree_on_long_captions(long_root):
    scenes = load_scenes(long_root)
    wrong_checked = 0
    for image in _images(long_root)[:12]:
        scene = scenes[image["cocoid"]]
        oracle = SceneOracle(scene)
        for sentence in image["sentences"]:
            tokens = tokenize(sentence["raw"])
            check = check_caption(sentence["raw"], scene, oracle)
            assert check.correct and check.grammatical and not check.false_claims, check.reason
            assert check.template.startswith("long_")
            state = oracle.start
            for k, word in enumerate(tokens):
                following = oracle.next_words(state)
                assert word in following
                if word in COLORS:  # after the article / size word only the object's own colour continues
                    assert following & set(COLORS) == {word}
                    # a wrong colour taking the same article ('a' / 'an'), so the sentence still parses
                    wrong = next((c for c in COLORS if c != word and (c[0] in "aeiou") == (word[0] in "aeiou")), None)
                    if wrong is None:  # orange is the one colour after 'an'
                        state = oracle.advance(state, word)
                        continue
                    bad = tokens[:k] + [wrong] + tokens[k + 1 :]
                    assert oracle.true_prefix_length(bad) == k and not oracle.is_caption(bad)
                    bad_check = check_caption(bad, scene, oracle)
                    assert not bad_check.correct
                    assert [c.kind for c in bad_check.false_claims] == ["colour"]
                    wrong_checked += 1
                state = oracle.advance(state, word)
            assert oracle.accepts(state)
    assert wrong_checked > 100


def test_the_standard_scenes_are_drawn_as_before():
    """The long templates add sentence forms for 4-6 objects only: 1-3 object captions are the same draws."""
    rng = random.Random("same")
    scene = sample_scene(rng)
    assert caption_scene(scene, random.Random(1)) == caption_scene(scene, random.Random(1), words=(5, 16))
    assert long_scenes.max_objects("standard") == 3 and long_scenes.max_objects("long") == 6
    with pytest.raises(ValueError, match="data.synthetic.kind must be one of"):
        ensure_synthetic("/nonexistent", kind="longer")


def test_true_label_input_is_the_one_hot_scene_labels_with_six_slots(long_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONING_CACHE", str(tmp_path / "cache"))
    cfg = compose(
        [
            f"data.root={long_root}",
            "data=synthetic_long",
            *(f"data.synthetic.{k}={v}" for k, v in LONG.items()),
            "data.image_size=32",
            "model.encoder.pretrain.feed=true_labels",
        ]
    )
    prepared = scene_features.prepare_inputs(cfg)
    store = prepared.data.features
    features = np.load(f"{store}/features.npy").astype(np.float32)
    ids = json.loads(Path(f"{store}/index.json").read_text())["image_ids"]
    heads = scene_features._heads(6)
    head = torch.load(prepared.model.encoder.label_head, weights_only=True)
    assert [tuple(g) for g in head["groups"]] == list(heads.items())
    assert features.shape == (len(ids), sum(heads.values()))
    labels = scene_features.scene_labels([load_scenes(long_root)[i] for i in ids], 6)
    start = 0
    for column, size in enumerate(heads.values()):
        block = features[:, start : start + size]
        known = labels[:, column] >= 0
        assert (block[known].argmax(1) == labels[known, column].numpy()).all()
        assert (block[known].sum(1) == 1).all() and (block[~known] == 0).all()
        start += size
    assert prepared.data.features == scene_features.prepare_inputs(cfg).data.features  # reused


def test_the_pretrained_encoder_learns_six_slots_on_long_scenes(long_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONING_CACHE", str(tmp_path / "cache"))
    cfg = compose(
        [
            f"data.root={long_root}",
            "data=synthetic_long",
            *(f"data.synthetic.{k}={v}" for k, v in LONG.items()),
            "data.image_size=32",
            "model.encoder.pretrain.epochs=1",
            "model.encoder.pretrain.batch_size=20",
            "model.encoder.pretrain.extra_images=20",
            "model.encoder.pretrain.precision=fp32",
            "trainer.device=cpu",
        ]
    )
    prepared = scene_features.prepare_inputs(cfg)
    heads = scene_features._heads(6)
    head = torch.load(prepared.model.encoder.label_head, weights_only=True)
    assert [tuple(g) for g in head["groups"]] == list(heads.items())
    features = np.load(f"{prepared.data.features}/features.npy")
    assert features.shape[1] == sum(heads.values())
    # the extra pretraining scenes are long scenes too (their labels fill slots 3..5)
    _, labels = scene_features.generated_scenes(5, 32, cfg.data, 0, "long")
    counts = labels[:, list(heads).index("count")] + 1
    assert ((counts >= 4) & (counts <= 6)).all()
    assert (labels[:, list(heads).index("slot3_shape")] >= 0).all()
