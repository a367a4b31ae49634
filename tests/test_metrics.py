"""Tests for captioning.metrics (pycocoevalcap wrapper, diversity metrics) and captioning-score."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from captioning import score as score_cli
from captioning.metrics import coco
from captioning.metrics.coco import load_references, load_results, ptb_tokenize, score_captions
from captioning.metrics.diversity import (
    distinct_n,
    diversity_report,
    diversity_report_tokenized,
    self_bleu4,
    unique_ngram_ratio,
)
from captioning.metrics.java import _major_version, check_java

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="needs a Java runtime (pycocoevalcap PTB tokenizer / METEOR)"
)

REFS = {
    1: [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave.",
        "Surfer in a black wetsuit riding a big wave!",
    ],
    2: [
        "Two dogs play with a red frisbee in the park.",
        "A pair of dogs chasing a frisbee on the grass.",
        "Dogs running after a flying disc.",
    ],
    3: [
        "A plate of food with broccoli, rice and chicken.",
        "A white plate topped with rice and vegetables.",
        "Chicken, broccoli, and rice on a plate.",
        "A healthy meal served on a white dish.",
        "Dinner plate with meat and greens.",
    ],
    4: [
        "A café with people sitting at tables outside.",
        "People drink coffee at an outdoor café.",
        'Customers sitting at a sidewalk "café" in the sun.',
    ],
    5: [
        "A cat sleeping on a laptop keyboard.",
        "The cat's asleep on the computer.",
        "A gray cat lying on top of an open laptop (sleeping).",
        "A kitten naps on a keyboard.",
    ],
    6: [
        "A red double-decker bus driving down a city street.",
        "A double decker bus on the road.",
        "A big red bus in the city -- London maybe.",
    ],
}
PREDS = {
    1: "a man riding a wave on top of a surfboard",  # perfect: equals reference 0 once tokenized
    2: "two dogs playing with a frisbee",  # partial
    3: "",  # empty
    4: "People sitting at a CAFÉ, outside!!",  # case, punctuation, non-ASCII
    5: 'A cat... sleeping on a "laptop".',
    6: "a bus\non the street",  # newline inside a caption
}
TRICKY = [
    "A man's dog -- isn't it (really) \"great\"?",
    "café au lait, naïve Ångström ÉCOLE",
    "emoji 😀 here 🐶!",
    "line one\nline two",
    "tabs\tand   spaces",
    "U.S.A. costs $5.50 & 50% off...",
    "",
    "'single' `quotes`",
    "{braces} [brackets] <angles>",
    "semi; colon: dash - ellipsis … end",
    "ALL CAPS SENTENCE.",
    "",
]


def pycocoevalcap_reference_scores(refs, preds):
    """The classic pipeline: their PTBTokenizer, then Bleu(4), Meteor(), Rouge(), Cider() directly."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in refs[i]] for i in refs})
    res = PTBTokenizer().tokenize({i: [{"caption": preds[i]}] for i in refs})
    ids = list(gts)
    scores, per_image = {}, {}
    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        scores[f"BLEU-{n + 1}"], per_image[f"BLEU-{n + 1}"] = bleu[n], dict(zip(ids, bleu_per[n]))
    meteor = Meteor()
    try:
        scores["METEOR"], m_per = meteor.compute_score(gts, res)
        per_image["METEOR"] = dict(zip(ids, m_per))
    finally:  # their wrapper only cleans up in __del__
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    for name, scorer in (("ROUGE-L", Rouge()), ("CIDEr", Cider())):
        scores[name], s_per = scorer.compute_score(gts, res)
        per_image[name] = dict(zip(ids, s_per))
    return scores, per_image


def their_package_dir_writable() -> bool:
    from pycocoevalcap.tokenizer import ptbtokenizer

    return os.access(os.path.dirname(ptbtokenizer.__file__), os.W_OK)


# ------------------------------------------------------------------------------------------------
# tokenizer


