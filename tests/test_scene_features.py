"""The scene-label pretrained encoder and its feature cache (captioning.scenes.pretraining), and the statistics of
tools/schedule_table.py on hand-made numbers."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, tiny_overrides

from captioning.data.features import FeatureStore
from captioning.errors import ConfigError
from captioning.scenes import pretraining as scene_features
from captioning.scenes.generator import Scene, SceneObject

spec = importlib.util.spec_from_file_location(
    "schedule_table", Path(__file__).parent.parent / "tools" / "schedule_table.py"
)
schedule_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(schedule_table)

QUICK = [
    "model.encoder.pretrain.epochs=1",
    "model.encoder.pretrain.batch_size=20",
    "model.encoder.pretrain.extra_images=40",
]


def pretraining(root) -> list[str]:
    """tiny_overrides with the scene-label pretraining (the default) left on, and made quick; the decoder attends
    over the label head's object slots, as by default."""
    off = ("model.encoder.pretrain=null", "model.decoder.attention=false")
    return [o for o in tiny_overrides(root) if o not in off] + QUICK


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CAPTIONING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def pretrained(tiny_data_root, cache):
    """(config before, config after prepare_inputs) for the tiny data set, pretraining built in a fresh cache."""
    from captioning.scenes.pretraining import prepare_inputs

    cfg = compose(pretraining(tiny_data_root))
    return cfg, prepare_inputs(cfg)


def _obj(shape, color, size="small", cx=0.5, cy=0.5):
    return SceneObject(shape, color, size, cx, cy, 0.16, (0, 0, 0))


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_pretraining_precision_is_the_forward_pass_dtype(precision, dtype):
    from captioning.models.encoder import headless_backbone

    torch.manual_seed(0)
    backbone, feature_dim = headless_backbone("resnet18", None, "grid")
    seen = []
    backbone.conv1.register_forward_hook(
        lambda module, args, output: seen.append(
            (module.training, output.dtype, output.is_contiguous(memory_format=torch.channels_last))
        )
    )
    labels = torch.full((8, len(scene_features._heads())), -1)
    labels[:, 0] = torch.arange(8) % 3  # the count head only
    settings = {**scene_features.DEFAULTS, "epochs": 1, "batch_size": 4, "precision": precision}
    pixels = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    history, head = scene_features.pretrain(
        backbone, feature_dim, pixels, labels, list(range(8)), [], settings, torch.device("cpu")
    )
    assert [d for training, d, _ in seen if training] == [dtype, dtype]  # two training steps
    assert all(channels_last for training, _, channels_last in seen if training)  # the layout the encoders had
    assert head.weight.dtype == torch.float32 and math.isfinite(history[0]["loss"])


def test_scene_labels_and_their_mirror_image():
    names = list(scene_features._heads())
    row = Scene(
        (120, 120, 120),
        "horizontal",
        None,
        [_obj("circle", "red", "large", 0.2), _obj("star", "blue", "small", 0.5), _obj("cross", "white", cx=0.8)],
    )
    single = Scene((120, 120, 120), "single", "left", [_obj("square", "green", "large", 0.25)])
    column = Scene((120, 120, 120), "vertical", None, [_obj("triangle", "black"), _obj("diamond", "orange")])
    labels = scene_features.scene_labels([row, single, column])
    get = lambda n, name: int(labels[n, names.index(name)])  # noqa: E731
    assert [get(0, "count"), get(0, "layout"), get(0, "position")] == [2, 1, -1]
    assert [get(0, "slot0_shape"), get(0, "slot1_shape"), get(0, "slot2_shape")] == [0, 3, 4]  # circle, star, cross
    assert [get(0, "slot0_colour"), get(0, "slot0_size"), get(0, "slot1_size")] == [0, 1, 0]  # red large, small
    assert [get(1, "count"), get(1, "layout"), get(1, "position"), get(1, "slot1_shape")] == [0, 0, 1, -1]
    flipped = scene_features.flipped_labels(labels)
    fget = lambda n, name: int(flipped[n, names.index(name)])  # noqa: E731
    assert [fget(0, f"slot{s}_shape") for s in range(3)] == [4, 3, 0]  # the row reads right to left
    assert [fget(0, f"slot{s}_colour") for s in range(3)] == [6, 1, 0]
    assert fget(1, "position") == 2  # left -> right
    assert torch.equal(flipped[2], labels[2])  # a column is unchanged
    assert torch.equal(scene_features.flipped_labels(flipped), labels)


