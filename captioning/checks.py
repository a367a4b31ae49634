"""Small helpers for the config checks that live beside their owners (data/checks.py, models/checks.py,
training/checks.py...): each names the key and the value it rejects. A leaf: it imports only captioning.errors."""

from __future__ import annotations

import importlib
import inspect

from omegaconf import OmegaConf

from captioning.errors import ConfigError


def require(condition: bool, key: str, message: str, value) -> None:
    if not condition:
        raise ConfigError(f"{key} {message} (got {value!r})")


def positive_int(cfg, key: str, allow_none: bool = False, minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        key,
        f"must be an integer >= {minimum}",
        value,
    )


def choice(cfg, key: str, choices: tuple) -> None:
    value = OmegaConf.select(cfg, key)
    require(value in choices, key, f"must be one of {list(choices)}", value)


def subset(cfg, key: str, choices: tuple) -> None:
    """`key`: a non-empty list of `choices` without repeats (e.g. the COCO metrics to compute)."""
    value = OmegaConf.select(cfg, key)
    items = list(value) if OmegaConf.is_list(value) else None
    require(
        bool(items) and all(item in choices for item in items) and len(set(items)) == len(items),
        key,
        f"must be a non-empty list of {list(choices)} without repeats",
        OmegaConf.to_container(value) if OmegaConf.is_config(value) else value,
    )


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_target(target: str, key: str):
    """The object a dotted name `package.module.attr` names (a `_target_`, `data.generator`...)."""
    module_name, _, attr = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{key}: cannot import {target!r}") from None


def check_target_arguments(node, key: str, provided_later: tuple[str, ...]) -> None:
    """Every argument of a `_target_` node exists in its signature, without building it (torchtune habit)."""
    if node is None:
        return
    target = resolve_target(node._target_, f"{key}._target_")
    params = inspect.signature(target).parameters
    accepts_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    for name in node:
        if name.startswith("_"):
            continue
        require(accepts_kwargs or name in params, f"{key}.{name}", f"is not an argument of {node._target_}", name)
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and n not in node
        and n not in provided_later
    ]
    require(not missing, key, f"misses required arguments {missing} of {node._target_}", dict(node))
