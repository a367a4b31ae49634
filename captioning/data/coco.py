"""COCO 2014 captions with the Karpathy split, read the same way for real COCO and for the
synthetic scenes (which are written in exactly these formats).

Folder layout (as downloaded):
    ROOT/train2014/*.jpg  ROOT/val2014/*.jpg
    ROOT/annotations/captions_train2014.json  ROOT/annotations/captions_val2014.json
    ROOT/dataset_coco.json     (Karpathy split: images with filepath, filename, cocoid, split)

Captions come from the COCO annotation files (read with pycocotools); the Karpathy file decides
which image belongs to which split and where its file is. `restval` joins `train` by default
(113,287 / 5,000 / 5,000 images on COCO).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from pycocotools.coco import COCO

SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    image_id: int
    path: Path
    split: str
    captions: list[str] = field(default_factory=list)  # raw reference captions, as annotated


def default_annotation_files(root: Path) -> list[Path]:
    return [root / "annotations" / "captions_train2014.json", root / "annotations" / "captions_val2014.json"]


def check_coco_paths(
    root: str | Path, karpathy_file: str | Path | None = None, annotation_files: list | None = None
) -> tuple[Path, Path, list[Path]]:
    """Fail in seconds, naming the path, if the data folder is not laid out as expected."""
    root = Path(str(root)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: folder not found: {root}")
    karpathy = Path(str(karpathy_file)).expanduser() if karpathy_file else root / "dataset_coco.json"
    if not karpathy.is_file():
        raise FileNotFoundError(
            f"data.karpathy_file: Karpathy split file not found: {karpathy} "
            "(dataset_coco.json from Karpathy's 'caption_datasets' archive)"
        )
    annotations = (
        [Path(str(p)).expanduser() for p in annotation_files] if annotation_files else default_annotation_files(root)
    )
    for path in annotations:
        if not path.is_file():
            raise FileNotFoundError(f"data.annotation_files: COCO caption annotations not found: {path}")
    return root, karpathy, annotations


def read_karpathy_images(path: str | Path, key: str = "data.karpathy_file") -> list[dict]:
    """The "images" of a Karpathy split file (dataset_coco.json): dicts with at least "cocoid" and "split"
    (and "filepath"/"filename" for images on disk). `key` names the option the path came from in errors."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: Karpathy split file not found: {path}")
    try:
        images = json.loads(path.read_text(encoding="utf-8"))["images"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f'{key}: {path} is not a Karpathy split file (expected {{"images": [{{"cocoid", '
            f'"split", ...}}]}}, e.g. dataset_coco.json): {e}'
        ) from None
    if not isinstance(images, list) or not all(
        isinstance(im, dict) and "split" in im and "cocoid" in im for im in images
    ):
        raise ValueError(f'{key}: {path} is not a Karpathy split file (every image needs "cocoid" and "split")')
    return images


def read_split_ids(path: str | Path, split: str, key: str = "--split-file") -> list[int]:
    """COCO image ids of one split ("train", "restval", "val", "test") of a Karpathy split file, sorted."""
    images = read_karpathy_images(path, key)
    ids = sorted(int(im["cocoid"]) for im in images if im["split"] == split)
    if not ids:
        available = sorted({str(im["split"]) for im in images})
        raise ValueError(f"split {split!r} has no images in {path}; available splits: {available}")
    return ids


def read_coco_karpathy(
    root: str | Path,
    karpathy_file: str | Path | None = None,
    annotation_files: list | None = None,
    restval_to_train: bool = True,
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, list[ImageRecord]]:
    """Image records per split, each with its raw COCO captions."""
    root, karpathy, annotations = check_coco_paths(root, karpathy_file, annotation_files)
    karpathy_images = read_karpathy_images(karpathy)

    captions: dict[int, list[str]] = {}
    for path in annotations:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            try:
                coco = COCO(str(path))
            except Exception as e:
                raise ValueError(f"data.annotation_files: could not read {path}: {e}") from e
        for ann in coco.dataset.get("annotations", []):
            captions.setdefault(int(ann["image_id"]), []).append(str(ann.get("caption", "")))

    records: dict[str, list[ImageRecord]] = {s: [] for s in splits}
    for item in karpathy_images:
        split = item["split"]
        if split == "restval":
            if not restval_to_train:
                continue
            split = "train"
        if split not in records:
            continue
        image_id = int(item["cocoid"])
        refs = captions.get(image_id)
        if refs is None:
            raise ValueError(
                f"data.annotation_files: image {image_id} ({item['filepath']}/{item['filename']}) "
                f"of the Karpathy {item['split']} split has no caption annotations in "
                f"{[str(p) for p in annotations]}"
            )
        records[split].append(ImageRecord(image_id, root / item["filepath"] / item["filename"], split, refs))
    for split in splits:
        if not records[split]:
            raise ValueError(f"data: the {split} split is empty in {karpathy}")
        first = records[split][0].path
        if not first.parent.is_dir():
            raise FileNotFoundError(f"data.root: image folder not found: {first.parent} (needed by the {split} split)")
    return records
