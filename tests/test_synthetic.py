"""Tests for the synthetic COCO-format data set (captioning.scenes.generator) and tools/check_coco.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from captioning.scenes import generator as synthetic
from captioning.scenes import grammar as scene_grammar
from captioning.scenes.generator import (
    COLORS,
    caption_scene,
    draw_scene,
    ensure_synthetic,
    generate_synthetic,
    is_synthetic_root,
    load_scenes,
    sample_scene,
    tokenize,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_train=30, num_val=5, num_test=5, image_size=32, seed=3)


def _load_check_coco():
    spec = importlib.util.spec_from_file_location("check_coco", REPO / "tools" / "check_coco.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_coco = _load_check_coco()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synthetic") / "coco", **SMALL)


def _karpathy(root: Path) -> list[dict]:
    return json.loads((root / "dataset_coco.json").read_text())["images"]


def _objects(root: Path) -> dict:
    return json.loads((root / "synthetic_objects.json").read_text())


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != synthetic.LOCK_FILE
    }


# ---------------------------------------------------------------------------------------------------
# Determinism and layout


def test_generation_is_byte_identical(root, tmp_path):
    again = generate_synthetic(tmp_path / "again", **SMALL)
    first, second = _all_files(root), _all_files(again)
    assert sorted(first) == sorted(second)
    assert any(name.endswith(".jpg") for name in first) and "dataset_coco.json" in first
    for name in first:
        assert first[name] == second[name], name
    other_seed = generate_synthetic(tmp_path / "seed4", **{**SMALL, "seed": 4})
    assert (other_seed / "dataset_coco.json").read_bytes() != first["dataset_coco.json"]


# sha256 of dataset_coco.json, captions_train2014.json, captions_val2014.json and synthetic_objects.json (in this
# order) for SMALL, as written by the generator before its grammar became data (scene_grammar.py): the published
# figures depend on these captions, so any change to them must be deliberate (and bump FORMAT_VERSION).
GOLDEN_JSON_SHA256 = "e95d2e6b498563e9b23e07108aa236f06ebd60e991d0648a2615021577569127"


def test_captions_and_metadata_are_those_of_format_version_1(root):
    digest = hashlib.sha256()
    for name in (
        "dataset_coco.json",
        "annotations/captions_train2014.json",
        "annotations/captions_val2014.json",
        "synthetic_objects.json",
    ):
        digest.update((root / name).read_bytes())
    assert synthetic.FORMAT_VERSION == 1
    assert digest.hexdigest() == GOLDEN_JSON_SHA256


def test_fingerprint_covers_the_grammar(monkeypatch, tmp_path):
    """Editing scene_grammar.py changes the generator fingerprint, so cached folders get regenerated."""
    before = synthetic._generator_fingerprint()
    edited = tmp_path / "scene_grammar.py"
    edited.write_bytes(Path(scene_grammar.__file__).read_bytes() + b"# edited\n")
    monkeypatch.setattr(scene_grammar, "__file__", str(edited))
    assert synthetic._generator_fingerprint() != before


def test_load_scenes_gives_back_the_generated_scenes(root):
    """The scenes read from synthetic_objects.json are the ones drawn for each image (same rng key)."""
    seed = SMALL["seed"]
    for split, code, count in (("val", 1, SMALL["num_val"]), ("test", 2, SMALL["num_test"])):
        loaded = load_scenes(root, split=split)
        assert len(loaded) == count
        for index in range(count):
            drawn = sample_scene(random.Random(f"synthetic-v{synthetic.FORMAT_VERSION}:{seed}:{code}:{index}"))
            scene = loaded[synthetic._cocoid(code, index, seed)]
            assert (scene.layout, scene.position, scene.background) == (drawn.layout, drawn.position, drawn.background)
            assert [(o.shape, o.color, o.size) for o in scene.objects] == [
                (o.shape, o.color, o.size) for o in drawn.objects
            ]
            for a, b in zip(scene.objects, drawn.objects):
                size = SMALL["image_size"]
                assert abs(a.cx - b.cx) * size <= 0.01 and abs(a.cy - b.cy) * size <= 0.01
                assert abs(a.extent - b.extent) * size <= 0.01 and a.rgb == COLORS[a.color]
    assert len(load_scenes(root)) == SMALL["num_train"] + SMALL["num_val"] + SMALL["num_test"]
    assert is_synthetic_root(root)
    (root / synthetic.INCOMPLETE_MARKER).touch()
    try:
        assert not is_synthetic_root(root)  # a generation in progress is not readable
    finally:
        (root / synthetic.INCOMPLETE_MARKER).unlink()


def test_public_names_survive_and_come_from_the_grammar():
    for name in synthetic.__all__:
        assert hasattr(synthetic, name), name
    for name in (
        "SHAPE_WORDS",
        "SIZE_WORDS",
        "RELATION_WORDS",
        "RELATION_TO_IT",
        "POSITION_WORDS",
        "VERBS",
        "THINGS",
        "PICTURE",
        "GREY",
        "TEMPLATES",
        "COLORS",
        "SHAPES",
        "tokenize",
    ):
        assert getattr(synthetic, name) is getattr(scene_grammar, name), name  # one copy, shared with the checker
    rng = random.Random(5)
    scene = sample_scene(rng)
    template, weight = synthetic.TEMPLATES[len(scene.objects)][0]
    assert weight > 0 and isinstance(template(scene, random.Random(1)), str)  # still (callable, weight) pairs


def test_val_and_test_images_do_not_depend_on_num_train(root, tmp_path):
    fewer = generate_synthetic(tmp_path / "fewer", **{**SMALL, "num_train": 12})
    for split in ("val", "test"):
        a = [e for e in _karpathy(root) if e["split"] == split]
        b = [e for e in _karpathy(fewer) if e["split"] == split]
        assert [e["cocoid"] for e in a] == [e["cocoid"] for e in b]
        assert [s["raw"] for e in a for s in e["sentences"]] == [s["raw"] for e in b for s in e["sentences"]]
        for ea, eb in zip(a, b):
            assert (root / "val2014" / ea["filename"]).read_bytes() == (fewer / "val2014" / eb["filename"]).read_bytes()


def test_layout_and_karpathy_file(root):
    assert (root / "annotations" / "captions_train2014.json").is_file()
    assert (root / "annotations" / "captions_val2014.json").is_file()
    images = _karpathy(root)
    assert json.loads((root / "dataset_coco.json").read_text())["dataset"] == "coco"
    splits = Counter(e["split"] for e in images)
    assert splits["train"] + splits["restval"] == SMALL["num_train"]
    assert splits["restval"] == SMALL["num_train"] // 10 > 0
    assert splits["val"] == SMALL["num_val"] and splits["test"] == SMALL["num_test"]
    assert set(splits) == {"train", "restval", "val", "test"}

    cocoids = [e["cocoid"] for e in images]
    assert len(set(cocoids)) == len(cocoids)
    assert cocoids != list(range(len(cocoids)))  # sparse like real COCO ids, not positions
    sentids = [sid for e in images for sid in e["sentids"]]
    assert sentids == list(range(len(sentids)))
    for imgid, e in enumerate(images):
        assert e["imgid"] == imgid
        assert e["filepath"] == ("train2014" if e["split"] == "train" else "val2014")
        assert e["filename"] == f"COCO_{e['filepath']}_{e['cocoid']:012d}.jpg"
        assert (root / e["filepath"] / e["filename"]).is_file()
        assert len(e["sentences"]) == 5
        assert [s["sentid"] for s in e["sentences"]] == e["sentids"]
        for s in e["sentences"]:
            assert s["imgid"] == imgid
            assert s["tokens"] == tokenize(s["raw"])
            assert all(t.isalnum() and t == t.lower() for t in s["tokens"])
    n_files = len(list((root / "train2014").iterdir())) + len(list((root / "val2014").iterdir()))
    assert n_files == len(images)  # no stray (e.g. temporary) files


def test_pycocotools_loads_annotations(root):
    images = _karpathy(root)
    ann_ids = set()
    for folder in ("train2014", "val2014"):
        coco = COCO(str(root / "annotations" / f"captions_{folder}.json"))
        expected = {e["cocoid"]: e for e in images if e["filepath"] == folder}
        assert set(coco.getImgIds()) == set(expected)
        for image_id, entry in expected.items():
            info = coco.loadImgs(image_id)[0]
            assert info["file_name"] == entry["filename"]
            assert (info["width"], info["height"]) == (SMALL["image_size"],) * 2
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert len(anns) == 5
            assert [a["caption"] for a in anns] == [s["raw"] for s in entry["sentences"]]
            ann_ids.update(a["id"] for a in anns)
    assert len(ann_ids) == 5 * len(images)  # annotation ids unique across both files


def test_images_are_rgb_of_requested_size(root):
    for e in _karpathy(root):
        with Image.open(root / e["filepath"] / e["filename"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (SMALL["image_size"], SMALL["image_size"])


def test_drawn_colours_match_metadata(tmp_path):
    """The named colour really is at each object's centre (exact before JPEG, close after it)."""
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng)
        image = draw_scene(scene, 64)
        assert image.getpixel((0, 0)) == scene.background
        for obj in scene.objects:
            assert image.getpixel((int(obj.cx * 64), int(obj.cy * 64))) == obj.rgb
            assert max(abs(a - b) for a, b in zip(obj.rgb, COLORS[obj.color])) <= 10
    root = generate_synthetic(tmp_path / "c64", num_train=20, num_val=2, num_test=2, image_size=64, seed=1)
    meta = _objects(root)
    checked = 0
    for info in meta["images"].values():
        with Image.open(root / info["file"]) as image:
            for obj in info["objects"]:
                if obj["size"] == "large":
                    x, y, w, h = obj["bbox"]
                    pixel = image.convert("RGB").getpixel((int(x + w / 2), int(y + h / 2)))
                    assert max(abs(a - b) for a, b in zip(pixel, COLORS[obj["color"]])) <= 60, (info, pixel)
                    checked += 1
    assert checked > 5


