"""Distributed data-parallel training and evaluation: 2 CPU processes on gloo, launched with torchrun.

The ranks must see disjoint halves of every epoch, log one mean loss per step from rank 0 alone, end with
identical models, score every val/test image exactly once (also for an odd split size), stop together when
only one rank is signalled, and resume exactly. tests/ddp_worker.py runs train() with spies on each rank.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, compose, requires_java, tiny_overrides

from captioning.data.build import ResumableSampler
from captioning.loggers.jsonl import read_jsonl

WORKER = REPO / "tests" / "ddp_worker.py"
WORLD = 2
# An odd test split: 11 images over 2 ranks (6 + 5); 60 training images, 6 per batch -> 5 steps per epoch.
DDP_DATA = {**TINY, "num_test": 11}
TRAIN_STEPS, VAL_EVERY, STEPS_PER_EPOCH = 6, 3, DDP_DATA["num_train"] // WORLD // 6

needs_gloo = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def ddp_run(test):
    """A test that launches torchrun and trains/evaluates (pycocoevalcap needs Java)."""
    for mark in (pytest.mark.ddp, pytest.mark.slow, pytest.mark.java, requires_java(), needs_gloo):
        test = mark(test)
    return test


# ---------------------------------------------------------------------------------------------- fast checks


def test_trainer_ddp_config_has_every_default_key_and_documents_the_launch():
    ddp, default = compose(["trainer=ddp"]), compose([])
    assert set(ddp.trainer) == set(default.trainer)
    assert ddp.trainer.device == "auto"
    first_line = (REPO / "conf" / "trainer" / "ddp.yaml").read_text().splitlines()[0]
    assert first_line == "# torchrun --nproc_per_node=N -m captioning.train trainer=ddp"


@pytest.mark.parametrize("size,world", [(60, 2), (61, 2), (61, 3), (7, 1)])
def test_sampler_gives_each_rank_a_disjoint_equal_share_of_every_epoch(size, world):
    per_rank = size // world
    previous_epoch = None
    for epoch in range(3):
        shards = []
        for rank in range(world):
            sampler = ResumableSampler(size, seed=5, shuffle=True, rank=rank, world_size=world)
            sampler.set_epoch(epoch)
            keys = list(sampler)
            assert len(keys) == len(sampler) == per_rank  # equal: every rank takes the same number of steps
            assert all(epoch * size <= k < (epoch + 1) * size for k in keys)  # the key carries the epoch
            shards.append([k - epoch * size for k in keys])
        seen = [i for shard in shards for i in shard]
        assert len(seen) == len(set(seen)) == per_rank * world  # disjoint; only the remainder < world is left out
        assert previous_epoch != shards[0]  # reshuffled each epoch
        previous_epoch = shards[0]
        # Resuming mid-epoch skips this rank's first `start` samples, nothing else.
        sampler = ResumableSampler(size, seed=5, shuffle=True, rank=world - 1, world_size=world)
        sampler.set_epoch(epoch, start=2)
        assert [k - epoch * size for k in sampler] == shards[-1][2:]


# ---------------------------------------------------------------------------------------------- torchrun runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], timeout: float = 300, env: dict | None = None) -> tuple[int, str, float]:
    """`torchrun --nproc_per_node=2 ARGS` (plain, not --standalone); returns (exit code, output, seconds).
    On a timeout the whole process group is killed and the test fails with the output so far."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        f"--master_port={_free_port()}",
        *args,
    ]
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "WANDB_SILENT": "true",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout}s (a rank left waiting in a collective?):\n{out[-6000:]}")
    return proc.returncode, out, time.perf_counter() - start


@pytest.fixture(scope="module")
def ddp_data_root(tmp_path_factory) -> Path:
    """A data set of its own: regenerating the session's tiny_data_root with num_test=11 would change it in place."""
    from captioning.scenes.generator import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("ddp_synthetic") / "tiny", **DDP_DATA)


def ddp_overrides(root: Path, *extra: str) -> list[str]:
    return [
        *tiny_overrides(root),
        *(f"data.synthetic.{k}={v}" for k, v in DDP_DATA.items()),
        "trainer=ddp",
        "trainer.device=cpu",
        "trainer.num_threads=1",
        f"trainer.max_steps={TRAIN_STEPS}",
        f"trainer.val_every_n_steps={VAL_EVERY}",
        *extra,
    ]


def split_ids(root: Path) -> dict[str, list[int]]:
    from captioning.data.build import load_records

    records = load_records(compose(ddp_overrides(root)).data)
    return {split: [r.image_id for r in rs] for split, rs in records.items()}


