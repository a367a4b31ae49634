"""Scene truth checker and prefix oracle (captioning.scenes.grammar), scene metrics (captioning.scenes.truth)
and exposure bias against the oracle (captioning.scenes.oracle_exposure)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from captioning.data.vocab import SPECIALS, Vocabulary
from captioning.scenes import grammar
from captioning.scenes.generator import (
    Scene,
    SceneObject,
    caption_scene,
    generate_synthetic,
    is_synthetic_root,
    load_scenes,
    sample_scene,
)
from captioning.scenes.grammar import (
    COLORS,
    RELATION_TO_IT,
    RELATION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    SceneOracle,
    check_caption,
    tokenize,
)
from captioning.scenes.oracle_exposure import PER_POSITION_KEYS, SWAP_KEYS, oracle_exposure
from captioning.scenes.truth import check_captions, scene_metrics

NAN = math.nan


def obj(shape: str, color: str, size: str) -> SceneObject:
    return SceneObject(shape, color, size, 0.5, 0.5, 0.2, COLORS[color])


def scene(layout: str, *objects: SceneObject, position: str | None = None) -> Scene:
    return Scene((120, 120, 120), layout, position, list(objects))


PAIR = scene("horizontal", obj("circle", "red", "large"), obj("square", "blue", "small"))  # circle left of square
SINGLE = scene("single", obj("star", "green", "small"), position="left")
COLUMN = scene(
    "vertical", obj("triangle", "yellow", "small"), obj("cross", "white", "large"), obj("diamond", "black", "small")
)  # triangle above cross above diamond


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return generate_synthetic(
        tmp_path_factory.mktemp("scene") / "coco", num_train=200, num_val=50, num_test=50, image_size=32, seed=11
    )


def _references(root: Path) -> list[tuple[int, str, list[str]]]:
    """(cocoid, split, raw captions) of every image."""
    images = json.loads((root / "dataset_coco.json").read_text())["images"]
    return [(e["cocoid"], e["split"], [s["raw"] for s in e["sentences"]]) for e in images]


# ---------------------------------------------------------------------------------------------------
# Loader


def test_load_scenes_and_is_synthetic_root(data_root, tmp_path):
    scenes = load_scenes(data_root)
    refs = _references(data_root)
    assert sorted(scenes) == sorted(cocoid for cocoid, _, _ in refs)
    test = load_scenes(data_root, split="test")
    assert len(test) == 50 and set(test) == {c for c, split, _ in refs if split == "test"}
    assert is_synthetic_root(data_root) and is_synthetic_root(str(data_root))
    (tmp_path / "annotations").mkdir()  # a COCO-looking folder without scene metadata
    assert not is_synthetic_root(tmp_path)
    with pytest.raises(ValueError, match="not a synthetic data set"):
        load_scenes(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Every reference is true; every prefix of it is a true prefix


def test_checker_accepts_every_reference_of_every_split(data_root):
    scenes = load_scenes(data_root)
    kinds, splits, templates = Counter(), Counter(), Counter()
    for cocoid, split, captions in _references(data_root):
        oracle = SceneOracle(scenes[cocoid])
        for raw in captions:
            check = check_caption(raw, scenes[cocoid], oracle)
            assert check.grammatical and check.correct and check.reason is None, (raw, check)
            assert check.false_claims == () and all(c.ok for c in check.claims), (raw, check.claims)
            tokens = tokenize(raw)
            assert check.true_prefix_length == len(tokens)
            assert all(oracle.is_prefix(tokens[:k]) for k in range(len(tokens) + 1))
            assert oracle.is_caption(tokens)
            kinds.update(c.kind for c in check.claims)
            splits[split] += 1
            templates[check.template] += 1
    assert set(splits) == {"train", "restval", "val", "test"}
    assert set(kinds) == set(grammar.CLAIM_KINDS)  # every kind of claim was exercised and held
    # Every sentence form was read, except tri_sides: its shortest caption has 17 words, so the generator's length
    # window (MAX_WORDS = 16) always rejects it (as it did before the grammar became data). The long_* forms are for
    # the 4-6 objects of data=synthetic_long (tests/test_long_scenes.py).
    assert set(templates) == {t.name for t in grammar.ALL_TEMPLATES if t.count <= 3} - {"tri_sides"}


def test_every_caption_the_oracle_holds_is_true_by_the_checker_and_sampled_ones_are_in_it():
    """The whole language of a one-object scene, enumerated from the automaton, against the parser."""
    oracle = SceneOracle(SINGLE)
    language, stack = [], [((), oracle.start)]
    while stack:
        words, state = stack.pop()
        if oracle.accepts(state):
            language.append(words)
        for word in sorted(oracle.next_words(state)):
            stack.append((words + (word,), oracle.advance(state, word)))
    language = set(language)
    assert len(language) == 120 + 28 + 112 + 16 + 32  # by template: position, single, picture, background, count
    for words in language:
        check = check_caption(list(words), SINGLE, oracle)
        assert check.grammatical and check.correct and not check.false_claims, words
    rng = random.Random(0)
    for _ in range(3000):
        template = rng.choice(grammar.TEMPLATES[1])[0]
        assert tuple(tokenize(grammar.sample_text(template, SINGLE, rng))) in language


def test_oracle_and_parser_agree_on_other_scenes_captions():
    """Captions of one scene judged against another: the automaton's verdict is exactly 'parses and no claim
    is false', and a false caption has a false claim or does not parse."""
    rng = random.Random(7)
    scenes = [sample_scene(rng) for _ in range(60)]
    captions = [caption_scene(s, rng) for s in scenes]
    verdicts = Counter()
    for i, target in enumerate(scenes):
        oracle = SceneOracle(target)
        for j in (i, (i + 1) % len(scenes), (i + 7) % len(scenes)):
            for raw in captions[j]:
                check = check_caption(raw, target, oracle)
                assert check.correct == (check.grammatical and not check.false_claims), (raw, check)
                assert check.correct == oracle.is_caption(tokenize(raw))
                verdicts[check.correct] += 1
    assert verdicts[True] >= 300 and verdicts[False] >= 300


