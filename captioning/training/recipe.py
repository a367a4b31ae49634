"""The training recipe: one `TrainingState` and top-level functions that each do one thing.

    state = setup(cfg, run_dir)          # data, model, objective, optimizer, loggers
    resume(state)                        # from RUN_DIR/checkpoints/last.pt or trainer.resume=PATH
    for batch in training_batches(state):
        train_step(state, batch)         # one optimizer step
        log_progress(state)              # every trainer.log_every_n_steps
        validate_and_save(state)         # every trainer.val_every_n_steps: last.pt, best.pt
        ...
    final_test(state)                    # the best checkpoint on the test split

`train(cfg, run_dir)` strings them together; tests call it (and the parts) with a composed config.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from captioning.config import validate_train_config
from captioning.data import build as data_build
from captioning.data.dataset import BadImageTracker
from captioning.data.features import open_feature_store
from captioning.data.vocab import Vocabulary
from captioning.evaluation.captions import decode_records, references_of, score, write_results
from captioning.evaluation.evaluate import evaluate_checkpoint, scene_truth
from captioning.evaluation.reports import report_evaluation, sample_rows
from captioning.loggers.jsonl import read_jsonl
from captioning.metrics.exposure import exposure_bias_probe
from captioning.models.captioner import Captioner, build_captioner
from captioning.runtime import distributed as dist_utils
from captioning.runtime.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from captioning.runtime.precision import autocast, autocast_dtype
from captioning.runtime.preemption import PREEMPTION_EXIT_CODE, PreemptionFlag
from captioning.training.objectives import build_objective
from captioning.training.optim import build_optimizer_and_scheduler
from captioning.training.run_logging import open_run_logger

log = logging.getLogger(__name__)


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float = -math.inf
    best_step: int = -1


@dataclass
class TrainingWindow:
    """What happened since the last log record: summed losses and stats (device tensors, read once per record,
    so the step itself never waits for the device), captions, images, time blocked on the loader."""
    steps: int = 0
    captions: int = 0
    images: int = 0
    data_wait: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, values: dict[str, torch.Tensor], captions: int, images: int) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums[name] + value.detach() if name in self.sums else value.detach().clone()
        self.steps += 1
        self.captions += captions
        self.images += images


@dataclass
class TrainingState:
    """Everything a training run holds; the checkpoint is `checkpoint_dict(state)`."""
    cfg: DictConfig
    run_dir: Path
    info: dist_utils.DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    records: dict[str, list]
    vocab: Vocabulary
    sampler: data_build.ResumableSampler
    loader: Any
    steps_per_epoch: int
    total_steps: int
    model: Captioner
    objective: torch.nn.Module
    train_forward: Any  # the objective, DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    config: dict  # the resolved config, saved in checkpoints and logged
    progress: Progress = field(default_factory=Progress)
    step_settings: dict[str, float] = field(default_factory=dict)  # what the latest optimizer step used
    window: TrainingWindow = field(default_factory=TrainingWindow)
    logger: Any = None
    bad_images: BadImageTracker | None = None
    preemption: PreemptionFlag | None = None
    bar: Any = None
    reference_loader: Any = None  # the val references for the exposure probe, built at the first validation
    scenes: dict | None = None  # synthetic data: image_id -> the scene, for the scene truth checker

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def deferred(self) -> bool:
        return self.cfg.trainer.scoring == "deferred"


# -- set-up ------------------------------------------------------------------------------------------------
def setup(cfg: DictConfig, run_dir: str | Path) -> TrainingState:
    """Check the config, join the process group, build data, model, objective and optimizer (in this order:
    the random initialisation depends on it)."""
    validate_train_config(cfg)
    cfg = data_build.prepare_inputs(cfg)
    if cfg.trainer.scoring != "deferred":
        from captioning.metrics import check_java

        check_java()  # before any heavy work: validation and evaluation need pycocoevalcap's Java tools
    info = dist_utils.init_distributed(device=str(cfg.trainer.device))
    run_dir = Path(dist_utils.broadcast_object(str(run_dir), info))  # rank 0's: ${now} in a path may differ by rank
    device = dist_utils.pick_device(str(cfg.trainer.device), info)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.trainer.cudnn_benchmark)  # fixed image size: autotune once
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    torch.manual_seed(cfg.seed)

    # Data: records, vocabulary from the train split only, the training loader.
    records = data_build.load_records(cfg.data)
    vocab = data_build.build_vocab(records["train"], cfg.data)
    items = data_build.encoded_train_items(records["train"], vocab, cfg.data)
    dataset = data_build.train_dataset(items, vocab, cfg.data, cfg.seed)
    sampler = data_build.ResumableSampler(len(dataset), cfg.seed, True, info.rank, info.world_size)
    loader = data_build.make_loader(dataset, cfg.data.batch_size, cfg.data.num_workers, sampler, drop_last=True,
                                    pin_memory=device.type == "cuda", seed=cfg.seed)
    steps_per_epoch = len(dataset) // info.world_size // cfg.data.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is larger than the training split "
                         f"({len(dataset)} images over {info.world_size} process(es))")
    total_steps = int(min(cfg.trainer.max_steps or math.inf, (cfg.trainer.max_epochs or math.inf) * steps_per_epoch))

    # Model and objective.
    feature_store = open_feature_store(cfg.data)
    if feature_store is not None:
        feature_store.check([r.image_id for split in records.values() for r in split], cfg.model.encoder, cfg.data)
    model = build_captioner(cfg.model, len(vocab), feature_store.feature_dim if feature_store else None).to(device)
    model.encoder.to(memory_format=memory_format)
    objective = build_objective(cfg, model, cuda_graphs=cfg.trainer.cuda_graphs and device.type == "cuda")
    train_forward = wrap_for_training(objective, cfg, info, device)
    if info.enabled:  # same initial weights everywhere (above), but each rank its own dropout and sampling draws
        torch.manual_seed(cfg.seed + 1_000_003 * info.rank)
    unfreeze_at = cfg.model.encoder.get("unfreeze_after_steps")
    optimizer, lr_scheduler = build_optimizer_and_scheduler(model, cfg.optim, total_steps, unfreeze_at is not None)
    amp_dtype = autocast_dtype(cfg.trainer.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return TrainingState(cfg, run_dir, info, device, amp_dtype, memory_format, records, vocab, sampler, loader,
                         steps_per_epoch, total_steps, model, objective, train_forward, optimizer, lr_scheduler, scaler,
                         OmegaConf.to_container(cfg, resolve=True))


def wrap_for_training(objective: torch.nn.Module, cfg: DictConfig, info, device: torch.device):
    """DDP registers the parameters that need gradients when it is built: rebuilt when the encoder unfreezes."""
    forward = objective
    if info.enabled:
        forward = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(forward, mode=cfg.trainer.compile_mode) if cfg.trainer.compile else forward


def maybe_unfreeze(state: TrainingState) -> None:
    unfreeze_at = state.cfg.model.encoder.get("unfreeze_after_steps")
    if unfreeze_at is not None and state.progress.step >= unfreeze_at and not state.model.encoder.trainable:
        state.model.encoder.set_trainable(True)
        state.model.encoder.train()
        state.train_forward = wrap_for_training(state.objective, state.cfg, state.info, state.device)
        log.info("step %d: encoder unfrozen (model.encoder.unfreeze_after_steps=%d)", state.progress.step, unfreeze_at)


def resume_path(state: TrainingState) -> Path | None:
    """RUN_DIR/checkpoints/last.pt under `trainer.resume=auto` when it exists, the given file, or None."""
    resume = str(state.cfg.trainer.resume)
    if resume == "auto":
        last = state.checkpoint_dir / "last.pt"
        return last if last.is_file() else None
    return None if resume == "never" else Path(resume).expanduser()


def resume(state: TrainingState) -> None:
    """Restore model, optimizer, scheduler, scaler, progress and every rank's random streams; drop metrics
    records written after the checkpoint (a killed run will write them again)."""
    path = resume_path(state)
    if path is not None:
        checkpoint = load_checkpoint(path, map_location=state.device)
        load_training_state(state, checkpoint, path)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, state.progress.step, state.progress.epoch,
                 state.progress.batch_in_epoch)
        metrics_file = state.run_dir / "metrics.jsonl"
        if state.info.is_main and metrics_file.is_file():
            kept = [r for r in read_jsonl(metrics_file) if r["step"] <= state.progress.step]
            metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
    state.step_settings = state.objective.step_settings(state.progress.step, state.progress.epoch)
    maybe_unfreeze(state)  # a run resumed past the unfreezing step


def load_training_state(state: TrainingState, checkpoint: dict, path: Path) -> None:
    if checkpoint["vocab"]["itos"] != state.vocab.itos:
        raise ValueError(f"trainer.resume: {path} was trained with a different vocabulary "
                         "(other data or data.word_count_threshold)")
    state.model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    if state.lr_scheduler and checkpoint["lr_scheduler"]:
        state.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    state.scaler.load_state_dict(checkpoint["scaler"])
    state.progress = Progress(checkpoint["step"], checkpoint["epoch"], checkpoint["batch_in_epoch"],
                              checkpoint["best_metric"], checkpoint["best_step"])
    rng = checkpoint["rng"] if isinstance(checkpoint["rng"], list) else [checkpoint["rng"]]
    info = state.info
    if len(rng) != info.world_size:
        log.warning("resuming %d process(es) from a checkpoint of %d: random streams restart from rank 0's",
                    info.world_size, len(rng))
    restore_rng_state(rng[info.rank] if len(rng) == info.world_size else rng[0])


def start_logging(state: TrainingState) -> None:
    """Loggers (rank 0), the bad-image tracker, the preemption flag and the progress bar."""
    cfg = state.cfg
    state.logger = open_run_logger(cfg, state.run_dir, state.info.is_main, state.config,
                                   lambda: {f"train/{k}": v for k, v in state.step_settings.items()})
    if state.info.is_main:
        log.info("vocabulary: %d words (count > %d in the train split); %d training images, %d steps per epoch, "
                 "%d steps; objective: %s", len(state.vocab), cfg.data.word_count_threshold,
                 len(state.loader.dataset), state.steps_per_epoch, state.total_steps, state.objective.describe())
    state.bad_images = BadImageTracker(cfg.data.on_bad_image)
    state.preemption = PreemptionFlag()
    state.bar = tqdm(total=state.total_steps, initial=state.progress.step, dynamic_ncols=True, desc="train",
                     disable=not (state.info.is_main and cfg.trainer.progress_bar))
    state.window = TrainingWindow()
    state.scenes = data_build.load_scene_truth(cfg.data)


# -- the loop ------------------------------------------------------------------------------------------------
def training_batches(state: TrainingState) -> Iterator[dict]:
    """Batches from where the run stands (epoch, batch in epoch), epoch after epoch; the caller stops. A batch of
    only bad images is skipped on every rank together (or DDP would hang)."""
    progress, window = state.progress, state.window
    while True:
        state.sampler.set_epoch(progress.epoch, start=progress.batch_in_epoch * state.cfg.data.batch_size)
        fetch_start = time.perf_counter()
        for batch in state.loader:
            window.data_wait += time.perf_counter() - fetch_start  # blocked on the loader: the device starves
            state.bad_images(batch)
            progress.batch_in_epoch += 1
            if not dist_utils.any_rank(batch["size"] == 0, state.info):
                yield batch
            fetch_start = time.perf_counter()
        progress.epoch += 1
        progress.batch_in_epoch = 0


def train_step(state: TrainingState, batch: dict) -> None:
    """One optimizer step on one batch: forward under autocast, backward (scaled for fp16), clipping, update."""
    maybe_unfreeze(state)
    cfg, progress = state.cfg, state.progress
    state.step_settings = state.objective.step_settings(progress.step, progress.epoch)
    images = batch["images"].to(state.device, non_blocking=True, memory_format=state.memory_format)
    targets = batch["targets"].to(state.device, non_blocking=True)
    with autocast(state.device, state.amp_dtype):
        loss, stats = state.train_forward(images, targets, **state.step_settings)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if cfg.optim.grad_clip_norm:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.lr_scheduler:
        state.lr_scheduler.step()
    progress.step += 1
    state.window.add({"loss": loss, **stats}, targets.shape[0] * targets.shape[1], targets.shape[0])
    state.bar.update(1)


def due(state: TrainingState, every: int) -> bool:
    return state.progress.step % every == 0 or state.progress.step == state.total_steps


def log_progress(state: TrainingState) -> None:
    """One `train/` record over the window since the last one: means over steps (and ranks), throughput."""
    window, info = state.window, state.info
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    metrics = dist_utils.all_reduce_mean({f"train/{k}": v.item() / window.steps for k, v in window.sums.items()},
                                         info, state.device)
    metrics["train/captions_per_s"] = window.captions * info.world_size / elapsed
    metrics["train/images_per_s"] = window.images * info.world_size / elapsed
    # Share of the wall time spent waiting for the next batch (> 0.1: the loader limits the step).
    metrics["train/data_wait_fraction"] = min(1.0, window.data_wait / elapsed)
    metrics["train/lr"] = state.optimizer.param_groups[0]["lr"]
    metrics["train/epoch"] = state.progress.epoch + state.progress.batch_in_epoch / state.steps_per_epoch
    state.logger.log_metrics(metrics, state.progress.step)
    state.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", cap_s=f"{metrics['train/captions_per_s']:.0f}",
                          **{k: f"{v:.3f}" for k, v in state.step_settings.items()})
    state.window = TrainingWindow()


def validate(state: TrainingState) -> dict[str, float]:
    """Greedy-decode the val split (at most trainer.val_max_images), score it (or write it for deferred scoring),
    run the exposure probe; every rank gets rank 0's `val/` metrics."""
    cfg, info, model = state.cfg, state.info, state.model
    val_records = state.records["val"][: cfg.trainer.val_max_images or None]
    dist_utils.broadcast_buffers(model, info)  # BatchNorm running stats: every rank decodes with rank 0's
    captions = decode_records(model, val_records, state.vocab, cfg.data, "greedy", {"max_len": cfg.data.max_len},
                              state.device, info, autocast_dtype=state.amp_dtype)
    metrics = {}
    if info.is_main:
        predictions = {i: hyps[0][0] for i, hyps in captions.items()}
        if state.deferred:  # scored later, where Java is (tools/score_runs.py)
            write_results(state.run_dir / "val_results" / f"step_{state.progress.step:08d}.json", captions)
        else:
            metrics = {f"val/{k}": v for k, v in score(references_of(val_records, predictions), predictions).items()}
        if state.scenes is not None:  # synthetic data: the exact truth, no Java needed
            metrics.update({f"val/{k}": v for k, v in scene_truth(predictions, state.scenes).items()})
        if state.reference_loader is None:
            state.reference_loader = data_build.reference_loader(val_records, state.vocab, cfg.data)
        with autocast(state.device, state.amp_dtype):
            exposure = exposure_bias_probe(model, state.reference_loader, state.device, cfg.data.max_len)
        metrics.update({f"val/{k}": v for k, v in exposure.summary().items()})
        state.logger.log_table("val/samples", ["image", "generated", "references"],  # W&B sends a few of them
                               sample_rows(val_records, captions, 16), state.progress.step)
    return dist_utils.gather_objects(metrics, info)[0]


