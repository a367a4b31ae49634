"""`captioning-score ANNOTATIONS RESULTS`: score a COCO results file with the COCO caption metrics.

    captioning-score captions_val2014.json results.json [--out scores.json] [--spice]
                     [--split-file dataset_coco.json --split test] [--synthetic-root DATA_FOLDER]

References are the captions in ANNOTATIONS of its images, or, with --split-file/--split, of the images
of that Karpathy split: RESULTS must caption every one of them. Results for only some of them (partial
results) are an error unless --allow-partial is given; then only the images in RESULTS are scored and the
table says how many of how many. Prints a table and writes {"metrics": {...}, "num_images": N,
"num_reference_images": M, ...} as JSON (default: RESULTS with .scores.json).
Bad input exits with status 1 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from captioning.data.coco import read_split_ids
from captioning.evaluation.reports import format_table
from captioning.metrics.coco import first_few, load_references, load_results, score_captions
from captioning.metrics.java import JavaMissingError, check_java


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="captioning-score", description=__doc__.split("\n")[0])
    parser.add_argument("annotations", help="COCO captions annotation file, e.g. captions_val2014.json")
    parser.add_argument("results", help='COCO results file: [{"image_id": int, "caption": str}, ...]')
    parser.add_argument("--out", help="where to write the JSON scores (default: RESULTS with .scores.json)")
    parser.add_argument("--spice", action="store_true", help="also compute SPICE (needs its Stanford models)")
    parser.add_argument("--split-file", help="Karpathy split file (dataset_coco.json); needs --split")
    parser.add_argument("--split", help="Karpathy split whose images are scored, e.g. test")
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="score results that caption only some of the reference images (say how many)",
    )
    parser.add_argument(
        "--synthetic-root",
        help="a synthetic data folder (with synthetic_objects.json): also judge "
        "every caption against its scene (scene/correct ...)",
    )
    args = parser.parse_args(argv)
    if (args.split_file is None) != (args.split is None):
        parser.error("--split-file and --split must be given together")

    try:
        check_java()
        scenes = None
        if args.synthetic_root:  # checked before the (slow) scoring
            from captioning.scenes.generator import load_scenes

            scenes = load_scenes(args.synthetic_root)
        predictions = load_results(args.results)
        if args.split_file is not None:
            image_ids = read_split_ids(args.split_file, args.split)
            outside = sorted(set(predictions) - set(image_ids))
            if outside:
                raise ValueError(
                    f"{args.results} has captions for {len(outside)} image(s) outside the "
                    f"{args.split!r} split: {first_few(outside)}"
                )
            expected, where = list(image_ids), f"of the {args.split!r} split"
        else:
            load_references(args.annotations, sorted(predictions))  # every captioned image must be in it
            expected, where = sorted(load_references(args.annotations)), f"in {args.annotations}"
        missing = sorted(set(expected) - set(predictions))
        if missing and not args.allow_partial:
            raise ValueError(
                f"{args.results} lacks captions for {len(missing)} of the {len(expected)} images "
                f"{where}: {first_few(missing)} (partial results: pass --allow-partial to score only "
                f"the {len(expected) - len(missing)} captioned)"
            )
        image_ids = sorted(set(expected) & set(predictions)) if args.split_file is not None else sorted(predictions)
        references = load_references(args.annotations, image_ids)
        metrics = score_captions(references, predictions, spice=args.spice)
        if scenes is not None:
            from captioning.evaluation.evaluate import scene_truth

            metrics.update(scene_truth(predictions, scenes))
        out = Path(args.out) if args.out else Path(args.results).with_suffix(".scores.json")
        report = {
            "metrics": metrics,
            "num_images": len(image_ids),
            "num_reference_images": len(expected),
            "annotations": str(args.annotations),
            "results": str(args.results),
            "split": args.split,
        }
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except (FileNotFoundError, ValueError, TypeError, KeyError, JavaMissingError, OSError) as e:  # bad input: one line
        message = " ".join(str(e).split("\n"))
        print(f"captioning-score: error: {message}", file=sys.stderr)
        return 1
    print(f"scored {len(image_ids)} of {len(expected)} images" + (" (partial results)" if missing else ""))
    print(format_table({"value": metrics}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
