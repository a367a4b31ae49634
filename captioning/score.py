"""`captioning-score ANNOTATIONS RESULTS`: score a COCO results file with the COCO caption metrics.

    captioning-score captions_val2014.json results.json [--out scores.json] [--spice]
                     [--split-file dataset_coco.json --split test]

References are the captions in ANNOTATIONS of the images in RESULTS, or, with --split-file/--split,
of the images of that Karpathy split (RESULTS must then cover exactly that split). Prints a table
and writes {"metrics": {...}, "num_images": N, ...} as JSON (default: RESULTS with .scores.json).
Bad input exits with status 1 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from captioning.metrics.coco import first_few, load_references, load_results, score_captions
from captioning.metrics.java import check_java


def format_table(metrics: dict[str, float]) -> str:
    """Two aligned columns, metric name and raw value with 4 decimals (as pycocoevalcap prints them)."""
    if not metrics:
        return "(no metrics)"
    width = max(len("metric"), *(len(name) for name in metrics))
    cells = [f"{v:d}" if isinstance(v, int) and not isinstance(v, bool) else f"{float(v):.4f}"
             for v in metrics.values()]
    value_width = max(len("value"), *(len(c) for c in cells))
    lines = [f"{'metric':<{width}}  {'value':>{value_width}}", "-" * (width + 2 + value_width)]
    lines += [f"{name:<{width}}  {cell:>{value_width}}" for name, cell in zip(metrics, cells)]
    return "\n".join(lines)


def read_split_ids(split_file: str | Path, split: str) -> list[int]:
    """COCO image ids of one split ("train", "restval", "val", "test") of Karpathy's dataset_coco.json."""
    path = Path(split_file)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not all(isinstance(im, dict) and "split" in im and "cocoid" in im
                                               for im in images):
        raise ValueError(f"{path} is not a Karpathy split file (expected {{\"images\": [{{\"cocoid\", \"split\", "
                         "...}}]}}, e.g. dataset_coco.json)")
    ids = sorted(int(im["cocoid"]) for im in images if im["split"] == split)
    if not ids:
        available = sorted({str(im["split"]) for im in images})
        raise ValueError(f"split {split!r} has no images in {path}; available splits: {available}")
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="captioning-score", description=__doc__.split("\n")[0])
    parser.add_argument("annotations", help="COCO captions annotation file, e.g. captions_val2014.json")
    parser.add_argument("results", help='COCO results file: [{"image_id": int, "caption": str}, ...]')
    parser.add_argument("--out", help="where to write the JSON scores (default: RESULTS with .scores.json)")
    parser.add_argument("--spice", action="store_true", help="also compute SPICE (needs its Stanford models)")
    parser.add_argument("--split-file", help="Karpathy split file (dataset_coco.json); needs --split")
    parser.add_argument("--split", help="Karpathy split whose images are scored, e.g. test")
    args = parser.parse_args(argv)
    if (args.split_file is None) != (args.split is None):
        parser.error("--split-file and --split must be given together")

    try:
        check_java()
        predictions = load_results(args.results)
        if args.split_file is not None:
            image_ids = read_split_ids(args.split_file, args.split)
            outside = sorted(set(predictions) - set(image_ids))
            if outside:
                raise ValueError(f"{args.results} has captions for {len(outside)} image(s) outside the "
                                 f"{args.split!r} split: {first_few(outside)}")
            missing = sorted(set(image_ids) - set(predictions))
            if missing:
                raise ValueError(f"{args.results} lacks captions for {len(missing)} of the {len(image_ids)} images "
                                 f"of the {args.split!r} split: {first_few(missing)}")
        else:
            image_ids = sorted(predictions)
        references = load_references(args.annotations, image_ids)
        metrics = score_captions(references, predictions, spice=args.spice)
        out = Path(args.out) if args.out else Path(args.results).with_suffix(".scores.json")
        report = {"metrics": metrics, "num_images": len(image_ids), "annotations": str(args.annotations),
                  "results": str(args.results), "split": args.split}
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, OSError) as e:
        message = " ".join(str(e).split("\n"))
        print(f"captioning-score: error: {message}", file=sys.stderr)
        return 1
    print(format_table(metrics))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
