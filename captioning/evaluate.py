"""`captioning-eval checkpoint=PATH`: decode a split with a checkpoint and score it.

Writes RUN_DIR/results_<split>_<strategy>.json (COCO server format) and
RUN_DIR/<split>_metrics.json, prints the metric table, next to the trivial reference
"the most common training caption for every image" scored the same way. A thin CLI over
captioning.evaluation; nothing imports this module.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from captioning.checks import subset
from captioning.cli import exit_on_user_error
from captioning.config import ConfigError, config_dir, validate_decode
from captioning.data import build as data_build
from captioning.evaluation.evaluate import evaluate_checkpoint
from captioning.evaluation.reports import format_table, report_evaluation, results_path
from captioning.runtime.checkpoint import load_checkpoint
from captioning.runtime.distributed import pick_device

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig, out_dir: str | Path) -> dict[str, float]:
    """The plain function behind `captioning-eval`."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(
            f"missing mandatory config value(s): {sorted(missing)} "
            "(e.g. captioning-eval checkpoint=outputs/DATE/TIME/checkpoints/best.pt)"
        )
    validate_decode(OmegaConf.create({"decode": cfg.decode}))
    for path in [cfg.checkpoint, *(cfg.ensemble or [])]:
        if Path(str(path)).expanduser().is_dir():
            raise ValueError(f"checkpoint {path} is a folder, not a checkpoint file (e.g. {path}/checkpoints/best.pt)")
        if not Path(str(path)).expanduser().is_file():
            raise FileNotFoundError(f"checkpoint: file not found: {path}")
    if cfg.ensemble and cfg.compare_decoders:
        raise ConfigError("ensemble and compare_decoders cannot be combined in one job")
    if cfg.split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test (got {cfg.split!r})")
    from captioning.metrics.coco import DEFAULT_METRICS

    subset(cfg, "metrics", DEFAULT_METRICS)
    from captioning.metrics import check_java

    check_java()
    from captioning.loggers.base import MultiLogger
    from captioning.loggers.jsonl import JsonlLogger

    out_dir = Path(out_dir)
    loggers = [JsonlLogger(out_dir / "metrics.jsonl")]
    if cfg.logger.wandb is not None:
        from captioning.loggers.wandb_logger import WandbLogger

        w = cfg.logger.wandb
        loggers.append(
            WandbLogger(
                out_dir,
                w.project,
                w.entity,
                w.group,
                w.name,
                list(w.tags) + [f"decode:{cfg.decode.strategy}"],
                w.mode,
                "eval",
                OmegaConf.to_container(cfg, resolve=True),
                num_table_images=w.num_table_images,
                thumbnail_size=w.thumbnail_size,
            )
        )
    logger = MultiLogger(loggers)
    checkpoint = Path(str(cfg.checkpoint)).expanduser()
    try:
        if not cfg.compare_decoders:
            evaluation = evaluate_checkpoint(
                checkpoint,
                cfg.split,
                cfg.decode,
                device=pick_device(cfg.device),
                data_root=cfg.data_root,
                ensemble=list(cfg.ensemble or []),
                spice=cfg.spice,
                metrics=tuple(cfg.metrics),
                batch_size=cfg.batch_size,
            )
            report_evaluation(evaluation, out_dir, logger)
            return evaluation.keyed()
        return compare_decoders(cfg, checkpoint, out_dir, logger)
    finally:
        logger.finish()


def decoder_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """conf/decode/NAME.yaml for each name in `compare_decoders`, each with the `compare_overrides` keys it has
    (`beam_size` changes beam and diverse beam, not greedy); a key that none of them has is an error."""
    overrides = OmegaConf.to_container(cfg.compare_overrides, resolve=True) if cfg.compare_overrides else {}
    configs, used = {}, set()
    for name in cfg.compare_decoders:
        path = Path(config_dir()) / "decode" / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"compare_decoders: no decode config {name!r} (one of "
                f"{sorted(p.stem for p in path.parent.glob('*.yaml'))})"
            )
        candidate = cfg.copy()
        own = OmegaConf.load(path)
        candidate.decode = OmegaConf.merge(own, {k: v for k, v in overrides.items() if k in own})
        used.update(k for k in overrides if k in own)
        OmegaConf.resolve(candidate)
        validate_decode(OmegaConf.create({"decode": candidate.decode}))
        configs[name] = candidate.decode
    unused = sorted(set(overrides) - used)
    if unused:
        raise ConfigError(f"compare_overrides: {unused} is a parameter of none of the decoders {list(configs)}")
    return configs


def compare_decoders(cfg: DictConfig, checkpoint: Path, out_dir: Path, logger) -> dict[str, float]:
    """Several decoders on one checkpoint: each into its own subfolder, then one table side by side
    (metrics, and sample images with every decoder's caption and the references)."""
    configs = decoder_configs(cfg)  # all validated before any decoding
    train_cfg = OmegaConf.create(load_checkpoint(checkpoint)["config"])
    cfg_data = OmegaConf.merge(train_cfg.data, {"root": cfg.data_root} if cfg.data_root else {})
    records = data_build.load_records(cfg_data)  # read once, for every decoder and the samples table
    device = pick_device(cfg.device)
    results, captions, exposure = {}, {}, None
    for name, decode_cfg in configs.items():
        evaluation = evaluate_checkpoint(
            checkpoint,
            cfg.split,
            decode_cfg,
            device=device,
            records=records,
            data_root=cfg.data_root,
            spice=cfg.spice,
            metrics=tuple(cfg.metrics),
            batch_size=cfg.batch_size,
            exposure=exposure,
        )  # the probe does not depend on the decoder: once
        exposure = evaluation.exposure
        report_evaluation(evaluation, out_dir / name)
        results[name] = {k.split("/", 1)[1]: v for k, v in evaluation.keyed().items() if "most_common_caption" not in k}
        captions[name] = {
            r["image_id"]: r["caption"] for r in json.loads(results_path(out_dir / name, evaluation).read_text())
        }
        logger.log_metrics({f"{cfg.split}/{name}/{k}": v for k, v in results[name].items()}, 0)
    keys = [k for k in results[next(iter(results))] if all(k in r for r in results.values())]
    table = format_table({name: {k: r[k] for k in keys} for name, r in results.items()})
    print(f"\n{cfg.split} split, decoders side by side ({json.dumps(OmegaConf.to_container(cfg.compare_overrides))})")
    print(table)
    (out_dir / f"{cfg.split}_decoders_metrics.json").write_text(
        json.dumps(
            {
                "checkpoint": str(checkpoint),
                "overrides": OmegaConf.to_container(cfg.compare_overrides),
                "decoders": {n: OmegaConf.to_container(c) for n, c in configs.items()},
                "metrics": results,
            },
            indent=2,
        )
    )
    rows = [
        [r.path, *(captions[n].get(r.image_id, "") for n in configs), " | ".join(r.captions)]
        for r in records[cfg.split][:16]
    ]
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
