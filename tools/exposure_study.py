"""The exposure-bias study (issue 24): which targets and schedules reduce exposure bias, and what they cost in truth.

    python tools/exposure_study.py tune  --data synthetic_long --input true_labels   # once: the learning rates
    python tools/exposure_study.py table --data synthetic_long --input true_labels   # the table (resumes)
    python tools/exposure_study.py table ... --table-only                            # re-read the finished runs

Protocol (fixed before any run; printed into every table):

- Rows (ROWS): baseline (teacher forcing); SS as the paper (inverse sigmoid to about 0.01); SS capped (the teacher-
  forcing probability floored at 0.75 after a teacher-forced warm-up); parallel SS (two passes); SS with
  optimal-completion targets; SS with oracle targets (untrue prefixes repaired, or masked); on-policy OCD (always
  sampling with optimal-completion targets after the warm-up); self-critical (from the same seed's baseline best).
- Tuning: every row gets the same budget, a learning-rate grid (--lrs; --scst-lrs for self-critical) trained once
  with the tuning seed (TUNE_SEED, not a table seed) and chosen on val by the checkpoint-selection rule below. The
  choices are stored in tools/results/exposure_study_lr_<name>.json and read by `table`, never redone per table.
  `table --untuned` uses the config's learning rates instead and says so.
- Checkpoint selection: the best validation checkpoint by val/scene/correct (trainer.monitor on synthetic data),
  validated --validations times per run; the test split is decoded once, with that checkpoint, by beam search.
- Seeds: 0..4 per row; a row whose interval against the baseline, or in a declared contrast (CONTRASTS), on a primary
  metric lies within its own width of 0 (|diff| <= high - low) gets seeds 5..9 too (--max-seeds), and so does the
  baseline; --seed-rows limits the extra seeds to the rows it names (the record's seed_rows).
- Primary metrics (declared): test scene/correct and AccErr (the oracle's accumulated excess error, Arora et al.
  2022, at the last position). Secondary: the oracle excess error, its slope per position, ExAccErr, the prefix
  swap gap, CIDEr.
- Statistics: per row and metric the difference from the baseline paired by seed, with a two-sided t interval
  (95%) and p-value over the seeds both have; Holm's correction over rows x primary metrics (one family) and over
  rows x secondary metrics (another). Per row also its own mean with a one-sample t interval (is there exposure
  bias at all: excess error and AccErr against 0).
- Plots: per row, the teacher-forced and free-running oracle error per position and the prefix swap per k (the
  mean over seeds of each run's test_exposure_oracle.json), OUT_DIR/exposure_study_<name>/<row>.png.

Runs: SWEEP_DIR/<row>/seed_<s>/ (tuning: SWEEP_DIR/tune/<row>/lr_<lr>/), each a `python -m captioning.train`
process; a run with test_metrics.json (tuning: a validation at its last step) is finished and reused. The
statistics are those of tools/schedule_table.py (t distribution, mean and standard deviation), imported from it.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import schedule_table as st

REPO = st.REPO
BASELINE = "baseline"
SELF_CRITICAL = "self_critical"
SS = ["experiment=scheduled_sampling"]
# row -> Hydra overrides ({warmup}: --warmup-fraction x steps). The schedule.targets / oracle_untrue /
# min_teacher_forcing_prob / mode options are the training-target work of issue 24 (items 2-3).
ROWS: dict[str, list[str]] = {
    BASELINE: ["experiment=baseline"],
    "ss_paper": SS,
    "ss_capped": SS + ["schedule.min_teacher_forcing_prob=0.75", "schedule.warmup_steps={warmup}"],
    "ss_parallel": SS + ["schedule.mode=parallel"],
    "ss_optimal_completion": SS + ["schedule.targets=optimal_completion"],
    "ss_oracle_repair": SS + ["schedule.targets=oracle", "schedule.oracle_untrue=repair"],
    "ss_oracle_mask": SS + ["schedule.targets=oracle", "schedule.oracle_untrue=mask"],
    "ocd": ["experiment=always_sampling", "schedule.targets=optimal_completion", "schedule.warmup_steps={warmup}"],
    SELF_CRITICAL: [],  # continues the same seed's baseline best (schedule_table.scst_command)
}
INPUTS = {"encoder": [], "true_labels": ["model.encoder.pretrain.feed=true_labels"]}
# (column, key in test_metrics.json or a derived key, higher is better, primary)
METRICS = (
    ("scene/correct", "test/scene/correct", True, True),
    ("AccErr", "test/exposure_oracle/accerr", False, True),
    ("excess error", "test/exposure_oracle/excess_error", False, False),
    ("excess slope", "excess_slope", False, False),
    ("ExAccErr", "test/exposure_oracle/exaccerr", False, False),
    ("swap gap", "test/exposure_oracle/swap_gap", False, False),
    ("CIDEr", "test/CIDEr", True, False),
)
# Contrasts declared beside the comparison with the baseline: the paper's schedule with each other target, against
# the paper's own targets (the same schedule, so a difference is the targets'), paired by seed; primary metrics only,
# Holm over contrasts x primary metrics (a family of its own).
CONTRASTS = (
    ("ss_optimal_completion", "ss_paper"),
    ("ss_oracle_repair", "ss_paper"),
    ("ss_oracle_mask", "ss_paper"),
)
TUNE_SEED = 100
# The COCO metrics every run computes: the table reads CIDEr only, and METEOR would cost each run the start of its
# Java process and a share of the cores while it runs (captioning/metrics/coco.py). Before the user's overrides.
RUN_METRICS = "trainer.metrics=[BLEU,ROUGE-L,CIDEr]"
LEVEL = 0.95


# -- statistics ---------------------------------------------------------------------------------------------------
def t_interval(values: Sequence[float], level: float = LEVEL) -> dict | None:
    """Mean of `values` with a two-sided t interval and the p-value of mean = 0; None for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean, sd = st.mean_std(values)
    if sd == 0.0:
        return {"n": n, "mean": mean, "low": mean, "high": mean, "p": 0.0 if mean != 0.0 else 1.0}
    se = sd / math.sqrt(n)
    half = st.t_quantile(0.5 + level / 2.0, n - 1) * se
    p = 2.0 * (1.0 - st.t_cdf(abs(mean) / se, n - 1))
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "p": min(1.0, max(0.0, p))}


