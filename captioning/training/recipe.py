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

from captioning.config import check_task_matches_data, validate_train_config
from captioning.data import build as data_build
from captioning.data.dataset import BadImageTracker
from captioning.data.features import open_feature_store
from captioning.data.vocab import Vocabulary
from captioning.evaluation.captions import decode_records, references_of, score, write_results
from captioning.evaluation.evaluate import evaluate_checkpoint, run_exposure_probes, scene_truth
from captioning.evaluation.reports import report_evaluation, sample_rows
from captioning.loggers.jsonl import read_jsonl
from captioning.models.captioner import Captioner, build_captioner
from captioning.runtime import distributed as dist_utils
from captioning.runtime.checkpoint import (capture_rng_state, load_newest_usable, previous_path, probe_writable,
                                          restore_rng_state, save_checkpoint)
from captioning.runtime.precision import autocast, autocast_dtype
from captioning.runtime.preemption import PREEMPTION_EXIT_CODE, PreemptionFlag
from captioning.scenes.generator import load_scene_truth
from captioning.scenes.pretraining import prepare_inputs
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
    """What happened since the last log record: summed losses and stats of the steps whose loss was finite
    (device tensors, read once per record, so the step itself never waits for the device), captions, images,
    time blocked on the loader."""
    steps: int = 0
    captions: int = 0
    images: int = 0
    data_wait: float = 0.0
    tokens: int = 0  # language model (task=lm): target tokens read
    start: float = field(default_factory=time.perf_counter)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    finite_steps: torch.Tensor | None = None

    def add(self, values: dict[str, torch.Tensor], finite: torch.Tensor, captions: int, images: int) -> None:
        for name, value in values.items():
            value = torch.where(finite, value.detach(), 0.0)
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.finite_steps = finite.long() if self.finite_steps is None else self.finite_steps + finite.long()
        self.steps += 1
        self.captions += captions
        self.images += images


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss (or the gradient) was NaN or inf and `trainer.on_nonfinite` says stop."""


@dataclass
class NonFiniteGuard:
    """Device-side record of non-finite steps (no host synchronisation per step): the total, the current run of
    them in a row, the longest run, and the first bad step and its loss; the grad scaler's own skips (fp16)."""
    total: torch.Tensor
    in_a_row: torch.Tensor
    longest: torch.Tensor
    first_step: torch.Tensor
    first_loss: torch.Tensor
    scaler_skips: torch.Tensor

    @classmethod
    def on(cls, device: torch.device) -> "NonFiniteGuard":
        zero = torch.zeros((), dtype=torch.long, device=device)
        return cls(zero.clone(), zero.clone(), zero.clone(), zero - 1, torch.zeros((), device=device), zero.clone())

    def record(self, finite: torch.Tensor, loss: torch.Tensor, step: int) -> None:
        bad = (~finite).long()
        self.total += bad
        self.in_a_row.copy_((self.in_a_row + 1) * bad)
        torch.maximum(self.longest, self.in_a_row, out=self.longest)
        first = (self.first_step < 0) & ~finite
        self.first_step.copy_(torch.where(first, step, self.first_step))
        self.first_loss.copy_(torch.where(first, loss.detach().float(), self.first_loss))


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
    guard: NonFiniteGuard | None = None
    last_checkpoint_time: float = field(default_factory=time.monotonic)
    reference_loader: Any = None  # the val references for the exposure probes, built at the first validation
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
    check_task_matches_data(cfg)
    if cfg.trainer.scoring != "deferred":
        from captioning.metrics import check_java

        check_java()  # before any heavy work: validation and evaluation need pycocoevalcap's Java tools
    cfg = prepare_inputs(cfg)  # on synthetic data: the pretrained encoder's features (built once)
    info = dist_utils.init_distributed(device=str(cfg.trainer.device), timeout_minutes=cfg.trainer.dist_timeout_minutes)
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
    objective = build_objective(cfg, model, cuda_graphs=cfg.trainer.cuda_graphs and device.type == "cuda",
                                records=records["train"], vocab=vocab)
    warn_if_schedule_barely_moves(objective, total_steps, steps_per_epoch)
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


