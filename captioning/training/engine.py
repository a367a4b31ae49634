"""The training engine: what every task's run shares, behind a small task protocol.

    context = start(cfg, run_dir)                   # process group, device, threads, the seed
    task = SomeTask.build(cfg, context)             # the task's data, model, objective (its own order)
    run = Engine(context, task, optimizer, lr_scheduler)   # built in one phase: loggers, guard, window...
    summary = fit(run)                              # resume, the step loop, requeue or the final test

The engine holds progress, the non-finite guard and the guarded update, the checkpoint (one dict: the model,
the optimizer, every rank's random streams and logging window, the task's own state) with save / resume /
requeue, the step loop and the progress records. A task (`Task`) brings batches, one training step (its forward
pass, then `guarded_update` and `record_step`), validation, its part of the checkpoint and the final test.

Everything a record depends on is in the checkpoint, the logging window included: a run resumed at any step
logs the uninterrupted run's records (apart from the wall-clock rates: captions/s, data_wait_fraction).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from captioning.loggers.jsonl import read_jsonl
from captioning.runtime import distributed as dist_utils
from captioning.runtime.checkpoint import (
    capture_rng_state,
    load_newest_usable,
    previous_path,
    probe_writable,
    restore_rng_state,
    save_checkpoint,
)
from captioning.runtime.precision import autocast_dtype
from captioning.runtime.preemption import PREEMPTION_EXIT_CODE, PreemptionFlag
from captioning.training.run_logging import open_run_logger

log = logging.getLogger(__name__)


# -- what a run counts --------------------------------------------------------------------------------------------
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
    tokens (a language model), time blocked on the loader. Saved in checkpoints (`state_dict`): a run resumed
    between two records logs the same next record as the run that was never stopped."""

    steps: int = 0
    captions: int = 0
    images: int = 0
    data_wait: float = 0.0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    finite_steps: torch.Tensor | None = None

    def add(
        self, values: dict[str, torch.Tensor], finite: torch.Tensor, captions: int, images: int, tokens: int = 0
    ) -> None:
        for name, value in values.items():
            value = torch.where(finite, value.detach(), 0.0)
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.finite_steps = finite.long() if self.finite_steps is None else self.finite_steps + finite.long()
        self.steps += 1
        self.captions += captions
        self.images += images
        self.tokens += tokens

    def state_dict(self) -> dict:
        """Plain numbers and CPU tensors (loadable with torch.load(weights_only=True)); `elapsed` instead of the
        clock reading, so the throughput after a resume still covers the whole window."""
        return {
            "steps": self.steps,
            "captions": self.captions,
            "images": self.images,
            "tokens": self.tokens,
            "data_wait": self.data_wait,
            "elapsed": time.perf_counter() - self.start,
            "sums": {name: value.detach().cpu() for name, value in self.sums.items()},
            "finite_steps": None if self.finite_steps is None else self.finite_steps.detach().cpu(),
        }

    @classmethod
    def from_state_dict(cls, saved: dict, device: torch.device) -> TrainingWindow:
        finite_steps = saved["finite_steps"]
        return cls(
            int(saved["steps"]),
            int(saved["captions"]),
            int(saved["images"]),
            float(saved["data_wait"]),
            int(saved["tokens"]),
            time.perf_counter() - float(saved["elapsed"]),
            {name: value.to(device) for name, value in saved["sums"].items()},
            None if finite_steps is None else finite_steps.to(device),
        )


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

    FIELDS = ("total", "in_a_row", "longest", "first_step", "first_loss", "scaler_skips")

    @classmethod
    def on(cls, device: torch.device) -> NonFiniteGuard:
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

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().cpu() for name in self.FIELDS}

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        for name in self.FIELDS:
            getattr(self, name).copy_(saved[name])


