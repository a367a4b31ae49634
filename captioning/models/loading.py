"""A model back from a checkpoint: the captioner, its vocabulary and the config it was trained with."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from captioning.data.vocab import Vocabulary
from captioning.models.captioner import build_captioner, build_image_encoder
from captioning.runtime.checkpoint import encoder_file, load_checkpoint


def load_model(checkpoint_path, device: torch.device, for_images: bool = False):
    """(model in eval mode, vocabulary, training config, checkpoint dict). No pretrained download: the
    weights come from the checkpoint. A model trained on cached features reads features, or, with
    `for_images`, gets its frozen encoder back (built from the config: the pretrained weights must be
    available). The encoder's files are found beside the checkpoint first (checkpoints/encoder/, copied there when
    it was saved), then where the config names them. A model trained on cached features whose feature store is gone
    (the run folder copied elsewhere, the cache moved) reads images instead, with that encoder, as `for_images` does.
    Every inconsistency (an empty vocabulary, weights that do not fit the config) is a ValueError naming the file."""
    state = load_checkpoint(checkpoint_path, map_location="cpu")
    try:
        cfg = OmegaConf.create(state["config"])
        if OmegaConf.select(cfg, "task.name", default="caption") == "lm":
            raise ValueError(
                f"{checkpoint_path} is a language model's checkpoint (task=lm), not a captioner's: "
                f"sample it with captioning-sample checkpoint={checkpoint_path}"
            )
        if not isinstance(state["vocab"], dict) or not state["vocab"].get("itos"):
            raise ValueError(
                f"checkpoint {checkpoint_path} has an empty vocabulary (no 'itos' words): not a trained "
                "captioner's checkpoint"
            )
        vocab = Vocabulary.from_state_dict(state["vocab"])
        cached = cfg.data.get("features") is not None
        if cached and not for_images and not _store_exists(cfg.data.features):
            for_images = True  # the features it read are not here: encode the images with its own encoder
            cfg.data.features = None
        model_cfg = cfg.model.copy()
        if not cached:
            model_cfg.encoder.weights = None
        else:  # the files on this machine: beside the checkpoint first (the label head also shapes attention)
            for field in ("weights", "label_head"):
                if model_cfg.encoder.get(field) is not None:
                    model_cfg.encoder[field] = encoder_file(state, checkpoint_path, field)
        feature_dim = state["model"]["image_proj.weight"].shape[1] if cached else None
        model = build_captioner(model_cfg, len(vocab), feature_dim)
    except (KeyError, AttributeError, TypeError) as e:
        raise ValueError(
            f"checkpoint {checkpoint_path} is incomplete or inconsistent ({type(e).__name__}: {e})"
        ) from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # the config's sizes disagree with the weights
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ValueError(
            f"checkpoint {checkpoint_path}: its weights do not fit the model its config describes ({first})"
        ) from None
    if cached and for_images:
        if cfg.model.encoder.weights is None:
            raise ValueError(
                f"{checkpoint_path} was trained on cached features of a randomly initialised encoder "
                "(model.encoder.weights=null): images cannot be encoded the same way again"
            )
        model.encoder = build_image_encoder(model_cfg.encoder, trainable=False)
    return model.to(device).eval(), vocab, cfg, state


def _store_exists(features) -> bool:
    from pathlib import Path

    return (Path(str(features)).expanduser() / "meta.json").is_file()
