"""`captioning-eval checkpoint=PATH`: decode a split with a checkpoint and score it.

Writes RUN_DIR/results_<split>_<strategy>.json (COCO server format) and
RUN_DIR/<split>_metrics.json, prints the metric table, next to the trivial reference
"the most common training caption for every image" scored the same way.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from captioning.cli import exit_on_user_error
from captioning.config import ConfigError, config_dir, decode_kwargs, validate_decode
from captioning.data import build as data_build
from captioning.inference import decode_records, references_of, score_with_baseline, write_results
from captioning.metrics.exposure import exposure_bias_probe, reference_loader
from captioning.models.captioner import build_captioner, build_image_encoder
from captioning.training.checkpoint import load_checkpoint
from captioning.training.distributed import DistInfo, pick_device
from captioning.data.vocab import Vocabulary

log = logging.getLogger(__name__)


def load_model(checkpoint_path, device: torch.device, for_images: bool = False):
    """Model, vocabulary and training config from one checkpoint (no pretrained download: weights come
    from the checkpoint). A model trained on cached features reads features, or, with `for_images`, gets
    its frozen encoder back (built from the config: the pretrained weights must be available)."""
    state = load_checkpoint(checkpoint_path, map_location="cpu")
    cfg = OmegaConf.create(state["config"])
    vocab = Vocabulary.from_state_dict(state["vocab"])
    cached = cfg.data.get("features") is not None
    model_cfg = cfg.model.copy()
    if not cached:
        model_cfg.encoder.weights = None
    feature_dim = state["model"]["image_proj.weight"].shape[1] if cached else None
    model = build_captioner(model_cfg, len(vocab), feature_dim)
    model.load_state_dict(state["model"])
    if cached and for_images:
        if cfg.model.encoder.weights is None:
            raise ValueError(f"{checkpoint_path} was trained on cached features of a randomly initialised encoder "
                             "(model.encoder.weights=null): images cannot be encoded the same way again")
        model.encoder = build_image_encoder(cfg.model.encoder, trainable=False)
    return model.to(device).eval(), vocab, cfg, state


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Metric table: one column per system (model, reference), one row per metric."""
    systems = list(rows)
    metrics = list(rows[systems[0]])
    width = max(len(m) for m in metrics) + 2
    column = max(12, *(len(s) + 2 for s in systems))
    lines = [" " * width + "".join(f"{s:>{column}}" for s in systems)]
    for m in metrics:
        lines.append(f"{m:<{width}}" + "".join(f"{rows[s].get(m, float('nan')):>{column}.4f}" for s in systems))
    return "\n".join(lines)


