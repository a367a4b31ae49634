"""Captioning as a task of the training engine: images and captions in, a captioner out.

    run = setup(cfg, run_dir)    # config checks; process group; data, model, objective, optimizer; the engine
    summary = engine.fit(run)    # resume, the step loop (CaptionTask.step), validation, the final test

`train(cfg, run_dir)` is both lines; `captioning.training.recipe.train` calls it for `task=caption`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from captioning.config import check_task_matches_data, validate_train_config
from captioning.data import build as data_build
from captioning.data.dataset import BadImageTracker
from captioning.data.features import open_feature_store
from captioning.data.vocab import Vocabulary
from captioning.evaluation.evaluate import evaluate_checkpoint
from captioning.evaluation.reports import report_evaluation
from captioning.evaluation.validation import CaptionValidator
from captioning.models.captioner import Captioner, build_captioner
from captioning.runtime import distributed as dist_utils
from captioning.runtime.precision import autocast
from captioning.scenes.generator import load_scene_truth
from captioning.scenes.pretraining import prepare_inputs
from captioning.training import engine
from captioning.training.objectives import build_objective
from captioning.training.optim import build_optimizer_and_scheduler

log = logging.getLogger(__name__)


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train a captioner, validate every `trainer.val_every_n_steps`, keep last/best checkpoints; then
    (`trainer.evaluate_after_training`) evaluate the best checkpoint on the test split. Returns a summary dict
    (`exit_code` 124 after a preemption signal: requeue me)."""
    return engine.fit(setup(cfg, run_dir))


def setup(cfg: DictConfig, run_dir: str | Path) -> engine.Engine:
    """Check the config, join the process group, build data, model, objective and optimizer (in this order: the
    random initialisation depends on it), and the engine around them."""
    validate_train_config(cfg)
    check_task_matches_data(cfg)
    if cfg.trainer.scoring != "deferred":
        from captioning.metrics import check_java

        check_java()  # before any heavy work: validation and evaluation need pycocoevalcap's Java tools
    cfg = prepare_inputs(cfg)  # on synthetic data: the pretrained encoder's features (built once)
    context = engine.start(cfg, run_dir)
    task = CaptionTask.build(context)
    unfreeze_at = cfg.model.encoder.get("unfreeze_after_steps")
    optimizer, lr_scheduler = build_optimizer_and_scheduler(
        task.model, cfg.optim, task.total_steps, unfreeze_at is not None
    )
    return engine.Engine(context, task, optimizer, lr_scheduler)