def paired_difference(row: Mapping[int, float], baseline: Mapping[int, float], level: float = LEVEL) -> dict | None:
    """row - baseline over the seeds both have (paired by seed): t_interval of the differences, with the seeds."""
    seeds = sorted(set(row) & set(baseline))
    out = t_interval([row[s] - baseline[s] for s in seeds], level)
    return None if out is None else {**out, "seeds": seeds}


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (monotone, capped at 1) of one family of tests."""
    order = sorted(pvalues, key=lambda key: pvalues[key])
    adjusted, running = {}, 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[key]))
        adjusted[key] = running
    return adjusted


def excess_slope(per_position: Mapping[str, Sequence]) -> float:
    """Least-squares slope of excess(t) on t, each position weighted by its free-running count (the positions
    where excess is defined): > 0 when the model's own prefixes err more, relative to the references', later on."""
    points = [
        (t, e, n)
        for t, e, n in zip(per_position["position"], per_position["excess"], per_position["free_scored"])
        if e is not None and not math.isnan(e) and n
    ]
    weight = sum(n for _, _, n in points)
    if weight == 0:
        return math.nan
    mean_t = sum(t * n for t, _, n in points) / weight
    mean_e = sum(e * n for _, e, n in points) / weight
    spread = sum(n * (t - mean_t) ** 2 for t, _, n in points)
    return math.nan if spread == 0 else sum(n * (t - mean_t) * (e - mean_e) for t, e, n in points) / spread


def needs_more_seeds(cell: dict | None) -> bool:
    """The rule for 10 seeds: the interval lies within its own width of 0."""
    return cell is not None and abs(cell["mean"]) <= cell["high"] - cell["low"]


# -- runs -----------------------------------------------------------------------------------------------------------
def row_overrides(row: str, steps: int, warmup_fraction: float) -> list[str]:
    warmup = round(warmup_fraction * steps)
    return [o.format(warmup=warmup) for o in ROWS[row]] + [f"experiment_name={row}"]


def common_overrides(args) -> list[str]:
    return [
        f"data={args.data}",
        *INPUTS[args.input],
        f"trainer.max_steps={args.steps}",
        f"trainer.val_every_n_steps={max(1, args.steps // args.validations)}",
        RUN_METRICS,
        *args.overrides,
    ]


def train_job(row: str, seed: int, out: Path, lr: float | None, args, source: Path | None = None) -> list[str]:
    """The command of one run: `row` with `seed` into `out`; self-critical continues `source` (a best.pt)."""
    k = st.inverse_sigmoid_k(args.steps, 0.5)
    lr_override = [] if lr is None else [f"optim.optimizer.lr={lr}"]
    if row == SELF_CRITICAL:
        command = st.scst_command(
            row,
            seed,
            out.parent.parent,
            args.scst_steps,
            lr or args.scst_default_lr,
            args.threads,
            [f"data={args.data}", *INPUTS[args.input], RUN_METRICS, *args.overrides],
        )
        command = [c for c in command if not c.startswith(("objective.init_from=", "hydra.run.dir="))]
        return command + [f"objective.init_from={source}", f"hydra.run.dir={out}"]
    return st.train_command(
        row,
        seed,
        out,
        k,
        args.threads,
        [*row_overrides(row, args.steps, args.warmup_fraction), *common_overrides(args), *lr_override],
    )


def best_validation(out: Path, monitor: str = "val/scene/correct") -> tuple[float, int] | None:
    """(best monitor value, its step) over the run's validations; None if it has none."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    scored = [(r[monitor], r["step"]) for r in records if isinstance(r.get(monitor), (int, float))]
    return max(scored, key=lambda pair: (pair[0], -pair[1])) if scored else None


