"""One rank of a DDP check, launched by tests/test_ddp.py with torchrun; writes what this rank saw as JSON.

    torchrun --nproc_per_node=2 tests/ddp_worker.py helpers OUT_DIR [HYDRA_OVERRIDE ...]
        the distributed helpers and decode_records (test split, untrained model) with real process groups;
    torchrun --nproc_per_node=2 tests/ddp_worker.py train OUT_DIR [HYDRA_OVERRIDE ...]
        train(cfg, OUT_DIR/run_rank<r>) with spies on what each rank loads, decodes and reduces; every rank
        passes its own run folder (as Hydra's ${now} folders may differ by a second) and all must use rank 0's.
        DDP_WORKER_SIGTERM=R:K sends SIGTERM to rank R alone during its K-th training forward pass.

Writes OUT_DIR/rank<r>.json and, for `train`, OUT_DIR/params_rank<r>.pt (the final model parameters).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from conftest import compose  # this script's folder (tests/) is first on sys.path


def check_helpers(overrides: list[str]) -> dict:
    """Collectives and the evaluation sharding with two real processes; the test asserts on the report."""
    from captioning.data.build import ResumableSampler
    from captioning.runtime import distributed as dist_utils

    info = dist_utils.init_distributed(device="cpu")
    report = {"rank": info.rank, "world_size": info.world_size}
    report["mean"] = dist_utils.all_reduce_mean(
        {"a": float(info.rank), "b": 10.0 * (info.rank + 1)}, info, torch.device("cpu")
    )
    report["any_only_rank1"] = dist_utils.any_rank(info.rank == 1, info)
    report["any_none"] = dist_utils.any_rank(False, info)
    report["broadcast"] = dist_utils.broadcast_object(f"from rank {info.rank}", info)
    report["gathered"] = dist_utils.gather_objects({"rank": info.rank}, info)
    sampler = ResumableSampler(61, seed=3, shuffle=True, rank=info.rank, world_size=info.world_size)
    report["sampler"] = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        report["sampler"][epoch] = [key - epoch * 61 for key in sampler]

    # decode_records over an odd number of images: each rank decodes its shard, every rank gets all captions.
    import captioning.evaluation.captions as inference
    from captioning.data import build as data_build
    from captioning.models.captioner import build_captioner

    cfg = compose(overrides)
    records = data_build.load_records(cfg.data)
    vocab = data_build.build_vocab(records["train"], cfg.data)
    torch.manual_seed(0)
    model = build_captioner(cfg.model, len(vocab))
    decoded_here = []
    original = inference.eval_dataset
    inference.eval_dataset = lambda shard, cfg_data: (
        decoded_here.extend(r.image_id for r in shard),
        original(shard, cfg_data),
    )[1]
    captions = inference.decode_records(
        model, records["test"], vocab, cfg.data, "greedy", {"max_len": 5}, torch.device("cpu"), info, batch_size=4
    )
    report["test_ids"] = [r.image_id for r in records["test"]]
    report["decoded_here"] = decoded_here
    report["captions_received"] = sorted(captions)
    dist_utils.barrier(info)
    dist_utils.cleanup(info)
    return report


def run_training(out_dir: Path, overrides: list[str]) -> tuple[dict, int]:
    """train() with spies; returns this rank's report and the exit code captioning.train would use."""
    import captioning.evaluation.captions as inference
    from captioning.data.dataset import TrainCaptionDataset
    from captioning.runtime import distributed as dist_utils
    from captioning.training import caption_task, recipe

    rank = int(os.environ["RANK"])
    report = {"rank": rank, "train_keys": [], "reduced": [], "decoded_shards": []}

    get_item = TrainCaptionDataset.__getitem__

    def spy_get_item(self, key):
        if type(self) is TrainCaptionDataset:  # not the exposure probe's all-references subclass
            report["train_keys"].append([int(key), len(self)])
        return get_item(self, key)

    all_reduce_mean = dist_utils.all_reduce_mean

    def spy_all_reduce_mean(values, info, device):
        result = all_reduce_mean(values, info, device)
        report["reduced"].append({"local": dict(values), "mean": dict(result)})
        return result

    eval_dataset = inference.eval_dataset

    def spy_eval_dataset(shard, cfg_data):
        report["decoded_shards"].append([r.image_id for r in shard])
        return eval_dataset(shard, cfg_data)

    models = []
    build_captioner = caption_task.build_captioner

    def spy_build_captioner(*args, **kwargs):
        models.append(build_captioner(*args, **kwargs))
        return models[-1]

    train_step = caption_task.CaptionTask.step
    signal_rank, signal_at = (int(v) for v in os.environ.get("DDP_WORKER_SIGTERM", "-1:-1").split(":"))

    def step_maybe_signal(task, run, batch):
        if rank == signal_rank and run.progress.step + 1 == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(task, run, batch)

    TrainCaptionDataset.__getitem__ = spy_get_item
    dist_utils.all_reduce_mean = spy_all_reduce_mean
    inference.eval_dataset = spy_eval_dataset
    caption_task.build_captioner = spy_build_captioner
    caption_task.CaptionTask.step = step_maybe_signal

    summary = recipe.train(compose(overrides), out_dir / f"run_rank{rank}")
    report["summary"] = {k: v for k, v in summary.items() if k != "test"}
    report["test_metrics"] = summary.get("test")
    report["process_group_destroyed"] = not torch.distributed.is_initialized()
    torch.save({k: v.detach().clone() for k, v in models[-1].state_dict().items()}, out_dir / f"params_rank{rank}.pt")
    return report, summary.get("exit_code", 0)


def main() -> None:
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if mode == "helpers":
        report, code = check_helpers(sys.argv[3:]), 0
    elif mode == "train":
        report, code = run_training(out_dir, sys.argv[3:])
    else:
        raise SystemExit(f"ddp_worker.py: unknown mode {mode!r} (helpers | train)")
    (out_dir / f"rank{report['rank']}.json").write_text(json.dumps(report))
    sys.exit(code)


if __name__ == "__main__":
    main()