# -- the task protocol ----------------------------------------------------------------------------------------------
class Task(Protocol):
    """What a task gives the engine. `model` (its weights are the checkpoint's "model"), `objective` (with
    `step_settings(step, epoch)` and `describe()`), `steps_per_epoch` and `total_steps`."""

    model: torch.nn.Module
    objective: torch.nn.Module
    steps_per_epoch: int
    total_steps: int

    def describe(self) -> str: ...  # the start-up line: data and steps

    def batches(self, run: Engine) -> Iterator[Any]: ...  # from run.progress on, epoch after epoch

    def step(self, run: Engine, batch: Any) -> None: ...  # forward, guarded_update, record_step

    def validate(self, run: Engine) -> dict[str, float]: ...  # val/ metrics, the same on every rank

    def monitored_value(self, metrics: dict[str, float], run: Engine) -> float: ...  # higher is better

    def state_dict(self) -> dict: ...  # the task's part of the checkpoint (vocabulary, objective name...)

    def check_checkpoint(self, checkpoint: dict, path: Path) -> None: ...  # ValueError: cannot continue this run

    def load_state_dict(self, checkpoint: dict, run: Engine) -> None: ...  # at a resume

    def after_resume(self, run: Engine) -> None: ...  # e.g. the encoder unfrozen if the run is past that step

    def final_test(self, run: Engine) -> dict[str, Any]: ...

    def summary(self, run: Engine) -> dict: ...  # the task's entries of the returned summary


@dataclass(frozen=True)
class Context:
    """Where a run runs: its config, folder (rank 0's), process group, device and autocast dtype."""

    cfg: DictConfig
    run_dir: Path
    info: dist_utils.DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None


def start(cfg: DictConfig, run_dir: str | Path) -> Context:
    """Join the process group, pick the device, set the thread count and seed the random streams (every rank the
    same seed: the same initial weights; `Engine` then gives each rank its own streams)."""
    info = dist_utils.init_distributed(device=str(cfg.trainer.device), timeout_minutes=cfg.trainer.dist_timeout_minutes)
    run_dir = Path(dist_utils.broadcast_object(str(run_dir), info))  # rank 0's: ${now} in a path may differ by rank
    device = dist_utils.pick_device(str(cfg.trainer.device), info)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.seed)
    return Context(cfg, run_dir, info, device, autocast_dtype(cfg.trainer.precision, device))


def total_steps(cfg_trainer, steps_per_epoch: int) -> int:
    """The run's length in optimizer steps: `trainer.max_steps` or `trainer.max_epochs` epochs, whichever is first."""
    return int(min(cfg_trainer.max_steps or math.inf, (cfg_trainer.max_epochs or math.inf) * steps_per_epoch))


def wrap_for_training(objective: torch.nn.Module, cfg: DictConfig, info, device: torch.device):
    """DDP registers the parameters that need gradients when it is built: rebuilt when the encoder unfreezes."""
    forward = objective
    if info.enabled:
        forward = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(forward, mode=cfg.trainer.compile_mode) if cfg.trainer.compile else forward


