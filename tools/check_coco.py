"""Check that a folder holds COCO 2014 captions + Karpathy splits in the layout the pipeline reads.

    python tools/check_coco.py ROOT [--karpathy PATH]

Expected layout (a real COCO 2014 download plus Karpathy's dataset_coco.json, or the synthetic
data set written by captioning.scenes.generator):

    ROOT/train2014/COCO_train2014_%012d.jpg
    ROOT/val2014/COCO_val2014_%012d.jpg
    ROOT/annotations/captions_train2014.json
    ROOT/annotations/captions_val2014.json
    ROOT/dataset_coco.json          (or --karpathy PATH)

Prints the image count per Karpathy split and every problem found, naming the missing paths/ids.
Exit code 0 if everything is in place, 1 otherwise. Importable: `check_coco_folder` returns the
problems as a list of strings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from captioning.data.coco import read_karpathy_images

ANNOTATION_FILES = ("annotations/captions_train2014.json", "annotations/captions_val2014.json")
IMAGE_DIRS = ("train2014", "val2014")
KARPATHY_SPLITS = ("train", "restval", "val", "test")
# Karpathy split sizes of real COCO 2014 (train + restval counted together, as usually reported).
REAL_COCO_SIZES = {"train+restval": 113_287, "val": 5_000, "test": 5_000}
SHOW_FIRST = 5  # how many missing items to name explicitly


def _load_json(path: Path, problems: list[str]) -> dict | None:
    """Load a JSON object, recording a problem (instead of raising) if it is missing or unreadable."""
    if not path.is_file():
        problems.append(f"missing file: {path}")
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        problems.append(f"cannot read JSON {path}: {err}")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
        return None
    return data


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:SHOW_FIRST])
    return shown + (f", ... ({len(items) - SHOW_FIRST} more)" if len(items) > SHOW_FIRST else "")


def default_karpathy_file(root: str | Path) -> Path:
    return Path(root) / "dataset_coco.json"


def karpathy_split_counts(karpathy_file: str | Path) -> dict[str, int]:
    """Number of images per Karpathy split, plus the usual "train+restval" total."""
    counts = Counter(entry["split"] for entry in read_karpathy_images(karpathy_file, "--karpathy"))
    result = {split: counts.get(split, 0) for split in KARPATHY_SPLITS}
    result.update({split: n for split, n in counts.items() if split not in KARPATHY_SPLITS})
    result["train+restval"] = result["train"] + result["restval"]
    return result


def check_coco_folder(root: str | Path, karpathy_file: str | Path | None = None) -> list[str]:
    """Return every problem found in a COCO 2014 + Karpathy folder (an empty list means OK)."""
    root = Path(root)
    if not root.is_dir():
        return [f"COCO root folder not found: {root}"]
    problems: list[str] = []

    for name in IMAGE_DIRS:
        if not (root / name).is_dir():
            problems.append(f"missing image folder: {root / name}")

    # Caption annotations: which image ids have at least one caption.
    captioned: set[int] = set()
    for name in ANNOTATION_FILES:
        data = _load_json(root / name, problems)
        if data is None:
            continue
        if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
            problems.append(f"{root / name}: not in COCO caption format (needs 'images' and 'annotations' lists)")
            continue
        captioned.update(ann["image_id"] for ann in data["annotations"] if "image_id" in ann and "caption" in ann)

    karpathy_path = Path(karpathy_file) if karpathy_file is not None else default_karpathy_file(root)
    karpathy = _load_json(karpathy_path, problems)
    if karpathy is None:
        if karpathy_file is None:
            problems.append(
                "the Karpathy split file dataset_coco.json (from Karpathy's caption_datasets.zip) "
                f"is expected at {karpathy_path}, or pass --karpathy PATH"
            )
        return problems
    images = karpathy.get("images")
    if not isinstance(images, list) or not images:
        problems.append(f"{karpathy_path}: expected a non-empty 'images' list (Karpathy split format)")
        return problems

    missing_files: list[str] = []
    uncaptioned: list[str] = []
    malformed: list[str] = []
    bad_splits: Counter = Counter()
    for k, entry in enumerate(images):
        if not all(key in entry for key in ("filepath", "filename", "cocoid", "split", "sentences")):
            malformed.append(f"entry {k}")
            continue
        if entry["split"] not in KARPATHY_SPLITS:
            bad_splits[entry["split"]] += 1
        path = os.path.join(root, entry["filepath"], entry["filename"])
        if not os.path.exists(path):
            missing_files.append(path)
        if entry["cocoid"] not in captioned:
            uncaptioned.append(f"{entry['cocoid']} ({entry['filename']})")
        if not entry["sentences"]:
            malformed.append(f"entry {k} (cocoid {entry['cocoid']}: no sentences)")

    if malformed:
        problems.append(
            f"{karpathy_path}: {len(malformed)} malformed image entries (need filepath, filename, "
            f"cocoid, split and non-empty sentences): {_examples(malformed)}"
        )
    if bad_splits:
        problems.append(f"{karpathy_path}: unknown split names {dict(bad_splits)}; expected one of {KARPATHY_SPLITS}")
    if missing_files:
        problems.append(
            f"{len(missing_files)} of {len(images)} images listed in {karpathy_path} are missing: "
            f"{_examples(missing_files)}"
        )
    if uncaptioned and captioned:  # (if no annotation file loaded, that was reported above)
        problems.append(
            f"{len(uncaptioned)} Karpathy cocoids have no caption annotation in "
            f"{' or '.join(ANNOTATION_FILES)}: {_examples(uncaptioned)}"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="COCO 2014 folder (holding train2014/, val2014/, annotations/)")
    parser.add_argument("--karpathy", default=None, help="Karpathy split file (default: ROOT/dataset_coco.json)")
    args = parser.parse_args(argv)

    problems = check_coco_folder(args.root, args.karpathy)
    karpathy_path = Path(args.karpathy) if args.karpathy else default_karpathy_file(args.root)
    try:
        counts = karpathy_split_counts(karpathy_path)
    except (OSError, ValueError, KeyError, TypeError):
        counts = None
    if counts is not None:
        print(f"Karpathy splits in {karpathy_path}:")
        for split, n in counts.items():
            expected = REAL_COCO_SIZES.get(split)
            note = (
                "" if expected is None else (f"  (real COCO: {expected:,}" + (")" if n == expected else ", differs)"))
            )
            print(f"  {split:>14}: {n:,}{note}")
    if problems:
        print(f"{len(problems)} problem(s) in {args.root}:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"OK: {args.root} has the COCO 2014 + Karpathy layout; every listed image exists and has captions.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