def choose_lr(grid: Mapping[str, dict | None]) -> float | None:
    """The learning rate whose run reached the highest best val/scene/correct (ties: the smaller rate)."""
    scored = {float(lr): cell["val/scene/correct"] for lr, cell in grid.items() if cell}
    return max(scored, key=lambda lr: (scored[lr], -lr)) if scored else None


def tuning_finished(out: Path, steps: int) -> bool:
    path = out / "metrics.jsonl"
    return path.is_file() and any(
        json.loads(line).get("step") == steps and "val/scene/correct" in line
        for line in path.read_text().splitlines()
        if line.strip()
    )


RUN_RECORD = "study_run.json"  # per run: its command, exit code and wall time, written when it ends


def run_jobs(jobs: list[tuple[str, int, Path, list[str]]], args) -> list[dict]:
    done = st.run_all(jobs, args.jobs, args.threads) if jobs else []
    commands = {str(out): command for _, _, out, command in jobs}
    here = machine()
    for record in done:
        (Path(record["dir"]) / RUN_RECORD).write_text(
            json.dumps(
                {
                    **record,
                    "command": commands[record["dir"]],
                    "jobs": args.jobs,
                    "threads": args.threads,
                    "machine": here,
                }
            )
        )
    return done


NOT_RECORDED = "not recorded (runs before the study wrote each run's machine)"


def run_machines(sweep: Path, rows: Sequence[str], seeds: Sequence[int]) -> dict[str, int]:
    """How many of the table's finished runs ran on each machine (CPU, cores, vector instructions), as their
    RUN_RECORDs give it. A table resumed on another machine mixes them: each run is still a valid seed, but a rerun
    on one machine gives other figures for the runs made on the other (their float results differ)."""
    return dict(collections.Counter(run.get("machine", NOT_RECORDED) for run in run_records(sweep, rows, seeds)))


def training_seconds(sweep: Path, rows: Sequence[str], seeds: Sequence[int]) -> float:
    """The summed wall time of the table's finished runs (as their RUN_RECORDs give it)."""
    return sum(run["seconds"] for run in run_records(sweep, rows, seeds))