def warn_if_schedule_barely_moves(objective, total_steps: int, steps_per_epoch: int) -> None:
    """A scheduled-sampling run whose epsilon is still above 0.9 at its last step is teacher forcing in all but
    name (e.g. the synthetic k on a COCO-length run, or a short run): say so at start-up."""
    schedule = getattr(objective, "schedule", None)
    if schedule is None or schedule.name == "teacher_forcing":
        return
    last = schedule.teacher_forcing_prob(total_steps - 1, (total_steps - 1) // steps_per_epoch)
    if last > 0.9:
        log.warning(
            "schedule %s ends with teacher_forcing_prob %.3f at step %d: the run is almost pure teacher "
            "forcing; scale the schedule to the run (e.g. inverse_sigmoid_k, schedule.k)",
            schedule.name,
            last,
            total_steps,
        )


def show_progress_bar(setting) -> bool:
    """`trainer.progress_bar`: true, false, or auto (a bar only when stderr is a terminal: SLURM log files get
    one line per log record instead of thousands of redraws)."""
    return sys.stderr.isatty() if str(setting) == "auto" else bool(setting)


class Engine:
    """One training run of one task, complete once built: optimizer, grad scaler, progress, logging window,
    non-finite guard, loggers (rank 0), preemption flag. `fit(run)` resumes and trains it."""

    def __init__(self, context: Context, task: Task, optimizer: torch.optim.Optimizer, lr_scheduler: Any):
        cfg, info = context.cfg, context.info
        self.cfg, self.run_dir, self.info, self.device, self.amp_dtype = (
            cfg,
            context.run_dir,
            info,
            context.device,
            context.amp_dtype,
        )
        self.task, self.model = task, task.model
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.config = OmegaConf.to_container(cfg, resolve=True)  # the resolved config: in checkpoints and logs
        self.progress = Progress()
        self.window = TrainingWindow()
        self.guard = NonFiniteGuard.on(self.device)
        self.step_settings: dict[str, float] = {}  # what the latest optimizer step used (the records carry them)
        if info.enabled:  # same initial weights everywhere, but each rank its own dropout and sampling draws
            torch.manual_seed(cfg.seed + 1_000_003 * info.rank)
        self.logger = open_run_logger(
            cfg,
            self.run_dir,
            info.is_main,
            self.config,
            lambda: {f"train/{k}": v for k, v in self.step_settings.items()},
        )
        if info.is_main:
            log.info(
                "%s; %d steps per epoch, %d steps; objective: %s",
                task.describe(),
                task.steps_per_epoch,
                task.total_steps,
                task.objective.describe(),
            )
            probe_writable(self.checkpoint_dir)  # an unwritable or full run folder stops the run now, not at a save
        self.preemption = PreemptionFlag()
        self.last_checkpoint_time = time.monotonic()
        self.bar = tqdm(
            total=task.total_steps,
            dynamic_ncols=True,
            desc="train",
            disable=not (info.is_main and show_progress_bar(cfg.trainer.progress_bar)),
        )

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def total_steps(self) -> int:
        return self.task.total_steps

    def close(self) -> None:
        """Loggers, the progress bar, the signal handlers, the process group."""
        self.bar.close()
        self.preemption.restore()
        self.logger.finish()
        dist_utils.cleanup(self.info)


# -- the run ------------------------------------------------------------------------------------------------------
def fit(run: Engine) -> dict:
    """Resume, train to the last step (logging, validating, checkpointing on their cadences), then evaluate the
    best checkpoint on the test split (`trainer.evaluate_after_training`). Returns the summary (`exit_code` 124
    after a preemption signal: requeue me)."""
    resume(run)
    stopped_by_signal = run_steps(run)
    summary = {
        "run_dir": str(run.run_dir),
        "steps": run.progress.step,
        "best_step": run.progress.best_step,
        "best_metric": run.progress.best_metric,
        "preempted": False,
        **run.task.summary(run),
    }
    if stopped_by_signal:
        return stop_for_requeue(run, summary)
    if run.cfg.trainer.evaluate_after_training:
        dist_utils.barrier(run.info)
        summary["test"] = run.task.final_test(run)
    run.close()
    return summary


def due(run: Engine, every: int) -> bool:
    return run.progress.step % every == 0 or run.progress.step == run.total_steps


def run_steps(run: Engine) -> bool:
    """The training loop of every task: `task.step(run, batch)` for each batch until the run's last step, logging,
    validating (and saving) and checkpointing on their cadences. True when a preemption signal stopped it (its
    checkpoint is saved: the caller requeues)."""
    cfg, task = run.cfg, run.task
    stopped_by_signal = False
    run.model.train()
    run.bar.reset(total=run.total_steps)  # from where the run stands (a resumed run: its checkpoint's step)
    run.bar.initial = run.bar.n = run.progress.step
    try:
        if run.progress.step < run.total_steps:
            for batch in task.batches(run):
                task.step(run, batch)
                if due(run, cfg.trainer.log_every_n_steps):
                    log_progress(run)
                validated = due(run, cfg.trainer.val_every_n_steps) and validate_and_save(run)
                signal_received, clock_says = boundary_flags(run)
                if not validated and checkpoint_due(run, clock_says):
                    save(run)
                if run.progress.step >= run.total_steps:
                    break
                if signal_received:
                    stopped_by_signal = True
                    break
    finally:
        run.bar.close()
        if not stopped_by_signal:
            run.preemption.restore()
    return stopped_by_signal


# -- one step: the guarded update -------------------------------------------------------------------------------
def guarded_update(run: Engine, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward (scaled for fp16), clipping (`optim.grad_clip_norm`), and the optimizer step, kept only where the
    loss and the gradient are finite (fp16: the scaler's business). Returns (finite: a device bool, grad_norm)."""
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)  # a no-op without fp16
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.optim.grad_clip_norm or math.inf)
    finite = torch.isfinite(loss.detach())
    if not run.scaler.is_enabled():  # with fp16, non-finite gradients are the scaler's business (skip, rescale)
        finite = finite & torch.isfinite(grad_norm)
    apply_update_if(run, finite)
    return finite, grad_norm


def record_step(
    run: Engine,
    loss: torch.Tensor,
    values: dict[str, torch.Tensor],
    finite: torch.Tensor,
    captions: int,
    images: int,
    tokens: int = 0,
) -> None:
    """After the update: the learning-rate schedule, the guard, the step count, the logging window, the bar."""
    if run.lr_scheduler:
        run.lr_scheduler.step()
    run.guard.record(finite, loss, run.progress.step + 1)
    run.progress.step += 1
    run.window.add(values, finite, captions, images, tokens)
    run.bar.update(1)


def apply_update_if(run: Engine, finite: torch.Tensor) -> None:
    """The optimizer (and grad scaler) step, kept only where `finite` (a device bool). On a CPU, asking is free;
    on a GPU the weights and optimizer state are put back from a copy where not finite, so the step never waits."""
    optimizer, scaler = run.optimizer, run.scaler
    if run.device.type != "cuda":
        if bool(finite):
            scaler.step(optimizer)
        scaler.update()
        return
    kept = [
        t
        for group in optimizer.param_groups
        for p in group["params"]
        for t in (p, *(v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)))
    ]
    before = [t.detach().clone() for t in kept]
    scale = scaler._scale.clone() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    restore_where_not(finite, kept, before)
    if scale is not None:  # the scaler lowered its scale: it skipped this step (inf/NaN gradients under fp16)
        run.guard.scaler_skips += (scaler._scale < scale).long()