def warn_if_schedule_barely_moves(objective, total_steps: int, steps_per_epoch: int) -> None:
    """A scheduled-sampling run whose epsilon is still above 0.9 at its last step is teacher forcing in all but
    name (e.g. the synthetic k on a COCO-length run, or a short run): say so at start-up."""
    schedule = getattr(objective, "schedule", None)
    if schedule is None or schedule.name == "teacher_forcing":
        return
    last = schedule.teacher_forcing_prob(total_steps - 1, (total_steps - 1) // steps_per_epoch)
    if last > 0.9:
        log.warning("schedule %s ends with teacher_forcing_prob %.3f at step %d: the run is almost pure teacher "
                    "forcing; scale the schedule to the run (e.g. inverse_sigmoid_k, schedule.k)", schedule.name, last,
                    total_steps)


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


def resume_candidates(state: TrainingState) -> list[Path]:
    """Under `trainer.resume=auto`: RUN_DIR/checkpoints/last.pt, then the generation kept back (last.prev.pt), then
    best.pt; the given file; or nothing (`never`)."""
    resume = str(state.cfg.trainer.resume)
    if resume == "auto":
        last = state.checkpoint_dir / "last.pt"
        return [last, previous_path(last), state.checkpoint_dir / "best.pt"]
    return [] if resume == "never" else [Path(resume).expanduser()]


def resume(state: TrainingState) -> None:
    """Restore model, optimizer, scheduler, scaler, progress and every rank's random streams from the newest
    usable checkpoint (an unreadable or inconsistent one is reported by name and the previous one used); drop
    metrics records written after it (a killed run will write them again)."""
    candidates = resume_candidates(state)
    found = load_newest_usable(candidates, state.device, lambda ckpt, path: check_resumable(state, ckpt, path))
    if found is None and str(state.cfg.trainer.resume) not in ("auto", "never"):
        raise FileNotFoundError(f"trainer.resume: checkpoint not found: {candidates[0]}")
    if found is not None:
        checkpoint, path = found
        load_training_state(state, checkpoint)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, state.progress.step, state.progress.epoch,
                 state.progress.batch_in_epoch)
    if state.info.is_main:  # a run killed before its first checkpoint starts again from step 0: the same rule
        metrics_file = state.run_dir / "metrics.jsonl"
        if metrics_file.is_file():
            kept = [r for r in read_jsonl(metrics_file) if r["step"] <= state.progress.step]
            metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
        for partial in state.checkpoint_dir.glob(".*.pt.*.tmp"):  # a write that a kill cut short
            log.warning("removing %s: a checkpoint write that did not finish", partial)
            partial.unlink(missing_ok=True)
    state.step_settings = state.objective.step_settings(state.progress.step, state.progress.epoch)
    maybe_unfreeze(state)  # a run resumed past the unfreezing step


def check_resumable(state: TrainingState, checkpoint: dict, path: Path) -> None:
    """ValueError if `checkpoint` cannot continue this run: another vocabulary, missing entries, non-finite weights."""
    missing = [k for k in ("optimizer", "scaler", "rng", "epoch", "batch_in_epoch", "best_metric") if k not in checkpoint]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not a training checkpoint")
    if checkpoint["vocab"]["itos"] != state.vocab.itos:
        raise ValueError(f"{path} was trained with a different vocabulary (other data or data.word_count_threshold)")
    if not all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point()):
        raise ValueError(f"{path} holds non-finite weights")


def load_training_state(state: TrainingState, checkpoint: dict) -> None:
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
    if hasattr(state.objective, "load_checkpoint_state"):
        state.objective.load_checkpoint_state(checkpoint)


