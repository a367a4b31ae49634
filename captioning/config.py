"""Config checks that run before any heavy work: every bad value fails with its key named."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Where the Hydra configs live: inside the installed package (wheel), else the checkout's conf/.
_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> str:
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"captioning: Hydra configs not found next to {_PACKAGE_DIR} (reinstall the package)")


class ConfigError(ValueError):
    pass


def _register_resolvers() -> None:
    """`${run_folder:}` in hydra.run.dir: DATE/TIME, or slurm-JOBID in a plain SLURM batch job (a requeued job
    finds its checkpoints again; runtime.cluster.run_folder_name)."""
    import time

    from captioning.runtime.cluster import run_folder_name

    started = time.strftime("%Y-%m-%d/%H-%M-%S")  # one timestamp per process, as Hydra's ${now:} gives
    if not OmegaConf.has_resolver("run_folder"):
        OmegaConf.register_new_resolver("run_folder", lambda: run_folder_name(now=started))


_register_resolvers()


def _require(condition: bool, key: str, message: str, value) -> None:
    if not condition:
        raise ConfigError(f"{key} {message} (got {value!r})")


def _positive_int(cfg, key: str, allow_none: bool = False, minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, key,
             f"must be an integer >= {minimum}", value)


def _choice(cfg, key: str, choices: tuple) -> None:
    value = OmegaConf.select(cfg, key)
    _require(value in choices, key, f"must be one of {list(choices)}", value)


def resolve_target(target: str, key: str):
    module_name, _, attr = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{key}._target_: cannot import {target!r}") from None


def check_target_arguments(node, key: str, provided_later: tuple[str, ...]) -> None:
    """Every argument of a `_target_` node exists in its signature, without building it (torchtune habit)."""
    if node is None:
        return
    target = resolve_target(node._target_, key)
    params = inspect.signature(target).parameters
    accepts_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    for name in node:
        if name.startswith("_"):
            continue
        _require(accepts_kwargs or name in params, f"{key}.{name}", f"is not an argument of {node._target_}", name)
    missing = [n for n, p in params.items() if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
               p.KEYWORD_ONLY) and n not in node and n not in provided_later]
    _require(not missing, key, f"misses required arguments {missing} of {node._target_}", dict(node))


def validate_data(cfg: DictConfig) -> None:
    if cfg.data.get("name") == "text":  # the language model's data (task=lm; check_task_matches_data)
        validate_text_data(cfg)
        return
    _choice(cfg, "data.name", ("synthetic", "coco"))
    if cfg.data.name == "coco":
        _require(OmegaConf.select(cfg, "data.root", throw_on_missing=False) not in (None, "???"), "data.root",
                 "must be set for data=coco (the COCO folder; check it with tools/check_coco.py)", None)
    for key in ("image_size", "captions_per_image", "max_len", "batch_size", "eval_batch_size"):
        _positive_int(cfg, f"data.{key}")
    _positive_int(cfg, "data.resize_size", allow_none=True)
    _positive_int(cfg, "data.num_workers", minimum=0)
    _positive_int(cfg, "data.word_count_threshold", minimum=0)
    _positive_int(cfg, "data.max_image_pixels")
    _choice(cfg, "data.on_bad_image", ("skip", "error"))
    if cfg.data.get("features"):
        _require(Path(str(cfg.data.features)).expanduser().is_dir(), "data.features",
                 "must be a feature store folder made by tools/extract_features.py", cfg.data.features)
        _require(not cfg.model.encoder.trainable and cfg.model.encoder.get("unfreeze_after_steps") is None,
                 "data.features", "needs a frozen encoder (model.encoder.trainable=false, no unfreezing): "
                 "cached features cannot be fine-tuned", cfg.data.features)
    _choice(cfg, "data.on_bad_caption", ("skip", "error"))
    if cfg.data.resize_size is not None:
        _require(cfg.data.resize_size >= cfg.data.image_size, "data.resize_size", "must be >= data.image_size",
                 cfg.data.resize_size)
    if cfg.data.name == "synthetic":
        for key in ("num_train", "num_val", "num_test", "image_size"):
            _positive_int(cfg, f"data.synthetic.{key}")
        _positive_int(cfg, "data.synthetic.seed", minimum=0)


def validate_model(cfg: DictConfig) -> None:
    _choice(cfg, "model.decoder.cell", ("lstm", "gru", "rnn"))
    for key in ("num_layers", "embed_dim", "hidden_dim"):
        _positive_int(cfg, f"model.decoder.{key}")
    dropout = cfg.model.decoder.dropout
    _require(isinstance(dropout, (int, float)) and 0 <= dropout < 1, "model.decoder.dropout", "must be in [0, 1)",
             dropout)
    _require(isinstance(cfg.model.encoder.trainable, bool), "model.encoder.trainable", "must be true or false",
             cfg.model.encoder.trainable)
    _choice(cfg, "model.encoder.pool", ("avg", "grid"))
    if cfg.model.decoder.get("image_feed") is not None:
        _choice(cfg, "model.decoder.image_feed", ("first", "every_step"))
    attention = cfg.model.decoder.get("attention", False)
    _require(isinstance(attention, bool), "model.decoder.attention", "must be true or false", attention)
    if attention and cfg.model.encoder.get("pretrain") is None:  # pretraining makes a label head (feed=labels)
        from captioning.models.attention import no_parts

        if problem := no_parts(cfg.model.encoder):
            raise ConfigError(problem)
    if cfg.model.get("image_input") is not None:  # conf/experiment/image_blind.yaml
        _choice(cfg, "model.image_input", ("image", "constant"))
    _positive_int(cfg, "model.encoder.unfreeze_after_steps", allow_none=True, minimum=0)
    if cfg.model.encoder.get("unfreeze_after_steps") is not None:
        _require(not cfg.model.encoder.trainable, "model.encoder.unfreeze_after_steps",
                 "needs model.encoder.trainable=false (the encoder starts frozen)", cfg.model.encoder.trainable)
    _positive_int(cfg, "model.encoder.grid_size")
    label_head = cfg.model.encoder.get("label_head")
    _require(label_head is None or (isinstance(label_head, str) and label_head), "model.encoder.label_head",
             "must be null or the path of a label head file", label_head)
    import torchvision

    name = cfg.model.encoder.name
    _require(name in torchvision.models.list_models(module=torchvision.models), "model.encoder.name",
             "must be a torchvision classification model (resnet18, resnet50, resnet101, efficientnet_b0...)", name)


def validate_decode(cfg: DictConfig) -> None:
    """The `decode` group holds exactly the chosen decoder's parameters (conf/decode/NAME.yaml): a key that
    decoder does not take is an error here, before any work."""
    from captioning.decoding import validate_decode_params

    from captioning.decoding import DECODERS

    d = cfg.decode
    _require(d.get("strategy") in DECODERS, "decode.strategy", f"must be one of {sorted(DECODERS)}", d.get("strategy"))
    try:
        validate_decode_params(d.strategy, **decode_kwargs(d))
    except ValueError as e:
        raise ConfigError(f"decode: {e} (decode={d.strategy} takes the keys of conf/decode/{d.strategy}.yaml)") from None


def decode_kwargs(d) -> dict:
    """The keyword arguments of the chosen decoder: every key of the `decode` config but `strategy`."""
    items = OmegaConf.to_container(d, resolve=True) if OmegaConf.is_config(d) else dict(d)
    return {k: v for k, v in items.items() if k != "strategy"}


def validate_schedule(cfg: DictConfig) -> None:
    from captioning.schedules import build_schedule_from_config

    try:
        build_schedule_from_config(OmegaConf.to_container(cfg.schedule, resolve=True))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    targets = cfg.schedule.get("targets", "reference")
    if targets == "reference":
        return
    if OmegaConf.select(cfg, "task.name", default="caption") == "lm":
        raise ConfigError(f"schedule.targets={targets}: the language model trains on reference targets only")
    if targets == "oracle" and OmegaConf.select(cfg, "data.name") != "synthetic":
        raise ConfigError(f"schedule.targets=oracle needs the synthetic scenes' oracle (data=synthetic); data "
                          f"{OmegaConf.select(cfg, 'data.name')} has none: use schedule.targets=optimal_completion")


OBJECTIVE_KEYS = {
    "cross_entropy": ("name",),
    "self_critical": ("name", "baseline", "samples_per_image", "temperature", "max_len", "reward", "reward_eos",
                      "init_from", "start_step"),
}
REWARD_KEYS = ("cider_d", "bleu4")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_objective(cfg: DictConfig) -> None:
    """The `objective` group (conf/objective/NAME.yaml); a config without it trains with cross-entropy."""
    o = cfg.get("objective")
    if o is None:
        return
    _choice(cfg, "objective.name", tuple(OBJECTIVE_KEYS))
    unknown = sorted(set(o) - set(OBJECTIVE_KEYS[o.name]))
    _require(not unknown, f"objective.{unknown[0] if unknown else ''}",
             f"is not a key of objective={o.name} (its keys: {list(OBJECTIVE_KEYS[o.name])})", unknown)
    if o.name != "self_critical":
        return
    _choice(cfg, "objective.baseline", ("greedy", "mean"))
    if o.baseline == "mean":
        _require(isinstance(o.samples_per_image, int) and not isinstance(o.samples_per_image, bool)
                 and o.samples_per_image >= 2, "objective.samples_per_image",
                 "must be an integer >= 2 with objective.baseline=mean (the baseline is the other samples' mean)",
                 o.samples_per_image)
    _positive_int(cfg, "objective.samples_per_image")
    _require(_number(o.temperature) and o.temperature > 0, "objective.temperature", "must be a number > 0",
             o.temperature)
    _positive_int(cfg, "objective.max_len", allow_none=True)
    _require(isinstance(o.reward_eos, bool), "objective.reward_eos", "must be true or false", o.reward_eos)
    _require(OmegaConf.is_dict(o.reward), "objective.reward", f"must be a mapping of weights {list(REWARD_KEYS)}",
             o.reward)
    for name in o.reward:
        _require(name in REWARD_KEYS, f"objective.reward.{name}", f"is not a reward (choose from {list(REWARD_KEYS)})",
                 name)
        weight = o.reward[name]
        _require(_number(weight) and weight >= 0, f"objective.reward.{name}", "must be a weight >= 0", weight)
    _require(any(o.reward[name] > 0 for name in o.reward), "objective.reward", "needs a weight > 0",
             OmegaConf.to_container(o.reward))
    if o.init_from is not None:
        _require(Path(str(o.init_from)).expanduser().is_file(), "objective.init_from",
                 "must be an existing checkpoint file or null", o.init_from)
    _positive_int(cfg, "objective.start_step", minimum=0)


def validate_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    _require(t.max_steps is not None or t.max_epochs is not None, "trainer.max_steps",
             "or trainer.max_epochs must be set", None)
    _positive_int(cfg, "trainer.max_steps", allow_none=True)
    _positive_int(cfg, "trainer.max_epochs", allow_none=True)
    _positive_int(cfg, "trainer.val_every_n_steps")
    _positive_int(cfg, "trainer.val_max_images", allow_none=True)
    _positive_int(cfg, "trainer.log_every_n_steps")
    _positive_int(cfg, "trainer.checkpoint_every_n_steps", allow_none=True)
    minutes = t.get("checkpoint_every_minutes")
    _require(minutes is None or (isinstance(minutes, (int, float)) and not isinstance(minutes, bool) and minutes > 0),
             "trainer.checkpoint_every_minutes", "must be a number of minutes > 0 or null", minutes)
    _choice(cfg, "trainer.on_nonfinite", ("skip", "stop"))
    _require(str(t.get("progress_bar")) in ("auto", "True", "False"), "trainer.progress_bar", "must be auto, true or false",
             t.get("progress_bar"))
    timeout = t.get("dist_timeout_minutes")
    _require(isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0,
             "trainer.dist_timeout_minutes", "must be a number of minutes > 0", timeout)
    _positive_int(cfg, "trainer.max_nonfinite_in_a_row")
    _positive_int(cfg, "trainer.num_threads", allow_none=True)
    _choice(cfg, "trainer.precision", ("fp32", "bf16", "fp16"))
    _choice(cfg, "trainer.scoring", ("now", "deferred"))
    _choice(cfg, "trainer.compile_mode", ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    for key in ("cudnn_benchmark", "channels_last", "compile", "cuda_graphs"):
        _require(isinstance(t.get(key), bool), f"trainer.{key}", "must be true or false", t.get(key))
    device = str(t.device)
    _require(device in ("auto", "cpu", "cuda") or device.startswith("cuda:"), "trainer.device",
             "must be auto, cpu, cuda or cuda:N", device)
    if device.startswith("cuda"):
        import torch

        _require(torch.cuda.is_available(), "trainer.device", "asks for CUDA but no CUDA device is available", device)
    resume = str(t.resume)
    if resume not in ("auto", "never"):
        _require(Path(resume).expanduser().is_file(), "trainer.resume", "must be auto, never or an existing "
                 "checkpoint file", resume)
    _require(str(t.monitor).startswith("val/"), "trainer.monitor", "must be a val/ metric such as val/CIDEr",
             t.monitor)


def validate_optim(cfg: DictConfig) -> None:
    o = cfg.optim
    check_target_arguments(o.optimizer, "optim.optimizer", provided_later=("params",))
    check_target_arguments(o.lr_scheduler, "optim.lr_scheduler", provided_later=("optimizer", "T_max"))
    _require(o.optimizer.get("lr", 1.0) > 0, "optim.optimizer.lr", "must be > 0", o.optimizer.get("lr"))
    _require(o.encoder_lr is None or o.encoder_lr > 0, "optim.encoder_lr", "must be > 0 or null", o.encoder_lr)
    _require(o.grad_clip_norm is None or o.grad_clip_norm >= 0, "optim.grad_clip_norm", "must be >= 0 or null",
             o.grad_clip_norm)


def validate_logger(cfg: DictConfig) -> None:
    w = cfg.logger.wandb
    if w is not None:
        _require(w.mode in (None, "online", "offline", "disabled"), "logger.wandb.mode",
                 "must be online, offline, disabled or null", w.mode)
        _require(bool(w.project), "logger.wandb.project", "must be set", w.project)


def validate_text_data(cfg: DictConfig) -> None:
    """`data=text` (conf/data/text.yaml): the language model's text, tokens and streams."""
    _choice(cfg, "data.level", ("char", "word"))
    path = cfg.data.get("path")
    if path is not None:
        _require(Path(str(path)).expanduser().exists(), "data.path", "must be an existing UTF-8 text file (or null "
                 "for the embedded synthetic captions): no such file", path)
        _require(Path(str(path)).expanduser().is_file(), "data.path", "must be a text file, not a folder", path)
    split = cfg.data.get("split")
    _require(OmegaConf.is_list(split) and len(split) == 3 and all(_number(x) and x > 0 for x in split), "data.split",
             "must be three fractions > 0 (train, val, test, by position)", split)
    for key in ("batch_size", "tbptt_steps", "eval_batch_size"):
        _positive_int(cfg, f"data.{key}")
    _positive_int(cfg, "data.word_count_threshold", minimum=0)
    for key in ("num_train", "num_val", "num_test"):
        _positive_int(cfg, f"data.embedded.{key}", minimum=0)
    _positive_int(cfg, "data.embedded.seed", minimum=0)