def updated_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers a training forward pass updates: those of BatchNorm layers in training mode."""
    return [
        b
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
        for b in m.buffers(recurse=False)
    ]


def keep_buffers_if(buffers: list[torch.Tensor], before: list[torch.Tensor], finite: torch.Tensor) -> None:
    """A skipped (non-finite) step leaves the BatchNorm statistics as they were, as it leaves the weights."""
    if buffers and (finite.device.type == "cuda" or not bool(finite)):  # on a CPU asking is free
        restore_where_not(finite, buffers, before)


def restore_where_not(finite: torch.Tensor, tensors: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    """Each tensor back to its copy in `before` where `finite` (a device bool) is false, without waiting on it."""
    with torch.no_grad():
        for tensor, old in zip(tensors, before):
            tensor.copy_(torch.where(finite, tensor, old))


# -- progress records ---------------------------------------------------------------------------------------------
def check_finite(run: Engine) -> tuple[dict[str, float], NonFiniteLossError | None]:
    """At the logging cadence (one read of the guard): `train/nonfinite_steps` so far, and the stop that
    `trainer.on_nonfinite` asks for (stop: at the first; skip: after `trainer.max_nonfinite_in_a_row` in a row)."""
    g, t = run.guard, run.cfg.trainer
    total, longest, first_step, first_loss = int(g.total), int(g.longest), int(g.first_step), float(g.first_loss)
    figures = {"train/nonfinite_steps": float(total)}
    if run.scaler.is_enabled():
        figures["train/scaler_skipped_steps"] = float(g.scaler_skips)
    if total and (t.on_nonfinite == "stop" or longest >= t.max_nonfinite_in_a_row):
        why = (
            "trainer.on_nonfinite=stop"
            if t.on_nonfinite == "stop"
            else f"{longest} steps in a row (trainer.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row})"
        )
        return figures, NonFiniteLossError(
            f"training diverged: the loss or gradient was not finite at step {first_step} (loss {first_loss}), "
            f"{total} such step(s) so far, {why}; their updates were not applied and no checkpoint holds them. "
            f"Try a lower learning rate (optim.optimizer.lr), gradient clipping (optim.grad_clip_norm), or "
            f"trainer.precision=fp32/bf16 instead of fp16"
        )
    return figures, None


def log_progress(run: Engine) -> None:
    """One `train/` record over the window since the last one: means over its finite steps (and ranks),
    throughput, the non-finite count; stops a diverged run (NonFiniteLossError)."""
    window, info, progress = run.window, run.info, run.progress
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    finite_steps = int(window.finite_steps) if window.finite_steps is not None else 0
    means = {f"train/{k}": v.item() / finite_steps if finite_steps else math.nan for k, v in window.sums.items()}
    metrics = {k: v for k, v in dist_utils.all_reduce_mean(means, info, run.device).items() if math.isfinite(v)}
    finite_figures, divergence = check_finite(run)
    metrics.update(finite_figures)
    metrics["train/captions_per_s"] = window.captions * info.world_size / elapsed
    metrics["train/images_per_s"] = window.images * info.world_size / elapsed
    if window.tokens:  # a language model (task=lm)
        metrics["train/tokens_per_s"] = window.tokens * info.world_size / elapsed
    # Share of the wall time spent waiting for the next batch (> 0.1: the loader limits the step).
    metrics["train/data_wait_fraction"] = min(1.0, window.data_wait / elapsed)
    metrics["train/lr"] = run.optimizer.param_groups[0]["lr"]
    metrics["train/epoch"] = progress.epoch + progress.batch_in_epoch / run.task.steps_per_epoch
    run.logger.log_metrics(metrics, progress.step)
    run.bar.set_postfix(
        loss=f"{metrics.get('train/loss', math.nan):.3f}",
        cap_s=f"{metrics['train/captions_per_s']:.0f}",
        **{k: f"{v:.3f}" for k, v in run.step_settings.items()},
    )
    if run.bar.disable and info.is_main:  # batch jobs: one line per record instead of a redrawn bar
        log.info(
            "step %d/%d  loss %s  %s  %.0f captions/s",
            progress.step,
            run.total_steps,
            f"{metrics['train/loss']:.4f}" if "train/loss" in metrics else "n/a",
            "  ".join(f"{k} {v:.3f}" for k, v in run.step_settings.items()),
            metrics["train/captions_per_s"],
        )
    run.window = TrainingWindow()
    if divergence is not None:  # after the record: the log shows the steps that led here
        raise divergence


def validate_and_save(run: Engine) -> bool:
    """The task's validation, logged; the best kept by the task's monitored value (higher is better); last.pt
    (+ best.pt)."""
    started = time.perf_counter()
    progress = run.progress
    metrics = run.task.validate(run)
    run.logger.log_metrics(metrics, progress.step)
    value = run.task.monitored_value(metrics, run)
    improved = value > progress.best_metric
    if improved:
        progress.best_metric, progress.best_step = value, progress.step
    save(run, ("last.pt", "best.pt") if improved else ("last.pt",))
    if run.info.is_main:
        run.bar.write(
            f"step {progress.step}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("val/"))
        )
    dist_utils.barrier(run.info)
    run.window.start += time.perf_counter() - started  # throughput counts training only
    return True


# -- checkpoints: save, resume, requeue -----------------------------------------------------------------------------
def checkpoint_dict(run: Engine, per_rank: list[dict]) -> dict:
    """Everything to resume, in one dict; `per_rank` from `gather_per_rank` (every rank's random streams, logging
    window and non-finite guard)."""
    p = run.progress
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict() if run.lr_scheduler else None,
        "scaler": run.scaler.state_dict(),
        "step": p.step,
        "epoch": p.epoch,
        "batch_in_epoch": p.batch_in_epoch,
        "best_metric": p.best_metric,
        "best_step": p.best_step,
        # the per-step settings of the step that produced these weights, as the metrics records carry them
        "last_step_settings": dict(run.step_settings),
        "rng": [r["rng"] for r in per_rank],
        "logging_window": [r["logging_window"] for r in per_rank],
        "nonfinite_guard": [r["nonfinite_guard"] for r in per_rank],
        "config": run.config,
        **run.task.state_dict(),
    }


def gather_per_rank(run: Engine) -> list[dict]:
    """Every rank's random streams, logging window and non-finite guard (a collective: all ranks call it)."""
    mine = {
        "rng": capture_rng_state(),
        "logging_window": run.window.state_dict(),
        "nonfinite_guard": run.guard.state_dict(),
    }
    return dist_utils.gather_objects(mine, run.info)


