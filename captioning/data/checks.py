"""Checks of the `data` group (conf/data/*.yaml), run by captioning.config.validate_train_config before any work:
every bad value fails with its key named."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from captioning.checks import choice, number, positive_int, require, resolve_target


def validate_data(cfg: DictConfig) -> None:
    if cfg.data.get("name") == "text":  # the language model's data (task=lm; check_task_matches_data)
        validate_text_data(cfg)
        return
    choice(cfg, "data.name", ("synthetic", "coco"))
    if cfg.data.get("generator") is not None:  # data=synthetic: the scenes package makes the folder
        require(
            callable(resolve_target(cfg.data.generator, "data.generator")),
            "data.generator",
            "must name a function of the data config that returns the data folder",
            cfg.data.generator,
        )
    if cfg.data.name == "coco":
        require(
            OmegaConf.select(cfg, "data.root", throw_on_missing=False) not in (None, "???"),
            "data.root",
            "must be set for data=coco (the COCO folder: data.root=PATH, or coco_root in conf/local/default.yaml; "
            "check it with tools/check_coco.py)",
            None,
        )
    for key in ("image_size", "captions_per_image", "max_len", "batch_size", "eval_batch_size"):
        positive_int(cfg, f"data.{key}")
    positive_int(cfg, "data.resize_size", allow_none=True)
    positive_int(cfg, "data.num_workers", minimum=0)
    positive_int(cfg, "data.word_count_threshold", minimum=0)
    positive_int(cfg, "data.max_image_pixels")
    choice(cfg, "data.on_bad_image", ("skip", "error"))
    if cfg.data.get("features"):
        require(
            Path(str(cfg.data.features)).expanduser().is_dir(),
            "data.features",
            "must be a feature store folder made by tools/extract_features.py",
            cfg.data.features,
        )
        require(
            not cfg.model.encoder.trainable and cfg.model.encoder.get("unfreeze_after_steps") is None,
            "data.features",
            "needs a frozen encoder (model.encoder.trainable=false, no unfreezing): "
            "cached features cannot be fine-tuned",
            cfg.data.features,
        )
    choice(cfg, "data.on_bad_caption", ("skip", "error"))
    if cfg.data.resize_size is not None:
        require(
            cfg.data.resize_size >= cfg.data.image_size,
            "data.resize_size",
            "must be >= data.image_size",
            cfg.data.resize_size,
        )
    if cfg.data.name == "synthetic":
        for key in ("num_train", "num_val", "num_test", "image_size"):
            positive_int(cfg, f"data.synthetic.{key}")
        positive_int(cfg, "data.synthetic.seed", minimum=0)


def validate_text_data(cfg: DictConfig) -> None:
    """`data=text` (conf/data/text.yaml): the language model's text, tokens and streams."""
    choice(cfg, "data.level", ("char", "word"))
    path = cfg.data.get("path")
    if path is not None:
        require(
            Path(str(path)).expanduser().exists(),
            "data.path",
            "must be an existing UTF-8 text file (or null for the embedded synthetic captions): no such file",
            path,
        )
        require(Path(str(path)).expanduser().is_file(), "data.path", "must be a text file, not a folder", path)
    split = cfg.data.get("split")
    require(
        OmegaConf.is_list(split) and len(split) == 3 and all(number(x) and x > 0 for x in split),
        "data.split",
        "must be three fractions > 0 (train, val, test, by position)",
        split,
    )
    for key in ("batch_size", "tbptt_steps", "eval_batch_size"):
        positive_int(cfg, f"data.{key}")
    positive_int(cfg, "data.word_count_threshold", minimum=0)
    if cfg.data.embedded.get("generator") is not None:  # the embedded text: the scenes package's captions
        require(
            callable(resolve_target(cfg.data.embedded.generator, "data.embedded.generator")),
            "data.embedded.generator",
            "must name a function (num_train, num_val, num_test, seed) -> text",
            cfg.data.embedded.generator,
        )
    for key in ("num_train", "num_val", "num_test"):
        positive_int(cfg, f"data.embedded.{key}", minimum=0)
    positive_int(cfg, "data.embedded.seed", minimum=0)
