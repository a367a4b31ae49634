"""Keys added on the command line with `+` must be keys some config group declares.

Hydra's own hint for a typo (`trainer.max_step=10`: "Key 'max_step' is not in struct") is to add a `+`, after
which the typo is accepted and silently ignored. Every entry point (captioning.cli.exit_on_user_error) checks the
task's overrides instead: a `+KEY=VALUE` that adds a value (not a config group's option, like `+experiment=...`)
is a ConfigError naming the key and the nearest declared key ("did you mean trainer.max_steps?"). `++KEY=VALUE`
(Hydra's force-add) and the open containers below stay allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Containers meant to receive new keys from the command line: captioning-eval's per-decoder overrides
# (checked against the decoders' own keys there) and Hydra's own settings.
OPEN_CONTAINERS = ("compare_overrides", "hydra")


def task_overrides() -> list[str] | None:
    """The command line's overrides of the running Hydra job; None outside one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job
        return None


def declared_keys(cfg: DictConfig, added: set[str]) -> list[str]:
    """Every key path of `cfg` (leaves and containers) except those in `added`."""
    keys = []

    def walk(node, prefix: str) -> None:
        if not OmegaConf.is_dict(node):
            return
        for key in node.keys():
            path = f"{prefix}{key}"
            if path in added:
                continue
            keys.append(path)
            value = node._get_node(key)
            if OmegaConf.is_dict(value) and not value._is_missing() and not value._is_none():
                walk(value, f"{path}.")

    walk(cfg, "")
    return keys


def added_value_keys(overrides: list[str], groups_root: Path) -> list[str]:
    """The keys that `+KEY=VALUE` overrides add (not `+group=option`, not `++`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    added = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.is_add() or override.is_force_add():
            continue
        key = override.key_or_group
        if override.package is not None or (groups_root / key.replace(".", "/")).is_dir():
            continue  # a config group's option appended to the defaults list
        if key.split(".")[0] in OPEN_CONTAINERS:
            continue
        added.append(key)
    return added


def check_added_keys(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """ConfigError naming the first `+`-added key that no config group declares, with the nearest declared key.
    `overrides` default: the running Hydra job's; outside a job, nothing to check."""
    from captioning.config import config_dir
    from captioning.errors import ConfigError

    overrides = task_overrides() if overrides is None else overrides
    if not overrides:
        return
    added = added_value_keys(overrides, Path(config_dir()))
    if not added:
        return
    known = declared_keys(cfg, set(added))
    for key in added:
        parent = key.rpartition(".")[0]
        siblings = [k for k in known if k.rpartition(".")[0] == parent] or known
        leaves = {k.rpartition(".")[2]: k for k in siblings}
        nearest = difflib.get_close_matches(key.rpartition(".")[2], list(leaves), n=1, cutoff=0.6)
        hint = (
            f"did you mean {leaves[nearest[0]]}?"
            if nearest
            else (f"the keys there are {sorted(k.rpartition('.')[2] for k in siblings)[:12]}" if parent else "")
        )
        raise ConfigError(
            f"+{key}: no config group declares the key {key}, so it would be ignored" + (f"; {hint}" if hint else "")
        )