def checkpoint_dict(state: TrainingState, rng_per_rank: list) -> dict:
    """Everything to resume, in one dict; `rng_per_rank` from `gather_rng` (every rank's random streams)."""
    p = state.progress
    return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "lr_scheduler": state.lr_scheduler.state_dict() if state.lr_scheduler else None,
            "scaler": state.scaler.state_dict(), "step": p.step, "epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch,
            "best_metric": p.best_metric, "best_step": p.best_step, "objective": state.objective.name,
            # the per-step settings of the step that produced these weights, as the metrics records carry them
            "last_step_settings": dict(state.step_settings),
            "rng": rng_per_rank, "vocab": state.vocab.state_dict(), "config": state.config}


def gather_rng(state: TrainingState) -> list:
    return dist_utils.gather_objects(capture_rng_state(), state.info)  # a collective: all ranks call it


def save(state: TrainingState, names: tuple[str, ...] = ("last.pt",)) -> None:
    """Every rank gathers its random streams; rank 0 writes RUN_DIR/checkpoints/NAME for each name."""
    rng_per_rank = gather_rng(state)
    if state.info.is_main:
        checkpoint = checkpoint_dict(state, rng_per_rank)
        for name in names:
            save_checkpoint(checkpoint, state.checkpoint_dir / name)