def test_pretraining_makes_valid_feature_stores_of_the_encoder_it_saves(pretrained, tiny_data_root, cache):
    """The default feed=labels store holds the heads' probabilities; the features store the backbone's features; the
    encoder rebuilt from the saved files (as captioning-predict does) computes both again from the JPEGs."""
    from captioning.data.build import eval_dataset, load_records
    from captioning.models.captioner import build_image_encoder
    from captioning.scenes.pretraining import prepare_inputs

    cfg, prepared = pretrained
    entry = Path(prepared.data.features).parent
    assert entry.parent == (cache / "scene_encoders").resolve() and scene_features.is_complete(entry)
    assert prepared.data.features == str(entry / "labels") and prepared.model.encoder.label_head == str(
        entry / "head.pth"
    )
    assert prepared.model.encoder.weights == str(entry / "encoder.pth") and prepared.model.encoder.trainable is False
    assert cfg.data.features is None and cfg.model.encoder.weights is None  # the input config is left alone
    records = load_records(prepared.data)
    image_ids = [r.image_id for split in records.values() for r in split]
    features = prepare_inputs(compose(pretraining(tiny_data_root) + ["model.encoder.pretrain.feed=features"]))
    assert features.data.features == str(entry / "features") and features.model.encoder.label_head is None
    groups = list(scene_features._heads().values())
    for config, dim in ((prepared, sum(groups)), (features, 1024)):
        store = FeatureStore(config.data.features)
        store.check(image_ids, config.model.encoder, config.data)
        assert store.complete() and store.feature_dim == dim and len(store.row_of) == 80
        encoder = build_image_encoder(config.model.encoder, trainable=False).eval()
        assert encoder.feature_dim == dim
        with torch.no_grad():
            for record in records["val"][:3] + records["train"][:3]:
                image = eval_dataset([record], cfg.data)[0]["image"]
                torch.testing.assert_close(store.get(record.image_id), encoder(image[None])[0], rtol=1e-2, atol=1e-2)
    probabilities = torch.from_numpy(np.array(FeatureStore(prepared.data.features).array, dtype=np.float32))
    for piece in probabilities.split(groups, dim=1):  # one distribution per label
        assert (piece >= 0).all()
        torch.testing.assert_close(piece.sum(1), torch.ones(len(piece)), atol=2e-3, rtol=0)
    report = json.loads((entry / "pretrain.json").read_text())
    assert report["images"] == 80 and set(report["val_accuracy"]) >= {"count", "slot0_shape", "scene"}


def test_a_label_head_of_another_encoder_names_the_mismatch(pretrained, tmp_path):
    from captioning.models.encoder import ImageEncoder

    _, prepared = pretrained
    head = prepared.model.encoder.label_head
    with pytest.raises(ValueError, match="reads 1024 features into 59 outputs .* the encoder gives 512 features"):
        ImageEncoder("resnet18", trainable=False, pool="avg", label_head=head)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="is not a label head file"):
        ImageEncoder("resnet18", trainable=False, pool="grid", label_head=str(tmp_path / "junk.pth"))
    with pytest.raises(FileNotFoundError, match="model.encoder.label_head: file not found"):
        ImageEncoder("resnet18", trainable=False, pool="grid", label_head=str(tmp_path / "missing.pth"))


