"""Checks of the groups training owns: `objective`, `trainer`, `optim`, and `task` (task=lm and the data it needs),
run by captioning.config.validate_train_config before any work: every bad value fails with its key named."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from captioning.checks import (
    check_target_arguments,
    choice,
    number,
    positive_int,
    require,
    subset,
)
from captioning.data.checks import validate_text_data
from captioning.errors import ConfigError

OBJECTIVE_KEYS = {
    "cross_entropy": ("name",),
    "self_critical": (
        "name",
        "baseline",
        "samples_per_image",
        "temperature",
        "max_len",
        "reward",
        "reward_eos",
        "init_from",
        "start_step",
    ),
}
REWARD_KEYS = ("cider_d", "bleu4")


def validate_objective(cfg: DictConfig) -> None:
    """The `objective` group (conf/objective/NAME.yaml); a config without it trains with cross-entropy."""
    o = cfg.get("objective")
    if o is None:
        return
    choice(cfg, "objective.name", tuple(OBJECTIVE_KEYS))
    unknown = sorted(set(o) - set(OBJECTIVE_KEYS[o.name]))
    require(
        not unknown,
        f"objective.{unknown[0] if unknown else ''}",
        f"is not a key of objective={o.name} (its keys: {list(OBJECTIVE_KEYS[o.name])})",
        unknown,
    )
    if o.name != "self_critical":
        return
    choice(cfg, "objective.baseline", ("greedy", "mean"))
    if o.baseline == "mean":
        require(
            isinstance(o.samples_per_image, int)
            and not isinstance(o.samples_per_image, bool)
            and o.samples_per_image >= 2,
            "objective.samples_per_image",
            "must be an integer >= 2 with objective.baseline=mean (the baseline is the other samples' mean)",
            o.samples_per_image,
        )
    positive_int(cfg, "objective.samples_per_image")
    require(number(o.temperature) and o.temperature > 0, "objective.temperature", "must be a number > 0", o.temperature)
    positive_int(cfg, "objective.max_len", allow_none=True)
    require(isinstance(o.reward_eos, bool), "objective.reward_eos", "must be true or false", o.reward_eos)
    require(
        OmegaConf.is_dict(o.reward), "objective.reward", f"must be a mapping of weights {list(REWARD_KEYS)}", o.reward
    )
    for name in o.reward:
        require(
            name in REWARD_KEYS, f"objective.reward.{name}", f"is not a reward (choose from {list(REWARD_KEYS)})", name
        )
        weight = o.reward[name]
        require(number(weight) and weight >= 0, f"objective.reward.{name}", "must be a weight >= 0", weight)
    require(
        any(o.reward[name] > 0 for name in o.reward),
        "objective.reward",
        "needs a weight > 0",
        OmegaConf.to_container(o.reward),
    )
    if o.init_from is not None:
        require(
            Path(str(o.init_from)).expanduser().is_file(),
            "objective.init_from",
            "must be an existing checkpoint file or null",
            o.init_from,
        )
    positive_int(cfg, "objective.start_step", minimum=0)


def validate_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    require(
        t.max_steps is not None or t.max_epochs is not None,
        "trainer.max_steps",
        "or trainer.max_epochs must be set",
        None,
    )
    positive_int(cfg, "trainer.max_steps", allow_none=True)
    positive_int(cfg, "trainer.max_epochs", allow_none=True)
    positive_int(cfg, "trainer.val_every_n_steps")
    positive_int(cfg, "trainer.val_max_images", allow_none=True)
    positive_int(cfg, "trainer.log_every_n_steps")
    positive_int(cfg, "trainer.checkpoint_every_n_steps", allow_none=True)
    minutes = t.get("checkpoint_every_minutes")
    require(
        minutes is None or (isinstance(minutes, (int, float)) and not isinstance(minutes, bool) and minutes > 0),
        "trainer.checkpoint_every_minutes",
        "must be a number of minutes > 0 or null",
        minutes,
    )
    choice(cfg, "trainer.on_nonfinite", ("skip", "stop"))
    require(
        str(t.get("progress_bar")) in ("auto", "True", "False"),
        "trainer.progress_bar",
        "must be auto, true or false",
        t.get("progress_bar"),
    )
    timeout = t.get("dist_timeout_minutes")
    require(
        isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0,
        "trainer.dist_timeout_minutes",
        "must be a number of minutes > 0",
        timeout,
    )
    positive_int(cfg, "trainer.max_nonfinite_in_a_row")
    positive_int(cfg, "trainer.num_threads", allow_none=True)
    choice(cfg, "trainer.precision", ("fp32", "bf16", "fp16"))
    choice(cfg, "trainer.scoring", ("now", "deferred"))
    choice(cfg, "trainer.compile_mode", ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    for key in ("cudnn_benchmark", "channels_last", "compile", "cuda_graphs"):
        require(isinstance(t.get(key), bool), f"trainer.{key}", "must be true or false", t.get(key))
    device = str(t.device)
    require(
        device in ("auto", "cpu", "cuda") or device.startswith("cuda:"),
        "trainer.device",
        "must be auto, cpu, cuda or cuda:N",
        device,
    )
    if device.startswith("cuda"):
        import torch

        require(torch.cuda.is_available(), "trainer.device", "asks for CUDA but no CUDA device is available", device)
    resume = str(t.resume)
    if resume not in ("auto", "never"):
        require(
            Path(resume).expanduser().is_file(),
            "trainer.resume",
            "must be auto, never or an existing checkpoint file",
            resume,
        )
    require(str(t.monitor).startswith("val/"), "trainer.monitor", "must be a val/ metric such as val/CIDEr", t.monitor)
    from captioning.metrics.coco import DEFAULT_METRICS, figures_of

    subset(cfg, "trainer.metrics", DEFAULT_METRICS)
    monitored = str(t.monitor).removeprefix("val/")
    left_out = [m for m in DEFAULT_METRICS if monitored in figures_of(m) and m not in t.metrics]
    require(
        not left_out,
        "trainer.monitor",
        f"is a {left_out[0] if left_out else ''} figure, which trainer.metrics={list(t.metrics)} does not compute",
        t.monitor,
    )


def validate_optim(cfg: DictConfig) -> None:
    o = cfg.optim
    check_target_arguments(o.optimizer, "optim.optimizer", provided_later=("params",))
    check_target_arguments(o.lr_scheduler, "optim.lr_scheduler", provided_later=("optimizer", "T_max"))
    require(o.optimizer.get("lr", 1.0) > 0, "optim.optimizer.lr", "must be > 0", o.optimizer.get("lr"))
    require(o.encoder_lr is None or o.encoder_lr > 0, "optim.encoder_lr", "must be > 0 or null", o.encoder_lr)
    require(
        o.grad_clip_norm is None or o.grad_clip_norm >= 0,
        "optim.grad_clip_norm",
        "must be >= 0 or null",
        o.grad_clip_norm,
    )


LM_MONITORS = {
    "char": ("val/loss", "val/bits_per_token", "val/bpc"),
    "word": ("val/loss", "val/bits_per_token", "val/perplexity"),
}


def validate_language_model(cfg: DictConfig) -> None:
    """task=lm (conf/task/lm.yaml): the decoder alone over `data=text`; the model's encoder settings do not apply."""
    require(
        cfg.data.get("name") == "text",
        "data",
        "must be text for task=lm (captioning-train task=lm data.path=FILE)",
        cfg.data.get("name"),
    )
    validate_text_data(cfg)  # the language model's data: data/checks.py
    require(
        OmegaConf.select(cfg, "objective.name", default="cross_entropy") == "cross_entropy",
        "objective.name",
        "must be cross_entropy for task=lm",
        OmegaConf.select(cfg, "objective.name"),
    )
    monitors = LM_MONITORS[cfg.data.level]
    require(
        cfg.trainer.monitor in monitors,
        "trainer.monitor",
        f"must be one of {list(monitors)} for task=lm data.level={cfg.data.level} (lower is better)",
        cfg.trainer.monitor,
    )
    positive_int(cfg, "task.sample_length")
    temperatures = cfg.task.get("sample_temperatures")
    require(
        OmegaConf.is_list(temperatures) and all(number(t) and t > 0 for t in temperatures),
        "task.sample_temperatures",
        "must be a list of temperatures > 0",
        temperatures,
    )


def check_task_matches_data(cfg: DictConfig) -> None:
    """Captioning (task=caption) needs image data: data=text is the language model's (task=lm)."""
    if OmegaConf.select(cfg, "task.name", default="caption") != "lm" and cfg.data.get("name") == "text":
        raise ConfigError(
            "data=text is text for the language model: add task=lm (captioning-train task=lm "
            "data.path=FILE); captioning needs data=synthetic or data=coco"
        )