def save(run: Engine, names: tuple[str, ...] = ("last.pt",)) -> None:
    """Every rank gathers its state; rank 0 writes RUN_DIR/checkpoints/NAME for each name (last.pt keeps its
    previous generation as last.prev.pt). Weights or buffers (BatchNorm statistics) that are not finite are never
    written."""
    per_rank = gather_per_rank(run)
    if run.info.is_main:
        bad = [
            name for name, v in run.model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()
        ]
        if bad:
            raise NonFiniteLossError(
                f"training diverged: at step {run.progress.step} the model's {bad[0]} ({len(bad)} "
                f"tensors in all) is not finite; not saving it (the checkpoints in "
                f"{run.checkpoint_dir} are from before). Try a lower learning rate "
                "(optim.optimizer.lr), gradient clipping (optim.grad_clip_norm) or fp32"
            )
        checkpoint = checkpoint_dict(run, per_rank)
        for name in names:
            save_checkpoint(checkpoint, run.checkpoint_dir / name, keep_previous=name == "last.pt")
    run.last_checkpoint_time = time.monotonic()


def checkpoint_due(run: Engine, clock_says: bool) -> bool:
    """`trainer.checkpoint_every_n_steps`, or `clock_says` (trainer.checkpoint_every_minutes, any rank's clock)."""
    every = run.cfg.trainer.checkpoint_every_n_steps
    return clock_says or bool(every and run.progress.step % every == 0)