LM_MONITORS = {"char": ("val/loss", "val/bits_per_token", "val/bpc"),
               "word": ("val/loss", "val/bits_per_token", "val/perplexity")}


def validate_language_model(cfg: DictConfig) -> None:
    """task=lm (conf/task/lm.yaml): the decoder alone over `data=text`; the model's encoder settings do not apply."""
    _require(cfg.data.get("name") == "text", "data", "must be text for task=lm (captioning-train task=lm "
             "data.path=FILE)", cfg.data.get("name"))
    validate_text_data(cfg)
    _require(OmegaConf.select(cfg, "objective.name", default="cross_entropy") == "cross_entropy", "objective.name",
             "must be cross_entropy for task=lm", OmegaConf.select(cfg, "objective.name"))
    monitors = LM_MONITORS[cfg.data.level]
    _require(cfg.trainer.monitor in monitors, "trainer.monitor", f"must be one of {list(monitors)} for task=lm "
             f"data.level={cfg.data.level} (lower is better)", cfg.trainer.monitor)
    _positive_int(cfg, "task.sample_length")
    temperatures = cfg.task.get("sample_temperatures")
    _require(OmegaConf.is_list(temperatures) and all(_number(t) and t > 0 for t in temperatures),
             "task.sample_temperatures", "must be a list of temperatures > 0", temperatures)


def check_task_matches_data(cfg: DictConfig) -> None:
    """Captioning (task=caption) needs image data: data=text is the language model's (task=lm)."""
    if OmegaConf.select(cfg, "task.name", default="caption") != "lm" and cfg.data.get("name") == "text":
        raise ConfigError("data=text is text for the language model: add task=lm (captioning-train task=lm "
                          "data.path=FILE); captioning needs data=synthetic or data=coco")


def validate_train_config(cfg: DictConfig) -> None:
    """All checks for a training run; cheap (no data, no model)."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"missing mandatory config value(s): {sorted(missing)}")
    _positive_int(cfg, "seed", minimum=0)
    task = OmegaConf.select(cfg, "task.name", default="caption")
    _require(task in ("caption", "lm"), "task", "must be caption or lm", task)
    if task == "lm":
        validate_language_model(cfg)  # its data and objective
    else:
        validate_data(cfg)
        validate_objective(cfg)
    validate_model(cfg)
    validate_schedule(cfg)
    validate_decode(cfg)
    validate_optim(cfg)
    validate_trainer(cfg)
    validate_logger(cfg)
