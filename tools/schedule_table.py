"""The paper's table (Bengio et al. 2015, image captioning) on the synthetic scenes, in one command.

    python tools/schedule_table.py                                   # 6 rows x 5 seeds, default data, 2 jobs
    python tools/schedule_table.py --data synthetic_hard
    python tools/schedule_table.py --table-only                     # re-print from the finished runs

1. Prepares the inputs once (the pretrained scene encoder's cached features, captioning.scenes.pretraining), so
   the runs only read them.
2. Trains every (row, seed) of the six rows of the paper's table as its own `python -m captioning.train
   experiment=ROW seed=S ...` process, `--jobs` at a time with `--threads` torch threads each (2 x 1 on a 2-core
   laptop), `--steps` optimizer steps each (1,000, validated `--validations` = 2 times: half the main job's 2,000,
   so that the 30 runs fit in an hour on 2 cores), into SWEEP_DIR/ROW/seed_S/. A run with a test_metrics.json is
   finished and not run again: a killed table resumes where it stopped.
3. With `--rows ... self_critical scheduled_sampling+self_critical`, the self-critical rows (SCST_ROWS):
   `self_critical` continues the same seed's `baseline` run, and `scheduled_sampling+self_critical` its
   `scheduled_sampling` run, from their best checkpoints (objective.init_from: weights only), `--scst-steps` steps
   at `--scst-lr`.
4. The schedule scales with the run: `inverse_sigmoid_k` is solved from the run's number of steps T so that
   epsilon = k / (k + exp(i / k)) crosses 0.5 at i = k ln k = `--half-at` x T (0.5 by default; epsilon is then
   about 0.01 at the end for T = 1,000).
5. Reads every run's test metrics (the best checkpoint by trainer.monitor, val/scene/correct on synthetic data;
   beam search of 3: what the run's final test evaluated, the oracle exposure figures included) and writes the
   table: per row mean +- sample standard deviation over seeds, and per row its difference from the baseline with
   a 95% Welch t confidence interval over seeds (unequal variances; significant when the interval excludes 0; no
   correction for the several rows and metrics compared).

Outputs: OUT_DIR/schedule_table_<data>.json and .md (default OUT_DIR: tools/results). Extra Hydra overrides for
every run go after `--`: `python tools/schedule_table.py -- model.decoder.hidden_dim=512`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS = (
    "baseline",
    "baseline_dropout",
    "always_sampling",
    "scheduled_sampling",
    "uniform_scheduled_sampling",
    "scheduled_sampling_sequence",
)
# Self-critical rows (Rennie et al. 2017): SCST started from the best checkpoint of the same seed's run of a row above.
SCST_ROWS = {"self_critical": "baseline", "scheduled_sampling+self_critical": "scheduled_sampling"}
# (column, key in test_metrics.json, higher is better)
METRICS = (
    ("BLEU-4", "test/BLEU-4", True),
    ("METEOR", "test/METEOR", True),
    ("CIDEr", "test/CIDEr", True),
    ("scene/correct", "test/scene/correct", True),
    ("oracle excess error", "test/exposure_oracle/excess_error", False),
)
BASELINE = "baseline"


# -- statistics ---------------------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function with `df` (> 0, not necessarily whole) degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on t_cdf, to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1) (got {p})")
    if math.isinf(df):
        low, high = -40.0, 40.0
        cdf = lambda x: 0.5 * math.erfc(-x / math.sqrt(2.0))  # noqa: E731
    else:
        low, high, cdf = -1e6, 1e6, lambda x: t_cdf(x, df)  # noqa: E731
    for _ in range(200):
        mid = 0.5 * (low + high)
        if cdf(mid) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return 0.5 * (low + high)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single value)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def welch_interval(row: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> dict | None:
    """mean(row) - mean(baseline) with Welch's t interval (unequal variances, Welch-Satterthwaite degrees of
    freedom); None when either side has fewer than 2 values. Two constant samples give a zero-width interval."""
    if len(row) < 2 or len(baseline) < 2:
        return None
    (m1, s1), (m0, s0) = mean_std(row), mean_std(baseline)
    v1, v0 = s1 * s1 / len(row), s0 * s0 / len(baseline)
    diff, se = m1 - m0, math.sqrt(v1 + v0)
    if se == 0.0:
        return {"diff": diff, "low": diff, "high": diff, "df": math.inf, "significant": diff != 0.0}
    df = (v1 + v0) ** 2 / (v1 * v1 / (len(row) - 1) + v0 * v0 / (len(baseline) - 1))
    half = t_quantile(0.5 + level / 2.0, df) * se
    return {
        "diff": diff,
        "low": diff - half,
        "high": diff + half,
        "df": df,
        "significant": diff - half > 0.0 or diff + half < 0.0,
    }


# -- the schedule length --------------------------------------------------------------------------------------------
def inverse_sigmoid_k(total_steps: int, half_at: float = 0.5) -> float:
    """k with k ln k = half_at * total_steps (epsilon = 0.5 there), k >= 1; Newton on f(k) = k ln k - c."""
    target = half_at * total_steps
    if target <= 0:
        raise ValueError(f"half_at * total_steps must be > 0 (got {target})")
    k = max(2.0, target / max(1.0, math.log(max(target, 2.0))))
    for _ in range(100):
        step = (k * math.log(k) - target) / (math.log(k) + 1.0)
        k = max(1.0, k - step)
        if abs(step) < 1e-9:
            break
    return k


def epsilon(step: float, k: float) -> float:
    return k / (k + math.exp(step / k))


# -- runs -----------------------------------------------------------------------------------------------------------
def compose(overrides: Sequence[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from captioning.config import config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def run_dir(sweep: Path, row: str, seed: int) -> Path:
    return sweep / row / f"seed_{seed}"


def train_command(row: str, seed: int, out: Path, k: float, threads: int, overrides: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "captioning.train",
        f"experiment={row}",
        f"seed={seed}",
        f"inverse_sigmoid_k={k:.3f}",
        f"trainer.num_threads={threads}",
        "data.num_workers=0",
        "trainer.progress_bar=false",
        f"hydra.run.dir={out}",
        *overrides,
    ]


def scst_command(
    row: str, seed: int, sweep: Path, scst_steps: int, lr: float, threads: int, overrides: Sequence[str]
) -> list[str]:
    """Self-critical training from the best checkpoint of the same seed's `SCST_ROWS[row]` run (its weights only:
    a fresh optimizer and learning-rate schedule), `scst_steps` steps, validated 4 times."""
    source = run_dir(sweep, SCST_ROWS[row], seed) / "checkpoints" / "best.pt"
    out = run_dir(sweep, row, seed)
    return [
        sys.executable,
        "-m",
        "captioning.train",
        "experiment=baseline",
        f"experiment_name={row}",
        f"seed={seed}",
        "objective=self_critical",
        f"objective.init_from={source}",
        f"trainer.max_steps={scst_steps}",
        f"trainer.val_every_n_steps={max(1, scst_steps // 4)}",
        f"optim.optimizer.lr={lr}",
        f"trainer.num_threads={threads}",
        "data.num_workers=0",
        "trainer.progress_bar=false",
        f"hydra.run.dir={out}",
        *overrides,
    ]


def finished(out: Path) -> bool:
    return (out / "test_metrics.json").is_file()


def run_all(jobs: list[tuple[str, int, Path, list[str]]], parallel: int, threads: int) -> list[dict]:
    """Run the commands `parallel` at a time; each writes OUT/train.log. Returns one record per job."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    pending, running, done = list(jobs), [], []
    while pending or running:
        while pending and len(running) < parallel:
            row, seed, out, command = pending.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "train.log", "w")
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((row, seed, out, process, log, time.perf_counter()))
            print(f"started {row} seed {seed} ({len(done) + len(running)}/{len(jobs)})", flush=True)
        time.sleep(1.0)
        for item in list(running):
            row, seed, out, process, log, started = item
            if process.poll() is None:
                continue
            log.close()
            running.remove(item)
            seconds = time.perf_counter() - started
            done.append(
                {
                    "row": row,
                    "seed": seed,
                    "dir": str(out),
                    "returncode": process.returncode,
                    "seconds": round(seconds, 1),
                }
            )
            state = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode}, see {out}/train.log)"
            print(f"{state}: {row} seed {seed} in {seconds:.0f} s", flush=True)
    return done