@pytest.mark.java
@needs_java
@pytest.mark.skipif(not their_package_dir_writable(), reason="pycocoevalcap's tokenizer needs its package dir writable")
def test_tokenize_equals_pycocoevalcap_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = {i: [c] for i, c in enumerate(TRICKY)}
    captions[100] = TRICKY[:4]  # several captions for one image, in order
    theirs = PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in captions.items()})
    ours = ptb_tokenize(captions)
    assert ours == theirs
    assert ours[1] == ["café au lait naïve ångström école"]
    assert ours[3] == ["line one line two"]


@pytest.mark.java
@needs_java
def test_tokenize_keeps_one_line_per_caption_for_any_line_break():
    # pycocoevalcap only replaces "\n": "\r", "\v", "\f", U+2028 split a caption and shift all later ones
    odd = ["a\rb", "c\r\nd", "e\x0bf", "g\x0ch", "i\u2028j", "k\u2029l", "m\x85n", "o\tp"]
    out = ptb_tokenize({1: odd, 2: ["A dog."]})
    assert out == {1: ["a b", "c d", "e f", "g h", "i j", "k l", "m n", "o p"], 2: ["a dog"]}
    assert ptb_tokenize({}) == {}
    assert ptb_tokenize({7: []}) == {7: []}
    with pytest.raises(TypeError, match="image 3"):
        ptb_tokenize({3: "not a list"})


# ------------------------------------------------------------------------------------------------
# score_captions


@pytest.mark.java
@needs_java
@pytest.mark.skipif(not their_package_dir_writable(), reason="pycocoevalcap's tokenizer needs its package dir writable")
def test_score_captions_equals_pycocoevalcap():
    theirs, theirs_per_image = pycocoevalcap_reference_scores(REFS, PREDS)
    ours, per_image = score_captions(REFS, PREDS, per_image=True)

    assert list(ours) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    assert all(type(v) is float for v in ours.values())
    for name, value in theirs.items():
        tol = 1e-6 if name == "METEOR" else 1e-9
        assert ours[name] == pytest.approx(value, abs=tol), name
        for image_id, image_value in theirs_per_image[name].items():
            assert per_image[name][image_id] == pytest.approx(image_value, abs=tol), (name, image_id)
    assert per_image["CIDEr"][3] == 0.0 and per_image["BLEU-4"][3] < 1e-6  # the empty prediction
    assert per_image["BLEU-1"][1] == pytest.approx(1.0)  # the perfect one
    assert coco._shared_meteor.alive()  # kept for the next call (the end-to-end test reuses it)


def test_score_captions_validates_inputs():
    with pytest.raises(ValueError, match=r"no prediction for 2 image id\(s\).*\[5, 6\]"):
        score_captions(REFS, {i: PREDS[i] for i in (1, 2, 3, 4)})
    with pytest.raises(ValueError, match=r"predictions for 1 image id\(s\) that have no references: \[99\]"):
        score_captions(REFS, {**PREDS, 99: "a dog"})
    with pytest.raises(ValueError, match=r"zero reference captions: \[2\]"):
        score_captions({**REFS, 2: []}, PREDS)
    with pytest.raises(ValueError, match="unknown metric"):
        score_captions(REFS, PREDS, metrics=("BLEU", "WER"))
    with pytest.raises(TypeError, match="prediction for image 4 must be a string"):
        score_captions(REFS, {**PREDS, 4: ["a", "list"]})
    with pytest.raises(TypeError, match="image ids must be integers"):
        score_captions({"1": ["a"]}, {"1": "a"})
    with pytest.raises(ValueError, match="no references"):
        score_captions({}, {})


@pytest.mark.java
@needs_java
def test_score_captions_accepts_empty_predictions_and_rejects_all_empty_references():
    scores = score_captions(REFS, {i: "" for i in REFS}, metrics=("BLEU", "ROUGE-L", "CIDEr"))
    assert scores["CIDEr"] == 0.0 and scores["ROUGE-L"] == 0.0 and scores["BLEU-1"] < 1e-9
    with pytest.raises(ValueError, match="every reference caption is empty"):
        score_captions({1: ["...", "!"]}, {1: "a dog"}, metrics=("CIDEr",))


