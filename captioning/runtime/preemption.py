"""Preemption: a signal sets a flag, the training loop saves at the next step boundary, then asks for a requeue."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess

log = logging.getLogger(__name__)
PREEMPTION_EXIT_CODE = 124  # what the run exits with after saving on SIGTERM/SIGUSR1: requeue me


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (SLURM's warning before preemption or time limit) set a flag; the loop saves at the
    next step boundary, then asks for a requeue: through the handler that was there before ours (the
    submitit launcher's, which requeues the job) or, in a plain sbatch job, with `scontrol requeue`. The
    requeued job resumes from that checkpoint by itself (`trainer.resume=auto`)."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self.signum = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
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
        """After the checkpoint is saved: hand the signal to the previous handler, or requeue the SLURM job."""
        previous = self._previous.get(self.signum)
        self.restore()
        if callable(previous):
            previous(self.signum, None)  # e.g. submitit: checkpoint callback, requeue, exit
            return "previous handler"
        job_id = os.environ.get("SLURM_JOB_ID")
        if job_id and shutil.which("scontrol"):
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
            if result.returncode == 0:
                return f"scontrol requeue {job_id}"
            log.warning("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return "none"
