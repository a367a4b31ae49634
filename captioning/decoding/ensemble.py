"""An ensemble of captioners that is itself a model with the step interface, so every decoder runs on it.

Per step the members' next-token distributions are averaged in probability space, computed in log
space: log mean_i p_i = logsumexp_i(log p_i) - log N. An ensemble of one is the member itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class EnsembleModel:
    """Average of `models` (same vocab_size, bos_id, eos_id, pad_id); state is a tuple of member states.

    Members are used as they are (call .eval() on them first); all get the same images.
    """

    def __init__(self, models: Sequence) -> None:
        models = list(models)
        if not models:
            raise ValueError("models must contain at least one model, got an empty sequence")
        for attr in ("vocab_size", "bos_id", "eos_id", "pad_id"):
            values = [getattr(m, attr) for m in models]
            if len(set(values)) != 1:
                raise ValueError(f"all ensemble members must share {attr}; got {values}")
        self.models = models
        self.vocab_size = models[0].vocab_size
        self.bos_id, self.eos_id, self.pad_id = models[0].bos_id, models[0].eos_id, models[0].pad_id

    def init_state(self, images: torch.Tensor) -> tuple:
        return tuple(m.init_state(images) for m in self.models)

    def step(self, tokens: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        outputs = [m.step(tokens, s) for m, s in zip(self.models, state)]
        dtype = torch.promote_types(outputs[0][0].dtype, torch.float32)
        member_log_probs = torch.stack([lp.to(dtype) for lp, _ in outputs])  # (M, N, V)
        log_probs = torch.logsumexp(member_log_probs, dim=0) - math.log(len(self.models))  # (N, V)
        # mathematically <= 0; clamp the rounding error so decoders' "log-probs never increase" holds
        return log_probs.clamp_max(0.0), tuple(s for _, s in outputs)

    def reorder_state(self, state: tuple, index: torch.Tensor) -> tuple:
        return tuple(m.reorder_state(s, index) for m, s in zip(self.models, state))

    # Train/eval mode goes to every member, so evaluation code can treat an ensemble like one model.
    @property
    def training(self) -> bool:
        return any(getattr(m, "training", False) for m in self.models)

    def train(self, mode: bool = True) -> EnsembleModel:
        for m in self.models:
            m.train(mode)
        return self

    def eval(self) -> EnsembleModel:
        return self.train(False)
