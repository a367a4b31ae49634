"""Score runs trained with `trainer.scoring=deferred` (e.g. on GPU nodes without Java).

    python tools/score_runs.py RUN_OR_SWEEP_DIR [...] [--data-root PATH]

For every run folder (one holding .hydra/config.yaml) with deferred results: scores each
val_results/step_*.json and appends its `val/*` metrics to metrics.jsonl at that step (tagged with the
teacher-forcing probability logged at that step), and scores results_test_*.json into test_metrics.json
and a `test/*` record, with the most-common-caption reference, exactly as a run with scoring=now does.
The data is read from the run's own config (synthetic data is regenerated identically here), or from
--data-root. Runs already scored are left alone.

A run that logged to W&B (logger=wandb: its folder holds wandb_run_id.txt) gets the same records in
that same W&B run, resumed by its saved id (`wandb.init(id=..., resume="allow")`), at the optimizer step
they belong to (`trainer/step`), so its test/* metrics reach the run summary and
`compare_runs --wandb-group` counts it. logger.wandb.mode of the run's config, WANDB_MODE and the API
key of the machine running this decide online or offline, as in training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from captioning.data.build import load_records
from captioning.evaluation.captions import references_of, score, score_with_baseline
from captioning.evaluation.evaluate import scene_truth
from captioning.loggers.base import MultiLogger
from captioning.loggers.jsonl import JsonlLogger, read_jsonl
from captioning.loggers.wandb_logger import WandbLogger, saved_run_info
from captioning.metrics import check_java, load_results
from captioning.scenes.generator import load_scene_truth


def run_folders(paths: list[Path]) -> list[Path]:
    found = []
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"no such folder: {path}")
        found += sorted({p.parent.parent for p in path.glob("**/.hydra/config.yaml")})
    return found


def run_logger(run: Path, cfg) -> MultiLogger:
    """metrics.jsonl, and the run's own W&B run (resumed by its saved id) when it logged to W&B."""
    loggers = [JsonlLogger(run / "metrics.jsonl")]
    wandb_cfg = OmegaConf.select(cfg, "logger.wandb", default=None)
    if wandb_cfg is not None:
        info = saved_run_info(run)
        if info is None:
            print(
                f"{run}: warning: logger=wandb but no wandb_run_id.txt (the run never started W&B?): "
                "scores go to metrics.jsonl only",
                file=sys.stderr,
            )
        else:
            setting = lambda key: OmegaConf.select(wandb_cfg, key, default=None)  # noqa: E731
            loggers.append(
                WandbLogger(
                    run,
                    info.get("project") or setting("project"),
                    info.get("entity", setting("entity")),
                    info.get("group", setting("group")),
                    info.get("name"),
                    info.get("tags"),
                    setting("mode"),
                    info.get("job_type") or "train",
                )
            )
    return MultiLogger(loggers)


def score_run(run: Path, data_root: str | None, records_cache: dict) -> str:
    if (run / "test_metrics.json").is_file():
        return "already scored"
    val_files = sorted((run / "val_results").glob("step_*.json"))
    test_files = sorted(run.glob("results_test_*.json"))
    if not val_files and not test_files:
        return "no deferred results (unfinished run?)"
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg_data = cfg.data
    if data_root:
        cfg_data.root = data_root
    key = json.dumps(OmegaConf.to_container(cfg_data, resolve=True), sort_keys=True)
    if key not in records_cache:
        records_cache[key] = load_records(cfg_data)
    records = records_cache[key]
    history = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    prob_at = {r["step"]: r["train/teacher_forcing_prob"] for r in history if "train/teacher_forcing_prob" in r}
    logger = run_logger(run, cfg)
    for path in val_files:
        step = int(path.stem.split("_")[1])
        predictions = load_results(path)
        metrics = {f"val/{k}": v for k, v in score(references_of(records["val"], predictions), predictions).items()}
        logger.log_metrics({"train/teacher_forcing_prob": prob_at.get(step, float("nan")), **metrics}, step)
    for path in test_files:
        predictions = load_results(path)
        references = references_of(records["test"], predictions)
        model_metrics, baseline_metrics, baseline = score_with_baseline(references, predictions, records["train"])
        scenes = load_scene_truth(cfg_data)  # synthetic data: the scene truth of both
        if scenes is not None:
            model_metrics.update(scene_truth(predictions, scenes))
            baseline_metrics.update(scene_truth({i: baseline for i in predictions}, scenes))
        metrics = {f"test/{k}": v for k, v in model_metrics.items()}
        metrics.update({f"test/most_common_caption/{k}": v for k, v in baseline_metrics.items()})
        step = max(prob_at) if prob_at else 0
        logger.log_metrics({"train/teacher_forcing_prob": prob_at.get(step, float("nan")), **metrics}, step)
        (run / "test_metrics.json").write_text(
            json.dumps(
                {**metrics, "results": str(path), "images": len(predictions), "most_common_caption": baseline}, indent=2
            )
        )
    logger.finish()
    return f"scored {len(val_files)} validation(s), {len(test_files)} test file(s)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or sweep folders")
    parser.add_argument("--data-root", default=None, help="data folder to use instead of the run's data.root")
    args = parser.parse_args(argv)
    try:
        check_java()
        runs = run_folders(args.paths)
        if not runs:
            raise FileNotFoundError(f"no run folders (with .hydra/config.yaml) under {[str(p) for p in args.paths]}")
        cache: dict = {}
        for run in runs:
            print(f"{run}: {score_run(run, args.data_root, cache)}")
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"score_runs: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