# ---------------------------------------------------------------------------------------------------
# Single-word corruptions of references are caught with the right claim kind

SHAPE_OF = {w: s for s, words in SHAPE_WORDS.items() for w in words if " " not in w}
SIZE_OF = {w: s for s, words in SIZE_WORDS.items() for w in words}


def _relation_swaps(tokens: list[str]) -> list[tuple[int, str]]:
    """(index, new word) single-word swaps inside relation phrases: a RELATION_WORDS phrase followed by an object
    ('a'/'an'/'the' + not 'image'/'picture'/'other'), or a RELATION_TO_IT phrase ending the caption, turned into
    a phrase of another relation that differs in that one word."""
    swaps = set()
    for table, at_end in ((RELATION_WORDS, False), (RELATION_TO_IT, True)):
        phrases = [(value, tuple(tokenize(p))) for value, ps in table.items() for p in ps]
        for value, phrase in phrases:
            n = len(phrase)
            for i in range(len(tokens) - n + 1):
                if tuple(tokens[i : i + n]) != phrase:
                    continue
                after = tokens[i + n : i + n + 2]
                if at_end != (i + n == len(tokens)):
                    continue
                if not at_end and (
                    after[:1] not in (["a"], ["an"], ["the"]) or after[1:] in (["image"], ["picture"], ["other"])
                ):
                    continue
                for other, candidate in phrases:
                    diff = [k for k in range(n) if len(candidate) == n and candidate[k] != phrase[k]]
                    if other != value and len(candidate) == n and len(diff) == 1:
                        swaps.add((i + diff[0], candidate[diff[0]]))
    return sorted(swaps)