@pytest.mark.ddp
@pytest.mark.slow
@needs_gloo
def test_collectives_and_sharded_decoding_with_two_processes(ddp_data_root, tmp_path):
    code, out, _ = torchrun([str(WORKER), "helpers", str(tmp_path), *ddp_overrides(ddp_data_root)], timeout=180)
    assert code == 0, out[-6000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, rep in enumerate(reports):
        assert rep["rank"] == rank and rep["world_size"] == WORLD
        assert rep["mean"] == {"a": 0.5, "b": 15.0}
        assert rep["any_only_rank1"] is True and rep["any_none"] is False
        assert rep["broadcast"] == "from rank 0"
        assert rep["gathered"] == [{"rank": 0}, {"rank": 1}]
    for epoch in ("0", "1"):
        shards = [rep["sampler"][epoch] for rep in reports]
        assert len(shards[0]) == len(shards[1]) == 30 and not set(shards[0]) & set(shards[1])
    test_ids = split_ids(ddp_data_root)["test"]
    assert len(test_ids) == 11
    decoded = [rep["decoded_here"] for rep in reports]
    assert sorted(decoded[0] + decoded[1]) == sorted(test_ids)  # each image decoded by exactly one rank
    assert (len(decoded[0]), len(decoded[1])) == (6, 5)
    assert all(rep["captions_received"] == sorted(test_ids) for rep in reports)  # and every rank gets them all


@ddp_run
def test_torchrun_captioning_train_end_to_end(ddp_data_root, tmp_path):
    run_dir = tmp_path / "run"
    code, out, seconds = torchrun(["-m", "captioning.train", *ddp_overrides(ddp_data_root), f"hydra.run.dir={run_dir}"])
    print(f"torchrun -m captioning.train, 2 ranks, {TRAIN_STEPS} steps + val + test: {seconds:.1f}s")
    assert code == 0, out[-6000:]

    # Rank 0 alone logs: exactly one record per logged step and kind, in order.
    records = read_jsonl(run_dir / "metrics.jsonl")
    kinds = [(r["step"], "test" if "test/CIDEr" in r else "val" if "val/CIDEr" in r else "train") for r in records]
    assert kinds == [(2, "train"), (3, "val"), (4, "train"), (6, "train"), (6, "val"), (6, "test")]
    train_records = [r for r in records if "train/loss" in r]
    # The epoch counter advances by the per-rank share: 60 images / 2 ranks / 6 per batch = 5 steps per epoch.
    assert [r["train/epoch"] for r in train_records] == [s / STEPS_PER_EPOCH for s in (2, 4, 6)]
    assert all(math.isfinite(r["train/loss"]) and r["train/loss"] > 0 for r in train_records)
    for r in records:
        for key, value in r.items():
            if key.endswith("scene/captions"):  # a count: one caption per image
                assert value == {"test": 11, "val": DDP_DATA["num_val"]}[key.split("/")[0]], (key, value)
            elif key.endswith(("exposure_oracle/images", "exposure_oracle/references")):  # counts
                assert value >= 1 and value == int(value), (key, value)
            elif key.startswith(("val/", "test/")):
                low = -10 if key.endswith(("_gap", "excess_error", "accerr")) else 0  # these may have either sign
                assert math.isfinite(value) and low <= value <= 10, (key, value)

    # Distributed evaluation scored each test image exactly once, odd split size included.
    test_ids = split_ids(ddp_data_root)["test"]
    results = json.loads((run_dir / "results_test_beam.json").read_text())
    ids = [r["image_id"] for r in results]
    assert len(ids) == len(set(ids)) == len(test_ids) == 11
    assert sorted(ids) == sorted(test_ids)
    assert json.loads((run_dir / "test_metrics.json").read_text())["images"] == 11

    # The checkpoints are complete and load into a model.
    from captioning.models.loading import load_model
    from captioning.runtime.checkpoint import load_checkpoint

    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["step"] == TRAIN_STEPS and last["config"]["trainer"]["device"] == "cpu"
    model, vocab, _, state = load_model(run_dir / "checkpoints" / "best.pt", torch.device("cpu"))
    assert state["step"] in (VAL_EVERY, TRAIN_STEPS)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.pt",
        "last.prev.pt",
        "last.pt",
    ]  # no temporary leftovers


