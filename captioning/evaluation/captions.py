"""Decode a split into captions and score them: shared by validation, the final test evaluation
of a training run, and `captioning-eval`, so that all three report the same figures."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import torch

from captioning.data.build import eval_dataset, make_loader
from captioning.data.coco import ImageRecord
from captioning.data.dataset import BadImageTracker
from captioning.data.text import training_tokens
from captioning.data.vocab import Vocabulary
from captioning.runtime.distributed import SINGLE_PROCESS, DistInfo, gather_objects

log = logging.getLogger(__name__)
PROGRESS_MIN_IMAGES = 1000  # splits at least this long log their decoding progress (COCO's 5,000 val images)


@torch.no_grad()
def decode_records(
    model,
    records: list[ImageRecord],
    vocab: Vocabulary,
    cfg_data,
    strategy: str,
    decode_kwargs: dict,
    device: torch.device,
    info: DistInfo = SINGLE_PROCESS,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[int, list[tuple[str, float]]]:
    """image_id -> [(caption, score), ...] best first. Under DDP each rank decodes a disjoint shard and
    every rank receives all captions: each image is decoded exactly once."""
    from captioning.decoding import decode

    was_training = model.training
    model.eval()
    shard = records[info.rank :: info.world_size]
    loader = make_loader(
        eval_dataset(shard, cfg_data),
        batch_size or cfg_data.eval_batch_size,
        num_workers=min(cfg_data.num_workers, 4),
        pin_memory=device.type == "cuda",
    )
    tracker = BadImageTracker(cfg_data.on_bad_image)
    captions: dict[int, list[tuple[str, float]]] = {}
    started, report_every = time.perf_counter(), max(1, len(loader) // 10)  # long splits: ten progress lines
    for number, batch in enumerate(loader, start=1):
        if len(shard) >= PROGRESS_MIN_IMAGES and info.is_main and number % report_every == 0:
            log.info(
                "decoding (%s): %d/%d batches, %.0f s", strategy, number, len(loader), time.perf_counter() - started
            )
        tracker(batch)
        if batch["size"] == 0:
            continue
        images = batch["images"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            hypotheses = decode(model, images, strategy, **decode_kwargs)
        for image_id, hyps in zip(batch["image_ids"].tolist(), hypotheses):
            captions[image_id] = [(vocab.decode(ids), float(score)) for ids, score in hyps]
    model.train(was_training)
    merged: dict[int, list[tuple[str, float]]] = {}
    for part in gather_objects(captions, info):
        merged.update(part)
    return merged


def references_of(records: list[ImageRecord], image_ids) -> dict[int, list[str]]:
    by_id = {r.image_id: r.captions for r in records}
    return {i: [c for c in by_id[i] if c.strip()] for i in image_ids}


def score(
    references: dict[int, list[str]],
    predictions: dict[int, str],
    spice: bool = False,
    metrics: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """The COCO `metrics` (None: all but SPICE; `spice` adds it)."""
    from captioning.metrics import score_captions
    from captioning.metrics.coco import DEFAULT_METRICS

    return score_captions(references, predictions, spice=spice, metrics=tuple(metrics or DEFAULT_METRICS))


def most_common_caption(train_records: list[ImageRecord]) -> str:
    """The single most frequent training caption (after tokenisation); ties broken alphabetically."""
    counts = Counter(" ".join(training_tokens(c)) for r in train_records for c in r.captions)
    counts.pop("", None)
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def score_with_baseline(
    references: dict[int, list[str]],
    predictions: dict[int, str],
    train_records: list[ImageRecord],
    spice: bool = False,
    metrics: tuple[str, ...] | None = None,
) -> tuple[dict[str, float], dict[str, float], str]:
    """The predictions' metrics, the metrics of the trivial reference that gives every image the most common
    training caption, and that caption."""
    caption = most_common_caption(train_records)
    baseline = score(references, {i: caption for i in predictions}, spice, metrics)
    return score(references, predictions, spice, metrics), baseline, caption


def write_results(path: Path, captions: dict[int, list[tuple[str, float]]]) -> None:
    """COCO server format: [{"image_id", "caption"}], the top caption per image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"image_id": i, "caption": hyps[0][0]} for i, hyps in sorted(captions.items())]
    path.write_text(json.dumps(rows, indent=0, ensure_ascii=False))
