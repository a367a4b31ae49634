"""captioning-predict and captioning-score as users call them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import compose, requires_java, tiny_overrides
from PIL import Image

from captioning.predict import list_images, predict
from captioning.training.recipe import train

pytestmark = [requires_java(), pytest.mark.java]


def test_predict_captions_files_and_folders_as_json_lines(checkpoint, tiny_data_root, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(tiny_data_root / "val2014", folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    Image.new("RGBA", (50, 40), (0, 0, 255, 128)).save(tmp_path / "rgba.png")
    out = tmp_path / "captions.jsonl"
    decode_cfg = compose(
        ["decode=diverse_beam", "decode.beam_size=4", "decode.num_groups=2", "decode.n_best=4"], config_name="predict"
    ).decode
    rows = predict(checkpoint, [folder, tmp_path / "rgba.png"], decode_cfg, "cpu", batch_size=7, output=out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == rows
    files = list_images([folder, tmp_path / "rgba.png"])
    assert sorted(r["file"] for r in rows) == sorted(map(str, files))
    broken = [r for r in rows if r["file"].endswith("broken.jpg")]
    assert len(broken) == 1 and "error" in broken[0]
    good = [r for r in rows if "captions" in r]
    assert all(len(r["captions"]) == 4 for r in good)
    assert all(r["captions"][0]["score"] >= r["captions"][-1]["score"] for r in good)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        list_images([tmp_path / "no_such_folder"])


def test_score_command_on_our_own_results(checkpoint, tiny_data_root, tmp_path):
    from captioning.evaluation.evaluate import evaluate_checkpoint
    from captioning.evaluation.reports import write_evaluation
    from captioning.score import main as score_main

    decode_cfg = compose(["decode=greedy"]).decode
    evaluation = evaluate_checkpoint(checkpoint, "test", decode_cfg, device=torch.device("cpu"))
    write_evaluation(evaluation, tmp_path)
    metrics = evaluation.keyed()
    out = tmp_path / "scores.json"
    split = ["--split-file", str(tiny_data_root / "dataset_coco.json"), "--split", "test"]  # val+test annotated
    code = score_main(
        [
            str(tiny_data_root / "annotations" / "captions_val2014.json"),
            str(tmp_path / "results_test_greedy.json"),
            "--out",
            str(out),
            *split,
        ]
    )
    assert code == 0
    scored = json.loads(out.read_text())["metrics"]
    for name in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert scored[name] == pytest.approx(metrics[f"test/{name}"], abs=1e-12), name
    assert "scene/correct" not in scored  # only with the synthetic data folder:
    assert (
        score_main(
            [
                str(tiny_data_root / "annotations" / "captions_val2014.json"),
                str(tmp_path / "results_test_greedy.json"),
                "--out",
                str(out),
                "--synthetic-root",
                str(tiny_data_root),
                *split,
            ]
        )
        == 0
    )
    scored = json.loads(out.read_text())["metrics"]
    assert scored["scene/correct"] == metrics["test/scene/correct"]
    assert scored["scene/grammatical"] == metrics["test/scene/grammatical"]


def test_compare_decoders_side_by_side(checkpoint, tmp_path, capsys):
    from captioning.evaluate import evaluate

    cfg = compose(
        [
            f"checkpoint={checkpoint}",
            "compare_decoders=[beam,diverse_beam]",
            "device=cpu",
            "+compare_overrides.beam_size=6",
            "+compare_overrides.n_best=6",
        ],
        config_name="eval",
    )
    result = evaluate(cfg, tmp_path)
    for name in ("beam", "diverse_beam"):
        assert (tmp_path / name / f"results_test_{name}.json").is_file()
        for key in ("CIDEr", "BLEU-4", "distinct-2", "oracle-CIDEr@6", "mBLEU-4"):
            assert f"test/{name}/{key}" in result
        assert result[f"test/{name}/oracle-CIDEr@6"] >= result[f"test/{name}/CIDEr"] - 1e-9
    table = json.loads((tmp_path / "test_decoders_metrics.json").read_text())
    assert table["decoders"]["beam"]["beam_size"] == 6 and table["decoders"]["diverse_beam"]["num_groups"] == 3
    assert table["metrics"]["beam"]["CIDEr"] == result["test/beam/CIDEr"]
    assert "diverse_beam" in capsys.readouterr().out
    logged = json.loads((tmp_path / "test_decoders.json").read_text())  # the side-by-side samples table
    assert logged["columns"] == ["image", "beam", "diverse_beam", "references"] and len(logged["rows"]) == 10


def test_eval_computes_the_metrics_asked_for(checkpoint, tmp_path):
    from captioning.config import ConfigError
    from captioning.evaluate import evaluate

    cfg = compose([f"checkpoint={checkpoint}", "device=cpu", "metrics=[CIDEr,ROUGE-L]"], config_name="eval")
    result = evaluate(cfg, tmp_path)
    coco_figures = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert {k.removeprefix("test/") for k in result} & coco_figures == {"CIDEr", "ROUGE-L"}
    with pytest.raises(ConfigError, match=r"^metrics must be a non-empty list"):
        evaluate(compose([f"checkpoint={checkpoint}", "metrics=[CIDEr,SPICE]"], config_name="eval"), tmp_path)


def test_compare_decoders_rejects_bad_names_and_combinations(checkpoint, tmp_path):
    from captioning.config import ConfigError
    from captioning.evaluate import evaluate

    with pytest.raises(ConfigError, match="no decode config 'nucleus'"):
        evaluate(compose([f"checkpoint={checkpoint}", "compare_decoders=[beam,nucleus]"], config_name="eval"), tmp_path)
    with pytest.raises(ConfigError, match="num_groups"):
        evaluate(
            compose(
                [
                    f"checkpoint={checkpoint}",
                    "compare_decoders=[diverse_beam]",
                    "+compare_overrides.beam_size=4",
                    "+compare_overrides.n_best=4",
                ],
                config_name="eval",
            ),
            tmp_path,
        )
    with pytest.raises(ConfigError, match=r"compare_overrides: \['temperature'\] is a parameter of none"):
        evaluate(
            compose(
                [
                    f"checkpoint={checkpoint}",
                    "compare_decoders=[beam,diverse_beam]",
                    "+compare_overrides.temperature=0.5",
                ],
                config_name="eval",
            ),
            tmp_path,
        )


def test_ensemble_evaluation(checkpoint, tiny_data_root, tmp_path):
    from captioning.evaluate import evaluate

    single = evaluate(compose([f"checkpoint={checkpoint}", "device=cpu"], config_name="eval"), tmp_path / "one")
    same_twice = evaluate(
        compose([f"checkpoint={checkpoint}", f"ensemble=[{checkpoint}]", "device=cpu"], config_name="eval"),
        tmp_path / "two",
    )
    for key, value in single.items():  # averaging a model with itself changes nothing
        if not key.startswith(("test/reference_likelihood", "test/exposure_oracle")):
            assert same_twice[key] == pytest.approx(value, abs=1e-9), key
    other = tmp_path / "other"
    train(
        compose(
            tiny_overrides(tiny_data_root) + ["trainer.max_steps=3", "trainer.evaluate_after_training=false", "seed=5"]
        ),
        other,
    )
    mixed = evaluate(
        compose(
            [f"checkpoint={checkpoint}", f"ensemble=[{other}/checkpoints/best.pt]", "device=cpu"], config_name="eval"
        ),
        tmp_path / "mixed",
    )
    # the ensemble's captions are those of the average of the two models' per-step probabilities, decoded here
    from captioning.data.build import load_records
    from captioning.decoding import EnsembleModel
    from captioning.evaluation.captions import decode_records
    from captioning.models.loading import load_model

    cpu = torch.device("cpu")
    (first, vocab, train_cfg, _), (second, *_) = (
        load_model(checkpoint, cpu),
        load_model(other / "checkpoints" / "best.pt", cpu),
    )
    decode_cfg = compose([], config_name="eval").decode
    expected = decode_records(
        EnsembleModel([first, second]),
        load_records(train_cfg.data)["test"],
        vocab,
        train_cfg.data,
        "beam",
        {k: v for k, v in decode_cfg.items() if k != "strategy"},
        cpu,
    )
    written = {
        r["image_id"]: r["caption"] for r in json.loads((tmp_path / "mixed" / "results_test_beam.json").read_text())
    }
    assert written == {i: hyps[0][0] for i, hyps in expected.items()}
    assert mixed["test/CIDEr"] != single["test/CIDEr"] or written != {
        r["image_id"]: r["caption"] for r in json.loads((tmp_path / "one" / "results_test_beam.json").read_text())
    }
    bad_vocab = tmp_path / "bad"
    train(
        compose(
            tiny_overrides(tiny_data_root)
            + ["trainer.max_steps=3", "trainer.evaluate_after_training=false", "data.word_count_threshold=0"]
        ),
        bad_vocab,
    )
    with pytest.raises(ValueError, match="another vocabulary"):
        evaluate(
            compose(
                [f"checkpoint={checkpoint}", f"ensemble=[{bad_vocab}/checkpoints/best.pt]", "device=cpu"],
                config_name="eval",
            ),
            tmp_path / "bad_eval",
        )