def run_records(sweep: Path, rows: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """The RUN_RECORDs of the table's finished runs (rows x seeds; a run without one has not finished)."""
    paths = [st.run_dir(sweep, row, seed) / RUN_RECORD for row in rows for seed in seeds]
    return [json.loads(path.read_text()) for path in paths if path.is_file()]


def learning_rates(row: str, args) -> list[float]:
    """The tuning grid of a row: self-critical's own (it continues a trained baseline), the others' shared one."""
    return args.scst_lrs if row == SELF_CRITICAL else args.lrs


def tune_run_dir(sweep: Path, row: str, lr: float) -> Path:
    """The folder of `row`'s tuning run at learning rate `lr`."""
    return sweep / "tune" / row / f"lr_{lr:g}"


def row_steps(row: str, args) -> int:
    """A row's training steps: self-critical's own (it continues a trained baseline), the others' shared ones."""
    return args.scst_steps if row == SELF_CRITICAL else args.steps


def tune(args, sweep: Path, lr_file: Path, earlier: dict | None, where: Mapping) -> dict:
    """Train every row at every learning rate of its grid with TUNE_SEED; keep the best on val per row.
    `earlier`: the tuning record already in lr_file (its other rows stay); `where`: this command's provenance."""
    choices = earlier or {"rows": {}}
    # a row already chosen whose grid runs are all finished would only be read again: its runs are reused as they
    # are, whatever code trained them, so tuning it "again" would change nothing but the record's history
    done = [
        row
        for row in args.rows
        if row in choices["rows"]
        and all(tuning_finished(tune_run_dir(sweep, row, lr), row_steps(row, args)) for lr in learning_rates(row, args))
    ]
    if done:
        raise SystemExit(
            f"{', '.join(done)}: already tuned in {lr_file}, and every run of the grid is finished in "
            f"{sweep / 'tune'}; finished runs are reused, not trained again. To tune a row again (its code changed), "
            f"delete its folder {sweep / 'tune' / done[0]} (and its table runs, {sweep / done[0]}) first"
        )
    stage1 = [row for row in args.rows if row != SELF_CRITICAL]
    for stage in (stage1, [r for r in args.rows if r == SELF_CRITICAL]):
        jobs = []
        for row in stage:
            for lr in learning_rates(row, args):
                out = tune_run_dir(sweep, row, lr)
                source = None
                if row == SELF_CRITICAL:
                    if BASELINE not in choices["rows"]:
                        raise SystemExit(
                            "tuning self_critical continues the tuned baseline: tune baseline first "
                            "(--rows baseline self_critical)"
                        )
                    source = tune_run_dir(sweep, BASELINE, choices["rows"][BASELINE]["lr"]) / "checkpoints" / "best.pt"
                if not tuning_finished(out, row_steps(row, args)):
                    jobs.append(
                        (
                            row,
                            TUNE_SEED,
                            out,
                            train_job(row, TUNE_SEED, out, lr, args, source)
                            + ["trainer.evaluate_after_training=false"],
                        )
                    )
        run_jobs(jobs, args)
        for row in stage:
            grid = {}
            for lr in learning_rates(row, args):
                best = best_validation(tune_run_dir(sweep, row, lr))
                grid[f"{lr:g}"] = None if best is None else {"val/scene/correct": best[0], "step": best[1]}
            lr = choose_lr(grid)
            if lr is None:
                raise SystemExit(f"tuning {row}: no run of the grid validated; see {sweep / 'tune' / row}")
            choices["rows"][row] = {"lr": lr, "grid": grid}
    runs = [tune_run_dir(sweep, row, lr) / RUN_RECORD for row in args.rows for lr in learning_rates(row, args)]
    if "commit" in choices:  # rows tuned again or added to an earlier tuning: the earlier commands stay, with cost
        past = {key: choices[key] for key in (*where, "training_seconds", "tuned_rows") if key in choices}
        choices["history"] = [*choices.get("history", []), past]
    choices.update(
        {
            "data": args.data,
            "input": args.input,
            "steps": args.steps,
            "scst_steps": args.scst_steps,
            "validations": args.validations,
            "warmup_fraction": args.warmup_fraction,
            "overrides": args.overrides,
            "jobs": args.jobs,
            "threads": args.threads,
            # the summed wall time of this command's grid runs (each run's RUN_RECORD); earlier commands' in history
            "training_seconds": sum(json.loads(r.read_text())["seconds"] for r in runs if r.is_file()),
            "tuned_rows": list(args.rows),
            "tune_seed": TUNE_SEED,
            "rule": "highest best val/scene/correct (ties: the smaller lr)",
            **where,
        }
    )
    lr_file.parent.mkdir(parents=True, exist_ok=True)
    lr_file.write_text(json.dumps(choices, indent=2))
    return choices


def table_runs(args, sweep: Path, lrs: Mapping[str, float | None], seeds: Sequence[int], rows: Sequence[str]) -> None:
    """Train what is missing: the rows other than self-critical first, then self-critical from baseline's best."""
    for stage in ([r for r in rows if r != SELF_CRITICAL], [r for r in rows if r == SELF_CRITICAL]):
        jobs = []
        for row in stage:
            for seed in seeds:
                out = st.run_dir(sweep, row, seed)
                if st.finished(out):
                    continue
                source = st.run_dir(sweep, BASELINE, seed) / "checkpoints" / "best.pt" if row == SELF_CRITICAL else None
                jobs.append((row, seed, out, train_job(row, seed, out, lrs.get(row), args, source)))
        run_jobs(jobs, args)


# -- reading the runs -----------------------------------------------------------------------------------------------
def run_values(out: Path) -> dict[str, float] | None:
    """The METRICS of one finished run (NaN left out), or None if it has not finished."""
    if not st.finished(out):
        return None
    metrics = json.loads((out / "test_metrics.json").read_text())
    exposure = out / "test_exposure_oracle.json"
    if exposure.is_file():
        metrics["excess_slope"] = excess_slope(json.loads(exposure.read_text())["per_position"])
    values = {}
    for name, key, _, _ in METRICS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not math.isnan(value):
            values[name] = float(value)
    return values


def collect(sweep: Path, rows: Sequence[str], seeds: Sequence[int]) -> dict[str, dict[str, dict[int, float]]]:
    """{row: {metric: {seed: value}}} over the finished runs."""
    out = {row: {name: {} for name, *_ in METRICS} for row in rows}
    for row in rows:
        for seed in seeds:
            values = run_values(st.run_dir(sweep, row, seed))
            for name, value in (values or {}).items():
                out[row][name][seed] = value
    return out


def build_table(values: Mapping[str, Mapping[str, Mapping[int, float]]], level: float = LEVEL) -> dict:
    """Per row and metric: its own interval, and (not the baseline) the paired difference with Holm's p."""
    table = {
        row: {
            name: {
                "own": t_interval(list(cells[name].values()), level),
                "values": {str(s): v for s, v in sorted(cells[name].items())},
            }
            for name, *_ in METRICS
        }
        for row, cells in values.items()
    }
    for primary in (True, False):
        family = {}
        for row in values:
            if row == BASELINE or BASELINE not in values:
                continue
            for name, _, _, is_primary in METRICS:
                if is_primary != primary:
                    continue
                cell = paired_difference(values[row][name], values[BASELINE][name], level)
                table[row][name]["diff"] = cell
                if cell is not None:
                    family[f"{row}\t{name}"] = cell["p"]
        for key, adjusted in holm(family).items():
            row, name = key.split("\t")
            table[row][name]["diff"]["p_holm"] = adjusted
    return table


def build_contrasts(values: Mapping[str, Mapping[str, Mapping[int, float]]], level: float = LEVEL) -> dict:
    """The CONTRASTS whose two rows ran: {"row - other": {metric: paired difference with Holm's p}} (primary
    metrics; one Holm family over them all)."""
    contrasts: dict[str, dict] = {}
    family = {}
    for row, other in CONTRASTS:
        if row not in values or other not in values:
            continue
        key = f"{row} - {other}"
        contrasts[key] = {}
        for name, _, _, primary in METRICS:
            if primary:
                cell = paired_difference(values[row][name], values[other][name], level)
                contrasts[key][name] = cell
                if cell is not None:
                    family[f"{key}\t{name}"] = cell["p"]
    for key, adjusted in holm(family).items():
        contrast, name = key.split("\t")
        contrasts[contrast][name]["p_holm"] = adjusted
    return contrasts


def rows_needing_seeds(table: Mapping, rows: Sequence[str], contrasts: Mapping | None = None) -> list[str]:
    """The rows (not the baseline, which always gets them) whose primary-metric interval against the baseline, or
    in a declared contrast (both of its rows), lies within its own width of 0."""
    primary = [name for name, _, _, is_primary in METRICS if is_primary]
    near = {
        row for row in rows if row != BASELINE and any(needs_more_seeds(table[row][n].get("diff")) for n in primary)
    }
    for key, cells in (contrasts or {}).items():
        if any(needs_more_seeds(cells.get(n)) for n in primary):
            near.update(key.split(" - "))
    return [row for row in rows if row in near and row != BASELINE]


def mean_curves(sweep: Path, row: str, seeds: Sequence[int]) -> dict | None:
    """Per-position and swap curves averaged over the row's finished seeds (positions: those every run has)."""
    reports = [
        json.loads((st.run_dir(sweep, row, s) / "test_exposure_oracle.json").read_text())
        for s in seeds
        if (st.run_dir(sweep, row, s) / "test_exposure_oracle.json").is_file()
    ]
    if not reports:
        return None

    def average(part: str, keys: Sequence[str]) -> dict[str, list[float]]:
        length = min(len(r[part][keys[0]]) for r in reports)
        out = {keys[0]: reports[0][part][keys[0]][:length]}
        for key in keys[1:]:
            columns = [[r[part][key][i] for r in reports if r[part][key][i] is not None] for i in range(length)]
            out[key] = [sum(c) / len(c) if c else math.nan for c in columns]
        return out

    return {
        "per_position": average("per_position", ("position", "tf", "free", "excess")),
        "swap": average("swap", ("prefix_length", "own_correct", "ref_correct")),
        "runs": len(reports),
    }


def plot_row(curves: Mapping, row: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, s = curves["per_position"], curves["swap"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(p["position"], p["tf"], label="teacher-forced (reference prefix)")
    left.plot(p["position"], p["free"], label="free-running (own true prefix)")
    left.set(xlabel="position t", ylabel="oracle next-word error", title=f"{row}: error per position")
    left.legend(fontsize=8)
    right.plot(s["prefix_length"], s["ref_correct"], label="from a reference's prefix")
    right.plot(s["prefix_length"], s["own_correct"], label="from its own prefix")
    right.set(xlabel="prefix length k", ylabel="caption true", title=f"{row}: prefix swap ({curves['runs']} seeds)")
    right.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


# -- records --------------------------------------------------------------------------------------------------------
def cpu_isa() -> str:
    """The vector instructions torch's CPU kernels use here and whether the CPU computes bf16 natively: machines of
    one name differ in both, and so do their float results."""
    import torch

    from captioning.scenes.pretraining import resolve_precision

    native = resolve_precision("auto", torch.device("cpu")) == "bf16"
    return f"{torch.backends.cpu.get_cpu_capability()}, {'native bf16' if native else 'no native bf16'}"


def machine() -> str:
    """This machine as the records name it: CPU model, cores, vector instructions and bf16."""
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {cpu_isa()}"


def provenance() -> dict:
    def git(*arguments: str) -> str:
        try:
            return subprocess.run(
                ["git", *arguments], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "commit": git("rev-parse", "HEAD"),
        # uncommitted changes outside tools/results/ (the study's own records are written there as it goes)
        "dirty": bool(git("status", "--porcelain", "--", ".", ":(exclude)tools/results")),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _number(value: float | None, signed: bool = False) -> str:
    """Three decimals; values under 0.001 (an excess error near 0, a slope per position) in two significant digits."""
    if value is None or math.isnan(value):
        return "-"
    spec = ".1e" if 0 < abs(value) < 0.001 else ".3f"
    return format(value, ("+" if signed else "") + spec)


def _own(cell: Mapping) -> str:
    """mean [interval]; a single seed's value alone; '-' for none."""
    c = cell["own"]
    if c is None:
        values = list(cell["values"].values())
        return _number(values[0]) if values else "-"
    return f"{_number(c['mean'])} [{_number(c['low'])}, {_number(c['high'])}]"


def _difference(d: Mapping | None) -> str:
    """difference [interval] (Holm p); **bold** where the Holm-adjusted p is below 0.05."""
    if d is None:
        return "-"
    p = d.get("p_holm", d["p"])
    text = f"{_number(d['mean'], True)} [{_number(d['low'], True)}, {_number(d['high'], True)}] (p {p:.2g})"
    return f"**{text}**" if p < 0.05 else text


def table_rows(table: Mapping, lrs: Mapping, metrics: Sequence[str]) -> list[str]:
    """The study's table in Markdown (this record's .md and docs/results.md): per row its mean over seeds [95% t]
    and, under it, the difference from the baseline paired by seed [95% t] (Holm p)."""
    lines = ["| row | lr | seeds | " + " | ".join(metrics) + " |", "| --- | ---: | ---: |" + " ---: |" * len(metrics)]
    for row, cells in table.items():
        n = max((len(cells[name]["values"]) for name in metrics), default=0)
        lines.append(
            f"| {row} | {lrs.get(row) or 'config'} | {n} | " + " | ".join(_own(cells[name]) for name in metrics) + " |"
        )
        diffs = [cells[name].get("diff") for name in metrics]
        if any(d is not None for d in diffs):
            lines.append("| vs baseline | | | " + " | ".join(_difference(d) for d in diffs) + " |")
    return lines


def contrast_rows(contrasts: Mapping) -> list[str]:
    """The declared contrasts in Markdown: per pair the difference paired by seed [95% t] (Holm p)."""
    metrics = [name for name, _, _, primary in METRICS if primary]
    lines = ["| contrast (same schedule) | " + " | ".join(metrics) + " |", "| --- |" + " ---: |" * len(metrics)]
    for key, cells in contrasts.items():
        lines.append(f"| {key} | " + " | ".join(_difference(cells.get(name)) for name in metrics) + " |")
    return lines


def overview_rows(studies: Mapping[str, Mapping], metric: str) -> list[str]:
    """One metric across several study records (a column per record, e.g. per data set): the baseline's mean
    [95% t] and every other row's difference from it paired by seed [95% t] (Holm p, as in each record), then the
    declared contrasts; a row a record lacks is '-'. Seeds differing from the record's most are written after it."""
    rows = list(dict.fromkeys(row for study in studies.values() for row in study["table"]))
    contrasts = list(dict.fromkeys(key for study in studies.values() for key in study.get("contrasts") or {}))
    most = {
        label: max(len(c[metric]["values"]) for c in s["table"].values() if metric in c) for label, s in studies.items()
    }
    lines = [f"| {metric} | " + " | ".join(studies) + " |", "| --- |" + " ---: |" * len(studies)]

    def shown(label: str, row: str) -> str:
        cells = studies[label]["table"].get(row)
        if cells is None or metric not in cells:
            return "-"
        text = _own(cells[metric]) if row == "baseline" else _difference(cells[metric].get("diff"))
        seeds = len(cells[metric]["values"])
        return text if seeds == most[label] else f"{text}, {seeds} seeds"

    for row in rows:
        name = row if row == "baseline" else f"{row} - baseline"
        lines.append(f"| {name} | " + " | ".join(shown(label, row) for label in studies) + " |")
    for key in contrasts:
        cells = [_difference((study.get("contrasts") or {}).get(key, {}).get(metric)) for study in studies.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def _provenance(entry: Mapping) -> str:
    """`command`; commit (dirty); date; wall clock: of a record or of one of its `history` entries."""
    commit = entry["commit"] + (" (dirty)" if entry.get("dirty") else "")
    return f"`{entry['command']}`; commit {commit}; {entry['date']}; wall clock {entry['seconds']:.0f} s"


def mixed_machines(machines: Mapping[str, int]) -> bool:
    """Whether run_machines names more than one recorded machine."""
    return len(set(machines) - {NOT_RECORDED}) > 1


def machine_lines(machines: Mapping[str, int]) -> list[str]:
    """The table's line on where its runs ran (run_machines), when that is not simply the record's machine."""
    recorded = [name for name in machines if name != NOT_RECORDED]
    if mixed_machines(machines):
        runs = "; ".join(f"{count} on {name}" for name, count in machines.items())
        return [
            "**The runs ran on more than one machine**, so a rerun on one of them gives other figures for the "
            f"others' runs: {runs}.",
            "",
        ]
    if NOT_RECORDED in machines:
        others = f"; the other {machines[recorded[0]]} ran on {recorded[0]}" if recorded else ""
        return [f"{machines[NOT_RECORDED]} of the runs predate the study's record of each run's machine{others}.", ""]
    return []


def format_markdown(table: Mapping, record: Mapping) -> str:
    lines = [
        f"# Exposure-bias study {record['name']}: {record['data']} ({record['input']} input)",
        "",
        f"Overrides of every run: `{' '.join(record['overrides']) or 'none'}`.",
        "",
        (
            f"Command: {_provenance(record)}; machine: {record['machine']}; "
            f"the runs' own times add up to {record['training_seconds']:.0f} s "
            f"({record['steps']} steps each, --jobs {record['jobs']} x --threads {record['threads']})."
        ),
        "",
    ]
    for past in record.get("history", []):
        lines += [f"Earlier, the same study's runs so far: {_provenance(past)}.", ""]
    lines += machine_lines(record.get("run_machines", {}))
    lines += [
        "Protocol: " + " ".join(record["protocol"]),
        "",
        "Per row: the mean over seeds [95% t interval]; below it, the difference from the baseline paired by "
        "seed [95% t interval] (Holm-adjusted p; **bold** below 0.05). Primary metrics: "
        + ", ".join(name for name, _, _, primary in METRICS if primary)
        + ".",
        "",
    ]
    lines += table_rows(table, record["lrs"], [name for name, *_ in METRICS])
    if record.get("contrasts"):
        lines += [
            "",
            "The targets under the paper's schedule: each row minus ss_paper, paired by seed [95% t interval] "
            "(Holm over these contrasts x primary metrics).",
            "",
            *contrast_rows(record["contrasts"]),
        ]
    lines += ["", "Per-position plots: " + (", ".join(f"`{p}`" for p in record.get("plots", [])) or "none"), ""]
    return "\n".join(lines)


PROTOCOL = (
    "Learning rate per row from the stored val-tuned grid (or the config's, when untuned, as said in the lr column).",
    "Checkpoint: the best val/scene/correct of the run's validations; test decoded once with it (beam search).",
    (
        "Seeds: --seeds per row, paired across rows; up to --max-seeds for rows whose primary-metric interval "
        "(against the baseline, or in a declared contrast) lies within its own width of 0 (--seed-rows: only those "
        "named, as the record's seed_rows says), and for the baseline."
    ),
    "Holm's correction over rows x primary metrics, and separately over rows x secondary metrics.",
    (
        "Contrasts of targets under the paper's schedule (ss_optimal_completion, ss_oracle_repair, ss_oracle_mask, "
        "each minus ss_paper), paired by seed, primary metrics, Holm over them as a third family."
    ),
    "Primary metrics declared before the runs: scene/correct and AccErr.",
)


def other_settings(tuning: Mapping, args) -> list[str]:
    """The settings given that differ from those the tuning record was made with ('--steps 1000 (tuned with
    300)', ...)."""
    settings = {
        "--data": ("data", args.data),
        "--input": ("input", args.input),
        "--steps": ("steps", args.steps),
        "--scst-steps": ("scst_steps", args.scst_steps),
        "--validations": ("validations", args.validations),
        "--warmup-fraction": ("warmup_fraction", args.warmup_fraction),
        "overrides after --": ("overrides", args.overrides),
    }
    return [
        f"{flag} {given} (tuned with {tuning[key]})"
        for flag, (key, given) in settings.items()
        if key in tuning and tuning[key] != given
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Hydra overrides for every run go after --: ... -- model.decoder.hidden_dim=512",
    )
    parser.add_argument("command", choices=("tune", "table"))
    parser.add_argument(
        "--data", default="synthetic_long", help="a conf/data option: synthetic, synthetic_long, synthetic_hard"
    )
    parser.add_argument(
        "--input",
        default="encoder",
        choices=list(INPUTS),
        help="encoder: the pretrained scene encoder; true_labels: the scenes' true labels (control)",
    )
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per row")
    parser.add_argument("--max-seeds", type=int, default=10, help="seeds for rows whose interval is near 0")
    parser.add_argument(
        "--seed-rows",
        nargs="+",
        default=None,
        choices=list(ROWS),
        help="give the extra seeds up to --max-seeds only to these of the rows that need them (and the baseline)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=300,
        help="optimizer steps per run (300: the tuned baseline reaches val 1.000 on the long scenes)",
    )
    parser.add_argument("--validations", type=int, default=2)
    parser.add_argument("--warmup-fraction", type=float, default=0.25, help="teacher-forced warm-up (capped SS, OCD)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 6e-3, 1.2e-2], help="the tuning grid")
    parser.add_argument("--scst-lrs", type=float, nargs="+", default=[5e-5, 1e-4, 2e-4])
    parser.add_argument("--scst-steps", type=int, default=400)
    parser.add_argument("--scst-default-lr", type=float, default=1e-4, help="self-critical's lr when --untuned")
    parser.add_argument(
        "--untuned",
        action="store_true",
        help="table: the config's learning rates, no tuning file (nor the check of its settings)",
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sweep-dir", type=Path, default=None)
    parser.add_argument("--out-dir", type=Path, default=REPO / "tools" / "results")
    parser.add_argument(
        "--name",
        default=None,
        help="the study's name in its files (default: <data>_<input>); "
        "name a variant run with extra overrides after --",
    )
    parser.add_argument("--table-only", action="store_true", help="no training: the table of the finished runs")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)  # Hydra overrides for every run follow "--"
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]
    if args.command == "table" and BASELINE not in args.rows:
        parser.error("--rows must include baseline (every row is compared with it)")
    if not 1 <= args.validations <= args.steps or not 0 <= args.warmup_fraction < 1:
        parser.error("--validations must be in [1, --steps] and --warmup-fraction in [0, 1)")
    name = args.name or f"{args.data}_{args.input}"
    sweep = args.sweep_dir or REPO / "multirun" / "exposure_study" / name
    lr_file = args.out_dir / f"exposure_study_lr_{name}.json"
    started, where = time.perf_counter(), provenance()  # before this command writes anything
    tuning = json.loads(lr_file.read_text()) if lr_file.is_file() else None
    # the learning rates hold for the settings they were tuned with: a table with others would not be tuned, and
    # rows tuned with others would not be comparable with the rows already in the file
    untuned_table = args.command == "table" and args.untuned  # reads no tuning, so nothing to check against
    differ = other_settings(tuning, args) if tuning is not None and not untuned_table else []
    if differ:
        parser.error(
            f"{lr_file} was tuned with other settings: {'; '.join(differ)}. Use the tuning's settings, "
            "or tune these under another --name"
        )
    if args.command == "tune":
        choices = tune(args, sweep, lr_file, tuning, where)
        print(json.dumps({row: cell["lr"] for row, cell in choices["rows"].items()}, indent=2))
        return 0
    if args.untuned:
        lrs: dict[str, float | None] = {row: None for row in args.rows}
    elif tuning is not None:
        stored = tuning["rows"]
        missing = [row for row in args.rows if row not in stored]
        if missing:
            parser.error(
                f"{lr_file} has no tuned learning rate for {missing}: run `tune` with those rows first, "
                "or pass --untuned"
            )
        lrs = {row: stored[row]["lr"] for row in args.rows}
    else:
        parser.error(
            f"no tuned learning rates ({lr_file} is missing): run `tools/exposure_study.py tune` with the "
            "same --data and --input first, or pass --untuned"
        )
    seeds = list(range(args.seeds))
    if not args.table_only:
        table_runs(args, sweep, lrs, seeds, args.rows)
    values = collect(sweep, args.rows, range(args.max_seeds))
    table, contrasts = build_table(values), build_contrasts(values)
    more = rows_needing_seeds(table, args.rows, contrasts)
    if args.seed_rows is not None:  # the extra seeds for these rows only (time): said in the record
        more = [row for row in more if row in args.seed_rows]
    if more and not args.table_only and args.max_seeds > args.seeds:
        table_runs(args, sweep, lrs, list(range(args.seeds, args.max_seeds)), [BASELINE, *more])
        values = collect(sweep, args.rows, range(args.max_seeds))
        table, contrasts = build_table(values), build_contrasts(values)
    plots = []
    for row in args.rows:
        curves = mean_curves(sweep, row, range(args.max_seeds))
        if curves is not None:
            path = plot_row(curves, row, args.out_dir / f"exposure_study_{name}" / f"{row}.png").resolve()
            plots.append(str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path))
    machines = run_machines(sweep, args.rows, range(args.max_seeds))
    if mixed_machines(machines):
        print(f"warning: this table's runs ran on more than one machine: {machines}", file=sys.stderr)
    record_file = args.out_dir / f"exposure_study_{name}.json"
    earlier = json.loads(record_file.read_text()) if record_file.is_file() else {}
    history = earlier.get("history", [])
    if args.table_only and earlier:  # a table re-read from the same runs: their provenance stays
        where = {key: earlier[key] for key in (*where, "seconds") if key in earlier} | {"rebuilt_by": where}
    elif earlier:  # more runs for the same table (more seeds): the earlier commands' provenance and wall clock
        history = [*history, {key: earlier[key] for key in (*where, "seconds") if key in earlier}]
    record = {
        "name": name,
        "overrides": args.overrides,
        "data": args.data,
        "input": args.input,
        "steps": args.steps,
        "validations": args.validations,
        "jobs": args.jobs,
        "threads": args.threads,
        "seeds": seeds,
        "max_seeds": args.max_seeds,
        "seed_rows": args.seed_rows,
        "lrs": {r: lrs[r] for r in args.rows},
        "tuned": not args.untuned,
        "rows": {r: ROWS[r] for r in args.rows},
        "protocol": list(PROTOCOL),
        "seconds": time.perf_counter() - started,
        **where,
        "history": history,  # the commands that wrote this record before, oldest first (each ran more of its runs)
        "training_seconds": training_seconds(sweep, args.rows, range(args.max_seeds)),
        "run_machines": machines,
        "plots": plots,
        "table": table,
        "contrasts": contrasts,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record_file.write_text(json.dumps(record, indent=2, default=str))
    markdown = format_markdown(table, record)
    (args.out_dir / f"exposure_study_{name}.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
