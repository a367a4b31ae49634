"""An Evaluation written out: the COCO results file, the metrics JSON, the exposure probes' reports and plots,
the printed table, and the logger's metrics and sample table."""

from __future__ import annotations

import json
from pathlib import Path

from captioning.evaluation.captions import write_results
from captioning.evaluation.evaluate import Evaluation


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Metric table: one column per system (model, reference, decoder...), one row per metric."""
    systems = list(rows)
    metrics = list(dict.fromkeys(m for s in systems for m in rows[s]))
    if not metrics:
        return "(no metrics)"
    width = max(len(m) for m in metrics) + 2
    column = max(12, *(len(s) + 2 for s in systems))
    lines = [" " * width + "".join(f"{s:>{column}}" for s in systems)]
    for m in metrics:
        lines.append(f"{m:<{width}}" + "".join(f"{_cell(rows[s].get(m, float('nan'))):>{column}}" for s in systems))
    return "\n".join(lines)


def _cell(value) -> str:
    """Counts as integers, figures with 4 decimals (as pycocoevalcap prints them)."""
    return f"{value:d}" if isinstance(value, int) and not isinstance(value, bool) else f"{float(value):.4f}"


def results_path(out_dir: Path, evaluation: Evaluation) -> Path:
    return Path(out_dir) / f"results_{evaluation.split}_{evaluation.strategy}.json"


def write_evaluation(evaluation: Evaluation, out_dir: str | Path) -> None:
    """OUT/results_<split>_<strategy>.json (COCO server format), OUT/<split>_reference_likelihood.{json,png},
    on synthetic data OUT/<split>_exposure_oracle.{json,png} and, when scored, OUT/<split>_metrics.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = evaluation.split
    write_results(results_path(out_dir, evaluation), evaluation.captions)
    for name, report in (
        ("reference_likelihood", evaluation.exposure.reference_likelihood),
        ("exposure_oracle", evaluation.exposure.oracle),
    ):
        if report is not None:
            (out_dir / f"{split}_{name}.json").write_text(json.dumps(report.to_json(), indent=2))
            report.plot(out_dir / f"{split}_{name}.png")
    if evaluation.scored:
        (out_dir / f"{split}_metrics.json").write_text(
            json.dumps(
                {
                    **evaluation.keyed(),
                    "checkpoint": evaluation.checkpoint,
                    "checkpoint_step": evaluation.checkpoint_step,
                    "decode": evaluation.strategy,
                    "decode_params": evaluation.decode_params,
                    "most_common_caption": evaluation.baseline_caption,
                    "images": len(evaluation.captions),
                },
                indent=2,
            )
        )


def print_evaluation(evaluation: Evaluation, out_dir: str | Path) -> None:
    split = evaluation.split
    if not evaluation.scored:
        print(f"{split}: wrote {results_path(Path(out_dir), evaluation)} (scoring deferred)")
        return
    print(
        f"\n{split} split, {len(evaluation.captions)} images, decode={evaluation.strategy} "
        f"{json.dumps(evaluation.decode_params)}, checkpoint step {evaluation.checkpoint_step}"
    )
    print(format_table({"model": evaluation.metrics, "most common caption": evaluation.baseline}))
    summary = evaluation.exposure.summary()
    print(
        f"reference likelihood: NLL per reference token {summary['reference_likelihood/nll_tf']:.3f} after the "
        f"reference's prefix vs {summary['reference_likelihood/nll_free']:.3f} after the model's own greedy prefix; "
        f"accuracy {summary['reference_likelihood/acc_tf']:.3f} vs {summary['reference_likelihood/acc_free']:.3f}"
    )
    if "exposure_oracle/excess_error" in summary:
        print(
            f"exposure bias against the scene oracle: next-word error {summary['exposure_oracle/error_tf']:.3f} "
            f"after a reference's prefix vs {summary['exposure_oracle/error_free']:.3f} after the model's own true "
            f"prefix (excess {summary['exposure_oracle/excess_error']:+.3f}, ExAccErr "
            f"{summary.get('exposure_oracle/exaccerr', float('nan')):+.3f}); prefix swap: "
            f"{summary.get('exposure_oracle/swap_ref_correct', float('nan')):.3f} true from a reference's prefix vs "
            f"{summary.get('exposure_oracle/swap_own_correct', float('nan')):.3f} from its own"
        )
    print(f'(most common training caption: "{evaluation.baseline_caption}")\n')
    if "scene/correct" in evaluation.metrics:
        print(
            f"scene truth: {evaluation.metrics['scene/correct']:.3f} of the captions are fully true of their image "
            f"({evaluation.baseline.get('scene/correct', float('nan')):.3f} for the most common caption)\n"
        )


def sample_rows(records, captions: dict[int, list[tuple[str, float]]], count: int) -> list[list[str]]:
    """[image path, generated caption, references joined] for the first `count` decoded images."""
    return [
        [r.path, captions[r.image_id][0][0], " | ".join(r.captions)] for r in records[:count] if r.image_id in captions
    ]


def log_evaluation(evaluation: Evaluation, logger, step: int | None = None, sample_images: int = 16) -> None:
    """All `split/name` figures at `step` (default: the checkpoint's step) and a table of sample captions."""
    step = evaluation.checkpoint_step if step is None else step
    logger.log_metrics(evaluation.keyed(), step)
    if evaluation.scored:
        logger.log_table(
            f"{evaluation.split}/samples",
            ["image", "generated", "references"],
            sample_rows(evaluation.records, evaluation.captions, sample_images),
            step,
        )


def report_evaluation(evaluation: Evaluation, out_dir: str | Path, logger=None, step: int | None = None) -> None:
    """Write, print and (with a logger) log one evaluation: what every evaluating command does with it."""
    write_evaluation(evaluation, out_dir)
    print_evaluation(evaluation, out_dir)
    if logger is not None:
        log_evaluation(evaluation, logger, step)
