"""A model back from a checkpoint: the captioner, its vocabulary and the config it was trained with."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from captioning.data.vocab import Vocabulary
from captioning.models.captioner import build_captioner, build_image_encoder
from captioning.runtime.checkpoint import load_checkpoint


def load_model(checkpoint_path, device: torch.device, for_images: bool = False):
    """(model in eval mode, vocabulary, training config, checkpoint dict). No pretrained download: the
    weights come from the checkpoint. A model trained on cached features reads features, or, with
    `for_images`, gets its frozen encoder back (built from the config: the pretrained weights must be
    available)."""
    state = load_checkpoint(checkpoint_path, map_location="cpu")
    cfg = OmegaConf.create(state["config"])
    if OmegaConf.select(cfg, "task.name", default="caption") == "lm":
        raise ValueError(f"{checkpoint_path} is a language model's checkpoint (task=lm), not a captioner's: sample "
                         f"it with captioning-sample checkpoint={checkpoint_path}")
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

