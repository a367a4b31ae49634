"""Where this process sits in a distributed job, read from its environment (torchrun, an srun step), by the
rules submitit's TorchDistributedEnvironment uses under SLURM; and a run folder that a requeued job finds again.

    torchrun        RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT) are set: used as they are.
    srun step       SLURM_STEP_ID is set: rank SLURM_PROCID of SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), local
                    rank SLURM_LOCALID; the master is the first host of the step's node list (not the node srun was
                    started from, which may be a login node), the port derived from the job id.
    sbatch shell    SLURM_NTASKS > 1 but no step: one process of an N-task allocation; joining a process group
                    of N would wait forever for the N - 1 that were never started, so this is an error that says to
                    use srun.
    anything else   one process.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


class ClusterEnvironmentError(ValueError):
    """The environment describes a multi-process job this process cannot join (a user error: fix the launch)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    source: str = "single process"


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,07],cpu5") -> ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[\]]+)\[([^\]]+)\]|([^,\[\]]+)", hostlist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            width = len(low)
            for number in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{number:0{width}d}")
    return hosts


def detect_world(env: dict[str, str] | None = None) -> World:
    """The World of this process (see the module docstring); ClusterEnvironmentError for an sbatch shell of
    several tasks."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        port = env.get("MASTER_PORT")
        return World(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR"),
            int(port) if port else None,
            "torchrun",
        )
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if tasks <= 1:
        return World()
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        raise ClusterEnvironmentError(
            f"this SLURM job has {tasks} tasks (SLURM_NTASKS) but this process is not an srun step: start one process "
            f"per task with `srun captioning-train ...` (or one torchrun per node), or ask for --ntasks=1 "
            f"--cpus-per-task=N for a single-process run"
        )
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    master = expand_hostlist(nodes)[0] if nodes else "127.0.0.1"
    job_id = int(re.sub(r"\D", "", env.get("SLURM_JOB_ID", "0")) or 0)
    return World(
        int(env["SLURM_PROCID"]),
        tasks,
        int(env.get("SLURM_LOCALID", 0)),
        env.get("MASTER_ADDR", master),
        int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
        "srun",
    )


def run_folder_name(env: dict[str, str] | None = None, now: str | None = None) -> str:
    """The run folder under outputs/: DATE/TIME, except in a plain SLURM batch job (not one started by the
    submitit launcher, whose folders are stable already): slurm-JOBID (slurm-ARRAYJOB_TASK for arrays), so that
    a requeued job (a new start of the same job id) lands in the same folder and resumes from its checkpoints."""
    import time

    env = os.environ if env is None else env
    job = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
    if job and "SUBMITIT_FOLDER" not in env and not env.get("SUBMITIT_EXECUTOR"):
        task = env.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"_{task}" if task and env.get("SLURM_ARRAY_JOB_ID") else "")
    return now or time.strftime("%Y-%m-%d/%H-%M-%S")
