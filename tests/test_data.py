"""Reading COCO-format data, the vocabulary, and every odd input's defined behaviour."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose, tiny_overrides
from PIL import Image

from captioning.data.build import ResumableSampler, build_vocab, encoded_train_items, train_dataset
from captioning.data.coco import read_coco_karpathy
from captioning.data.dataset import BadImageTracker, BadInputError, EvalImageDataset, collate, encode_captions
from captioning.data.images import BadImage, load_rgb
from captioning.data.text import training_tokens
from captioning.data.vocab import Vocabulary


@pytest.fixture
def data_copy(tiny_data_root, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_data_root, root)
    return root


def test_reader_gives_karpathy_splits_with_coco_captions(tiny_data_root):
    records = read_coco_karpathy(tiny_data_root)
    assert len(records["train"]) == 60 and len(records["val"]) == 10 and len(records["test"]) == 10
    assert all(len(r.captions) == 5 and r.path.is_file() for split in records.values() for r in split)
    ids = [r.image_id for split in records.values() for r in split]
    assert len(ids) == len(set(ids))
    restval = read_coco_karpathy(tiny_data_root, restval_to_train=False)
    assert 0 < len(restval["train"]) < 60  # restval images joined train by default


def _rewrite_captions(root: Path, image_ids: set[int], caption: str) -> None:
    for name in ("captions_train2014.json", "captions_val2014.json"):
        path = root / "annotations" / name
        data = json.loads(path.read_text())
        for ann in data["annotations"]:
            if ann["image_id"] in image_ids:
                ann["caption"] = caption
        path.write_text(json.dumps(data))


def test_vocabulary_comes_from_the_train_split_only(data_copy):
    records = read_coco_karpathy(data_copy)
    held_out = {r.image_id for r in records["val"] + records["test"]}
    _rewrite_captions(data_copy, held_out, "a zebra next to a giraffe")  # 100 occurrences, all in val/test
    records = read_coco_karpathy(data_copy)
    vocab = build_vocab(records["train"], compose(["data.word_count_threshold=5"]).data)
    assert "zebra" not in vocab.stoi and "giraffe" not in vocab.stoi
    counts = {}
    for r in records["train"]:
        for c in r.captions:
            for w in training_tokens(c):
                counts[w] = counts.get(w, 0) + 1
    assert set(vocab.itos[4:]) == {w for w, c in counts.items() if c > 5}  # count > threshold, train only
    assert vocab.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]


def test_vocabulary_encode_decode_and_round_trip():
    vocab = Vocabulary.build([["a", "red", "circle"]] * 6 + [["rare"]], word_count_threshold=5)
    ids = vocab.encode(["a", "red", "rare", "circle"], max_len=3)
    assert ids == [vocab.stoi["a"], vocab.stoi["red"], vocab.unk_id]
    assert vocab.decode([vocab.bos_id, *ids, vocab.eos_id, 5, 5]) == "a red <unk>"
    assert Vocabulary.from_state_dict(vocab.state_dict()).itos == vocab.itos
    with pytest.raises(ValueError, match="word_count_threshold"):
        Vocabulary.build([], word_count_threshold=-1)


def test_tokenize_handles_newlines_and_unicode():
    assert training_tokens("A red\ncircle,\tleft of a CAFÉ\u2028sign!") == [
        "a",
        "red",
        "circle",
        "left",
        "of",
        "a",
        "cafe",
        "sign",
    ]
    assert training_tokens("🙂 ✨") == []
    assert training_tokens("  ") == []


def test_bad_captions_are_skipped_and_counted_or_raise(caplog):
    vocab = Vocabulary.build([["a", "red", "circle"]] * 6, word_count_threshold=5)
    from captioning.data.coco import ImageRecord

    records = [
        ImageRecord(1, Path("x.jpg"), "train", ["a red circle", "", "zebra giraffe", "a red\ncircle 🙂"]),
        ImageRecord(2, Path("y.jpg"), "train", ["   ", "okapi"]),
    ]
    with caplog.at_level(logging.WARNING):
        items, problems = encode_captions(records, vocab, 16, "skip")
    assert [len(caps) for _, caps in items] == [2]
    assert items[0][1][1] == vocab.encode(["a", "red", "circle"], 16)  # newline + emoji caption kept, cleaned
    assert len(problems.empty) == 2 and len(problems.unknown_only) == 2 and problems.images_without_captions == [2]
    assert "skipped 2 empty captions" in caplog.text and "skipped 2 unknown-only captions" in caplog.text
    with pytest.raises(BadInputError, match="image 1 .*only unknown words|image 1 .*empty"):
        encode_captions(records, vocab, 16, "error")


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "1", "LA"])
def test_any_colour_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    image = Image.new(mode, (40, 30))
    if mode == "CMYK":
        path = path.with_suffix(".jpg")
    image.save(path)
    loaded = load_rgb(path, 32, 10**8)
    assert isinstance(loaded, Image.Image) and loaded.mode == "RGB" and loaded.size == (40, 30)


def test_rgba_transparency_is_composited_on_white(tmp_path):
    path = tmp_path / "transparent.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(path)
    assert load_rgb(path, 8, 10**8).getpixel((0, 0)) == (255, 255, 255)


def test_huge_jpeg_is_decoded_at_reduced_size_and_huge_png_is_bad(tmp_path):
    big = Image.new("RGB", (4000, 3000), (10, 200, 30))
    big.save(tmp_path / "big.jpg")
    big.save(tmp_path / "big.png")
    small = load_rgb(tmp_path / "big.jpg", 64, max_pixels=1_000_000)
    assert isinstance(small, Image.Image) and max(small.size) <= 1000  # draft mode: decoded at 1/4 or 1/8
    bad = load_rgb(tmp_path / "big.png", 64, max_pixels=1_000_000)
    assert isinstance(bad, BadImage) and "max_image_pixels" in bad.reason


def test_missing_and_corrupt_images_are_named(tmp_path):
    truncated = tmp_path / "truncated.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.jpg")
    truncated.write_bytes((tmp_path / "ok.jpg").read_bytes()[:200])
    (tmp_path / "text.jpg").write_text("not an image")
    for name, reason in [("missing.jpg", "file not found"), ("truncated.jpg", ""), ("text.jpg", "")]:
        result = load_rgb(tmp_path / name, 32, 10**8)
        assert isinstance(result, BadImage) and result.path.endswith(name) and reason in result.reason


def test_bad_images_in_a_loader_are_skipped_by_name_or_raise(data_copy, caplog):
    records = read_coco_karpathy(data_copy)
    victims = records["test"][:2]
    victims[0].path.unlink()
    victims[1].path.write_bytes(b"\xff\xd8\xff garbage")
    dataset = EvalImageDataset(records["test"], 32, None, 10**8)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["size"] == 8 and batch["images"].shape == (8, 3, 32, 32)
    tracker = BadImageTracker("skip")
    with caplog.at_level(logging.WARNING):
        tracker(batch)
    assert set(tracker.skipped) == {str(victims[0].path), str(victims[1].path)}
    assert victims[0].path.name in caplog.text and victims[1].path.name in caplog.text
    with pytest.raises(BadInputError, match=victims[0].path.name):
        BadImageTracker("error")(batch)


def test_training_items_pick_captions_deterministically(tiny_data_root):
    cfg = compose(tiny_overrides(tiny_data_root))
    records = read_coco_karpathy(tiny_data_root)
    vocab = build_vocab(records["train"], cfg.data)
    dataset = train_dataset(encoded_train_items(records["train"], vocab, cfg.data), vocab, cfg.data, seed=0)
    a, b = dataset[3], dataset[3]
    assert torch.equal(a["targets"], b["targets"]) and a["targets"].shape == (5, 17)
    assert (a["targets"] == vocab.eos_id).sum() == 5  # one <eos> per caption
    other_epoch = dataset[3 + len(dataset)]  # same image, epoch 1: same image, possibly other order
    assert torch.equal(other_epoch["image"], a["image"])
    batch = collate([dataset[i] for i in range(4)])
    assert batch["targets"].shape[:2] == (4, 5) and (batch["targets"][..., -1] != 0).any()  # trimmed to longest


def test_sampler_resumes_mid_epoch_and_shards_ranks():
    full = list(ResumableSampler(20, seed=1))
    s = ResumableSampler(20, seed=1)
    s.set_epoch(0, start=8)
    assert list(s) == full[8:]
    s.set_epoch(1)
    assert sorted(i - 20 for i in s) == list(range(20)) and list(s) != [i + 20 for i in full]
    shards = [list(ResumableSampler(20, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert all(len(x) == 6 for x in shards) and len(set(sum(shards, []))) == 18


def test_wrong_paths_fail_fast_naming_the_path(tmp_path, data_copy):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        read_coco_karpathy(tmp_path / "nowhere")
    (data_copy / "annotations" / "captions_val2014.json").unlink()
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        read_coco_karpathy(data_copy)
    (data_copy / "dataset_coco.json").unlink()
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
        read_coco_karpathy(data_copy)


FOLDERS_MADE = []


def folder_made_here(cfg_data) -> Path:
    """A data generator of this test (data.generator names it): records the call, returns data.root."""
    FOLDERS_MADE.append(cfg_data.root)
    return Path(cfg_data.root)


def test_the_data_config_names_what_makes_its_folder(tiny_data_root, tmp_path):
    """data/ reaches the synthetic scenes only through the function `data.generator` names (it imports nothing of
    captioning.scenes): another function named there makes the folder instead; a config saved before the key
    existed still gets the scenes' folder; COCO reads data.root."""
    from omegaconf import open_dict

    from captioning.data.build import resolve_root

    cfg = compose(tiny_overrides(tiny_data_root)).data
    assert cfg.generator == "captioning.scenes.generator.ensure_data" and resolve_root(cfg) == tiny_data_root
    with open_dict(cfg):
        cfg.generator, cfg.root = f"{__name__}.folder_made_here", str(tmp_path)
    assert resolve_root(cfg) == tmp_path and FOLDERS_MADE == [str(tmp_path)]
    old = compose(tiny_overrides(tiny_data_root)).data
    with open_dict(old):
        del old["generator"]
    assert resolve_root(old) == tiny_data_root
    coco = compose(["data=coco", f"data.root={tmp_path}"]).data
    assert "generator" not in coco and resolve_root(coco) == tmp_path
