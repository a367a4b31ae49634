"""The cluster path without a cluster: the world each launcher's environment describes, the run folder of a
requeued job, the preemption signals and where the requeue goes."""

from __future__ import annotations

import os
import signal

import pytest

from captioning.runtime.cluster import ClusterEnvironmentError, detect_world, expand_hostlist, run_folder_name
from captioning.runtime.preemption import PreemptionFlag, preemption_signals

SBATCH_SHELL = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.1",
}
SRUN_STEP = {
    **SBATCH_SHELL,
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
}
TORCHRUN = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "node-a",
    "MASTER_PORT": "29400",
    **SBATCH_SHELL,
}  # torchrun inside an sbatch job: torchrun's variables win


def test_hostlists_expand_as_slurm_writes_them():
    assert expand_hostlist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_hostlist("node9") == ["node9"]
    assert expand_hostlist("a[8-10]") == ["a8", "a9", "a10"]


def test_an_srun_step_is_a_world_whose_master_is_the_first_node_of_the_step():
    world = detect_world(SRUN_STEP)
    assert (world.rank, world.world_size, world.local_rank, world.source) == (3, 4, 1, "srun")
    assert world.master_addr == "gpu07"  # not SLURM_LAUNCH_NODE_IPADDR: srun may start on a login node
    assert world.master_port == 20000 + 4242 % 20000


def test_torchrun_variables_win():
    world = detect_world(TORCHRUN)
    assert (world.rank, world.world_size, world.local_rank, world.master_addr, world.master_port) == (
        5,
        8,
        1,
        "node-a",
        29400,
    )


def test_an_sbatch_shell_of_several_tasks_says_to_use_srun_instead_of_hanging():
    with pytest.raises(ClusterEnvironmentError, match="not an srun step.*srun captioning-train"):
        detect_world(SBATCH_SHELL)
    assert detect_world({**SBATCH_SHELL, "SLURM_NTASKS": "1"}).world_size == 1
    assert detect_world({}).world_size == 1


def test_the_training_entry_point_reports_it(tiny_data_root, tmp_path, monkeypatch):
    from conftest import compose, tiny_overrides

    from captioning.training.caption_task import setup

    for key, value in SBATCH_SHELL.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ClusterEnvironmentError, match="srun"):
        setup(compose(tiny_overrides(tiny_data_root) + ["trainer.scoring=deferred"]), tmp_path)


def test_a_plain_sbatch_job_keeps_its_run_folder_across_requeues():
    assert run_folder_name({"SLURM_JOB_ID": "4242"}) == "slurm-4242"
    assert (
        run_folder_name({"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3"})
        == "slurm-4242_3"
    )
    # the submitit launcher keeps its own (stable) folders; no SLURM: a timestamp
    assert (
        run_folder_name({"SLURM_JOB_ID": "4242", "SUBMITIT_EXECUTOR": "slurm"}, now="2026-12-02/10-00-00")
        == "2026-12-02/10-00-00"
    )
    assert run_folder_name({}, now="2026-12-02/10-00-00") == "2026-12-02/10-00-00"


def test_the_composed_run_dir_follows_the_job_id(monkeypatch):
    from conftest import compose
    from omegaconf import OmegaConf

    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    cfg = compose([], return_hydra_config=True)
    assert OmegaConf.select(cfg, "hydra.run.dir").endswith("outputs/slurm-777")


def test_submitits_signal_is_read_the_way_submitit_reads_it():
    assert preemption_signals({}) == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    assert preemption_signals({"SUBMITIT_PREEMPT_SIGNAL": "USR1"}) == (signal.SIGTERM, signal.SIGUSR1)


def test_under_submitit_the_requeue_goes_through_submitits_handler(monkeypatch):
    """submitit's USR2 handler checkpoints and requeues; its SIGTERM handler only logs. Whatever signal arrived,
    the requeue is asked of the USR2 handler, after our checkpoint."""
    calls = []
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(("checkpoint+requeue", signum)))
    signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(("bypass", signum)))
    try:
        flag = PreemptionFlag()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.signal_name == "SIGTERM" and calls == []  # ours only sets the flag
        assert flag.request_requeue() == "submitit (SIGUSR2 handler)"
        assert calls == [("checkpoint+requeue", signal.SIGUSR2)]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_sigusr2_stops_a_training_run_at_a_step_boundary(tiny_data_root, tmp_path, monkeypatch):
    from conftest import compose, signal_during_step, tiny_overrides

    from captioning.runtime.checkpoint import load_checkpoint
    from captioning.training.recipe import train

    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    signal_during_step(monkeypatch, 2, signal.SIGUSR2)
    summary = train(compose(tiny_overrides(tiny_data_root) + ["trainer.scoring=deferred"]), tmp_path)
    assert summary["preempted"] and summary["steps"] == 2 and summary["exit_code"] == 124
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 2