# ---------------------------------------------------------------------------------------------------
# Captions: length, vocabulary, truth


def _scene_objects(scene) -> list[dict]:
    """Scene objects as the metadata dicts written to synthetic_objects.json (bbox as image fractions)."""
    return [
        {
            "shape": o.shape,
            "color": o.color,
            "size": o.size,
            "bbox": [o.cx - o.extent / 2, o.cy - o.extent / 2, o.extent, o.extent],
        }
        for o in scene.objects
    ]


SHAPE_OF = {
    "circle": "circle",
    "disc": "circle",
    "round": "circle",
    "square": "square",
    "box": "square",
    "triangle": "triangle",
    "star": "star",
    "cross": "cross",
    "diamond": "diamond",
}
SIZE_OF = {"large": "large", "big": "large", "small": "small", "little": "small", "tiny": "small"}
RELATIONS = {
    "to the left of": "left",
    "left of": "left",
    "on the left of": "left",
    "to the right of": "right",
    "right of": "right",
    "on the right of": "right",
    "above": "above",
    "on top of": "above",
    "over": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
    "underneath": "below",
}
TO_IT = {
    "to its left": "left",
    "on its left": "left",
    "to its right": "right",
    "on its right": "right",
    "above it": "above",
    "over it": "above",
    "below it": "below",
    "under it": "below",
    "beneath it": "below",
}
FILLER = {"is", "sits", "lies", "placed", "which", "a", "an", "the"}


