"""Optimizer and learning-rate scheduler from the `optim` config."""

from __future__ import annotations

import hydra
from omegaconf import OmegaConf


def build_param_groups(model, cfg_optim, will_unfreeze: bool = False) -> list[dict]:
    """The decoder's parameters, and the encoder's (with `optim.encoder_lr`) when it is trained now or will
    be after `model.encoder.unfreeze_after_steps` (frozen parameters get no gradient, so the optimizer
    leaves them alone until then)."""
    encoder_params = [p for p in model.encoder.parameters()]
    encoder_ids = {id(p) for p in encoder_params}
    rest = [p for p in model.parameters() if id(p) not in encoder_ids]
    groups = [{"params": rest, "name": "decoder"}]
    if (model.encoder.trainable or will_unfreeze) and encoder_params:
        group = {"params": encoder_params, "name": "encoder"}
        if cfg_optim.encoder_lr is not None:
            group["lr"] = cfg_optim.encoder_lr
        groups.append(group)
    return groups


def build_optimizer_and_scheduler(model, cfg_optim, total_steps: int, will_unfreeze: bool = False):
    optimizer = hydra.utils.instantiate(cfg_optim.optimizer)(build_param_groups(model, cfg_optim, will_unfreeze))
    scheduler_cfg = OmegaConf.to_container(cfg_optim.lr_scheduler, resolve=True) if cfg_optim.lr_scheduler else None
    scheduler = None
    if scheduler_cfg:
        if "T_max" in scheduler_cfg and scheduler_cfg["T_max"] is None:
            scheduler_cfg["T_max"] = total_steps
        scheduler = hydra.utils.instantiate(scheduler_cfg)(optimizer)
    return optimizer, scheduler