def _corruptions(tokens: list[str], target: Scene) -> list[tuple[int, str, str]]:
    """(index, new word, claim kind) for colour, shape, size and relation words; colour replacements keep the
    article right ('a red' -> 'a blue', never 'a orange')."""
    out = []
    for i, word in enumerate(tokens):
        if word in COLORS:
            article = tokens[i - 1] if i and tokens[i - 1] in ("a", "an") else None
            out += [
                (i, c, "colour") for c in COLORS if c != word and (article is None or grammar._article(c) == article)
            ]
        elif word in SHAPE_OF:
            out += [(i, w, "shape") for w, s in SHAPE_OF.items() if s != SHAPE_OF[word]]
        elif word in SIZE_OF:
            out += [(i, w, "size") for w, s in SIZE_OF.items() if s != SIZE_OF[word]]
    out += [(i, w, "relation") for i, w in _relation_swaps(tokens)]
    return out


def _named_object(tokens: list[str], i: int, target: Scene) -> int:
    """1-based number of the object named by the first shape word at or after i (shapes are unique per scene)."""
    shape = next(SHAPE_OF.get(w) or (w == "round" and "circle") for w in tokens[i:] if w in SHAPE_OF or w == "round")
    return 1 + [o.shape for o in target.objects].index(shape)


def test_single_word_corruptions_are_rejected_with_the_right_claim_kind():
    rng = random.Random(3)
    tried = Counter()
    for _ in range(50):
        target = sample_scene(rng)
        oracle = SceneOracle(target)
        scene_words = oracle.words()
        for raw in caption_scene(target, rng)[:3]:
            tokens = tokenize(raw)
            for i, new, kind in _corruptions(tokens, target)[::3]:
                corrupted = tokens[:i] + [new] + tokens[i + 1 :]
                check = check_caption(corrupted, target, oracle)
                assert check.grammatical and not check.correct, (corrupted, check)
                assert [c.kind for c in check.false_claims] == [kind], (corrupted, check.claims)
                assert check.reason.startswith(f"{kind} of object"), check.reason
                if kind in ("colour", "size"):
                    assert f"object {_named_object(corrupted, i, target)}:" in check.reason, (corrupted, check.reason)
                # the prefix oracle: true up to the changed word, false at it when no true caption has that word
                assert oracle.is_prefix(corrupted[:i]) and not oracle.is_caption(corrupted)
                assert check.true_prefix_length >= i
                if new not in scene_words:
                    assert not oracle.is_prefix(corrupted[: i + 1]) and check.true_prefix_length == i
                tried[kind] += 1
    assert min(tried[k] for k in ("colour", "shape", "size", "relation")) >= 30, tried


# ---------------------------------------------------------------------------------------------------
# Per-caption verdicts and set metrics on hand-made scenes

HAND_SCENES = {1: PAIR, 2: SINGLE, 3: COLUMN, 4: PAIR, 5: SINGLE, 6: PAIR}
HAND_CAPTIONS = {
    1: "A big red circle to the left of a green square.",  # colour of object 2 false
    2: "a small green star on the left",  # true
    3: "a white cross between a yellow triangle and a black star",  # shape of object 3 false (a hallucinated star)
    4: "a red circle and and a blue square",  # not a sentence of the grammar
    5: "two shapes : a green star and a red circle",  # a two-object sentence about one object
    6: "a blue square to the left of a red circle",  # relation false
}


def test_hand_made_captions_get_the_right_verdicts():
    checks = check_captions(HAND_CAPTIONS, HAND_SCENES)
    assert {i: c.correct for i, c in checks.items()} == {1: False, 2: True, 3: False, 4: False, 5: False, 6: False}
    assert {i: c.grammatical for i, c in checks.items()} == {1: True, 2: True, 3: True, 4: False, 5: True, 6: True}
    assert {i: c.template for i, c in checks.items()} == {
        1: "pair_plain",
        2: "one_position",
        3: "tri_between",
        4: None,
        5: "pair_count",
        6: "pair_plain",
    }
    assert checks[1].reason == "colour of object 2: said green, is blue"
    assert checks[2].reason is None
    assert checks[3].reason == "shape of object 3: said star, is diamond"
    assert checks[4].reason == "grammar: not a sentence of the caption grammar (true up to word 4 of 8)"
    assert checks[5].reason == "count of objects: said 2, is 1" and len(checks[5].claims) == 1
    assert checks[6].reason == "relation of object 2 to object 1: said to the left of, is to the right of"
    assert checks[3].named == {"cross", "triangle", "star"} and checks[5].named == {"star", "circle"}
    assert [(c.kind, c.ok) for c in checks[1].claims] == [
        ("count", True),
        ("colour", True),
        ("shape", True),
        ("size", True),
        ("relation", True),
        ("colour", False),
        ("shape", True),
    ]