# ------------------------------------------------------------------------------------------------
# files


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_load_results_reads_coco_results_and_rejects_bad_files(tmp_path):
    good = write_json(
        tmp_path / "good.json", [{"image_id": 1, "caption": "a dog", "id": 7}, {"image_id": 2, "caption": ""}]
    )
    assert load_results(good) == {1: "a dog", 2: ""}

    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_results(tmp_path / "nope.json")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"image_id": 1, "caption": "a"', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_results(bad_json)
    cases = {
        "dict.json": ({"image_id": 1, "caption": "a"}, "expected a JSON list"),
        "empty.json": ([], "empty"),
        "nokey.json": ([{"image_id": 1, "caption": "a"}, {"image_id": 2}], "entry 1 lacks 'caption'"),
        "nocaption.json": ([{"caption": "a"}], "entry 0 lacks 'image_id'"),
        "notstr.json": ([{"image_id": 3, "caption": ["a", "b"]}], r"entry 0 \(image_id 3\) has caption"),
        "strid.json": ([{"image_id": "3", "caption": "a"}], "image_id '3'; expected an integer"),
        "dups.json": (
            [{"image_id": i, "caption": "x"} for i in (5, 6, 5, 7, 6, 5)],
            r"2 image id\(s\) appear more than once .*\[5, 6\]",
        ),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            load_results(write_json(tmp_path / name, data))


def coco_captions_json(refs):
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in refs]
    annotations = [
        {"id": 1000 * i + j, "image_id": i, "caption": c} for i, caps in refs.items() for j, c in enumerate(caps)
    ]
    return {"images": images, "annotations": annotations}