def evaluate_checkpoint(checkpoint_path, split: str, decode_cfg, out_dir, device: torch.device | str = "auto",
                        data_overrides: dict | None = None, spice: bool = False, logger=None, step: int | None = None,
                        info: DistInfo = DistInfo(), records=None, batch_size: int | None = None,
                        score_now: bool = True, ensemble: list | None = None,
                        exposure_cache: dict | None = None) -> dict[str, float]:
    """Decode `split` with the checkpoint and score it; returns {"split/metric": value, ...}.
    `ensemble`: more checkpoints; every decoder then runs over the average of all their per-step
    probabilities (they must share the vocabulary and the kind of input).
    With score_now=False only the results file (and the exposure probe, which needs no Java) is written:
    tools/score_runs.py scores it later on a machine with Java.
    `exposure_cache`: a dict shared by calls on the same checkpoint and data (several decoders): the exposure
    probe, which does not depend on the decoder, then runs once per split."""
    if isinstance(device, str):
        device = pick_device(device)
    model, vocab, train_cfg, state = load_model(checkpoint_path, device)
    if ensemble:
        from captioning.decoding import EnsembleModel

        members = [model]
        for path in ensemble:
            member, member_vocab, member_cfg, _ = load_model(Path(str(path)).expanduser(), device)
            if member_vocab.itos != vocab.itos:
                raise ValueError(f"ensemble: {path} has another vocabulary than {checkpoint_path}")
            if member_cfg.data.get("features") != train_cfg.data.get("features"):
                raise ValueError(f"ensemble: {path} reads other inputs (data.features) than {checkpoint_path}")
            members.append(member)
        model = EnsembleModel(members)
    cfg_data = train_cfg.data
    if data_overrides:
        cfg_data = OmegaConf.merge(cfg_data, {k: v for k, v in data_overrides.items() if v is not None})
    if records is None:
        records = data_build.load_records(cfg_data)
    if split not in records:
        raise ValueError(f"split must be one of {sorted(records)} (got {split!r})")
    split_records = records[split]
    strategy = decode_cfg.strategy
    captions = decode_records(model, split_records, vocab, cfg_data, strategy, decode_kwargs(decode_cfg), device,
                              info, batch_size=batch_size)
    if not info.is_main:
        return {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = {i: hyps[0][0] for i, hyps in captions.items()}
    write_results(out_dir / f"results_{split}_{strategy}.json", captions)
    # Exposure bias: the references' NLL and accuracy per position, teacher-forced vs free-running.
    exposure = (exposure_cache or {}).get(split)
    if exposure is None:
        exposure = exposure_bias_probe(model, reference_loader(split_records, vocab, cfg_data, batch_size), device,
                                       cfg_data.max_len)
        if exposure_cache is not None:
            exposure_cache[split] = exposure
    exposure_metrics = {f"{split}/{k}": v for k, v in exposure.summary().items()}
    (out_dir / f"{split}_exposure.json").write_text(json.dumps(exposure.to_json(), indent=2))
    exposure.plot(out_dir / f"{split}_exposure.png")
    if not score_now:
        print(f"{split}: wrote {out_dir / f'results_{split}_{strategy}.json'} (scoring deferred)")
        if logger is not None:
            logger.log_metrics(exposure_metrics, step if step is not None else state["step"])
        return exposure_metrics
    references = references_of(split_records, predictions)
    metrics, baseline, baseline_caption = score_with_baseline(references, predictions, records["train"], spice)

    from captioning.metrics import diversity_report

    nbest = {i: [c for c, _ in hyps] for i, hyps in captions.items()}
    if max(len(v) for v in nbest.values()) > 1:
        metrics.update(diversity_report(nbest, references))
    result = {f"{split}/{k}": v for k, v in metrics.items()}
    result.update({f"{split}/most_common_caption/{k}": v for k, v in baseline.items()})
    result.update(exposure_metrics)
    (out_dir / f"{split}_metrics.json").write_text(json.dumps(
        {**result, "checkpoint": str(checkpoint_path), "checkpoint_step": state["step"], "decode": strategy,
         "decode_params": decode_kwargs(decode_cfg), "most_common_caption": baseline_caption,
         "images": len(predictions)}, indent=2))
    print(f"\n{split} split, {len(predictions)} images, decode={strategy} "
          f"{json.dumps(decode_kwargs(decode_cfg))}, checkpoint step {state['step']}")
    print(format_table({"model": metrics, "most common caption": baseline}))
    summary = exposure.summary()
    print(f"exposure bias: reference NLL per token {summary['exposure/nll_tf']:.3f} teacher-forced vs "
          f"{summary['exposure/nll_free']:.3f} free-running (gap {summary['exposure/nll_gap']:.3f}); "
          f"accuracy {summary['exposure/acc_tf']:.3f} vs {summary['exposure/acc_free']:.3f}")
    print(f'(most common training caption: "{baseline_caption}")\n')
    if logger is not None:
        logger.log_metrics(result, step if step is not None else state["step"])
        rows = [[r.path, captions[r.image_id][0][0], " | ".join(r.captions)] for r in split_records[:16]]
        logger.log_table(f"{split}/samples", ["image", "generated", "references"], rows,
                         step if step is not None else state["step"])
    return result


def evaluate(cfg: DictConfig, out_dir: str | Path) -> dict[str, float]:
    """The plain function behind `captioning-eval`."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"missing mandatory config value(s): {sorted(missing)} "
                          "(e.g. captioning-eval checkpoint=outputs/DATE/TIME/checkpoints/best.pt)")
    validate_decode(OmegaConf.create({"decode": cfg.decode}))
    for path in [cfg.checkpoint, *(cfg.ensemble or [])]:
        if not Path(str(path)).expanduser().is_file():
            raise FileNotFoundError(f"checkpoint: file not found: {path}")
    if cfg.ensemble and cfg.compare_decoders:
        raise ConfigError("ensemble and compare_decoders cannot be combined in one job")
    if cfg.split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test (got {cfg.split!r})")
    from captioning.metrics import check_java

    check_java()
    from captioning.loggers.base import MultiLogger
    from captioning.loggers.jsonl import JsonlLogger

    out_dir = Path(out_dir)
    loggers = [JsonlLogger(out_dir / "metrics.jsonl")]
    if cfg.logger.wandb is not None:
        from captioning.loggers.wandb_logger import WandbLogger

        w = cfg.logger.wandb
        loggers.append(WandbLogger(out_dir, w.project, w.entity, w.group, w.name, list(w.tags) +
                                   [f"decode:{cfg.decode.strategy}"], w.mode, "eval",
                                   OmegaConf.to_container(cfg, resolve=True)))
    logger = MultiLogger(loggers)
    checkpoint = Path(str(cfg.checkpoint)).expanduser()
    try:
        if not cfg.compare_decoders:
            return evaluate_checkpoint(checkpoint, cfg.split, cfg.decode, out_dir, device=cfg.device,
                                       data_overrides={"root": cfg.data_root}, spice=cfg.spice, logger=logger,
                                       batch_size=cfg.batch_size, ensemble=list(cfg.ensemble or []))
        return compare_decoders(cfg, checkpoint, out_dir, logger)
    finally:
        logger.finish()


def decoder_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """conf/decode/NAME.yaml for each name in `compare_decoders`, with `compare_overrides` applied to each."""
    configs = {}
    for name in cfg.compare_decoders:
        path = Path(config_dir()) / "decode" / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"compare_decoders: no decode config {name!r} (one of "
                              f"{sorted(p.stem for p in path.parent.glob('*.yaml'))})")
        candidate = cfg.copy()
        candidate.decode = OmegaConf.merge(OmegaConf.load(path), cfg.compare_overrides or {})
        OmegaConf.resolve(candidate)
        validate_decode(OmegaConf.create({"decode": candidate.decode}))
        configs[name] = candidate.decode
    return configs


def compare_decoders(cfg: DictConfig, checkpoint: Path, out_dir: Path, logger) -> dict[str, float]:
    """Several decoders on one checkpoint: each into its own subfolder, then one table side by side
    (metrics, and sample images with every decoder's caption and the references)."""
    configs = decoder_configs(cfg)  # all validated before any decoding
    train_cfg = OmegaConf.create(load_checkpoint(checkpoint)["config"])
    cfg_data = OmegaConf.merge(train_cfg.data, {"root": cfg.data_root} if cfg.data_root else {})
    records = data_build.load_records(cfg_data)  # read once, for every decoder and the samples table
    results, captions, exposure_cache = {}, {}, {}
    for name, decode_cfg in configs.items():
        metrics = evaluate_checkpoint(checkpoint, cfg.split, decode_cfg, out_dir / name, device=cfg.device,
                                      data_overrides={"root": cfg.data_root}, spice=cfg.spice,
                                      batch_size=cfg.batch_size, records=records, exposure_cache=exposure_cache)
        results[name] = {k.split("/", 1)[1]: v for k, v in metrics.items() if "most_common_caption" not in k}
        captions[name] = {r["image_id"]: r["caption"] for r in json.loads(
            (out_dir / name / f"results_{cfg.split}_{decode_cfg.strategy}.json").read_text())}
        logger.log_metrics({f"{cfg.split}/{name}/{k}": v for k, v in results[name].items()}, 0)
    keys = [k for k in results[next(iter(results))] if all(k in r for r in results.values())]
    table = format_table({name: {k: r[k] for k in keys} for name, r in results.items()})
    print(f"\n{cfg.split} split, decoders side by side ({json.dumps(OmegaConf.to_container(cfg.compare_overrides))})")
    print(table)
    (out_dir / f"{cfg.split}_decoders_metrics.json").write_text(json.dumps(
        {"checkpoint": str(checkpoint), "overrides": OmegaConf.to_container(cfg.compare_overrides),
         "decoders": {n: OmegaConf.to_container(c) for n, c in configs.items()}, "metrics": results}, indent=2))
    rows = [[r.path, *(captions[n].get(r.image_id, "") for n in configs), " | ".join(r.captions)]
            for r in records[cfg.split][:16]]
    logger.log_table(f"{cfg.split}/decoders", ["image", *configs, "references"], rows, 0)
    return {f"{cfg.split}/{name}/{k}": v for name, r in results.items() for k, v in r.items()}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    exit_on_user_error(evaluate)(cfg, HydraConfig.get().runtime.output_dir)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