def clock_due(run: Engine) -> bool:
    minutes = run.cfg.trainer.checkpoint_every_minutes
    return bool(minutes) and time.monotonic() - run.last_checkpoint_time >= 60 * minutes


def boundary_flags(run: Engine) -> tuple[bool, bool]:
    """(a preemption signal on any rank, the checkpoint clock due on any rank): one exchange per step, so that
    every rank stops, or saves, at the same step."""
    flags = dist_utils.any_rank_flags((run.preemption.requested, clock_due(run)), run.info)
    return flags[0], flags[1]


def stop_for_requeue(run: Engine, summary: dict) -> dict:
    """After a preemption signal: save last.pt, close, and ask for the requeue (exit code 124)."""
    save(run)
    if run.info.is_main:
        log.warning(
            "%s received: saved %s at step %d; exiting for requeue",
            run.preemption.signal_name or "a signal (on another rank)",
            run.checkpoint_dir / "last.pt",
            run.progress.step,
        )
    run.logger.finish()
    dist_utils.cleanup(run.info)
    summary.update(preempted=True, exit_code=PREEMPTION_EXIT_CODE)
    if run.preemption.requested:  # the rank that got the signal asks for the requeue
        summary["requeue"] = run.preemption.request_requeue()
    return summary


def resume_candidates(run: Engine) -> list[Path]:
    """Under `trainer.resume=auto`: RUN_DIR/checkpoints/last.pt, then the generation kept back (last.prev.pt), then
    best.pt; the given file; or nothing (`never`)."""
    resume_from = str(run.cfg.trainer.resume)
    if resume_from == "auto":
        last = run.checkpoint_dir / "last.pt"
        return [last, previous_path(last), run.checkpoint_dir / "best.pt"]
    return [] if resume_from == "never" else [Path(resume_from).expanduser()]