def test_the_cache_is_reused_and_keyed_by_the_settings(pretrained, tiny_data_root, monkeypatch):
    from captioning.scenes.pretraining import prepare_inputs

    cfg, prepared = pretrained

    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached entry")

    monkeypatch.setattr(scene_features, "build_entry", must_not_build)
    again = prepare_inputs(cfg)
    assert again.data.features == prepared.data.features
    assert again.model.encoder.weights == prepared.model.encoder.weights
    features = prepare_inputs(compose(pretraining(tiny_data_root) + ["model.encoder.pretrain.feed=features"]))
    assert Path(features.data.features).parent == Path(prepared.data.features).parent  # feed: a store of the entry
    other = compose(pretraining(tiny_data_root) + ["model.encoder.pretrain.seed=1"])
    with pytest.raises(AssertionError, match="rebuilt"):
        prepare_inputs(other)  # other settings: another entry
    # precision=auto is keyed by what it resolves to on this machine: naming that reuses the entry, the other does not
    resolved = scene_features.resolve_precision("auto", torch.device("cpu"))
    assert resolved == ("bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32")
    same = prepare_inputs(compose(pretraining(tiny_data_root) + [f"model.encoder.pretrain.precision={resolved}"]))
    assert same.data.features == prepared.data.features
    other = {"bf16": "fp32", "fp32": "bf16"}[resolved]
    with pytest.raises(AssertionError, match="rebuilt"):
        prepare_inputs(compose(pretraining(tiny_data_root) + [f"model.encoder.pretrain.precision={other}"]))


def test_the_same_settings_build_the_same_encoder_whatever_the_run_did_before(tiny_data_root, tmp_path, monkeypatch):
    """The backbone's initialisation comes from the pretraining seed, not from the calling process's random stream
    (it did once, and three fresh caches gave three encoders), and the caller's stream is left as it was."""
    from captioning.scenes.pretraining import prepare_inputs

    cfg = compose(pretraining(tiny_data_root))
    weights, features = [], []
    for n, seed in enumerate((1, 2)):
        monkeypatch.setenv("CAPTIONING_CACHE", str(tmp_path / f"cache{n}"))
        torch.manual_seed(seed)
        expected_next = torch.rand(1, generator=torch.Generator().manual_seed(seed))
        prepared = prepare_inputs(cfg)
        assert torch.equal(torch.rand(1), expected_next)  # the run's own stream: untouched by the pretraining
        weights.append(torch.load(prepared.model.encoder.weights, weights_only=True))
        features.append(np.array(FeatureStore(prepared.data.features).array))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    assert (features[0] == features[1]).all()


def test_the_encoder_starts_from_torchvisions_initialisation_under_the_pretraining_seed(
    tiny_data_root, cache, monkeypatch
):
    """The pretraining builds its backbone with models/' builder, first thing after seeding: the weights it starts
    from are torchvision's for that seed (classifier removed), and the head then draws next from the same stream,
    so the same settings give the same encoder across releases (a change of builder or of draw order shows here)."""
    import copy

    import torchvision

    seen = {}
    original = scene_features.pretrain

    def spy(backbone, feature_dim, *args, **kwargs):
        seen["weights"], seen["rng"] = copy.deepcopy(backbone.state_dict()), torch.random.get_rng_state()
        seen["feature_dim"] = feature_dim
        return original(backbone, feature_dim, *args, **kwargs)

    monkeypatch.setattr(scene_features, "pretrain", spy)
    cfg = compose(pretraining(tiny_data_root))
    scene_features.prepare_inputs(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.model.encoder.pretrain.seed)
        reference = torchvision.models.get_model(cfg.model.encoder.name, weights=None).state_dict()
        assert torch.equal(torch.random.get_rng_state(), seen["rng"])  # the head draws what it drew before
    classifier = [k for k in reference if k not in seen["weights"]]
    assert classifier and all(k.startswith(("fc.", "classifier.")) for k in classifier)
    for name, tensor in seen["weights"].items():
        assert torch.equal(tensor, reference[name]), name
    assert seen["feature_dim"] == 1024