def _center(obj):
    x, y, w, h = obj["bbox"]
    return x + w / 2, y + h / 2


def _holds(rel: str, a: dict, b: dict) -> bool:
    """Is a {rel} b? Fully separated on the axis, and clearly more along that axis than across it."""
    (ax, ay, aw, ah), (bx, by, _, _) = a["bbox"], b["bbox"]
    (acx, acy), (bcx, bcy) = _center(a), _center(b)
    if rel == "left":
        return ax + aw <= bx and abs(acy - bcy) < abs(acx - bcx)
    if rel == "right":
        return _holds("left", b, a)
    if rel == "above":
        return ay + ah <= by and abs(acx - bcx) < abs(acy - bcy)
    if rel == "below":
        return _holds("above", b, a)
    raise AssertionError(rel)


def _mentions(toks: list[str], objects: list[dict]) -> list[tuple[int, int, dict]] | None:
    """Object mentions as (start, end, object): '[size] [colour] shape'. Shapes are unique in a scene,
    so the shape word names the object; None if a mention's colour/size/shape is wrong."""
    by_shape = {o["shape"]: o for o in objects}
    mentions = []
    for i, t in enumerate(toks):
        if t not in SHAPE_OF:
            continue
        if t == "round" and toks[i + 1 : i + 2] != ["shape"]:
            return None
        obj = by_shape.get(SHAPE_OF[t])
        if obj is None:
            return None
        start, end = i, i + (2 if t == "round" else 1)
        if start > 0 and toks[start - 1] in COLORS:
            start -= 1
            if toks[start] != obj["color"]:
                return None
        if start > 0 and toks[start - 1] in SIZE_OF:
            start -= 1
            if SIZE_OF[toks[start]] != obj["size"]:
                return None
        mentions.append((start, end, obj))
    return mentions


