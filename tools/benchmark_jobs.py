"""Wall-clock times of the two jobs the README promises on a small machine: the main job and the comparison table.

    python tools/benchmark_jobs.py main                 # `captioning-train`, no arguments, from an empty cache
    python tools/benchmark_jobs.py table                # `python tools/schedule_table.py` (its runs, then the table)
    python tools/benchmark_jobs.py main_fp32            # the main job as a CPU without native bf16 runs it
    python tools/benchmark_jobs.py main table --out tools/results/benchmark_jobs_cpu_2cores.json

`main` runs the console script exactly as the README's Quick start does, with CAPTIONING_CACHE pointed at a new
folder, so the data generation and the scene-label pretraining are paid for as on a fresh machine; it records the
wall time, the pretraining's own seconds (its pretrain.json), and the run's test figures. `main_fp32` is the same
with `model.encoder.pretrain.precision=fp32`: what `precision: auto` resolves to on a CPU without AVX-512 BF16 or
AMX, so a machine with bf16 can measure the slower case too. `table` runs the table
command with the cache given by --cache (default: the main job's fresh cache when both run, else the user's), in
a new sweep folder, and records its wall time and the table's own time split. Each job is timed as a whole
process (python start-up included). The machine's load average is recorded before and after each job: the
figures mean something only if nothing else ran (the 1-minute load before a job is printed; above 0.5 the record
says `quiet: false`).

The results file keeps one record per job (a later run of a job replaces its record) with the date, the commit,
the CPU and torch versions. These are targets checked by a person reading the file, never by the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUIET_LOAD = 0.5


def machine() -> dict:
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.exists()
        else []
    )
    model = names[0] if names else platform.processor()
    return {"cpus": os.cpu_count(), "cpu": model, "python": platform.python_version(), "torch": torch.__version__}


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timed(command: list[str], env: dict, log: Path, cwd: Path) -> dict:
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    return {
        "command": " ".join(command),
        "returncode": code,
        "seconds": round(seconds, 1),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "quiet": load_before <= QUIET_LOAD,
        "log": str(log),
    }


MAIN_OVERRIDES = {"main": [], "main_fp32": ["model.encoder.pretrain.precision=fp32"]}


def main_job(job: str, work: Path, cache: Path, env: dict) -> dict:
    run = work / f"{job}_run"
    record = timed(
        ["captioning-train", *MAIN_OVERRIDES[job], f"hydra.run.dir={run}"],
        {**env, "CAPTIONING_CACHE": str(cache)},
        work / f"{job}.log",
        work,
    )
    if record["returncode"] == 0:
        metrics = json.loads((run / "test_metrics.json").read_text())
        record["test"] = {
            k: round(v, 4)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and k.split("/")[-1] in ("BLEU-4", "METEOR", "CIDEr", "correct")
        }
        pretrained = sorted(cache.glob("scene_encoders/*/pretrain.json"))
        if pretrained:
            report = json.loads(pretrained[0].read_text())
            record["pretraining_seconds"] = report["seconds"]
            record["encoder_val_scene_accuracy"] = round(report["val_accuracy"]["scene"], 4)
    return record


def table_job(work: Path, cache: Path | None, env: dict, extra: list[str]) -> dict:
    if cache is not None:
        env = {**env, "CAPTIONING_CACHE": str(cache)}
    out_dir = work / "table_results"
    record = timed(
        [
            sys.executable,
            str(REPO / "tools" / "schedule_table.py"),
            "--sweep-dir",
            str(work / "table_runs"),
            "--out-dir",
            str(out_dir),
            *extra,
        ],
        env,
        work / "table.log",
        REPO,
    )
    written = sorted(out_dir.glob("schedule_table_*.json"))
    if written:
        table = json.loads(written[0].read_text())
        record["table_seconds"] = table["seconds"]
        record["runs"] = len(table["runs"])
        record["failed_runs"] = sum(1 for r in table["runs"] if r["returncode"])
    return record


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jobs", nargs="+", choices=[*MAIN_OVERRIDES, "table"])
    parser.add_argument("--out", type=Path, default=REPO / "tools" / "results" / "benchmark_jobs_cpu_2cores.json")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where runs and logs go (default: a new temp folder)"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="CAPTIONING_CACHE for the table (default: the main job's fresh cache, else the user's)",
    )
    parser.add_argument(
        "--table-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="arguments for tools/schedule_table.py (last on the line)",
    )
    args = parser.parse_args(argv)
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="benchmark_jobs_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    cache = args.cache
    for job in args.jobs:
        print(f"{job}: 1-minute load before {os.getloadavg()[0]:.2f} (work dir {work})", flush=True)
        if job in MAIN_OVERRIDES:
            fresh = work / f"{job}_cache"
            record = main_job(job, work, fresh, env)
            cache = cache or fresh
        else:
            record = table_job(work, cache, env, args.table_args)
        record.update(
            {
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "commit": commit(),
                "machine": machine(),
            }
        )
        results[job] = record
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(
            f"{job}: {record['seconds']:.0f} s (exit {record['returncode']}, quiet {record['quiet']}) -> {args.out}",
            flush=True,
        )
        if record["returncode"]:
            print(f"{job} failed; its log: {record['log']}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
