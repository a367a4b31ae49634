"""The training loss as one module, so that DistributedDataParallel sees a single forward()."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from captioning.models.captioner import Captioner
from captioning.schedules.feeding import GraphedInputChooser, scheduled_sampling_logits


def shift_right(targets: torch.Tensor, bos_id: int) -> torch.Tensor:
    """targets (N, T) = w1..wn <eos> <pad>... -> decoder inputs (N, T) = <bos> w1..wn <eos>..."""
    bos = torch.full_like(targets[:, :1], bos_id)
    return torch.cat([bos, targets[:, :-1]], dim=1)


class CaptionLoss(nn.Module):
    """Cross-entropy of the next word, under a teacher-forcing probability (1 = plain teacher forcing).
    `cuda_graphs`: on a GPU, replay exact scheduled sampling's token-choosing loop as CUDA graphs."""

    def __init__(self, model: Captioner, token_source: str = "sample", granularity: str = "token",
                 temperature: float = 1.0, mode: str = "exact", cuda_graphs: bool = False):
        super().__init__()
        self.model = model
        self.token_source, self.granularity, self.temperature, self.mode = token_source, granularity, temperature, mode
        self.chooser = GraphedInputChooser() if cuda_graphs else None

    def forward(self, images: torch.Tensor, targets: torch.Tensor, teacher_forcing_prob: float,
                features: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, 3, H, W) (or precomputed features (B, F)), targets (B, C, T) -> mean token loss, stats."""
        if features is None:
            features = self.model.encode(images)  # (B, F)
        captions_per_image = targets.shape[1]
        features = features.repeat_interleave(captions_per_image, dim=0)  # (B*C, F)
        targets = targets.flatten(0, 1)  # (N, T)
        inputs = shift_right(targets, self.model.bos_id)  # (N, T)
        logits, _, use_truth = scheduled_sampling_logits(
            self.model, features, inputs, teacher_forcing_prob, self.token_source, self.granularity,
            self.temperature, self.mode, self.chooser)  # (N, T, V)
        real = targets != self.model.pad_id  # (N, T)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=self.model.pad_id)
        # Share of fed inputs (after <bos>, within the caption) that were the model's own tokens.
        fed_positions = real[:, 1:]
        model_fed = (~use_truth[:, 1:] & fed_positions).sum()
        stats = {"model_token_fraction": model_fed / fed_positions.sum().clamp(min=1), "tokens": real.sum()}
        return loss, stats
