"""Turn a sweep of training runs into a comparison table (mean ± std over seeds) and two plots.

    python tools/compare_runs.py SWEEP_DIR [--out-dir DIR] [--metrics BLEU-4 METEOR CIDEr]
    python tools/compare_runs.py --wandb-project [ENTITY/]PROJECT --wandb-group GROUP --out-dir DIR

Local source: a Hydra multirun folder whose run folders (SWEEP_DIR/0/, SWEEP_DIR/1/, ..., or one
level deeper, SWEEP_DIR/*/0/) each hold .hydra/config.yaml, metrics.jsonl and, for a finished run,
test_metrics.json. W&B source: the runs of one group, read through wandb.Api() (config, summary,
history against the optimizer step `trainer/step` that captioning's W&B logger logs with every record,
or `step` in older runs; never W&B's `_step`, which counts log calls). Both sources are turned into the same
`RunRecord`s, and everything after that
(grouping, statistics, table, plots) is shared.

Runs are grouped into rows by `experiment_name` when the config has one, else by `schedule.name`.
Each row reports, per test metric, the mean and the sample standard deviation (ddof=1) over its
runs (seeds) that have test metrics; std is left blank for a single run. Values are the raw metric
values (as pycocoevalcap reports them, e.g. CIDEr 0.95, not 95.0), printed with 3 decimals; the
JSON keeps full precision. Runs without test metrics (crashed / unfinished) are listed by folder
and left out of the statistics.

Outputs (in --out-dir, default SWEEP_DIR): table.md, table.json (the table, and under "curves" the
plotted points), teacher_forcing_prob.png (train/teacher_forcing_prob against the optimizer step, mean
over seeds) and val_cider.png (val/CIDEr against the optimizer step, mean over seeds with a min-max
band). Curves are averaged step by step over the runs that logged that step.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioning.loggers.jsonl import read_jsonl
from captioning.loggers.wandb_logger import STEP_METRIC

DEFAULT_METRICS = ("BLEU-4", "METEOR", "CIDEr")
TF_PROB_KEY = "train/teacher_forcing_prob"
VAL_CIDER_KEY = "val/CIDEr"
CURVE_KEYS = (TF_PROB_KEY, VAL_CIDER_KEY)
# The optimizer step in W&B histories: STEP_METRIC ("trainer/step"); "step" in runs logged before it.
# Never W&B's `_step`, which counts log calls (several per optimizer step; deferred scores come last).
WANDB_STEP_KEYS = (STEP_METRIC, "step")


@dataclass
class RunRecord:
    """One training run, whatever it was read from."""

    run_id: str  # folder relative to the sweep dir, or "wandb:<id> (<name>)"
    row: str  # experiment_name, else schedule.name
    seed: int | None
    test_metrics: dict[str, float] | None  # {"test/BLEU-4": ...}; None when the run has none
    missing_reason: str | None = None  # why test_metrics is None
    history: list[dict[str, Any]] = field(default_factory=list)  # rows with "step" + metric keys


# ----------------------------------------------------------------------------- reading configs


def config_value(config: Mapping[str, Any], dotted: str) -> Any:
    """Look up `a.b` in a nested config, or as a flat "a.b" / "a/b" key (W&B may flatten)."""
    for flat in (dotted, dotted.replace(".", "/")):
        if flat in config:
            return config[flat]
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def row_and_seed(config: Mapping[str, Any], where: str) -> tuple[str, int | None]:
    """Row name (experiment_name, else schedule.name) and seed of a run config."""
    row = config_value(config, "experiment_name") or config_value(config, "schedule.name")
    if not row:
        raise ValueError(f"{where}: config has neither experiment_name nor schedule.name")
    seed = config_value(config, "seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"{where}: seed must be an integer (got {seed!r})")
    return str(row), seed


def _natural_key(path: Path) -> list[Any]:
    """Sort 2/ before 10/."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def find_run_dirs(sweep_dir: Path) -> list[Path]:
    """Run folders (holding .hydra/config.yaml) directly under sweep_dir or one level deeper."""
    found = []
    for child in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (child / ".hydra" / "config.yaml").is_file():
            found.append(child)
            continue
        for grandchild in child.iterdir():
            if (
                grandchild.is_dir()
                and not grandchild.name.startswith(".")
                and (grandchild / ".hydra" / "config.yaml").is_file()
            ):
                found.append(grandchild)
    return sorted(found, key=lambda p: _natural_key(p.relative_to(sweep_dir)))