def _strip(words: list[str]) -> str:
    """The words between two mentions without verbs and the leading/trailing article."""
    words = [w for w in words if w not in {"is", "sits", "lies", "placed", "which"}]
    if words and words[0] == "the":
        words = words[1:]
    if words and words[-1] in {"a", "an", "the"}:
        words = words[:-1]
    return " ".join(words)


def caption_claims_hold(caption: str, objects: list[dict]) -> tuple[bool, int]:
    """Independent checker of what a caption claims: (all claims true?, number of spatial claims).

    Checks mentioned colours/sizes/shapes, counts, pairwise relations between consecutive mentions,
    'between', 'with X to its left', reading-order listings, 'one above the other', 'in the middle
    of a row' and absolute sides ('on the left there is X', 'X at the top')."""
    toks = tokenize(caption)
    text = " ".join(toks)
    n = len(objects)
    mentions = _mentions(toks, objects)
    if mentions is None:
        return False, 0
    if not {t for t in toks if t in COLORS} <= {o["color"] for o in objects}:
        return False, 0
    if ("two" in toks and n != 2) or ("three" in toks and n != 3):
        return False, 0
    if re.search(r"\b(single|only|one (shape|object))\b", text) and n != 1:
        return False, 0

    claims = 0
    for k in range(len(mentions) - 1):
        (_, e1, a), (s2, _, b) = mentions[k], mentions[k + 1]
        phrase = _strip(toks[e1:s2])
        if phrase in RELATIONS:
            claims += 1
            if not _holds(RELATIONS[phrase], a, b):
                return False, claims
        elif phrase == "between":  # "A [is] between B and C"
            if k + 2 >= len(mentions):
                return False, claims
            ends = [b, mentions[k + 2][2]]
            axis = 0 if any(_holds(r, *ends) for r in ("left", "right")) else 1
            lo, hi = sorted(_center(o)[axis] for o in ends)
            claims += 1
            if not lo < _center(a)[axis] < hi:
                return False, claims
    tail = " ".join(toks[mentions[-1][1] :]) if mentions else ""
    if tail in TO_IT:  # "B with A to its left": A is left of B
        if len(mentions) != 2 or _strip(toks[mentions[0][1] : mentions[1][0]]) != "with":
            return False, claims
        claims += 1
        if not _holds(TO_IT[tail], mentions[1][2], mentions[0][2]):
            return False, claims

    listed = [m[2] for m in mentions] if len(mentions) == n else None  # all objects, in mention order
    for phrase, rels in (
        ("from left to right", ["left"]),
        ("from top to bottom", ["above"]),
        ("in a row", ["left"]),
        ("in a column", ["above"]),
        ("in a line", ["left", "above"]),
    ):
        if phrase in text and n > 1:
            claims += 1
            if phrase.startswith("from") and listed is None:
                return False, claims
            orders = [listed] if listed else [sorted(objects, key=lambda o: _center(o)[axis]) for axis in (0, 1)]
            if not any(all(_holds(rel, p, q) for p, q in zip(order, order[1:])) for rel in rels for order in orders):
                return False, claims
    if "side by side" in text or "next to each other" in text:
        claims += 1
        if not (_holds("left", *objects) or _holds("right", *objects)):
            return False, claims
    if "one above the other" in text:
        claims += 1
        if not (_holds("above", *objects) or _holds("below", *objects)):
            return False, claims
    if re.search(r"in the middle of a (row|column)", text):
        claims += 1
        axis = 0 if "row" in toks else 1
        middle = sorted(objects, key=lambda o: _center(o)[axis])[1]
        if n != 3 or len(mentions) != 1 or mentions[0][2] is not middle:
            return False, claims
    elif n == 1 and re.search(r"in the middle|in the center|at the center", text):
        claims += 1
        if not all(abs(c - 0.5) < 0.1 for c in _center(objects[0])):
            return False, claims

    # Absolute sides: "on the left there is X", "and on the right X", "X on the left side of the image".
    for side, axis, extreme in (
        ("on the left", 0, min),
        ("on the right", 0, max),
        ("at the top", 1, min),
        ("near the top", 1, min),
        ("at the bottom", 1, max),
        ("near the bottom", 1, max),
    ):
        for match in re.finditer(rf"\b{side}\b", text):
            start = len(text[: match.start()].split())
            after = start + len(side.split())
            rest = toks[after:]
            if rest[:1] == ["side"]:
                rest = rest[1:]
            if rest[:1] == ["of"] and rest[1:3] not in (["the", "image"], ["the", "picture"]):
                continue  # the relation "on the left of X", checked above
            if rest[:2] == ["there", "is"]:
                rest = rest[2:]
            if rest[:1] in (["a"], ["an"]):
                target = next(m[2] for m in mentions if m[0] >= after)
            else:
                target = [m for m in mentions if m[1] <= start][-1][2]
            claims += 1
            if n == 1:
                c = _center(target)[axis]
                if not (c < 0.4 if extreme is min else c > 0.6):
                    return False, claims
            elif target is not extreme(objects, key=lambda o: _center(o)[axis]):
                return False, claims
    return True, claims