def test_scene_metrics_on_a_hand_made_set():
    metrics = scene_metrics(HAND_CAPTIONS, HAND_SCENES)
    expected = {
        "scene/captions": 6.0,
        "scene/correct": 1 / 6,
        "scene/grammatical": 5 / 6,
        "scene/count_precision": 4 / 5,  # 1, 2, 3, 6 right; 5 (two objects said, one there) wrong
        "scene/colour_precision": 7 / 8,  # 1: 1 of 2, 2: 1, 3: 3, 6: 2 (5's claims are not scored)
        "scene/shape_precision": 7 / 8,  # 1: 2, 2: 1, 3: 2 of 3, 6: 2
        "scene/size_precision": 2 / 2,  # 'big' (1), 'small' (2)
        "scene/relation_precision": 1 / 2,  # 1 right, 6 wrong
        "scene/position_precision": 1 / 1,  # 2
        "scene/order_precision": NAN,  # no caption states an arrangement
        "scene/hallucinated_objects": 2 / 12,  # the star of 3 and the circle of 5, of 2+1+3+2+2+2 named shapes
        "scene/hallucinated_captions": 2 / 6,
        "scene/omitted_objects": 1 / 11,  # the diamond of 3, of 2+1+3+2+1+2 image objects
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, nan_ok=True), key
    with pytest.raises(KeyError, match="no scene"):
        scene_metrics({99: "a red circle"}, HAND_SCENES)


def test_eos_rule_of_the_oracle():
    """Ending is right only at a complete true caption, even where a longer true caption continues it."""
    oracle = SceneOracle(SINGLE)
    assert oracle.is_caption(tokenize("a green star on the left"))
    assert oracle.is_prefix(tokenize("a green star on the left of the"))  # ... of the image
    assert not oracle.is_caption(tokenize("a green star on the"))
    assert oracle.is_prefix(tokenize("a green star on the"))
    assert not oracle.is_prefix(tokenize("a green star on the right"))
    assert oracle.next_words(oracle.state(tokenize("a green star on the left of the"))) == {"image", "picture"}


# ---------------------------------------------------------------------------------------------------
# Exposure bias against the oracle, on a scripted model whose errors are known


class ScriptedModel:
    """Next word = script[image][words fed so far] ('<eos>' for any prefix not in the script). The images tensor
    (B, 1) holds the image ids. Deterministic; the step interface of captioning.models.Captioner."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, vocab: Vocabulary, scripts: dict[int, dict[tuple[str, ...], str]]):
        self.vocab, self.scripts = vocab, scripts

    def init_state(self, images: torch.Tensor):
        return [(int(i), ()) for i in images[:, 0].tolist()]

    def step(self, tokens: torch.Tensor, state):
        log_probs = torch.full((len(state), len(self.vocab)), -20.0)  # (N, V)
        new_state = []
        for row, (token, (image, prefix)) in enumerate(zip(tokens.tolist(), state)):
            if token != self.bos_id:
                prefix = prefix + (self.vocab.itos[token],)
            log_probs[row, self.vocab.stoi[self.scripts[image].get(prefix, "<eos>")]] = 0.0
            new_state.append((image, prefix))
        return log_probs, new_state

    @staticmethod
    def reorder_state(state, index: torch.Tensor):
        return [state[i] for i in index.tolist()]


def _script(*captions: str) -> dict[tuple[str, ...], str]:
    """Each caption's words in order then <eos>; later captions override shared prefixes."""
    script = {}
    for caption in captions:
        words = tuple(caption.split())
        for k in range(len(words)):
            script[words[:k]] = words[k]
        script[words] = "<eos>"
    return script