def test_nothing_changes_without_pretraining_or_with_own_features(tiny_data_root, cache, tmp_path):
    from captioning.scenes.pretraining import prepare_inputs

    for extra in (["model.encoder.pretrain=null"], [f"data.features={tmp_path}", "model.encoder.trainable=false"]):
        cfg = compose(tiny_overrides(tiny_data_root) + extra)
        assert prepare_inputs(cfg) is cfg
    coco = compose(["data=coco", "data.root=/nonexistent"])
    assert coco.model.encoder.pretrain is not None and prepare_inputs(coco) is coco
    assert not cache.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.encoder.weights=DEFAULT"], "model.encoder.weights cannot be used"),
        (["model.encoder.trainable=false", "model.encoder.unfreeze_after_steps=3"], "unfreeze_after_steps cannot"),
        (["model.encoder.pretrain.task=imagenet"], "model.encoder.pretrain.task must be one of"),
        (["model.encoder.pretrain.epochs=0"], "model.encoder.pretrain.epochs must be an integer >= 1"),
        (["model.encoder.pretrain.hflip=2"], r"model.encoder.pretrain.hflip must be in \[0, 1\]"),
        (["+model.encoder.pretrain.steps=10"], "model.encoder.pretrain.steps is not a pretraining setting"),
        (
            ["model.encoder.pretrain.feed=logits"],
            r"model.encoder.pretrain.feed must be one of \['labels', 'features', 'true_labels'\]",
        ),
        (
            ["model.encoder.pretrain.precision=fp16"],
            r"model.encoder.pretrain.precision must be one of \['auto', 'fp32'",
        ),
        (
            ["model.encoder.label_head=/x/head.pth"],
            "model.encoder.label_head cannot be used with model.encoder.pretrain",
        ),
    ],
)
def test_contradicting_settings_name_the_key(tiny_data_root, cache, extra, message):
    from captioning.scenes.pretraining import prepare_inputs

    with pytest.raises(ConfigError, match=message):
        prepare_inputs(compose(pretraining(tiny_data_root) + extra))


def test_a_run_trains_on_the_cached_features_and_predicts_from_images(tiny_data_root, cache, tmp_path):
    """Deferred scoring: no Java needed; the checkpoint reads features, and captions JPEGs with the saved encoder."""
    from captioning.evaluation.evaluate import evaluate_checkpoint
    from captioning.predict import predict
    from captioning.training.recipe import train

    overrides = pretraining(tiny_data_root) + [
        "trainer.max_steps=4",
        "trainer.val_every_n_steps=2",
        "trainer.scoring=deferred",
    ]
    summary = train(compose(overrides), tmp_path / "run")
    assert summary["steps"] == 4
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    config = torch.load(checkpoint, map_location="cpu", weights_only=True)["config"]
    assert config["data"]["features"] and config["model"]["encoder"]["weights"].endswith("encoder.pth")
    evaluation = evaluate_checkpoint(
        checkpoint, "test", compose([], config_name="eval").decode, device=torch.device("cpu"), score_now=False
    )
    assert len(evaluation.captions) == 10
    rows = predict(
        checkpoint,
        [tiny_data_root / "val2014"],
        compose([], config_name="predict").decode,
        "cpu",
        output=tmp_path / "out.jsonl",
    )
    assert len(rows) == len(list((tiny_data_root / "val2014").glob("*.jpg"))) and all("captions" in r for r in rows)


# -- tools/schedule_table.py ------------------------------------------------------------------------------------------
def test_t_quantiles_match_the_printed_tables():
    assert schedule_table.t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert schedule_table.t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    assert schedule_table.t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-6)
    assert schedule_table.t_quantile(0.025, 10) == pytest.approx(-2.228139, abs=1e-6)
    assert schedule_table.t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-6)