def start_logging(state: TrainingState) -> None:
    """Loggers (rank 0), the bad-image tracker, the preemption flag and the progress bar."""
    cfg = state.cfg
    state.logger = open_run_logger(cfg, state.run_dir, state.info.is_main, state.config,
                                   lambda: {f"train/{k}": v for k, v in state.step_settings.items()})
    if state.info.is_main:
        log.info("vocabulary: %d words (count > %d in the train split); %d training images, %d steps per epoch, "
                 "%d steps; objective: %s", len(state.vocab), cfg.data.word_count_threshold,
                 len(state.loader.dataset), state.steps_per_epoch, state.total_steps, state.objective.describe())
    if state.info.is_main:
        probe_writable(state.checkpoint_dir)  # an unwritable or full run folder stops the run now, not at a save
    state.guard = NonFiniteGuard.on(state.device)
    state.last_checkpoint_time = time.monotonic()
    state.bad_images = BadImageTracker(cfg.data.on_bad_image)
    state.preemption = PreemptionFlag()
    state.bar = tqdm(total=state.total_steps, initial=state.progress.step, dynamic_ncols=True, desc="train",
                     disable=not (state.info.is_main and show_progress_bar(cfg.trainer.progress_bar)))
    state.window = TrainingWindow()
    state.scenes = load_scene_truth(cfg.data)


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
    """One optimizer step on one batch: forward under autocast, backward (scaled for fp16), clipping, update. A
    step whose loss or gradient is not finite changes nothing (NonFiniteGuard counts it; fp16's scaler skips too)."""
    maybe_unfreeze(state)
    cfg, progress = state.cfg, state.progress
    state.step_settings = state.objective.step_settings(progress.step, progress.epoch)
    images = batch["images"].to(state.device, non_blocking=True, memory_format=state.memory_format)
    targets = batch["targets"].to(state.device, non_blocking=True)
    buffers = updated_buffers(state.model)  # BatchNorm statistics: the forward pass moves them
    buffers_before = [b.detach().clone() for b in buffers]
    with autocast(state.device, state.amp_dtype):
        loss, stats = state.train_forward(images, targets, image_ids=batch["image_ids"], **state.step_settings)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.unscale_(state.optimizer)  # a no-op without fp16
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip_norm or math.inf)
    finite = torch.isfinite(loss.detach())
    if not state.scaler.is_enabled():  # with fp16, non-finite gradients are the scaler's business (skip, rescale)
        finite = finite & torch.isfinite(grad_norm)
    apply_update_if(state, finite)
    keep_buffers_if(buffers, buffers_before, finite)
    if state.lr_scheduler:
        state.lr_scheduler.step()
    state.guard.record(finite, loss, progress.step + 1)
    progress.step += 1
    state.window.add({"loss": loss, **stats}, finite, targets.shape[0] * targets.shape[1], targets.shape[0])
    state.bar.update(1)


