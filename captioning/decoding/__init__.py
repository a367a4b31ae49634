"""Caption decoders over the model step interface (init_state / step / reorder_state).

Every decoder returns, per image, a list of (word_ids, score) best first, word_ids without bos/eos/pad.
Conventions (max_len, eos, scores) are documented in common.py; decoders run under torch.no_grad()
and do not change the model's train/eval mode (call model.eval() first).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from captioning.decoding.beam import beam_search
from captioning.decoding.common import Hypothesis, gnmt_length_penalty, validate_decode_params
from captioning.decoding.diverse_beam import diverse_beam_search
from captioning.decoding.ensemble import EnsembleModel
from captioning.decoding.greedy import greedy
from captioning.decoding.sampling import sample, sampling_distribution

DECODERS: dict[str, Callable[..., list[list[Hypothesis]]]] = {
    "greedy": greedy,
    "sample": sample,
    "beam": beam_search,
    "diverse_beam": diverse_beam_search,
}


def decode(model, images: torch.Tensor, strategy: str, **params) -> list[list[Hypothesis]]:
    """Run the decoder named `strategy` ("greedy" | "sample" | "beam" | "diverse_beam") with `params`.

    All parameters are validated before any model work; a bad one raises ValueError naming it.
    """
    full = validate_decode_params(strategy, **params)
    return DECODERS[strategy](model, images, **full)


__all__ = [
    "DECODERS",
    "EnsembleModel",
    "Hypothesis",
    "beam_search",
    "decode",
    "diverse_beam_search",
    "gnmt_length_penalty",
    "greedy",
    "sample",
    "sampling_distribution",
    "validate_decode_params",
]
