"""Helpers shared by every decoder: parameter validation, special-token masking, the length penalty.

Conventions that all decoders in this package follow (they are the contract the tests check):

* A hypothesis is ``(token_ids, score)``; ``token_ids`` are word ids only (no bos/eos/pad).
* bos and pad are never generated: their log-probs are set to -inf before any choice is made
  (the log-probs of the other tokens are *not* renormalised, so scores stay model log-probs).
* ``max_len`` is the maximum number of words. Step t (1-based) emits token t. A hypothesis that emits
  eos is finished, and its score includes the eos log-prob. A hypothesis that has emitted ``max_len``
  words is finished without an eos: no eos log-prob is added (the model is never asked for step
  max_len + 1). So a caption has at most ``max_len`` words and ``length`` (for the length penalty)
  counts the emitted tokens: words + 1 if it ended with eos, else ``max_len``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from captioning.models.captioner import never_generated  # noqa: F401  (the one mask of tokens no caption contains)

Hypothesis = tuple[list[int], float]  # (word ids without bos/eos/pad, score)

# strategy -> {parameter: default}; a default of _REQUIRED means the caller must pass it.
_REQUIRED = object()
DECODE_PARAMS: dict[str, dict[str, object]] = {
    "greedy": {"max_len": _REQUIRED},
    "sample": {
        "max_len": _REQUIRED,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "n": 1,
        "generator": None,
    },
    "beam": {"beam_size": _REQUIRED, "max_len": _REQUIRED, "length_penalty": 0.0, "n_best": 1},
    "diverse_beam": {
        "beam_size": _REQUIRED,
        "num_groups": _REQUIRED,
        "diversity_strength": _REQUIRED,
        "max_len": _REQUIRED,
        "length_penalty": 0.0,
        "n_best": None,
    },
}


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def validate_decode_params(strategy: str, **params: object) -> dict[str, Any]:
    """Check `params` for `strategy` before any work; return them completed with the defaults.

    Raises ValueError naming the offending parameter (or the strategy) when anything is wrong.
    """
    if strategy not in DECODE_PARAMS:
        raise ValueError(f"strategy must be one of {sorted(DECODE_PARAMS)}, got {strategy!r}")
    spec = DECODE_PARAMS[strategy]
    unknown = sorted(set(params) - set(spec))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for strategy {strategy!r}; expected {sorted(spec)}")
    missing = [name for name, default in spec.items() if default is _REQUIRED and name not in params]
    if missing:
        raise ValueError(f"missing required parameter(s) {missing} for strategy {strategy!r}")
    full: dict[str, Any] = {name: params.get(name, default) for name, default in spec.items()}

    _check_int("max_len", full["max_len"], 1)
    if strategy == "sample":
        if _check_real("temperature", full["temperature"]) <= 0:
            raise ValueError(f"temperature must be > 0, got {full['temperature']!r}")
        _check_int("top_k", full["top_k"], 0)
        top_p = _check_real("top_p", full["top_p"])
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {full['top_p']!r}")
        _check_int("n", full["n"], 1)
        if full["generator"] is not None and not isinstance(full["generator"], torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(full['generator']).__name__}")
    if strategy in ("beam", "diverse_beam"):
        _check_int("beam_size", full["beam_size"], 1)
        _check_real("length_penalty", full["length_penalty"])
        n_best = full["n_best"] if full["n_best"] is not None else full["beam_size"]
        _check_int("n_best", n_best, 1)
        if n_best > full["beam_size"]:
            raise ValueError(f"n_best must be <= beam_size ({full['beam_size']}), got {n_best!r}")
        full["n_best"] = n_best
    if strategy == "diverse_beam":
        _check_int("num_groups", full["num_groups"], 1)
        if full["beam_size"] % full["num_groups"] != 0:
            raise ValueError(f"num_groups ({full['num_groups']}) must divide beam_size ({full['beam_size']})")
        if _check_real("diversity_strength", full["diversity_strength"]) < 0:
            raise ValueError(f"diversity_strength must be >= 0, got {full['diversity_strength']!r}")
    return full


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty lp = ((5 + length) / 6) ** alpha (Wu et al. 2016); alpha = 0 gives 1."""
    return ((5.0 + length) / 6.0) ** alpha


def to_hypotheses(words: torch.Tensor, num_words: torch.Tensor, scores: torch.Tensor) -> list[list[Hypothesis]]:
    """Turn (B, H, L) word ids, (B, H) word counts, (B, H) scores into per-image lists, best first.

    Entries with score -inf (empty pool slots) are dropped. One host transfer for the whole batch.
    """
    order = scores.argsort(dim=1, descending=True, stable=True)  # (B, H)
    word_rows = words.gather(1, order.unsqueeze(-1).expand_as(words)).tolist()
    word_counts = num_words.gather(1, order).tolist()
    score_rows = scores.gather(1, order).tolist()
    return [
        [(w[:n], s) for w, n, s in zip(ws, ns, ss) if s != float("-inf")]
        for ws, ns, ss in zip(word_rows, word_counts, score_rows)
    ]