def updated_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers a training forward pass updates: those of BatchNorm layers in training mode."""
    return [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
            for b in m.buffers(recurse=False)]


def keep_buffers_if(buffers: list[torch.Tensor], before: list[torch.Tensor], finite: torch.Tensor) -> None:
    """A skipped (non-finite) step leaves the BatchNorm statistics as they were, as it leaves the weights."""
    if buffers and (finite.device.type == "cuda" or not bool(finite)):  # on a CPU asking is free
        restore_where_not(finite, buffers, before)


def restore_where_not(finite: torch.Tensor, tensors: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    """Each tensor back to its copy in `before` where `finite` (a device bool) is false, without waiting on it."""
    with torch.no_grad():
        for tensor, old in zip(tensors, before):
            tensor.copy_(torch.where(finite, tensor, old))


def apply_update_if(state: TrainingState, finite: torch.Tensor) -> None:
    """The optimizer (and grad scaler) step, kept only where `finite` (a device bool). On a CPU, asking is free;
    on a GPU the weights and optimizer state are put back from a copy where not finite, so the step never waits."""
    optimizer, scaler = state.optimizer, state.scaler
    if state.device.type != "cuda":
        if bool(finite):
            scaler.step(optimizer)
        scaler.update()
        return
    kept = [t for group in optimizer.param_groups for p in group["params"]
            for t in (p, *(v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)))]
    before = [t.detach().clone() for t in kept]
    scale = scaler._scale.clone() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    restore_where_not(finite, kept, before)
    if scale is not None:  # the scaler lowered its scale: it skipped this step (inf/NaN gradients under fp16)
        state.guard.scaler_skips += (scaler._scale < scale).long()


def check_finite(state: TrainingState) -> tuple[dict[str, float], NonFiniteLossError | None]:
    """At the logging cadence (one read of the guard): `train/nonfinite_steps` so far, and the stop that
    `trainer.on_nonfinite` asks for (stop: at the first; skip: after `trainer.max_nonfinite_in_a_row` in a row)."""
    g, t = state.guard, state.cfg.trainer
    total, longest, first_step, first_loss = int(g.total), int(g.longest), int(g.first_step), float(g.first_loss)
    figures = {"train/nonfinite_steps": float(total)}
    if state.scaler.is_enabled():
        figures["train/scaler_skipped_steps"] = float(g.scaler_skips)
    if total and (t.on_nonfinite == "stop" or longest >= t.max_nonfinite_in_a_row):
        why = ("trainer.on_nonfinite=stop" if t.on_nonfinite == "stop"
               else f"{longest} steps in a row (trainer.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row})")
        return figures, NonFiniteLossError(
            f"training diverged: the loss or gradient was not finite at step {first_step} (loss {first_loss}), "
            f"{total} such step(s) so far, {why}; their updates were not applied and no checkpoint holds them. "
            f"Try a lower learning rate (optim.optimizer.lr), gradient clipping (optim.grad_clip_norm), or "
            f"trainer.precision=fp32/bf16 instead of fp16")
    return figures, None


def show_progress_bar(setting) -> bool:
    """`trainer.progress_bar`: true, false, or auto (a bar only when stderr is a terminal: SLURM log files get
    one line per log record instead of thousands of redraws)."""
    import sys

    return sys.stderr.isatty() if str(setting) == "auto" else bool(setting)


def due(state: TrainingState, every: int) -> bool:
    return state.progress.step % every == 0 or state.progress.step == state.total_steps


def log_progress(state: TrainingState) -> None:
    """One `train/` record over the window since the last one: means over its finite steps (and ranks),
    throughput, the non-finite count; stops a diverged run (NonFiniteLossError)."""
    window, info = state.window, state.info
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    finite_steps = int(window.finite_steps) if window.finite_steps is not None else 0
    means = {f"train/{k}": v.item() / finite_steps if finite_steps else math.nan for k, v in window.sums.items()}
    metrics = {k: v for k, v in dist_utils.all_reduce_mean(means, info, state.device).items() if math.isfinite(v)}
    finite_figures, divergence = check_finite(state)
    metrics.update(finite_figures)
    metrics["train/captions_per_s"] = window.captions * info.world_size / elapsed
    metrics["train/images_per_s"] = window.images * info.world_size / elapsed
    if window.tokens:  # a language model (task=lm)
        metrics["train/tokens_per_s"] = window.tokens * info.world_size / elapsed
    # Share of the wall time spent waiting for the next batch (> 0.1: the loader limits the step).
    metrics["train/data_wait_fraction"] = min(1.0, window.data_wait / elapsed)
    metrics["train/lr"] = state.optimizer.param_groups[0]["lr"]
    metrics["train/epoch"] = state.progress.epoch + state.progress.batch_in_epoch / state.steps_per_epoch
    state.logger.log_metrics(metrics, state.progress.step)
    state.bar.set_postfix(loss=f"{metrics.get('train/loss', math.nan):.3f}",
                          cap_s=f"{metrics['train/captions_per_s']:.0f}",
                          **{k: f"{v:.3f}" for k, v in state.step_settings.items()})
    if state.bar.disable and state.info.is_main:  # batch jobs: one line per record instead of a redrawn bar
        log.info("step %d/%d  loss %s  %s  %.0f captions/s", state.progress.step, state.total_steps,
                 f"{metrics['train/loss']:.4f}" if "train/loss" in metrics else "n/a",
                 "  ".join(f"{k} {v:.3f}" for k, v in state.step_settings.items()), metrics["train/captions_per_s"])
    state.window = TrainingWindow()
    if divergence is not None:  # after the record: the log shows the steps that led here
        raise divergence


def validate(state: TrainingState) -> dict[str, float]:
    """Greedy-decode the val split (at most trainer.val_max_images), score it (or write it for deferred scoring),
    run the exposure probes (without the oracle's prefix swap, which the final test runs); every rank gets rank
    0's `val/` metrics."""
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
            metrics = {f"val/{k}": v for k, v in score_or_record_failure(val_records, predictions).items()}
        if state.scenes is not None:  # synthetic data: the exact truth, no Java needed
            metrics.update({f"val/{k}": v for k, v in scene_truth(predictions, state.scenes).items()})
        if state.reference_loader is None:
            state.reference_loader = data_build.reference_loader(val_records, state.vocab, cfg.data)
        with autocast(state.device, state.amp_dtype):
            exposure = run_exposure_probes(model, state.vocab, state.reference_loader, cfg.data.max_len, state.device,
                                           state.scenes, val_records, prefix_swap=False)
        metrics.update({f"val/{k}": v for k, v in exposure.summary().items()})
        state.logger.log_table("val/samples", ["image", "generated", "references"],  # W&B sends a few of them
                               sample_rows(val_records, captions, 16), state.progress.step)
    return dist_utils.gather_objects(metrics, info)[0]


def score_or_record_failure(records, predictions: dict[int, str]) -> dict[str, float]:
    """The COCO scores; if a Java process (the PTB tokenizer, METEOR) dies, once more with a fresh METEOR, and if
    that fails too, {"scoring_failed": 1.0}: the validation is recorded as failed and training goes on."""
    from captioning.metrics import close_meteor

    for attempt in (1, 2):
        try:
            return score(references_of(records, predictions), predictions)
        except (RuntimeError, OSError, BrokenPipeError) as e:
            close_meteor()  # the next call starts a new JVM
            log.warning("validation scoring failed (attempt %d of 2): %s", attempt, e)
    log.error("validation scoring failed twice: recorded as val/scoring_failed; training goes on")
    return {"scoring_failed": 1.0}


def checkpoint_dict(state: TrainingState, rng_per_rank: list) -> dict:
    """Everything to resume, in one dict; `rng_per_rank` from `gather_rng` (every rank's random streams)."""
    p = state.progress
    return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "lr_scheduler": state.lr_scheduler.state_dict() if state.lr_scheduler else None,
            "scaler": state.scaler.state_dict(), "step": p.step, "epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch,
            "best_metric": p.best_metric, "best_step": p.best_step, "objective": state.objective.name,
            # the per-step settings of the step that produced these weights, as the metrics records carry them
            "last_step_settings": dict(state.step_settings),
            "rng": rng_per_rank, "vocab": state.vocab.state_dict(), "config": state.config,
            # an objective's own resumable state (the language model's carried recurrent state)
            **(state.objective.checkpoint_state() if hasattr(state.objective, "checkpoint_state") else {})}