def resume(run: Engine) -> None:
    """Restore the weights, optimizer, scheduler, scaler, progress, every rank's random streams, logging window
    and guard, and the task's state, from the newest usable checkpoint (an unreadable or inconsistent one is
    reported by name and the previous one used); drop metrics records written after it (a killed run will write
    them again)."""
    candidates = resume_candidates(run)
    found = load_newest_usable(candidates, run.device, lambda ckpt, path: check_resumable(run, ckpt, path))
    if found is None and str(run.cfg.trainer.resume) not in ("auto", "never"):
        raise FileNotFoundError(f"trainer.resume: checkpoint not found: {candidates[0]}")
    if found is not None:
        checkpoint, path = found
        load_training_state(run, checkpoint)
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            path,
            run.progress.step,
            run.progress.epoch,
            run.progress.batch_in_epoch,
        )
    if run.info.is_main:  # a run killed before its first checkpoint starts again from step 0: the same rule
        metrics_file = run.run_dir / "metrics.jsonl"
        if metrics_file.is_file():  # the logger appends (O_APPEND): its next record follows the kept ones
            kept = [r for r in read_jsonl(metrics_file) if r["step"] <= run.progress.step]
            metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
        for partial in run.checkpoint_dir.glob(".*.pt.*.tmp"):  # a write that a kill cut short
            log.warning("removing %s: a checkpoint write that did not finish", partial)
            partial.unlink(missing_ok=True)
    run.step_settings = run.task.objective.step_settings(run.progress.step, run.progress.epoch)
    run.task.after_resume(run)


def check_resumable(run: Engine, checkpoint: dict, path: Path) -> None:
    """ValueError if `checkpoint` cannot continue this run: missing entries, non-finite weights, or what the task
    says (another vocabulary)."""
    missing = [
        k for k in ("optimizer", "scaler", "rng", "epoch", "batch_in_epoch", "best_metric") if k not in checkpoint
    ]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not a training checkpoint")
    run.task.check_checkpoint(checkpoint, path)
    if not all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point()):
        raise ValueError(f"{path} holds non-finite weights")


def load_training_state(run: Engine, checkpoint: dict) -> None:
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    if run.lr_scheduler and checkpoint["lr_scheduler"]:
        run.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    run.progress = Progress(
        checkpoint["step"],
        checkpoint["epoch"],
        checkpoint["batch_in_epoch"],
        checkpoint["best_metric"],
        checkpoint["best_step"],
    )
    rng = checkpoint["rng"] if isinstance(checkpoint["rng"], list) else [checkpoint["rng"]]
    info = run.info
    same_world = len(rng) == info.world_size
    if not same_world:
        log.warning(
            "resuming %d process(es) from a checkpoint of %d: random streams restart from rank 0's, "
            "the logging window from empty",
            info.world_size,
            len(rng),
        )
    restore_rng_state(rng[info.rank] if same_world else rng[0])
    windows, guards = checkpoint.get("logging_window"), checkpoint.get("nonfinite_guard")
    if windows is not None and same_world:  # older checkpoints have none: the window starts empty
        run.window = TrainingWindow.from_state_dict(windows[info.rank], run.device)
    if guards is not None:
        run.guard.load_state_dict(guards[info.rank] if same_world else guards[0])
    run.task.load_state_dict(checkpoint, run)
