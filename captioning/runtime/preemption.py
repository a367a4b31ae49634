"""Preemption: a signal sets a flag, the training loop saves at the next step boundary, then asks for a requeue."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess

log = logging.getLogger(__name__)
PREEMPTION_EXIT_CODE = 124  # what the run exits with after saving on a preemption signal: requeue me


def preemption_signals(env: dict[str, str] | None = None) -> tuple[signal.Signals, ...]:
    """SIGTERM (SLURM's end of time, a plain kill), SIGUSR1 (what `--signal=USR1@N` usually names) and the signal
    submitit uses for preemption, read as submitit reads it (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    env = os.environ if env is None else env
    name = env.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    submitit_signal = getattr(signal, f"SIG{name}" if not name.startswith("SIG") else name, signal.SIGUSR2)
    return tuple(dict.fromkeys((signal.SIGTERM, signal.SIGUSR1, signal.Signals(submitit_signal))))


def under_submitit(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("SUBMITIT_EXECUTOR")) or "SUBMITIT_FOLDER" in env


class PreemptionFlag:
    """The preemption signals set a flag; the loop saves at the next step boundary, then asks for a requeue:
    under the submitit launcher, through submitit's own handler for its preemption signal (it checkpoints the
    job's callable and requeues it; called only after our checkpoint is on disk); in a plain sbatch job, with
    `scontrol requeue`. The requeued job resumes from that checkpoint by itself (`trainer.resume=auto`, and a
    run folder named after the job: see runtime.cluster.run_folder_name)."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self.signum = None
        self._previous = {}
        for sig in preemption_signals():
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def request_requeue(self) -> str:
        """After the checkpoint is saved. Under submitit: its handler of its preemption signal requeues (it may
        exit the process); for another signal, submitit's handler would only log ("bypassing"), so its
        preemption handler is asked instead. Elsewhere: a handler that was there before ours (a launcher's), else
        `scontrol requeue` of the SLURM job. Returns what was done."""
        self.restore()
        if under_submitit():
            submitit_signal = preemption_signals()[-1]
            handler = self._previous.get(submitit_signal)
            if callable(handler):
                handler(submitit_signal, None)  # submitit: checkpoint callback, requeue, exit
                return f"submitit ({signal.Signals(submitit_signal).name} handler)"
        previous = self._previous.get(self.signum)
        if callable(previous) and not under_submitit():
            previous(self.signum, None)
            return "previous handler"
        job_id = os.environ.get("SLURM_JOB_ID")
        if job_id and shutil.which("scontrol"):
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
            if result.returncode == 0:
                return f"scontrol requeue {job_id}"
            log.warning("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return "none"