def validate_and_save(state: TrainingState) -> None:
    """Validate, log, keep the best by `trainer.monitor` (deferred scoring: the latest), save last.pt (+ best.pt)."""
    started = time.perf_counter()
    cfg, progress = state.cfg, state.progress
    metrics = validate(state)
    state.logger.log_metrics(metrics, progress.step)
    value = metrics.get(cfg.trainer.monitor, progress.step if state.deferred else None)
    if value is None:
        raise ValueError(f"trainer.monitor: {cfg.trainer.monitor} is not among the validation metrics {sorted(metrics)}")
    improved = value > progress.best_metric
    if improved:
        progress.best_metric, progress.best_step = value, progress.step
    save(state, ("last.pt", "best.pt") if improved else ("last.pt",))
    if state.info.is_main:
        state.bar.write(f"step {progress.step}: " + "  ".join(
            f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("val/")))
    dist_utils.barrier(state.info)
    state.window.start += time.perf_counter() - started  # throughput counts training only


def preempted(state: TrainingState) -> bool:
    """A signal on any rank: every rank stops at the same step."""
    return dist_utils.any_rank(state.preemption.requested, state.info)


def stop_for_requeue(state: TrainingState, summary: dict) -> dict:
    """After a preemption signal: save last.pt, close, and ask for the requeue (exit code 124)."""
    save(state)
    if state.info.is_main:
        log.warning("%s received: saved %s at step %d; exiting for requeue",
                    state.preemption.signal_name or "a signal (on another rank)", state.checkpoint_dir / "last.pt",
                    state.progress.step)
    state.logger.finish()
    dist_utils.cleanup(state.info)
    summary.update(preempted=True, exit_code=PREEMPTION_EXIT_CODE)
    if state.preemption.requested:  # the rank that got the signal asks for the requeue
        summary["requeue"] = state.preemption.request_requeue()
    return summary


