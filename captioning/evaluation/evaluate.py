"""One evaluation of a model on one split: captions, COCO metrics, the most-common-caption reference, the
exposure probes and (for n-best decoders) diversity, as an `Evaluation` that reports.py writes out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from captioning.data import build as data_build
from captioning.data.coco import ImageRecord
from captioning.evaluation.captions import decode_records, references_of, score_with_baseline
from captioning.metrics.reference_likelihood import ReferenceLikelihoodReport, reference_likelihood_probe
from captioning.models.loading import load_model
from captioning.runtime.distributed import SINGLE_PROCESS, DistInfo
from captioning.scenes.generator import load_scene_truth
from captioning.scenes.oracle_exposure import OracleExposureReport, oracle_exposure


@dataclass
class ExposureProbes:
    """The decoder-independent probes of one model on one split: the reference likelihood after the model's own
    prefix (any data) and, on synthetic data, exposure bias against the scene oracle (None elsewhere)."""

    reference_likelihood: ReferenceLikelihoodReport
    oracle: OracleExposureReport | None = None

    def summary(self) -> dict[str, float]:
        """`reference_likelihood/...` and `exposure_oracle/...` (NaN-free: a rate with nothing to count is left
        out, so every logged value is a number)."""
        import math

        result = dict(self.reference_likelihood.summary())
        if self.oracle is not None:
            result.update({k: v for k, v in self.oracle.summary().items() if not math.isnan(v)})
        return result


def run_exposure_probes(
    model,
    vocab,
    loader,
    max_len: int,
    device: torch.device,
    scenes: dict | None = None,
    records: list[ImageRecord] | None = None,
    prefix_swap: bool = True,
) -> ExposureProbes:
    """Both probes over the batches of `loader` (data.build.reference_loader: images, image ids and every
    reference); the oracle one when `scenes` (and the split's `records`, whose raw references it judges) are given.
    With scenes the batches are read once and kept (synthetic splits are small). `prefix_swap=False` leaves out
    the prefix-swap continuations (most of the oracle probe's time: validations skip them)."""
    if scenes is None:
        return ExposureProbes(reference_likelihood_probe(model, loader, device, max_len))
    if records is None:
        raise ValueError("run_exposure_probes: the oracle probe needs the split's records (their references)")
    batches = [batch for batch in loader if batch["size"]]
    likelihood = reference_likelihood_probe(model, batches, device, max_len)
    references = {r.image_id: r.captions for r in records}
    oracle = oracle_exposure(
        model,
        vocab,
        ((b["images"], b["image_ids"].tolist()) for b in batches),
        scenes,
        references,
        max_len,
        prefix_lengths=None if prefix_swap else [],
        device=device,
    )
    return ExposureProbes(likelihood, oracle)


@dataclass
class Evaluation:
    """What one decoder gave on one split. `metrics`/`baseline` are empty when scoring is deferred."""

    split: str
    strategy: str
    decode_params: dict
    captions: dict[int, list[tuple[str, float]]]  # image_id -> [(caption, score), ...] best first
    exposure: ExposureProbes
    records: list[ImageRecord]
    metrics: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    baseline_caption: str | None = None
    checkpoint: str | None = None
    checkpoint_step: int | None = None

    @property
    def scored(self) -> bool:
        return bool(self.metrics)

    @property
    def predictions(self) -> dict[int, str]:
        return {i: hyps[0][0] for i, hyps in self.captions.items()}

    def keyed(self) -> dict[str, float]:
        """Every figure under `split/name` (`test/CIDEr`, `test/most_common_caption/CIDEr`,
        `test/reference_likelihood/...`, `test/exposure_oracle/...`)."""
        s = self.split
        result = {f"{s}/{k}": v for k, v in self.metrics.items()}
        result.update({f"{s}/most_common_caption/{k}": v for k, v in self.baseline.items()})
        result.update({f"{s}/{k}": v for k, v in self.exposure.summary().items()})
        return result


def load_ensemble(checkpoint_path, others, device: torch.device):
    """`load_model` for the first checkpoint; with `others`, an EnsembleModel averaging every member's per-step
    probabilities (all must share the vocabulary and the kind of input)."""
    model, vocab, cfg, state = load_model(checkpoint_path, device)
    if not others:
        return model, vocab, cfg, state
    from captioning.decoding import EnsembleModel

    members = [model]
    for path in others:
        member, member_vocab, member_cfg, _ = load_model(Path(str(path)).expanduser(), device)
        if member_vocab.itos != vocab.itos:
            raise ValueError(f"ensemble: {path} has another vocabulary than {checkpoint_path}")
        if member_cfg.data.get("features") != cfg.data.get("features"):
            raise ValueError(f"ensemble: {path} reads other inputs (data.features) than {checkpoint_path}")
        members.append(member)
    return EnsembleModel(members), vocab, cfg, state


def evaluate_model(
    model,
    vocab,
    records: dict[str, list[ImageRecord]],
    split: str,
    decode_cfg,
    cfg_data,
    device: torch.device,
    *,
    info: DistInfo = SINGLE_PROCESS,
    score_now: bool = True,
    spice: bool = False,
    metrics: tuple[str, ...] | None = None,
    batch_size: int | None = None,
    exposure: ExposureProbes | None = None,
) -> Evaluation | None:
    """Decode `records[split]` with the `decode` config and score it (`score_now`: the COCO `metrics`, None: all
    but SPICE), next to the most common training caption (`records["train"]`). Under DDP every rank decodes its
    shard; rank 0 alone scores and gets the Evaluation (the others None). `exposure`: the probes already run on
    this model and split (they do not depend on the decoder)."""
    from captioning.decoding.checks import decode_kwargs

    if split not in records:
        raise ValueError(f"split must be one of {sorted(records)} (got {split!r})")
    split_records = records[split]
    params = decode_kwargs(decode_cfg)
    captions = decode_records(
        model, split_records, vocab, cfg_data, decode_cfg.strategy, params, device, info, batch_size=batch_size
    )
    if not info.is_main:
        return None
    scenes = load_scene_truth(cfg_data)  # synthetic data: the exact truth (None elsewhere)
    if exposure is None:
        loader = data_build.reference_loader(split_records, vocab, cfg_data, batch_size)
        exposure = run_exposure_probes(model, vocab, loader, cfg_data.max_len, device, scenes, split_records)
    evaluation = Evaluation(split, decode_cfg.strategy, params, captions, exposure, split_records)
    if score_now:
        score_evaluation(evaluation, records["train"], spice, scenes, metrics)
    return evaluation


def score_evaluation(
    evaluation: Evaluation,
    train_records: list[ImageRecord],
    spice: bool = False,
    scenes: dict | None = None,
    metrics: tuple[str, ...] | None = None,
) -> None:
    """COCO metrics of the top captions, the most-common-caption reference and, for n-best decoders, diversity;
    with `scenes` (synthetic data), the scene truth of both (`scene/correct` ...)."""
    from captioning.metrics import diversity_report

    predictions = evaluation.predictions
    references = references_of(evaluation.records, predictions)
    scores, baseline, baseline_caption = score_with_baseline(references, predictions, train_records, spice, metrics)
    nbest = {i: [c for c, _ in hyps] for i, hyps in evaluation.captions.items()}
    if max(len(v) for v in nbest.values()) > 1:
        scores.update(diversity_report(nbest, references))
    if scenes is not None:
        scores.update(scene_truth(predictions, scenes))
        baseline.update(scene_truth({i: baseline_caption for i in predictions}, scenes))
    evaluation.metrics, evaluation.baseline, evaluation.baseline_caption = scores, baseline, baseline_caption


def scene_truth(predictions: dict[int, str], scenes: dict) -> dict[str, float]:
    """`scene/...` figures of one caption per image against the exact scenes (NaN-free: a figure with no claim
    to count is left out)."""
    import math

    from captioning.scenes.truth import scene_metrics

    return {k: v for k, v in scene_metrics(predictions, scenes).items() if not math.isnan(v)}


def evaluate_checkpoint(
    checkpoint_path,
    split: str,
    decode_cfg,
    *,
    device: torch.device,
    info: DistInfo = SINGLE_PROCESS,
    records: dict[str, list[ImageRecord]] | None = None,
    data_root: str | None = None,
    ensemble: list | None = None,
    score_now: bool = True,
    spice: bool = False,
    metrics: tuple[str, ...] | None = None,
    batch_size: int | None = None,
    exposure: ExposureProbes | None = None,
) -> Evaluation | None:
    """`evaluate_model` on a checkpoint (and, with `ensemble`, more checkpoints averaged with it), on the data it
    was trained on (or `data_root`); `records` already read can be passed in."""
    from omegaconf import OmegaConf

    model, vocab, train_cfg, state = load_ensemble(checkpoint_path, ensemble, device)
    cfg_data = OmegaConf.merge(train_cfg.data, {"root": data_root}) if data_root else train_cfg.data
    if records is None:
        records = data_build.load_records(cfg_data)
    evaluation = evaluate_model(
        model,
        vocab,
        records,
        split,
        decode_cfg,
        cfg_data,
        device,
        info=info,
        score_now=score_now,
        spice=spice,
        metrics=metrics,
        batch_size=batch_size,
        exposure=exposure,
    )
    if evaluation is not None:
        evaluation.checkpoint, evaluation.checkpoint_step = str(checkpoint_path), state["step"]
    return evaluation