def gather_rng(state: TrainingState) -> list:
    return dist_utils.gather_objects(capture_rng_state(), state.info)  # a collective: all ranks call it


def save(state: TrainingState, names: tuple[str, ...] = ("last.pt",)) -> None:
    """Every rank gathers its random streams; rank 0 writes RUN_DIR/checkpoints/NAME for each name (last.pt keeps
    its previous generation as last.prev.pt). Weights or buffers (BatchNorm statistics) that are not finite are
    never written."""
    rng_per_rank = gather_rng(state)
    if state.info.is_main:
        bad = [name for name, v in state.model.state_dict().items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteLossError(f"training diverged: at step {state.progress.step} the model's {bad[0]} ({len(bad)} "
                                     f"tensors in all) is not finite; not saving it (the checkpoints in "
                                     f"{state.checkpoint_dir} are from before). Try a lower learning rate "
                                     "(optim.optimizer.lr), gradient clipping (optim.grad_clip_norm) or fp32")
        checkpoint = checkpoint_dict(state, rng_per_rank)
        for name in names:
            save_checkpoint(checkpoint, state.checkpoint_dir / name, keep_previous=name == "last.pt")
    state.last_checkpoint_time = time.monotonic()


def checkpoint_due(state: TrainingState, clock_says: bool) -> bool:
    """`trainer.checkpoint_every_n_steps`, or `clock_says` (trainer.checkpoint_every_minutes, any rank's clock)."""
    every = state.cfg.trainer.checkpoint_every_n_steps
    return clock_says or bool(every and state.progress.step % every == 0)


def clock_due(state: TrainingState) -> bool:
    minutes = state.cfg.trainer.checkpoint_every_minutes
    return bool(minutes) and time.monotonic() - state.last_checkpoint_time >= 60 * minutes


def validate_and_save(state: TrainingState) -> bool:
    """Validate, log, keep the best by `trainer.monitor` (deferred scoring: the latest), save last.pt (+ best.pt)."""
    started = time.perf_counter()
    cfg, progress = state.cfg, state.progress
    metrics = validate(state)
    state.logger.log_metrics(metrics, progress.step)
    value = metrics.get(cfg.trainer.monitor, progress.step if state.deferred else None)
    if "val/scoring_failed" in metrics:  # no score to compare: keep last.pt only
        value = -math.inf
    elif value is None:
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
    return True


def boundary_flags(state: TrainingState) -> tuple[bool, bool]:
    """(a preemption signal on any rank, the checkpoint clock due on any rank): one exchange per step, so that
    every rank stops, or saves, at the same step."""
    flags = dist_utils.any_rank_flags((state.preemption.requested, clock_due(state)), state.info)
    return flags[0], flags[1]


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


def run_steps(state, batches, step, validate_and_save_now) -> bool:
    """The training loop of every task: `step(state, batch)` for each batch until the run's last step, logging,
    validating (`validate_and_save_now(state)`: True when it saved) and checkpointing on their cadences. True when
    a preemption signal stopped it (its checkpoint is saved: the caller requeues)."""
    cfg = state.cfg
    stopped_by_signal = False
    state.model.train()
    try:
        if state.progress.step < state.total_steps:
            for batch in batches:
                step(state, batch)
                if due(state, cfg.trainer.log_every_n_steps):
                    log_progress(state)
                validated = due(state, cfg.trainer.val_every_n_steps) and validate_and_save_now(state)
                signal_received, clock_says = boundary_flags(state)
                if not validated and checkpoint_due(state, clock_says):
                    save(state)
                if state.progress.step >= state.total_steps:
                    break
                if signal_received:
                    stopped_by_signal = True
                    break
    finally:
        state.bar.close()
        if not stopped_by_signal:
            state.preemption.restore()
    return stopped_by_signal


# -- the run -------------------------------------------------------------------------------------------------
def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train, validate every `trainer.val_every_n_steps`, keep last/best checkpoints; then (optionally)
    evaluate the best checkpoint on the test split. Returns a summary dict (`exit_code` 124 after a
    preemption signal: requeue me)."""
    state = setup(cfg, run_dir)  # task=lm is captioning.training.language_model's (training.tasks.train picks)
    resume(state)
    start_logging(state)
    stopped_by_signal = run_steps(state, training_batches(state), train_step, validate_and_save)
    summary = summary_of(state)
    if stopped_by_signal:
        return stop_for_requeue(state, summary)
    if cfg.trainer.evaluate_after_training:
        summary["test"] = final_test(state)
    state.logger.finish()
    dist_utils.cleanup(state.info)
    return summary