def _resolve_keys(config: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """experiment_name / schedule.name / seed with ${...} interpolations resolved.

    Hydra saves .hydra/config.yaml unresolved, so an experiment_name like
    "ss_${schedule.name}_k${schedule.k}" must be resolved before it can name a row.
    """
    from omegaconf import OmegaConf  # comes with hydra-core

    cfg = OmegaConf.create(config)
    out: dict[str, Any] = {}
    for key in ("experiment_name", "schedule.name", "seed"):
        try:
            value = OmegaConf.select(cfg, key, default=None)
        except Exception as err:  # unresolvable interpolation, e.g. a ${hydra:...} resolver
            raise ValueError(f"{config_path}: cannot resolve {key} ({err})") from None
        out[key] = value
    return out


def load_local_run(run_dir: Path, sweep_dir: Path) -> RunRecord:
    """Read one Hydra run folder."""
    import yaml  # PyYAML comes with hydra-core

    run_id = run_dir.relative_to(sweep_dir).as_posix() + "/"
    config_path = run_dir / ".hydra" / "config.yaml"
    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a mapping at top level")
    row, seed = row_and_seed(_resolve_keys(config, config_path), str(config_path))

    metrics_path = run_dir / "metrics.jsonl"
    history = read_jsonl(metrics_path) if metrics_path.is_file() else []

    test_path = run_dir / "test_metrics.json"
    test_metrics, reason = None, None
    if test_path.is_file():
        with open(test_path, encoding="utf-8") as f:
            try:
                test_metrics = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{test_path}: not valid JSON ({err.msg})") from None
        if not isinstance(test_metrics, dict):
            raise ValueError(f"{test_path}: expected a JSON object of metrics")
    else:
        reason = "test_metrics.json missing"
    return RunRecord(run_id, row, seed, test_metrics, reason, history)


def load_local_runs(sweep_dir: str | Path) -> list[RunRecord]:
    """All runs of a local sweep folder (empty list when it has no run folders)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep_dir} does not exist or is not a folder")
    return [load_local_run(d, sweep_dir) for d in find_run_dirs(sweep_dir)]


def load_wandb_runs(project: str, group: str, api: Any = None, samples: int = 10_000) -> list[RunRecord]:
    """All runs of a W&B group. `project` is "PROJECT" or "ENTITY/PROJECT"; `api` defaults to
    wandb.Api() (pass another object with the same interface to test without a network)."""
    if api is None:
        import wandb

        api = wandb.Api()
    records = []
    for run in api.runs(project, filters={"group": group}):
        run_id = f"wandb:{run.id} ({run.name})"
        config = dict(run.config)
        row, seed = row_and_seed(config, run_id)
        summary = dict(run.summary.items())
        test_metrics = {k: v for k, v in summary.items() if k.startswith("test/")} or None
        reason = None if test_metrics else f"no test/* metrics in the run summary (state: {run.state})"
        history = []
        for key in CURVE_KEYS:
            history += wandb_curve(run, key, samples)
        records.append(RunRecord(run_id, row, seed, test_metrics, reason, history))
    return records


def wandb_curve(run: Any, key: str, samples: int) -> list[dict[str, Any]]:
    """[{"step": optimizer step, key: value}, ...] of one W&B run. One query per key, asking for the
    step metric with it: W&B returns only the rows holding all the keys asked for (plus `_step`)."""
    for step_key in WANDB_STEP_KEYS:
        rows = [
            {"step": entry[step_key], key: entry[key]}
            for entry in run.history(keys=[step_key, key], samples=samples, pandas=False)
            if entry.get(step_key) is not None and key in entry
        ]
        if rows:
            return rows
    return []


# ----------------------------------------------------------------------------- aggregation


def metric_key(name: str) -> tuple[str, str]:
    """("BLEU-4", "test/BLEU-4") from "BLEU-4" or "test/BLEU-4"."""
    short = name[len("test/") :] if name.startswith("test/") else name
    if not short or "/" in short:
        raise ValueError(f"--metrics takes test metric names like BLEU-4 or test/BLEU-4 (got {name!r})")
    return short, "test/" + short


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1); std is None for fewer than two values."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _as_float(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return float(value) if math.isfinite(value) else None


def aggregate_table(runs: Iterable[RunRecord], metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, Any]:
    """Group runs into rows and compute mean ± std per test metric (the content of table.json)."""
    runs = list(runs)
    names = [metric_key(m) for m in metrics]
    rows, missing, warnings = [], [], []
    for row in sorted({r.row for r in runs}):
        members = [r for r in runs if r.row == row]
        finished = [r for r in members if r.test_metrics is not None]
        missing += [
            {"run": r.run_id, "row": row, "seed": r.seed, "reason": r.missing_reason}
            for r in members
            if r.test_metrics is None
        ]
        seeds = [r.seed for r in members if r.seed is not None]
        duplicated = sorted({s for s in seeds if seeds.count(s) > 1})
        if duplicated:
            warnings.append(
                f"row {row!r} has several runs with seed(s) {duplicated} "
                f"({', '.join(r.run_id for r in members)}): runs with different settings are probably "
                f"being merged; give them distinct experiment_name values"
            )
        cells = {}
        for short, key in names:
            values = [v for r in finished if (v := _as_float(r.test_metrics.get(key), f"{r.run_id} {key}")) is not None]
            mean, std = mean_std(values)
            cells[short] = {"mean": mean, "std": std, "n": len(values), "values": values}
            if finished and len(values) < len(finished):
                warnings.append(
                    f"row {row!r}: {key} is missing in {len(finished) - len(values)} "
                    f"of its {len(finished)} finished runs"
                )
        rows.append(
            {
                "run": row,
                "n_seeds": len(finished),
                "seeds": [r.seed for r in finished],
                "run_ids": [r.run_id for r in finished],
                "metrics": cells,
            }
        )
    return {"metrics": [short for short, _ in names], "rows": rows, "missing": missing, "warnings": warnings}


def curves(runs: Iterable[RunRecord], key: str) -> dict[str, dict[str, list[float]]]:
    """Per row: steps and the mean / min / max over runs of `key` at each logged step.

    A run that logged a step twice (e.g. after a resume) counts with its last value.
    """
    per_row: dict[str, list[dict[int, float]]] = {}
    for run in runs:
        points = {}
        for entry in run.history:
            value, step = entry.get(key), entry.get("step")
            if (
                isinstance(step, bool)
                or not isinstance(step, (int, float))
                or isinstance(value, bool)
                or not isinstance(value, (int, float))
            ):
                continue
            if math.isfinite(value):
                points[int(step)] = float(value)
        if points:
            per_row.setdefault(run.row, []).append(points)
    out = {}
    for row in sorted(per_row):
        steps = sorted(set().union(*per_row[row]))
        at = [[p[s] for p in per_row[row] if s in p] for s in steps]
        out[row] = {
            "step": steps,
            "mean": [sum(v) / len(v) for v in at],
            "min": [min(v) for v in at],
            "max": [max(v) for v in at],
            "n": [len(v) for v in at],
        }
    return out


# ----------------------------------------------------------------------------- output


def _cell(cell: Mapping[str, Any], n_seeds: int) -> str:
    if cell["mean"] is None:
        return "—"
    text = f"{cell['mean']:.3f}"
    if cell["std"] is not None:
        text += f" ± {cell['std']:.3f}"
    if cell["n"] < n_seeds:
        text += f" (n={cell['n']})"
    return text


def format_markdown(table: Mapping[str, Any]) -> str:
    """table.md: one row per run name, metric cells as "mean ± std" over seeds."""
    header = ["run", "n seeds", *table["metrics"]]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(table["metrics"])]
    for row in table["rows"]:
        cells = [_cell(row["metrics"][m], row["n_seeds"]) for m in table["metrics"]]
        lines.append("| " + " | ".join([row["run"], str(row["n_seeds"]), *cells]) + " |")
    lines.append("")
    lines.append("Mean ± sample std (ddof=1) over seeds; raw metric values (not x100).")
    if table["missing"]:
        lines.append("")
        lines.append("Runs without test metrics (not counted):")
        lines += [f"- {m['run']} (row {m['row']}, seed {m['seed']}): {m['reason']}" for m in table["missing"]]
    if table["warnings"]:
        lines.append("")
        lines.append("Warnings:")
        lines += [f"- {w}" for w in table["warnings"]]
    return "\n".join(lines) + "\n"


def plot_curves(curve_data: Mapping[str, Mapping[str, list[float]]], key: str, path: Path, band: bool) -> None:
    """One line per row (mean over seeds); with `band`, a shaded min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, c in curve_data.items():
        (line,) = ax.plot(c["step"], c["mean"], label=f"{row} (n={max(c['n'])})")
        if band and max(c["n"]) > 1:
            ax.fill_between(c["step"], c["min"], c["max"], color=line.get_color(), alpha=0.2, linewidth=0)
    if curve_data:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no {key} values logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.set_title(f"{key}: mean over seeds" + (" (band: min-max)" if band else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(runs: list[RunRecord], out_dir: Path, metrics: Sequence[str], source: str) -> dict[str, Any]:
    """Write table.md, table.json (with the plotted curves, against the optimizer step) and the two
    plots; return the table."""
    table = aggregate_table(runs, metrics)
    table["source"] = source
    table["curves"] = {key: curves(runs, key) for key in CURVE_KEYS}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(format_markdown(table), encoding="utf-8")
    (out_dir / "table.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    plot_curves(table["curves"][TF_PROB_KEY], TF_PROB_KEY, out_dir / "teacher_forcing_prob.png", band=False)
    plot_curves(table["curves"][VAL_CIDER_KEY], VAL_CIDER_KEY, out_dir / "val_cider.png", band=True)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="Hydra multirun folder")
    parser.add_argument("--out-dir", type=Path, help="where to write (default: SWEEP_DIR)")
    parser.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS), help="test metric names (default: %(default)s)"
    )
    parser.add_argument("--wandb-group", help="read the runs of this W&B group instead of a folder")
    parser.add_argument("--wandb-project", help="W&B project, PROJECT or ENTITY/PROJECT")
    parser.add_argument(
        "--wandb-samples",
        type=int,
        default=10_000,
        help="history points per curve fetched from W&B (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    use_wandb = args.wandb_group is not None or args.wandb_project is not None
    if use_wandb and (args.wandb_group is None or args.wandb_project is None):
        parser.error("--wandb-group and --wandb-project go together")
    if use_wandb == (args.sweep_dir is not None):
        parser.error("give either SWEEP_DIR or --wandb-project/--wandb-group")
    if use_wandb and args.out_dir is None:
        parser.error("--out-dir is required with --wandb-group")

    try:
        for name in args.metrics:
            metric_key(name)
        if use_wandb:
            source = f"wandb:{args.wandb_project} group={args.wandb_group}"
            runs = load_wandb_runs(args.wandb_project, args.wandb_group, samples=args.wandb_samples)
        else:
            source = str(args.sweep_dir)
            runs = load_local_runs(args.sweep_dir)
        if not runs:
            where = (
                source
                if use_wandb
                else f"{args.sweep_dir} (looked for */.hydra/config.yaml and */*/.hydra/config.yaml)"
            )
            print(f"compare_runs: error: no runs found in {where}", file=sys.stderr)
            return 1
        out_dir = args.out_dir or args.sweep_dir
        table = write_outputs(runs, out_dir, args.metrics, source)
    except (ValueError, FileNotFoundError) as err:
        print(f"compare_runs: error: {err}", file=sys.stderr)
        return 1

    print(format_markdown(table), end="", flush=True)
    for m in table["missing"]:
        print(f"compare_runs: warning: {m['run']} has no test metrics ({m['reason']})", file=sys.stderr)
    print(f"\nwrote {out_dir}/table.md, table.json, teacher_forcing_prob.png, val_cider.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