def _worker_train(out_dir: Path, root: Path, *extra: str, env: dict | None = None) -> tuple[int, str, list[dict]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    code, out, seconds = torchrun(
        [str(WORKER), "train", str(out_dir), *ddp_overrides(root, "trainer.log_every_n_steps=1", *extra)], env=env
    )
    print(f"ddp_worker.py train ({out_dir.name}): {seconds:.1f}s")
    reports = [
        json.loads((out_dir / f"rank{r}.json").read_text())
        for r in range(WORLD)
        if (out_dir / f"rank{r}.json").is_file()
    ]
    return code, out, reports


# Scheduled sampling with dropout: the random draws that make an exact resume hard.
SCHEDULE = ("schedule=inverse_sigmoid", "schedule.k=2", "model.decoder.dropout=0.3")


@pytest.fixture(scope="module")
def straight_run(ddp_data_root, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp_straight")
    code, out, reports = _worker_train(out_dir, ddp_data_root, *SCHEDULE)
    assert code == 0, out[-6000:]
    return out_dir, reports


@ddp_run
def test_ranks_split_the_data_reduce_the_loss_and_end_identical(straight_run, ddp_data_root):
    out_dir, reports = straight_run
    # Every rank used rank 0's run folder (each passed its own, as Hydra ${now} folders may differ).
    assert all(rep["summary"]["run_dir"] == str(out_dir / "run_rank0") for rep in reports)
    assert not (out_dir / "run_rank1").exists()
    assert all(rep["process_group_destroyed"] for rep in reports)
    assert all(rep["summary"]["steps"] == TRAIN_STEPS and not rep["summary"]["preempted"] for rep in reports)

    # Disjoint halves of each epoch: epoch 0 entirely (5 steps x 6 images x 2 ranks = 60), then epoch 1's start.
    seen = [{} for _ in reports]
    for rank, rep in enumerate(reports):
        for key, size in rep["train_keys"]:
            epoch, index = divmod(key, size)
            seen[rank].setdefault(epoch, []).append(index)
    assert sorted(seen[0]) == sorted(seen[1]) == [0, 1]
    assert len(seen[0][0]) == len(seen[1][0]) == 30 and sorted(seen[0][0] + seen[1][0]) == list(range(60))
    assert len(seen[0][1]) == len(seen[1][1]) == 6 and not set(seen[0][1]) & set(seen[1][1])

    # train/loss logged by rank 0 = mean of the ranks' local losses, one record per step.
    local = [[r["local"]["train/loss"] for r in rep["reduced"]] for rep in reports]
    assert len(local[0]) == len(local[1]) == TRAIN_STEPS
    assert local[0] != local[1]  # the ranks really saw different data
    logged = [r["train/loss"] for r in read_jsonl(out_dir / "run_rank0" / "metrics.jsonl") if "train/loss" in r]
    assert logged == pytest.approx([(a + b) / 2 for a, b in zip(*local)], rel=1e-12)

    # Identical models on both ranks at the end, BatchNorm running statistics included, = rank 0's checkpoint.
    params = [torch.load(out_dir / f"params_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert params[0].keys() == params[1].keys()
    assert [k for k in params[0] if not torch.equal(params[0][k], params[1][k])] == []
    from captioning.runtime.checkpoint import load_checkpoint

    saved = load_checkpoint(out_dir / "run_rank0" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(saved[k], params[0][k]) for k in saved)

    # Validation (twice) and the test evaluation: each image decoded by exactly one rank.
    ids = split_ids(ddp_data_root)
    shards = [rep["decoded_shards"] for rep in reports]
    assert len(shards[0]) == len(shards[1]) == 3
    for call, split in enumerate(["val", "val", "test"]):
        both = shards[0][call] + shards[1][call]
        assert sorted(both) == sorted(ids[split]), split
    test = reports[0]["test_metrics"]
    assert reports[1]["test_metrics"] == {} and math.isfinite(test["test/CIDEr"])


@ddp_run
def test_sigterm_on_one_rank_stops_all_and_the_resumed_run_matches(straight_run, ddp_data_root, tmp_path):
    straight_dir, _ = straight_run
    out_dir = tmp_path / "resumed"
    # SIGTERM to rank 1 alone, during its 2nd forward pass: both ranks must stop after step 2 (not hang).
    no_test = "trainer.evaluate_after_training=false"  # the straight run's test figures are not compared
    code, out, reports = _worker_train(out_dir, ddp_data_root, *SCHEDULE, no_test, env={"DDP_WORKER_SIGTERM": "1:2"})
    assert code != 0, "torchrun reports the workers' requeue exit status (124) as a failure"
    assert len(reports) == WORLD, out[-6000:]
    for rep in reports:
        assert rep["summary"]["preempted"] and rep["summary"]["exit_code"] == 124 and rep["summary"]["steps"] == 2
    from captioning.runtime.checkpoint import load_checkpoint

    assert load_checkpoint(out_dir / "run_rank0" / "checkpoints" / "last.pt")["step"] == 2

    code, out, reports = _worker_train(out_dir, ddp_data_root, *SCHEDULE, no_test)  # trainer.resume=auto
    assert code == 0, out[-6000:]
    assert all(rep["summary"]["steps"] == TRAIN_STEPS and not rep["summary"]["preempted"] for rep in reports)

    def losses(directory):
        return {
            r["step"]: r["train/loss"]
            for r in read_jsonl(directory / "run_rank0" / "metrics.jsonl")
            if "train/loss" in r
        }

    assert losses(out_dir) == losses(straight_dir)
    resumed = torch.load(out_dir / "params_rank0.pt", weights_only=True)
    straight = torch.load(straight_dir / "params_rank0.pt", weights_only=True)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert Counter(r["step"] for r in read_jsonl(out_dir / "run_rank0" / "metrics.jsonl") if "train/loss" in r) == {
        s: 1 for s in range(1, TRAIN_STEPS + 1)
    }
