"""Checks of the `model` group (conf/model/*.yaml), run by captioning.config.validate_train_config before any model
is built: every bad value fails with its key named."""

from __future__ import annotations

from omegaconf import DictConfig

from captioning.checks import choice, positive_int, require
from captioning.errors import ConfigError


def validate_model(cfg: DictConfig) -> None:
    choice(cfg, "model.decoder.cell", ("lstm", "gru", "rnn"))
    for key in ("num_layers", "embed_dim", "hidden_dim"):
        positive_int(cfg, f"model.decoder.{key}")
    dropout = cfg.model.decoder.dropout
    require(
        isinstance(dropout, (int, float)) and 0 <= dropout < 1, "model.decoder.dropout", "must be in [0, 1)", dropout
    )
    require(
        isinstance(cfg.model.encoder.trainable, bool),
        "model.encoder.trainable",
        "must be true or false",
        cfg.model.encoder.trainable,
    )
    choice(cfg, "model.encoder.pool", ("avg", "grid"))
    if cfg.model.decoder.get("image_feed") is not None:
        choice(cfg, "model.decoder.image_feed", ("first", "every_step"))
    attention = cfg.model.decoder.get("attention", False)
    require(isinstance(attention, bool), "model.decoder.attention", "must be true or false", attention)
    if attention and cfg.model.encoder.get("pretrain") is None:  # pretraining makes a label head (feed=labels)
        from captioning.models.attention import no_parts

        if problem := no_parts(cfg.model.encoder):
            raise ConfigError(problem)
    if cfg.model.get("image_input") is not None:  # conf/experiment/image_blind.yaml
        choice(cfg, "model.image_input", ("image", "constant"))
    positive_int(cfg, "model.encoder.unfreeze_after_steps", allow_none=True, minimum=0)
    if cfg.model.encoder.get("unfreeze_after_steps") is not None:
        require(
            not cfg.model.encoder.trainable,
            "model.encoder.unfreeze_after_steps",
            "needs model.encoder.trainable=false (the encoder starts frozen)",
            cfg.model.encoder.trainable,
        )
    positive_int(cfg, "model.encoder.grid_size")
    label_head = cfg.model.encoder.get("label_head")
    require(
        label_head is None or (isinstance(label_head, str) and label_head != ""),
        "model.encoder.label_head",
        "must be null or the path of a label head file",
        label_head,
    )
    import torchvision

    name = cfg.model.encoder.name
    require(
        name in torchvision.models.list_models(module=torchvision.models),
        "model.encoder.name",
        "must be a torchvision classification model (resnet18, resnet50, resnet101, efficientnet_b0...)",
        name,
    )
