"""Checks of the `decode` group (conf/decode/NAME.yaml): the chosen decoder and exactly its parameters."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from captioning.checks import require
from captioning.errors import ConfigError


def validate_decode(cfg: DictConfig) -> None:
    """The `decode` group holds exactly the chosen decoder's parameters (conf/decode/NAME.yaml): a key that
    decoder does not take is an error here, before any work."""
    from captioning.decoding import DECODERS, validate_decode_params

    d = cfg.decode
    require(d.get("strategy") in DECODERS, "decode.strategy", f"must be one of {sorted(DECODERS)}", d.get("strategy"))
    try:
        validate_decode_params(d.strategy, **decode_kwargs(d))
    except ValueError as e:
        raise ConfigError(
            f"decode: {e} (decode={d.strategy} takes the keys of conf/decode/{d.strategy}.yaml)"
        ) from None


def decode_kwargs(d) -> dict:
    """The keyword arguments of the chosen decoder: every key of the `decode` config but `strategy`."""
    items = OmegaConf.to_container(d, resolve=True) if OmegaConf.is_config(d) else dict(d)
    assert isinstance(items, dict)  # `decode` is a mapping (a DictConfig or a dict)
    return {k: v for k, v in items.items() if k != "strategy"}