def test_truth_checker_rejects_false_captions():
    """The checker below must catch wrong colours, sizes, counts and relations (else the truth test is vacuous)."""
    left = {"shape": "circle", "color": "red", "size": "large", "bbox": [0.05, 0.35, 0.3, 0.3]}
    right = {"shape": "square", "color": "blue", "size": "small", "bbox": [0.7, 0.42, 0.16, 0.16]}
    objects = [left, right]
    assert caption_claims_hold("a big red circle to the left of a small blue square", objects) == (True, 1)
    assert caption_claims_hold("A blue box sits right of a red disc.", objects) == (True, 1)
    assert caption_claims_hold("a blue square with a red circle to its left", objects) == (True, 1)
    assert caption_claims_hold("a red circle and a blue box , the circle is left of the box", objects)[0]
    assert caption_claims_hold("on the left there is a red disc and on the right a blue box", objects)[0]
    for false in [
        "a red circle to the right of a blue square",
        "a blue box above a red circle",
        "a green circle left of a blue square",
        "a small red circle left of a blue square",
        "three shapes : a red circle , a blue square and a star",
        "a blue square with a red circle to its right",
        "a single red circle",
        "on the left there is a blue box and on the right a red disc",
        "a red circle and a blue box , the box is left of the circle",
        "a red circle and a blue square one above the other",
    ]:
        assert not caption_claims_hold(false, objects)[0], false
    top, mid, bottom = (
        {"shape": s, "color": "red", "size": "small", "bbox": [0.42, y, 0.16, 0.16]}
        for s, y in (("star", 0.05), ("cross", 0.42), ("diamond", 0.8))
    )
    column = [top, mid, bottom]
    assert caption_claims_hold("a red cross between a red star and a red diamond", column) == (True, 1)
    assert not caption_claims_hold("a red star between a red cross and a red diamond", column)[0]
    assert caption_claims_hold("from top to bottom : a red star , a red cross and a red diamond", column)[0]
    assert not caption_claims_hold("from top to bottom : a red cross , a red star and a red diamond", column)[0]
    assert not caption_claims_hold("a red star in the middle of a column of three shapes", column)[0]