def final_test(state: TrainingState) -> dict[str, float]:
    """The best checkpoint on the test split with the `decode` config: written, printed and logged (rank 0)."""
    dist_utils.barrier(state.info)
    evaluation = evaluate_checkpoint(state.checkpoint_dir / "best.pt", "test", state.cfg.decode, device=state.device,
                                     info=state.info, records=state.records, score_now=not state.deferred)
    if evaluation is None:  # not rank 0
        return {}
    report_evaluation(evaluation, state.run_dir, state.logger, state.progress.step)
    return evaluation.keyed()


def summary_of(state: TrainingState) -> dict:
    p = state.progress
    return {"run_dir": str(state.run_dir), "steps": p.step, "best_step": p.best_step, "best_metric": p.best_metric,
            "skipped_images": len(state.bad_images.skipped), "preempted": False}


# -- the run -------------------------------------------------------------------------------------------------
def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train, validate every `trainer.val_every_n_steps`, keep last/best checkpoints; then (optionally)
    evaluate the best checkpoint on the test split. Returns a summary dict (`exit_code` 124 after a
    preemption signal: requeue me)."""
    state = setup(cfg, run_dir)
    resume(state)
    start_logging(state)
    stopped_by_signal = False
    state.model.train()
    try:
        if state.progress.step < state.total_steps:
            for batch in training_batches(state):
                train_step(state, batch)
                if due(state, cfg.trainer.log_every_n_steps):
                    log_progress(state)
                if due(state, cfg.trainer.val_every_n_steps):
                    validate_and_save(state)
                if state.progress.step >= state.total_steps:
                    break
                if preempted(state):
                    stopped_by_signal = True
                    break
    finally:
        state.bar.close()
        if not stopped_by_signal:
            state.preemption.restore()
    summary = summary_of(state)
    if stopped_by_signal:
        return stop_for_requeue(state, summary)
    if cfg.trainer.evaluate_after_training:
        summary["test"] = final_test(state)
    state.logger.finish()
    dist_utils.cleanup(state.info)
    return summary