def test_load_references(tmp_path):
    path = write_json(tmp_path / "captions.json", coco_captions_json(REFS))
    assert load_references(path) == REFS
    assert load_references(path, [5, 2]) == {5: REFS[5], 2: REFS[2]}
    with pytest.raises(ValueError, match=r"2 image id\(s\) are not in .*\[42, 43\]"):
        load_references(path, [1, 42, 43])
    data = coco_captions_json(REFS)
    data["images"].append({"id": 77, "file_name": "x.jpg"})
    with pytest.raises(ValueError, match=r"no captions in .*\[77\]"):
        load_references(write_json(tmp_path / "uncaptioned.json", data))
    instances = {"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1]}]}
    with pytest.raises(ValueError, match="not a COCO captions file"):
        load_references(write_json(tmp_path / "instances.json", instances))
    with pytest.raises(FileNotFoundError):
        load_references(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------------
# diversity


def test_distinct_n_by_hand():
    # Li et al. 2016: distinct n-grams / total words. Bigrams: (a man)(man rides)(rides a)(a horse)
    # (a man)(man on)(on a)(a horse) -> 6 distinct out of 8 bigrams; 5 + 5 = 10 words.
    horses = ["a man rides a horse", "a man on a horse"]
    assert distinct_n(horses, 2) == 0.6  # 6 / 10, exactly
    assert unique_ngram_ratio(horses, 2) == 0.75  # 6 / 8, the old ratio under its own name
    assert distinct_n(horses, 1) == unique_ngram_ratio(horses, 1) == 0.5  # {a man rides horse on} / 10
    captions = ["a b a", "a c"]
    assert distinct_n(captions, 1) == pytest.approx(3 / 5)  # a b a a c -> {a, b, c}
    assert distinct_n(captions, 2) == pytest.approx(3 / 5)  # (a b) (b a) (a c) over 5 words
    assert unique_ngram_ratio(captions, 2) == pytest.approx(3 / 3)
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 4)
    assert unique_ngram_ratio(["a a a a"], 2) == pytest.approx(1 / 3)
    # "a" has a word but no bigram: 0 distinct bigrams / 1 word; no words at all -> 0.0
    assert distinct_n(["a", ""], 2) == 0.0 and distinct_n([], 1) == 0.0 and unique_ngram_ratio(["a"], 2) == 0.0
    assert distinct_n(["a", "b c"], 2) == pytest.approx(1 / 3)  # words of bigram-less captions still count
    for metric in (distinct_n, unique_ngram_ratio):
        with pytest.raises(ValueError, match="n must be >= 1"):
            metric(captions, 0)


def test_self_bleu4_by_hand():
    # each caption against the other: p1..p4 = 4/5, 3/4, 2/3, 1/2, equal lengths -> BLEU-4 = 0.2 ** (1/4)
    assert self_bleu4([["a b c d e", "a b c d f"]]) == pytest.approx(0.2**0.25, rel=1e-8)
    assert self_bleu4([["a b c d", "a b c d", "a b c d"]]) == pytest.approx(1.0, rel=1e-8)
    # averaged over all captions of all images
    mixed = self_bleu4([["a b c d e", "a b c d f"], ["a b c d", "a b c d"]])
    assert mixed == pytest.approx((2 * 0.2**0.25 + 2 * 1.0) / 4, rel=1e-8)
    assert self_bleu4([["w x y z", "p q r s"]]) < 1e-3  # nothing shared


def test_diversity_report_tokenized_by_hand():
    nbest = {1: ["a dog runs", "a dog sits"], 2: ["a cat on mat", "a cat on mat"]}
    refs = {1: ["a dog runs fast", "the dog runs"], 2: ["a cat sleeps on a mat", "one cat"]}
    report = diversity_report_tokenized(nbest, refs)
    # words: 3 + 3 + 4 + 4 = 14, unique {a dog runs sits cat on mat} = 7
    assert report["distinct-1"] == pytest.approx(7 / 14)
    # bigrams: (a dog)(dog runs) (a dog)(dog sits) (a cat)(cat on)(on mat) x2 -> 10 total, 6 unique
    assert report["distinct-2"] == pytest.approx(6 / 14)  # distinct bigrams / words
    assert report["unique-ngram-ratio-2"] == pytest.approx(6 / 10)  # distinct bigrams / bigrams
    assert report["distinct-1/image"] == pytest.approx((4 / 6 + 4 / 8) / 2)
    assert report["distinct-2/image"] == pytest.approx((3 / 6 + 3 / 8) / 2)
    assert report["unique-ngram-ratio-2/image"] == pytest.approx((3 / 4 + 3 / 6) / 2)
    assert report["vocab-size"] == 7.0
    # image 1: "a dog runs" vs "a dog sits": p1 2/3, p2 1/2, p3 0/1 (smoothed to ~1e-15) -> ~0
    # image 2: identical 4-word captions -> 1 (2-word ones would score ~1e-3: no 3-/4-grams at all)
    assert report["mBLEU-4"] == pytest.approx((0 + 0 + 1 + 1) / 4, abs=1e-3)
    assert set(report) == {
        "distinct-1",
        "distinct-2",
        "distinct-1/image",
        "distinct-2/image",
        "unique-ngram-ratio-2",
        "unique-ngram-ratio-2/image",
        "oracle-CIDEr@2",
        "oracle-BLEU-4@2",
        "mBLEU-4",
        "vocab-size",
    }
    assert "mBLEU-4" not in diversity_report_tokenized(nbest, refs, k=1)


def test_oracle_is_at_least_top1():
    refs = {
        i: [f"a {w} on the grass", f"the {w} on green grass", f"a {w} sitting outside"]
        for i, w in enumerate(["dog", "cat", "horse", "cow"])
    }
    nbest = {
        0: ["a dog on the grass", "a cat"],
        1: ["a dog", "the cat on green grass"],
        2: ["", "a horse sitting outside"],
        3: ["a cow on the grass", "a cow on the grass"],
    }
    top1 = diversity_report_tokenized(nbest, refs, k=1)
    top2 = diversity_report_tokenized(nbest, refs, k=2)
    assert top2["oracle-CIDEr@2"] >= top1["oracle-CIDEr@1"] and top2["oracle-BLEU-4@2"] >= top1["oracle-BLEU-4@1"]
    assert top2["oracle-CIDEr@2"] > top1["oracle-CIDEr@1"] + 0.1  # slots 2 of images 1 and 2 are much better
    with pytest.raises(ValueError, match=r"fewer than k=3 captions"):
        diversity_report_tokenized(nbest, refs, k=3)
    with pytest.raises(ValueError, match="different lengths"):
        diversity_report_tokenized({**nbest, 3: ["a cow"]}, refs)
    with pytest.raises(ValueError, match=r"no references for 1 n-best image id\(s\): \[9\]"):
        diversity_report_tokenized({**nbest, 9: ["x", "y"]}, refs)


@pytest.mark.java
@needs_java
def test_oracle_at_1_equals_top1_scoring():
    nbest = {i: [PREDS[i], REFS[i][-1], "a thing"] for i in REFS}
    report = diversity_report(nbest, REFS)
    scores, per_image = score_captions(REFS, {i: PREDS[i] for i in REFS}, metrics=("BLEU", "CIDEr"), per_image=True)
    at1 = diversity_report(nbest, REFS, k=1)
    assert at1["oracle-CIDEr@1"] == pytest.approx(scores["CIDEr"], abs=1e-12)
    assert at1["oracle-BLEU-4@1"] == pytest.approx(sum(per_image["BLEU-4"].values()) / len(REFS), abs=1e-12)
    assert report["oracle-CIDEr@3"] > at1["oracle-CIDEr@1"]  # slot 2 is a reference itself
    # the raw path tokenizes: case/punctuation variants of one caption are the same caption
    same = diversity_report({1: ["A dog.", "a DOG!"]}, {1: ["a dog"]})
    assert same["distinct-1"] == 0.5 and same["mBLEU-4"] < 1e-3 and same["vocab-size"] == 2.0


# ------------------------------------------------------------------------------------------------
# Java check


def test_check_java_names_the_problem(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="Java runtime not found on PATH: .*openjdk-17-jre-headless"):
        check_java()


def fake_java(directory, script):
    directory.mkdir()
    path = directory / "java"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(directory)


def test_check_java_rejects_broken_or_old_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", fake_java(tmp_path / "broken", "echo 'Error: corrupt install' >&2; exit 3"))
    with pytest.raises(RuntimeError, match="exited with 3: Error: corrupt install"):
        check_java()
    monkeypatch.setenv("PATH", fake_java(tmp_path / "old", "echo 'java version \"1.7.0_80\"' >&2"))
    with pytest.raises(RuntimeError, match="is Java 7"):
        check_java()
    monkeypatch.setenv("PATH", fake_java(tmp_path / "new", "echo 'openjdk version \"21.0.1\" 2023-10-17' >&2"))
    assert check_java() == str(tmp_path / "new" / "java")
    assert _major_version('java version "1.8.0_292"') == 8 and _major_version("garbage") is None


# ------------------------------------------------------------------------------------------------
# captioning-score


def test_format_table_aligns_raw_values():
    from captioning.evaluation.reports import format_table

    table = format_table({"value": {"BLEU-4": 0.31234567, "CIDEr": 1.0, "vocab": 12}})
    lines = table.splitlines()
    assert lines[0].split() == ["value"]
    assert [line.split() for line in lines[1:]] == [["BLEU-4", "0.3123"], ["CIDEr", "1.0000"], ["vocab", "12"]]
    assert len({len(line) for line in lines}) == 1  # right-aligned columns


@pytest.mark.java
@needs_java
def test_captioning_score_end_to_end(tmp_path, capsys):
    annotations = write_json(tmp_path / "captions_val2014.json", coco_captions_json(REFS))
    results = write_json(tmp_path / "results.json", [{"image_id": i, "caption": c} for i, c in PREDS.items()])
    out = tmp_path / "scores.json"
    assert score_cli.main([str(annotations), str(results), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    expected = score_captions(REFS, PREDS)  # reuses the shared METEOR process
    assert written["metrics"] == pytest.approx(expected, abs=1e-12) and written["num_images"] == 6
    printed = capsys.readouterr().out
    assert any(line.split() == ["CIDEr", f"{expected['CIDEr']:.4f}"] for line in printed.splitlines())
    assert str(out) in printed
    meteor_pid = coco._shared_meteor.proc.pid

    # Karpathy split: references restricted to the split's images, predictions must cover exactly them
    split_file = write_json(
        tmp_path / "dataset_coco.json",
        {"images": [{"cocoid": i, "split": "test" if i <= 3 else "train", "sentences": []} for i in REFS]},
    )
    test_results = write_json(tmp_path / "test_results.json", [{"image_id": i, "caption": PREDS[i]} for i in (1, 2, 3)])
    split_args = ["--split-file", str(split_file), "--split", "test"]
    assert score_cli.main([str(annotations), str(test_results), *split_args]) == 0
    split_scores = json.loads((tmp_path / "test_results.scores.json").read_text())  # default --out
    subset = score_captions({i: REFS[i] for i in (1, 2, 3)}, {i: PREDS[i] for i in (1, 2, 3)})
    assert split_scores["metrics"] == pytest.approx(subset, abs=1e-12) and split_scores["split"] == "test"
    assert coco._shared_meteor.proc.pid == meteor_pid  # one JVM served all calls
    capsys.readouterr()

    def fails(argv, message):
        assert score_cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("captioning-score: error: ") and message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err

    fails(
        [str(annotations), str(results), "--split-file", str(split_file), "--split", "test"],
        "captions for 3 image(s) outside the 'test' split: [4, 5, 6]",
    )
    fails(
        [str(annotations), str(test_results), "--split-file", str(split_file), "--split", "val"],
        "split 'val' has no images",
    )
    fails([str(annotations), str(tmp_path / "missing.json")], "results file not found")
    bad = tmp_path / "bad.json"
    bad.write_text("[{", encoding="utf-8")
    fails([str(annotations), str(bad)], "is not valid JSON")
    fails(
        [str(annotations), str(write_json(tmp_path / "extra.json", [{"image_id": 99, "caption": "x"}]))],
        "image id(s) are not in",
    )


def test_captioning_score_checks_java_first(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert score_cli.main([str(tmp_path / "a.json"), str(tmp_path / "r.json")]) == 1
    assert "Java runtime not found on PATH" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# METEOR process lifetime (last: it kills the shared process)


@pytest.mark.java
@needs_java
def test_exception_during_scoring_kills_meteor(monkeypatch):
    seen = []
    original_readline = coco.MeteorProcess._readline

    def failing_readline(self):
        seen.append(self)
        original_readline(self)  # the JVM answered one line, then something goes wrong mid-protocol
        raise RuntimeError("boom")

    monkeypatch.setattr(coco.MeteorProcess, "_readline", failing_readline)
    with pytest.raises(RuntimeError, match="boom"):
        score_captions(REFS, PREDS, metrics=("METEOR",))
    process = seen[0].proc
    assert process.poll() is not None  # killed and reaped
    assert not os.path.exists(f"/proc/{process.pid}") or _not_our_jvm(process.pid)
    assert coco._shared_meteor is None and not seen[0].lock.locked()


@pytest.mark.java
@needs_java
def test_exception_with_private_meteor_kills_it(monkeypatch):
    seen = []

    def failing_write(self, line):
        seen.append(self)
        raise RuntimeError("broken pipe")

    monkeypatch.setattr(coco.MeteorProcess, "_write", failing_write)
    with pytest.raises(RuntimeError, match="broken pipe"):
        score_captions(REFS, PREDS, metrics=("METEOR",), reuse_meteor=False)
    assert len(seen) == 1 and seen[0].proc.poll() is not None


def _not_our_jvm(pid: int) -> bool:
    """The pid may have been reused by an unrelated process; it must at least not be our dead JVM."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"meteor" not in f.read()
    except OSError:
        return True