def test_captions_are_true_bounded_and_varied():
    rng = random.Random(123)
    vocabulary: Counter = Counter()
    relational_claims = 0
    templates_seen = set()
    for _ in range(1500):
        scene = sample_scene(rng)
        captions = caption_scene(scene, rng)
        assert len(captions) == 5
        assert len({" ".join(tokenize(c)) for c in captions}) == 5  # distinct references
        lengths = [len(tokenize(c)) for c in captions]
        assert all(5 <= n <= 16 for n in lengths), captions
        if len(scene.objects) > 1:
            assert max(lengths) >= 12, captions  # at least one long caption per multi-object scene
        objects = _scene_objects(scene)
        for caption in captions:
            ok, claims = caption_claims_hold(caption, objects)
            assert ok, (caption, objects, scene.layout)
            relational_claims += claims
            vocabulary.update(tokenize(caption))
            templates_seen.add(" ".join(t for t in tokenize(caption) if t not in COLORS)[:12])
    assert 50 <= len(vocabulary) <= 120, sorted(vocabulary)
    assert set(COLORS) <= set(vocabulary)
    assert {
        "circle",
        "disc",
        "square",
        "box",
        "triangle",
        "star",
        "cross",
        "diamond",
        "large",
        "big",
        "small",
        "little",
        "tiny",
        "left",
        "right",
        "above",
        "below",
        "between",
        "two",
        "three",
    } <= set(vocabulary)
    assert relational_claims > 3000  # the truth check really exercised relations
    assert len(templates_seen) > 30  # varied word order, not one template


def test_written_captions_match_object_metadata(root):
    meta = _objects(root)
    size = meta["image_size"]
    capitalised = 0
    for e in _karpathy(root):
        info = meta["images"][str(e["cocoid"])]
        assert info["file"] == f"{e['filepath']}/{e['filename']}" and info["split"] == e["split"]
        objects = [{**o, "bbox": [v / size for v in o["bbox"]]} for o in info["objects"]]
        assert 1 <= len(objects) <= 3 and len({o["shape"] for o in objects}) == len(objects)
        for s in e["sentences"]:
            assert caption_claims_hold(s["raw"], objects)[0], (s["raw"], info)
            capitalised += s["raw"][0].isupper()
    assert capitalised > 0  # some raw captions look like COCO's ("A red ... .")


# ---------------------------------------------------------------------------------------------------
# ensure_synthetic: reuse, regeneration, locking, safety


@pytest.fixture()
def count_generations(monkeypatch):
    calls = []
    real = synthetic.generate_synthetic

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_synthetic", counting)
    return calls


def test_ensure_synthetic_reuses_and_regenerates(tmp_path, count_generations):
    root = tmp_path / "coco"
    assert ensure_synthetic(root, **SMALL) == root
    assert len(count_generations) == 1
    meta, image = root / "synthetic_meta.json", next((root / "train2014").iterdir())
    stamps = (meta.stat().st_mtime_ns, image.stat().st_mtime_ns)

    ensure_synthetic(str(root), **SMALL)  # reuse: nothing rewritten
    assert len(count_generations) == 1
    assert (meta.stat().st_mtime_ns, image.stat().st_mtime_ns) == stamps

    meta.unlink()  # interrupted generation: no completion marker
    ensure_synthetic(root, **SMALL)
    assert len(count_generations) == 2 and meta.is_file()

    (root / synthetic.INCOMPLETE_MARKER).touch()  # killed after writing meta but before finishing
    ensure_synthetic(root, **SMALL)
    assert len(count_generations) == 3 and not (root / synthetic.INCOMPLETE_MARKER).exists()

    changed = {**SMALL, "num_train": 20, "image_size": 40}
    ensure_synthetic(root, **changed)
    assert len(count_generations) == 4
    assert json.loads(meta.read_text())["kwargs"] == changed
    images = _karpathy(root)
    assert sum(e["split"] in ("train", "restval") for e in images) == 20
    on_disk = sorted(str(p.relative_to(root)) for d in ("train2014", "val2014") for p in (root / d).iterdir())
    assert on_disk == sorted(f"{e['filepath']}/{e['filename']}" for e in images)  # old files cleared
    with Image.open(root / on_disk[0]) as im:
        assert im.size == (40, 40)
    assert check_coco.check_coco_folder(root) == []