@dataclass
class CaptionTask:
    """The captioning task's data, model and objective (`train_forward`: the objective, DDP-wrapped and/or
    compiled), and what its steps need: the bad-image tracker, the validator."""

    cfg: DictConfig
    context: engine.Context
    memory_format: torch.memory_format
    records: dict[str, list]
    vocab: Vocabulary
    sampler: data_build.ResumableSampler
    loader: Any
    steps_per_epoch: int
    total_steps: int
    model: Captioner
    objective: torch.nn.Module
    train_forward: Any
    bad_images: BadImageTracker
    validator: CaptionValidator

    @classmethod
    def build(cls, context: engine.Context) -> CaptionTask:
        """Records, the vocabulary (train split only), the training loader; the model and its objective."""
        cfg, info, device = context.cfg, context.info, context.device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(cfg.trainer.cudnn_benchmark)  # fixed image size: autotune once
        memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
        records = data_build.load_records(cfg.data)
        vocab = data_build.build_vocab(records["train"], cfg.data)
        items = data_build.encoded_train_items(records["train"], vocab, cfg.data)
        dataset = data_build.train_dataset(items, vocab, cfg.data, cfg.seed)
        sampler = data_build.ResumableSampler(len(dataset), cfg.seed, True, info.rank, info.world_size)
        loader = data_build.make_loader(
            dataset,
            cfg.data.batch_size,
            cfg.data.num_workers,
            sampler,
            drop_last=True,
            pin_memory=device.type == "cuda",
            seed=cfg.seed,
        )
        steps_per_epoch = len(dataset) // info.world_size // cfg.data.batch_size
        if steps_per_epoch == 0:
            raise ValueError(
                f"data.batch_size={cfg.data.batch_size} is larger than the training split "
                f"({len(dataset)} images over {info.world_size} process(es))"
            )
        total_steps = engine.total_steps(cfg.trainer, steps_per_epoch)

        feature_store = open_feature_store(cfg.data)
        if feature_store is not None:
            feature_store.check([r.image_id for split in records.values() for r in split], cfg.model.encoder, cfg.data)
        model = build_captioner(cfg.model, len(vocab), feature_store.feature_dim if feature_store else None).to(device)
        model.encoder.to(memory_format=memory_format)
        objective = build_objective(
            cfg,
            model,
            cuda_graphs=cfg.trainer.cuda_graphs and device.type == "cuda",
            records=records["train"],
            vocab=vocab,
        )
        engine.warn_if_schedule_barely_moves(objective, total_steps, steps_per_epoch)
        train_forward = engine.wrap_for_training(objective, cfg, info, device)
        validator = CaptionValidator(
            cfg, records["val"], vocab, load_scene_truth(cfg.data), context.run_dir, device, info, context.amp_dtype
        )
        return cls(
            cfg,
            context,
            memory_format,
            records,
            vocab,
            sampler,
            loader,
            steps_per_epoch,
            total_steps,
            model,
            objective,
            train_forward,
            BadImageTracker(cfg.data.on_bad_image),
            validator,
        )

    def describe(self) -> str:
        return (
            f"vocabulary: {len(self.vocab)} words (count > {self.cfg.data.word_count_threshold} in the train "
            f"split); {len(self.loader.dataset)} training images"
        )

    # -- the loop ---------------------------------------------------------------------------------------------
    def batches(self, run: engine.Engine) -> Iterator[dict]:
        """Batches from where the run stands (epoch, batch in epoch), epoch after epoch; the caller stops. A batch
        of only bad images is skipped on every rank together (or DDP would hang)."""
        progress = run.progress
        while True:
            self.sampler.set_epoch(progress.epoch, start=progress.batch_in_epoch * self.cfg.data.batch_size)
            fetch_start = time.perf_counter()
            for batch in self.loader:
                run.window.data_wait += time.perf_counter() - fetch_start  # blocked on the loader
                self.bad_images(batch)
                progress.batch_in_epoch += 1
                if not dist_utils.any_rank(batch["size"] == 0, run.info):
                    yield batch
                fetch_start = time.perf_counter()
            progress.epoch += 1
            progress.batch_in_epoch = 0

    def step(self, run: engine.Engine, batch: dict) -> None:
        """One optimizer step on one batch: the objective under autocast, then the engine's guarded update. A step
        whose loss or gradient is not finite changes nothing, the BatchNorm statistics included."""
        self.maybe_unfreeze(run)
        run.step_settings = self.objective.step_settings(run.progress.step, run.progress.epoch)
        images = batch["images"].to(run.device, non_blocking=True, memory_format=self.memory_format)
        targets = batch["targets"].to(run.device, non_blocking=True)
        buffers = engine.updated_buffers(self.model)  # BatchNorm statistics: the forward pass moves them
        buffers_before = [b.detach().clone() for b in buffers]
        with autocast(run.device, run.amp_dtype):
            loss, stats = self.train_forward(images, targets, image_ids=batch["image_ids"], **run.step_settings)
        finite, _ = engine.guarded_update(run, loss)
        engine.keep_buffers_if(buffers, buffers_before, finite)
        engine.record_step(
            run, loss, {"loss": loss, **stats}, finite, targets.shape[0] * targets.shape[1], targets.shape[0]
        )

    def maybe_unfreeze(self, run: engine.Engine) -> None:
        unfreeze_at = self.cfg.model.encoder.get("unfreeze_after_steps")
        if unfreeze_at is not None and run.progress.step >= unfreeze_at and not self.model.encoder.trainable:
            self.model.encoder.set_trainable(True)
            self.model.encoder.train()
            self.train_forward = engine.wrap_for_training(self.objective, self.cfg, run.info, run.device)
            log.info(
                "step %d: encoder unfrozen (model.encoder.unfreeze_after_steps=%d)", run.progress.step, unfreeze_at
            )

    # -- validation and test ----------------------------------------------------------------------------------
    def validate(self, run: engine.Engine) -> dict[str, float]:
        return self.validator(self.model, run.progress.step, run.logger)

    def monitored_value(self, metrics: dict[str, float], run: engine.Engine) -> float:
        """`trainer.monitor` (deferred scoring: the step, so the latest is the best); a failed scoring: -inf
        (last.pt only)."""
        monitor = self.cfg.trainer.monitor
        if "val/scoring_failed" in metrics:  # no score to compare
            return -math.inf
        value = metrics.get(monitor, run.progress.step if self.validator.deferred else None)
        if value is None:
            raise ValueError(f"trainer.monitor: {monitor} is not among the validation metrics {sorted(metrics)}")
        return value

    def final_test(self, run: engine.Engine) -> dict[str, float]:
        """The best checkpoint on the test split with the `decode` config: written, printed and logged (rank 0)."""
        evaluation = evaluate_checkpoint(
            run.checkpoint_dir / "best.pt",
            "test",
            self.cfg.decode,
            device=run.device,
            info=run.info,
            records=self.records,
            score_now=not self.validator.deferred,
            metrics=tuple(self.cfg.trainer.metrics),
        )
        if evaluation is None:  # not rank 0
            return {}
        report_evaluation(evaluation, run.run_dir, run.logger, run.progress.step)
        return evaluation.keyed()

    def summary(self, run: engine.Engine) -> dict:
        return {"skipped_images": len(self.bad_images.skipped)}

    # -- the task's part of the checkpoint --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"objective": self.objective.name, "vocab": self.vocab.state_dict()}

    def check_checkpoint(self, checkpoint: dict, path: Path) -> None:
        if checkpoint["vocab"]["itos"] != self.vocab.itos:
            raise ValueError(
                f"{path} was trained with a different vocabulary (other data or data.word_count_threshold)"
            )

    def load_state_dict(self, checkpoint: dict, run: engine.Engine) -> None:
        """Nothing beyond the weights (the engine's): the objectives of captioning carry no state across steps."""

    def after_resume(self, run: engine.Engine) -> None:
        self.maybe_unfreeze(run)  # a run resumed past the unfreezing step
