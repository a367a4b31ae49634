"""The campaign as a whole (run_campaign: the report as a dict) and its command line (main)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from .checks import ScenarioResult
from .launcher import missing_hooks
from .plan import NEEDS_REFERENCE, PREEMPTION_EXIT_CODE, SCENARIOS, CampaignError, RunPlan, check_overrides
from .scenarios import Campaign

DESCRIPTION = (
    "The fault campaign: one small training run, straight through, then the same run under each fault a cluster "
    "deals out; each ends bit-identical to the straight run (CPU, fp32) or with its stated message and exit code."
)


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads_in_runs": 1,
    }


def run_campaign(
    kills: int = 20,
    steps: int = 160,
    seed: int = 0,
    scenarios: list[str] | None = None,
    extra_overrides: Sequence[str] = (),
    work_dir: str | Path | None = None,
    keep: bool = False,
    timeout: float = 600.0,
    log: Callable[[str], None] = print,
    wandb_init_timeout: float = 10.0,
) -> dict:
    """Run the scenarios (all by default) and return the report: {"passed", "scenarios": [...], ...}. Runs live in
    `work_dir` (default: a temporary folder, removed afterwards unless `keep` or a scenario failed)."""
    from captioning.runtime.preemption import PREEMPTION_EXIT_CODE as project_code

    if project_code != PREEMPTION_EXIT_CODE:
        raise RuntimeError(
            f"the project's preemption exit code is {project_code}, this tool expects "
            f"{PREEMPTION_EXIT_CODE}: update tools/fault_campaign/plan.py"
        )
    missing = missing_hooks()
    if missing:  # what the launcher would exit with at every launch; said once, before any work
        raise RuntimeError(
            f"missing hook point(s) {', '.join(missing)}: update HOOKS in tools/fault_campaign/launcher.py"
        )
    if kills < 1:
        raise CampaignError(f"--kills must be at least 1 (got {kills})")
    if timeout <= 0:
        raise CampaignError(f"--timeout must be positive (got {timeout})")
    chosen = list(scenarios or SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        raise CampaignError(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    plan = RunPlan.for_steps(steps, check_overrides(list(extra_overrides)))
    temporary = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="fault_campaign_") if work_dir is None else work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if wandb_init_timeout <= 0:
        raise CampaignError(f"--wandb-init-timeout must be positive (got {wandb_init_timeout})")
    campaign = Campaign(work, plan, kills, seed, timeout, log, wandb_init_timeout)
    results: list[ScenarioResult] = []
    reference_seconds = 0.0
    if NEEDS_REFERENCE & set(chosen):
        began = time.monotonic()
        try:
            campaign.ensure_reference()
        except RuntimeError as e:  # every scenario that needs it fails with this message
            log(str(e))
        reference_seconds = time.monotonic() - began
    for name in chosen:
        began = time.monotonic()
        try:
            result = getattr(campaign, name)()
        except Exception as e:  # noqa: BLE001 - a broken scenario is a failed scenario, the others still run
            result = ScenarioResult(
                name,
                f"the scenario itself failed: {type(e).__name__}: {e}",
                "",
                False,
                0.0,
                {"failed_checks": [str(e)]},
            )
        result.seconds = round(time.monotonic() - began, 1)
        results.append(result)
        log(f"{name}: {'passed' if result.passed else 'FAILED'} in {result.seconds:.1f} s")
    passed = all(r.passed for r in results)
    kill_result = next((r for r in results if r.name == "sigkill_random"), None)
    report = {
        "passed": passed,
        "date": datetime.date.today().isoformat(),
        "seconds": round(time.monotonic() - started, 1),
        "reference_seconds": round(reference_seconds, 1),
        "kills": kill_result.details.get("kills") if kill_result else 0,
        "restarts": kill_result.details.get("restarts") if kill_result else 0,
        "launches": campaign.runner.count,
        "seed": seed,
        "run": {
            "max_steps": plan.steps,
            "val_every_n_steps": plan.val_every,
            "checkpoint_every_n_steps": plan.checkpoint_every_n_steps,
            "checkpoint_every_minutes": plan.checkpoint_every_minutes,
            "overrides": campaign.overrides,
        },
        "machine": machine(),
        "work_dir": str(work),
        "scenarios": [asdict(r) for r in results],
    }
    if temporary and passed and not keep:
        shutil.rmtree(work, ignore_errors=True)
        report["work_dir"] = None
    return report


def table(report: dict) -> str:
    rows = [("scenario", "result", "seconds", "outcome")]
    rows += [
        (s["name"], "passed" if s["passed"] else "FAILED", f"{s['seconds']:.1f}", s["outcome"])
        for s in report["scenarios"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    lines.append(
        f"{sum(s['passed'] for s in report['scenarios'])}/{len(report['scenarios'])} passed in "
        f"{report['seconds']:.0f} s ({report['kills']} SIGKILLs, {report['restarts']} restarts, "
        f"{report['launches']} launches)"
    )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    else:
        extra = []
    parser = argparse.ArgumentParser(
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Extra Hydra overrides for every run go after `--`.",
    )
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of the random-kill scenario (default 20)")
    parser.add_argument("--steps", type=int, default=160, help="optimizer steps of the run (default 160)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep the runs here (default: a temporary folder, removed when everything passed)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds one launch may take before it counts as hung (default 600)",
    )
    parser.add_argument(
        "--wandb-init-timeout",
        type=float,
        default=10.0,
        help="wandb_down: seconds W&B may try the dead server before falling back (default 10; "
        "the project's own default is 60)",
    )
    args = parser.parse_args(argv)
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    try:
        report = run_campaign(
            args.kills,
            args.steps,
            args.seed,
            scenarios,
            extra,
            args.work_dir,
            args.keep,
            args.timeout,
            log=lambda line: print(line, file=sys.stderr, flush=True),
            wandb_init_timeout=args.wandb_init_timeout,
        )
    except CampaignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["command"] = " ".join(["python", "tools/fault_campaign", *(sys.argv[1:] if argv is None else argv)])
    print(table(report))
    if report["work_dir"]:
        print(f"runs and logs: {report['work_dir']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"report: {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