def test_ensure_synthetic_concurrent_processes_generate_once(tmp_path):
    root = tmp_path / "coco"
    code = (
        "import sys; from captioning.scenes import generator as s; real = s.generate_synthetic\n"
        "def g(*a, **k):\n    print('GENERATED', flush=True); return real(*a, **k)\n"
        "s.generate_synthetic = g\n"
        f"s.ensure_synthetic(sys.argv[1], **{SMALL!r}); print('DONE')"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(root)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    stdout = "".join(out for out, _ in outputs)
    assert stdout.count("DONE") == 3 and stdout.count("GENERATED") == 1
    assert check_coco.check_coco_folder(root) == []
    reference = generate_synthetic(tmp_path / "reference", **SMALL)
    assert _all_files(root) == _all_files(reference)


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    real = tmp_path / "real_coco"
    (real / "annotations").mkdir(parents=True)
    keep = real / "annotations" / "captions_train2014.json"
    keep.write_text("{}")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        ensure_synthetic(real, **SMALL)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        generate_synthetic(real, **SMALL)
    assert keep.read_text() == "{}"


@pytest.mark.parametrize(
    "bad",
    [
        dict(num_train=0),
        dict(num_val=-1),
        dict(image_size=8),
        dict(seed=-1),
        dict(num_test="5"),
        dict(image_size=32.0),
        dict(num_train=True),
    ],
)
def test_invalid_arguments_raise(tmp_path, bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        generate_synthetic(tmp_path / "x", **{**SMALL, **bad})
    with pytest.raises(ValueError, match=name):
        ensure_synthetic(tmp_path / "y", **{**SMALL, **bad})


# ---------------------------------------------------------------------------------------------------
# tools/check_coco.py


def test_check_coco_passes_on_synthetic(root):
    assert check_coco.check_coco_folder(root) == []
    counts = check_coco.karpathy_split_counts(root / "dataset_coco.json")
    assert counts["train+restval"] == 30 and counts["val"] == 5 and counts["test"] == 5
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "check_coco.py"), str(root)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "train+restval: 30" in result.stdout and "real COCO: 113,287" in result.stdout


def test_check_coco_names_missing_image_and_annotation_file(root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    entry = next(e for e in _karpathy(broken) if e["split"] == "test")
    missing_image = broken / "val2014" / entry["filename"]
    missing_image.unlink()
    problems = check_coco.check_coco_folder(broken)
    assert len(problems) == 1 and str(missing_image) in problems[0] and problems[0].startswith("1 of 40 images")

    (broken / "annotations" / "captions_val2014.json").unlink()
    problems = check_coco.check_coco_folder(broken)
    text = "\n".join(problems)
    assert f"missing file: {broken / 'annotations' / 'captions_val2014.json'}" in text
    n_val2014 = sum(e["filepath"] == "val2014" for e in _karpathy(broken))
    assert f"{n_val2014} Karpathy cocoids have no caption annotation" in text and str(entry["cocoid"]) in text

    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "check_coco.py"), str(broken)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "captions_val2014.json" in result.stdout and entry["filename"] in result.stdout


def test_check_coco_karpathy_option_and_missing_folders(root, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    split_file = tmp_path / "splits.json"
    (moved / "dataset_coco.json").rename(split_file)
    problems = check_coco.check_coco_folder(moved)
    assert any(str(moved / "dataset_coco.json") in p for p in problems)
    assert check_coco.check_coco_folder(moved, karpathy_file=split_file) == []
    assert check_coco.main([str(moved), "--karpathy", str(split_file)]) == 0

    shutil.rmtree(moved / "train2014")
    problems = check_coco.check_coco_folder(moved, split_file)
    assert any(p == f"missing image folder: {moved / 'train2014'}" for p in problems)
    assert check_coco.check_coco_folder(tmp_path / "nowhere") == [f"COCO root folder not found: {tmp_path / 'nowhere'}"]