REF_7 = "a green star on the left"  # SINGLE: true
REF_8 = "a red circle left of a blue square"  # PAIR: true


def _exposure_setup():
    scripts = {
        # Image 7 errs only when free-running: after 'a green star' it says 'lies' (still true), fed the reference
        # ('a green star on') it follows the reference; on its own path it goes on 'on the right' (false at t=7).
        7: {**_script(REF_7), **_script("a green star lies on the right")},
        # Image 8 errs after 'a red circle left' in both modes: 'above' (false) at position 5.
        8: {**_script(REF_8), ("a", "red", "circle", "left"): "above"},
    }
    words = {word for script in scripts.values() for prefix, nxt in script.items() for word in prefix + (nxt,)}
    words = sorted(words - set(SPECIALS))
    vocab = Vocabulary(list(SPECIALS) + words)
    return ScriptedModel(vocab, scripts), vocab


def _assert_lists(actual: list, expected: list) -> None:
    assert len(actual) == len(expected), (actual, expected)
    for a, e in zip(actual, expected):
        assert a == pytest.approx(e, nan_ok=True), (actual, expected)


def test_oracle_exposure_gives_the_known_rates_of_a_scripted_model(tmp_path):
    model, vocab = _exposure_setup()
    scenes = {7: SINGLE, 8: PAIR}
    references = {7: [REF_7], 8: [REF_8.split()]}  # a raw string and a word list
    batches = [(torch.tensor([[7.0], [8.0]]), [7, 8])]
    report = oracle_exposure(model, vocab, batches, scenes, references, max_len=16)
    p = report.per_position
    assert set(p) == set(PER_POSITION_KEYS)
    # Teacher forced: image 7 at positions 1..7 (6 words + <eos>), image 8 at 1..9; one error: image 8 at t=5
    # ('a red circle left' -> 'above'). Image 7 predicts 'lies' at t=4 after 'a green star': still true.
    _assert_lists(p["position"], list(range(1, 10)))
    _assert_lists(p["tf_scored"], [2, 2, 2, 2, 2, 2, 2, 1, 1])
    _assert_lists(p["tf_errors"], [0, 0, 0, 0, 1, 0, 0, 0, 0])
    _assert_lists(p["tf"], [0, 0, 0, 0, 0.5, 0, 0, 0, 0])
    # Free running: image 7 'a green star lies on the right': error at t=7 ('right'); image 8 error at t=5.
    _assert_lists(p["free_scored"], [2, 2, 2, 2, 2, 1, 1, 0, 0])
    _assert_lists(p["free_errors"], [0, 0, 0, 0, 1, 0, 1, 0, 0])
    _assert_lists(p["free"], [0, 0, 0, 0, 0.5, 0, 1, NAN, NAN])
    _assert_lists(p["excess"], [0, 0, 0, 0, 0, 0, 1, NAN, NAN])
    _assert_lists(p["accerr"], [0, 0, 0, 0, 0, 0, 1, 1, 1])
    _assert_lists(p["exaccerr"], [NAN, NAN, NAN, NAN, 0, 0, 2, 2, 2])  # accerr / (sum of tf) = 1 / 0.5
    # Prefix swap: image 7's own true prefix has 6 words, image 8's 4. From a reference prefix of k >= 4 words
    # image 7 completes the reference; shorter ones pass 'a green star' and go its own (false) way. Image 8 never
    # completes one: every continuation passes 'a red circle left' -> 'above'.
    s = report.swap
    assert set(s) == set(SWAP_KEYS)
    _assert_lists(s["prefix_length"], [1, 2, 3, 4, 5, 6])
    _assert_lists(s["images"], [2, 2, 2, 2, 1, 1])
    _assert_lists(s["own_correct"], [0, 0, 0, 0, 0, 0])
    _assert_lists(s["ref_correct"], [0, 0, 0, 0.5, 1, 1])
    _assert_lists(s["gap"], [0, 0, 0, 0.5, 1, 1])
    summary = report.summary()
    expected = {
        "exposure_oracle/error_tf": 1 / 16,
        "exposure_oracle/error_free": 2 / 12,
        "exposure_oracle/excess_error": 1 / 12,  # t=7: 1 own prefix, excess 1; t=1..7: 12 own prefixes
        "exposure_oracle/accerr": 1.0,
        "exposure_oracle/exaccerr": 2.0,
        "exposure_oracle/free_correct": 0.0,
        "exposure_oracle/swap_own_correct": 0.0,
        "exposure_oracle/swap_ref_correct": 3 / 10,
        "exposure_oracle/swap_gap": 3 / 10,
        "exposure_oracle/images": 2.0,
        "exposure_oracle/references": 2.0,
    }
    assert summary.keys() == expected.keys()
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value), key
    assert report.untrue_references == 0
    as_json = report.to_json()
    json.dumps(as_json, allow_nan=False)  # NaN became None
    assert as_json["per_position"]["free"][-1] is None and as_json["summary"]["exposure_oracle/accerr"] == 1.0
    png = report.plot(tmp_path / "plots" / "oracle_exposure.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oracle_exposure_of_a_model_that_follows_the_references():
    model, vocab = _exposure_setup()
    model.scripts = {7: _script(REF_7), 8: _script(REF_8)}
    batches = [(torch.tensor([[7.0]]), [7]), (torch.tensor([[8.0]]), [8])]  # two batches: counts add up
    report = oracle_exposure(
        model, vocab, batches, {7: SINGLE, 8: PAIR}, {7: [REF_7], 8: [REF_8]}, max_len=16, prefix_lengths=[2, 6, 7]
    )
    summary = report.summary()
    assert summary["exposure_oracle/error_tf"] == 0 and summary["exposure_oracle/error_free"] == 0
    assert summary["exposure_oracle/free_correct"] == 1.0 and summary["exposure_oracle/accerr"] == 0
    assert summary["exposure_oracle/excess_error"] == 0 and summary["exposure_oracle/swap_gap"] == 0
    assert math.isnan(summary["exposure_oracle/exaccerr"])  # 0 / 0
    _assert_lists(report.per_position["free_scored"], [2, 2, 2, 2, 2, 2, 2, 1, 1])  # both end right at <eos>
    _assert_lists(report.swap["prefix_length"], [2, 6, 7])  # 7: only image 8 has a 7-word prefix
    _assert_lists(report.swap["images"], [2, 2, 1])
    _assert_lists(report.swap["own_correct"], [1, 1, 1])
    _assert_lists(report.swap["ref_correct"], [1, 1, 1])


def test_oracle_exposure_eos_errors_and_argument_checks():
    model, vocab = _exposure_setup()
    model.scripts = {7: {**_script(REF_7), ("a", "green", "star", "on"): "<eos>"}}  # ends at an incomplete prefix
    report = oracle_exposure(model, vocab, [(torch.tensor([[7.0]]), [7])], {7: SINGLE}, {7: [REF_7]}, max_len=16)
    _assert_lists(report.per_position["tf_errors"], [0, 0, 0, 0, 1, 0, 0])  # <eos> after 'a green star on'
    _assert_lists(report.per_position["free_scored"], [1, 1, 1, 1, 1, 0, 0])
    _assert_lists(report.per_position["free_errors"], [0, 0, 0, 0, 1, 0, 0])
    with pytest.raises(ValueError, match="prefix lengths"):
        oracle_exposure(model, vocab, [], {7: SINGLE}, {7: [REF_7]}, max_len=4, prefix_lengths=[4])
    with pytest.raises(ValueError, match="no image"):
        oracle_exposure(model, vocab, [], {7: SINGLE}, {7: [REF_7]}, max_len=4)