def collect(sweep: Path, rows: Sequence[str], seeds: Sequence[int]) -> dict:
    """{row: {column: [value per finished seed]}} and the runs left out."""
    values, missing = {row: {name: [] for name, _, _ in METRICS} for row in rows}, []
    for row in rows:
        for seed in seeds:
            out = run_dir(sweep, row, seed)
            if not finished(out):
                missing.append(str(out))
                continue
            metrics = json.loads((out / "test_metrics.json").read_text())
            for name, key, _ in METRICS:
                value = metrics.get(key)
                if isinstance(value, (int, float)) and not math.isnan(value):
                    values[row][name].append(float(value))
    return {"values": values, "missing": missing}


# -- the table ------------------------------------------------------------------------------------------------------
def build_table(values: Mapping[str, Mapping[str, Sequence[float]]], level: float = 0.95) -> dict:
    """Per row and column: n, mean, std, values and (rows other than the baseline) the Welch interval of the
    difference from the baseline."""
    table = {}
    for row, columns in values.items():
        table[row] = {}
        for name, _, higher in METRICS:
            sample = list(columns.get(name, []))
            mean, std = mean_std(sample)
            cell = {"n": len(sample), "mean": mean, "std": std, "values": sample, "higher_is_better": higher}
            if row != BASELINE and BASELINE in values:
                cell["vs_baseline"] = welch_interval(sample, list(values[BASELINE].get(name, [])), level)
            table[row][name] = cell
    return table


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def format_markdown(table: Mapping[str, Mapping[str, dict]], title: str, level: float = 0.95) -> str:
    names = [name for name, _, _ in METRICS if any(table[row][name]["n"] for row in table)]
    seeds = {row: max(table[row][name]["n"] for name in names) if names else 0 for row in table}
    lines = [
        f"### {title}",
        "",
        "| Approach | seeds | " + " | ".join(names) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    for row, cells in table.items():
        shown = []
        for name in names:
            cell = cells[name]
            shown.append(
                ""
                if cell["mean"] is None
                else _number(cell["mean"]) + ("" if cell["std"] is None else f" ± {cell['std']:.3f}")
            )
        lines.append(f"| {row} | {seeds[row]} | " + " | ".join(shown) + " |")
    lines += [
        "",
        f"Difference from {BASELINE} (mean over seeds), {level:.0%} Welch confidence interval; "
        "**bold**: significant (the interval excludes 0).",
        "",
        "| Approach | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for row, cells in table.items():
        if row == BASELINE:
            continue
        shown = []
        for name in names:
            ci = cells[name].get("vs_baseline")
            if ci is None:
                shown.append("")
                continue
            text = f"{ci['diff']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]"
            shown.append(f"**{text}**" if ci["significant"] else text)
        lines.append(f"| {row} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


# -- the command ----------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="a conf/data option: synthetic (default), synthetic_hard")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=list(ROWS),
        choices=[*ROWS, *SCST_ROWS],
        help="default: the paper's six rows; add self_critical and scheduled_sampling+self_critical "
        "for the self-critical rows",
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per row")
    parser.add_argument(
        "--steps",
        type=int,
        default=1000,
        help="optimizer steps per run: shorter than the main job's 2,000, so that 30 runs fit in an hour on 2 cores",
    )
    parser.add_argument("--validations", type=int, default=2, help="validations per run (every steps / N steps)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--half-at", type=float, default=0.5, help="epsilon = 0.5 at this fraction of the run (sets inverse_sigmoid_k)"
    )
    parser.add_argument("--sweep-dir", type=Path, default=None, help="default: multirun/schedule_table/<data>")
    parser.add_argument("--out-dir", type=Path, default=REPO / "tools" / "results")
    parser.add_argument("--name", default=None, help="output name (default: schedule_table_<data>)")
    parser.add_argument("--scst-steps", type=int, default=400, help="optimizer steps of each self-critical run")
    parser.add_argument("--scst-lr", type=float, default=1e-4, help="its learning rate (cosine-decayed)")
    parser.add_argument("--table-only", action="store_true", help="no training: the table of the finished runs")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args(argv)
    if BASELINE not in args.rows:
        parser.error("--rows must include baseline (every row is compared with it)")
    for row in args.rows:
        if row in SCST_ROWS and SCST_ROWS[row] not in args.rows:
            parser.error(f"--rows: {row} starts from {SCST_ROWS[row]}'s checkpoints, so it needs that row too")
    if not 1 <= args.validations <= args.steps:
        parser.error(f"--validations must be in [1, --steps] (got {args.validations} for {args.steps} steps)")
    if args.scst_steps < 1 or not args.scst_lr > 0:
        parser.error(f"--scst-steps must be >= 1 and --scst-lr > 0 (got {args.scst_steps}, {args.scst_lr})")
    overrides = [f"data={args.data}", *args.overrides]
    run_overrides = [
        f"trainer.max_steps={args.steps}",
        f"trainer.val_every_n_steps={args.steps // args.validations}",
        *overrides,
    ]
    sweep = args.sweep_dir or REPO / "multirun" / "schedule_table" / args.data
    seeds = list(range(args.seeds))
    started = time.perf_counter()

    from captioning.scenes.pretraining import prepare_inputs

    cfg = compose(run_overrides)
    steps = int(cfg.trainer.max_steps)
    k = inverse_sigmoid_k(steps, args.half_at)
    runs = []
    if not args.table_only:
        import torch

        torch.set_num_threads(max(1, args.jobs * args.threads))
        prepared_in = time.perf_counter()
        prepare_inputs(cfg)  # the pretrained encoder's features, once, before the runs read them
        prepared_in = time.perf_counter() - prepared_in
        base = [row for row in args.rows if row in ROWS]
        jobs = [
            (
                row,
                seed,
                run_dir(sweep, row, seed),
                train_command(row, seed, run_dir(sweep, row, seed), k, args.threads, run_overrides),
            )
            for seed in seeds
            for row in base
            if not finished(run_dir(sweep, row, seed))
        ]
        print(
            f"{len(jobs)} runs to train ({len(base)} rows x {len(seeds)} seeds, {steps} steps, "
            f"inverse_sigmoid_k={k:.1f}: epsilon {epsilon(0, k):.2f} -> {epsilon(steps, k):.3f}), "
            f"{args.jobs} at a time, {args.threads} thread(s) each; inputs ready in {prepared_in:.0f} s",
            flush=True,
        )
        runs = run_all(jobs, args.jobs, args.threads)
        scst = [
            (
                row,
                seed,
                run_dir(sweep, row, seed),
                scst_command(row, seed, sweep, args.scst_steps, args.scst_lr, args.threads, overrides),
            )
            for seed in seeds
            for row in args.rows
            if row in SCST_ROWS
            and not finished(run_dir(sweep, row, seed))
            and finished(run_dir(sweep, SCST_ROWS[row], seed))
        ]
        if scst:
            print(
                f"{len(scst)} self-critical runs ({args.scst_steps} steps at lr {args.scst_lr:g} from the best "
                f"checkpoints of {sorted({SCST_ROWS[r] for r in args.rows if r in SCST_ROWS})})",
                flush=True,
            )
            runs += run_all(scst, args.jobs, args.threads)
    trained = time.perf_counter()
    collected = collect(sweep, args.rows, seeds)
    table = build_table(collected["values"])
    name = args.name or f"schedule_table_{args.data}"
    title = (
        f"data={args.data}, {steps} steps, inverse_sigmoid_k={k:.1f} (epsilon {epsilon(steps, k):.3f} at the "
        f"end), test split, beam search of 3, best checkpoint by {cfg.trainer.monitor}"
        + (
            f"; self-critical rows: {args.scst_steps} more steps from that checkpoint at lr {args.scst_lr:g}"
            if any(r in SCST_ROWS for r in args.rows)
            else ""
        )
    )
    markdown = format_markdown(table, title)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.md").write_text(markdown)
    (args.out_dir / f"{name}.json").write_text(
        json.dumps(
            {
                "data": args.data,
                "overrides": overrides,
                "rows": args.rows,
                "seeds": seeds,
                "max_steps": steps,
                "inverse_sigmoid_k": k,
                "half_at": args.half_at,
                "jobs": args.jobs,
                "threads": args.threads,
                "scst_steps": args.scst_steps,
                "scst_lr": args.scst_lr,
                "sweep_dir": str(sweep),
                "missing_runs": collected["missing"],
                "runs": runs,
                "seconds": {"training": round(trained - started, 1), "table": round(time.perf_counter() - trained, 1)},
                "table": table,
            },
            indent=2,
        )
    )
    print(markdown)
    if collected["missing"]:
        print(f"{len(collected['missing'])} run(s) unfinished, left out: {collected['missing']}", file=sys.stderr)
    print(f"wrote {args.out_dir / name}.{{md,json}} in {time.perf_counter() - started:.0f} s")
    return 1 if any(r["returncode"] for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