def test_welch_interval_by_hand():
    # row mean 4, baseline mean 2, both variance 2 over 2 values: se = sqrt(2/2 + 2/2) = sqrt 2, df = 4 / (1 + 1) = 2
    ci = schedule_table.welch_interval([3.0, 5.0], [1.0, 3.0])
    half = 4.302653 * math.sqrt(2)
    assert ci["diff"] == pytest.approx(2.0) and ci["df"] == pytest.approx(2.0)
    assert (ci["low"], ci["high"]) == pytest.approx((2 - half, 2 + half), abs=1e-5) and not ci["significant"]
    # variances 0.04 over 3 values each: se = sqrt(0.08 / 3), df = 4
    ci = schedule_table.welch_interval([10.0, 10.2, 9.8], [1.0, 1.2, 0.8])
    half = 2.776445 * math.sqrt(0.08 / 3)
    assert ci["df"] == pytest.approx(4.0) and ci["significant"]
    assert (ci["low"], ci["high"]) == pytest.approx((9 - half, 9 + half), abs=1e-5)
    below = schedule_table.welch_interval([1.0, 1.2, 0.8], [10.0, 10.2, 9.8])
    assert below["significant"] and below["high"] == pytest.approx(-9 + half, abs=1e-5)
    assert schedule_table.welch_interval([1.0], [1.0, 2.0]) is None
    same = schedule_table.welch_interval([0.0, 0.0], [0.5, 0.5])
    assert same["low"] == same["high"] == -0.5 and same["significant"]


def test_schedule_length_and_table_from_finished_runs(tmp_path, capsys):
    k = schedule_table.inverse_sigmoid_k(1400, 0.5)
    assert k * math.log(k) == pytest.approx(700) and schedule_table.epsilon(700, k) == pytest.approx(0.5)
    values = {"baseline": [0.50, 0.52, 0.48], "scheduled_sampling": [0.60, 0.62, 0.58]}
    for row, cider in values.items():
        for seed, value in enumerate(cider):
            out = schedule_table.run_dir(tmp_path / "sweep", row, seed)
            out.mkdir(parents=True)
            (out / "test_metrics.json").write_text(
                json.dumps({"test/CIDEr": value, "test/BLEU-4": 0.2, "test/METEOR": 0.2, "test/scene/correct": 0.9})
            )
    code = schedule_table.main(
        [
            "--table-only",
            "--seeds",
            "4",
            "--rows",
            "baseline",
            "scheduled_sampling",
            "--sweep-dir",
            str(tmp_path / "sweep"),
            "--out-dir",
            str(tmp_path / "out"),
            "--name",
            "t",
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "out" / "t.json").read_text())
    cell = result["table"]["scheduled_sampling"]["CIDEr"]
    assert cell["n"] == 3 and cell["mean"] == pytest.approx(0.60) and cell["std"] == pytest.approx(0.02)
    half = 2.776445 * math.sqrt(2 * 0.0004 / 3)
    assert cell["vs_baseline"]["significant"] and cell["vs_baseline"]["low"] == pytest.approx(0.1 - half, abs=1e-6)
    assert len(result["missing_runs"]) == 2  # seed 3 of both rows
    assert result["max_steps"] == 1000  # --steps: the table's own run length, not the main job's
    markdown = (tmp_path / "out" / "t.md").read_text()
    assert "| scheduled_sampling | 3 | 0.200 ± 0.000 | 0.200 ± 0.000 | 0.600 ± 0.020 | 0.900 ± 0.000 |" in markdown
    assert f"**+0.100 [{0.1 - half:+.3f}, {0.1 + half:+.3f}]**" in markdown


def test_self_critical_rows_continue_the_same_seeds_checkpoint(tmp_path):
    command = schedule_table.scst_command("scheduled_sampling+self_critical", 3, tmp_path, 400, 1e-4, 1, ["data=x"])
    source = tmp_path / "scheduled_sampling" / "seed_3" / "checkpoints" / "best.pt"
    assert f"objective.init_from={source}" in command and "objective=self_critical" in command
    assert {"seed=3", "trainer.max_steps=400", "optim.optimizer.lr=0.0001", "data=x"} <= set(command)
    assert f"hydra.run.dir={tmp_path / 'scheduled_sampling+self_critical' / 'seed_3'}" in command
    with pytest.raises(SystemExit):  # its source row is not in the table
        schedule_table.main(["--table-only", "--rows", "baseline", "scheduled_sampling+self_critical"])
