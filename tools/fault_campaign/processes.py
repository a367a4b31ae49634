"""Starting the campaign's children: `python launcher.py OVERRIDES`, one at a time, each in its own process group
(a SIGKILL reaches the whole group, as a node loss does), with the SLURM_* and SUBMITIT_* variables removed (a
preemption save must not `scontrol requeue` the job the campaign runs in) and output to a log file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .launcher import FAULT_ENV

LAUNCHER = Path(__file__).resolve().with_name("launcher.py")


@dataclass
class Launch:
    rc: int | None  # None: killed by the campaign; negative: killed by that signal
    seconds: float
    log: Path
    killed_after: float | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


class ProcessRunner:
    """Starts `python launcher.py OVERRIDES` one at a time, each in its own process group, output to a log file."""

    def __init__(self, work: Path, timeout: float):
        self.work = work
        self.timeout = timeout
        self.logs = work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.count = 0

    def env(self, spec: dict | None, extra_env: dict[str, str] | None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SUBMITIT_", "WANDB_")) and k != FAULT_ENV
        }
        env.update(WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
        if spec:
            env[FAULT_ENV] = json.dumps(spec)
        env.update(extra_env or {})
        return env

    def start(
        self,
        name: str,
        overrides: list[str],
        run_dir: Path,
        spec: dict | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> tuple[subprocess.Popen, Path, float]:
        self.count += 1
        log = self.logs / f"{self.count:03d}-{name}.log"
        command = [sys.executable, str(LAUNCHER), *overrides, f"hydra.run.dir={run_dir}"]
        with open(log, "w") as out:
            out.write("$ " + " ".join(command) + "\n")
            out.flush()
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(spec, extra_env),
                start_new_session=True,
            )
        return process, log, time.monotonic()

    def wait(self, process: subprocess.Popen, log: Path, started: float) -> Launch:
        try:
            rc = process.wait(timeout=max(1.0, self.timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            kill_group(process)
            with open(log, "a") as out:
                out.write(f"\n[fault_campaign] no exit after {self.timeout:.0f} s: killed (a hang)\n")
            return Launch(-signal.SIGKILL, time.monotonic() - started, log)
        return Launch(rc, time.monotonic() - started, log)

    def run(
        self,
        name: str,
        overrides: list[str],
        run_dir: Path,
        spec: dict | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> Launch:
        return self.wait(*self.start(name, overrides, run_dir, spec, extra_env))


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the whole group: what a node loss does
    except ProcessLookupError:
        pass
    process.wait()
