"""Validation during captioning training: greedy-decode the val split, score it (or write it for deferred scoring),
the scene truth on synthetic data, the exposure probes; a few samples as a table."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from captioning.data import build as data_build
from captioning.data.vocab import Vocabulary
from captioning.evaluation.captions import (
    decode_records,
    references_of,
    score,
    write_results,
)
from captioning.evaluation.evaluate import run_exposure_probes, scene_truth
from captioning.evaluation.reports import sample_rows
from captioning.runtime import distributed as dist_utils
from captioning.runtime.precision import autocast

log = logging.getLogger(__name__)


class CaptionValidator:
    """`validator(model, step, logger)` -> the `val/` metrics, the same on every rank (rank 0's). The val
    references for the exposure probes are read once, at the first validation."""

    def __init__(
        self,
        cfg: DictConfig,
        val_records: list,
        vocab: Vocabulary,
        scenes: dict | None,
        run_dir: Path,
        device: torch.device,
        info: dist_utils.DistInfo,
        amp_dtype: torch.dtype | None,
    ):
        self.cfg, self.vocab, self.scenes, self.run_dir = cfg, vocab, scenes, run_dir
        self.device, self.info, self.amp_dtype = device, info, amp_dtype
        self.records = val_records[: cfg.trainer.val_max_images or None]
        self.deferred = cfg.trainer.scoring == "deferred"
        self.reference_loader = None

    def __call__(self, model, step: int, logger) -> dict[str, float]:
        """Greedy-decode the val split (at most trainer.val_max_images), score it (or write it for deferred
        scoring), run the exposure probes (without the oracle's prefix swap, which the final test runs)."""
        cfg, info, records = self.cfg, self.info, self.records
        dist_utils.broadcast_buffers(model, info)  # BatchNorm running stats: every rank decodes with rank 0's
        captions = decode_records(
            model,
            records,
            self.vocab,
            cfg.data,
            "greedy",
            {"max_len": cfg.data.max_len},
            self.device,
            info,
            autocast_dtype=self.amp_dtype,
        )
        metrics = {}
        if info.is_main:
            predictions = {i: hyps[0][0] for i, hyps in captions.items()}
            if self.deferred:  # scored later, where Java is (tools/score_runs.py)
                write_results(self.run_dir / "val_results" / f"step_{step:08d}.json", captions)
            else:
                scores = score_or_record_failure(records, predictions, tuple(cfg.trainer.metrics))
                metrics = {f"val/{k}": v for k, v in scores.items()}
            if self.scenes is not None:  # synthetic data: the exact truth, no Java needed
                metrics.update({f"val/{k}": v for k, v in scene_truth(predictions, self.scenes).items()})
            if self.reference_loader is None:
                self.reference_loader = data_build.reference_loader(records, self.vocab, cfg.data)
            with autocast(self.device, self.amp_dtype):
                exposure = run_exposure_probes(
                    model,
                    self.vocab,
                    self.reference_loader,
                    cfg.data.max_len,
                    self.device,
                    self.scenes,
                    records,
                    prefix_swap=False,
                )
            metrics.update({f"val/{k}": v for k, v in exposure.summary().items()})
            logger.log_table(
                "val/samples",
                ["image", "generated", "references"],  # W&B sends a few of them
                sample_rows(records, captions, 16),
                step,
            )
        return dist_utils.gather_objects(metrics, info)[0]


def score_or_record_failure(records, predictions: dict[int, str], metrics: tuple[str, ...]) -> dict[str, float]:
    """The COCO `metrics`; if a Java process (the PTB tokenizer, METEOR) dies, once more with a fresh METEOR, and if
    that fails too, {"scoring_failed": 1.0}: the validation is recorded as failed and training goes on."""
    from captioning.metrics import close_meteor

    for attempt in (1, 2):
        try:
            return score(references_of(records, predictions), predictions, metrics=metrics)
        except (RuntimeError, OSError, BrokenPipeError) as e:
            close_meteor()  # the next call starts a new JVM
            log.warning("validation scoring failed (attempt %d of 2): %s", attempt, e)
    log.error("validation scoring failed twice: recorded as val/scoring_failed; training goes on")
    return {"scoring_failed": 1.0}
