"""Training objectives: what one optimizer step minimises. Each is one nn.Module (so DistributedDataParallel
sees a single forward()) with a small interface the recipe relies on, and nothing else:

    settings = objective.step_settings(step, epoch)   # per-step values, e.g. {"teacher_forcing_prob": 0.9}:
                                                      #   passed to forward and logged as train/<name>
    loss, stats = objective(images, targets, **settings)  # stats: scalar tensors, logged as train/<name>
    objective.describe()                              # one line for the log

The `objective` config group picks one (`build_objective`):

    cross_entropy  `CrossEntropyObjective`, the next word's cross-entropy under the teacher-forcing schedule of
                   the `schedule` group (1 = plain teacher forcing; scheduled sampling feeds the model's own
                   tokens, see feeding.py)
    self_critical  `SelfCriticalObjective` (self_critical.py): REINFORCE on CIDEr-D (+ BLEU-4) with a greedy or
                   mean-of-other-samples baseline; cross-entropy under `schedule` before `objective.start_step`

Every objective's forward also takes `image_ids` (B,), the batch's images (self-critical needs their
references; cross-entropy needs them for `schedule.targets` other than reference and for the share of reference
targets that are no valid continuation of the fed prefix, see targets.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from captioning.models.captioner import Captioner
from captioning.schedules import (
    TeacherForcingSchedule,
    build_schedule,
    build_schedule_from_config,
    sampling_options_from_config,
)
from captioning.training.feeding import GraphedInputChooser, scheduled_sampling_logits
from captioning.training.self_critical import build_self_critical
from captioning.training.targets import INVALID_SHARE, TrainingTargets, build_training_targets


def shift_right(targets: torch.Tensor, bos_id: int) -> torch.Tensor:
    """targets (N, T) = w1..wn <eos> <pad>... -> decoder inputs (N, T) = <bos> w1..wn <eos>..."""
    bos = torch.full_like(targets[:, :1], bos_id)
    return torch.cat([bos, targets[:, :-1]], dim=1)


class CrossEntropyObjective(nn.Module):
    """Cross-entropy of the next word, under a teacher-forcing probability from `schedule` (the paper's
    epsilon; 1 = plain teacher forcing). `cuda_graphs`: on a GPU, replay exact scheduled sampling's
    token-choosing loop as CUDA graphs. `targets`: what the loss asks after a prefix the model fed (targets.py;
    None: the reference's next word). With teacher_forcing_prob = 1 the loss is plain teacher forcing's whatever
    the targets."""

    name = "cross_entropy"

    def __init__(
        self,
        model: Captioner,
        schedule: TeacherForcingSchedule | None = None,
        token_source: str = "sample",
        granularity: str = "token",
        temperature: float = 1.0,
        mode: str = "exact",
        cuda_graphs: bool = False,
        targets: TrainingTargets | None = None,
    ):
        super().__init__()
        self.model = model
        self.schedule = schedule or build_schedule("teacher_forcing")
        self.token_source, self.granularity, self.temperature, self.mode = token_source, granularity, temperature, mode
        self.chooser = GraphedInputChooser() if cuda_graphs else None
        self.targets = targets

    def step_settings(self, step: int, epoch: int) -> dict[str, float]:
        return {"teacher_forcing_prob": self.schedule.teacher_forcing_prob(step, epoch)}

    def describe(self) -> str:
        targets = f"; {self.targets.describe()}" if self.targets is not None else ""
        return f"cross-entropy; teacher forcing: {self.schedule.describe()}{targets}"

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        teacher_forcing_prob: float = 1.0,
        image_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, 3, H, W) (or cached features (B, F)), targets (B, C, T) -> mean token loss, stats.
        `image_ids` (B,): the references and scenes of `self.targets`."""
        features = self.model.encode(images)  # (B, F)
        captions_per_image = targets.shape[1]
        features = features.repeat_interleave(captions_per_image, dim=0)  # (B*C, F)
        targets = targets.flatten(0, 1)  # (N, T)
        inputs = shift_right(targets, self.model.bos_id)  # (N, T)
        logits, fed, use_truth = scheduled_sampling_logits(
            self.model,
            features,
            inputs,
            teacher_forcing_prob,
            self.token_source,
            self.granularity,
            self.temperature,
            self.mode,
            self.chooser,
        )  # (N, T, V)
        real = targets != self.model.pad_id  # (N, T)
        stats = {}
        if self.targets is None or teacher_forcing_prob >= 1.0:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=self.model.pad_id)
            if self.targets is not None and image_ids is not None:
                stats[INVALID_SHARE] = torch.zeros((), device=logits.device)  # nothing fed from the model
        else:
            rows = None if image_ids is None else image_ids.repeat_interleave(captions_per_image)  # (N,)
            loss, stats = self.targets(logits, targets, inputs, fed, use_truth, rows)
        # Share of fed inputs (after <bos>, within the caption) that were the model's own tokens.
        fed_positions = real[:, 1:]
        model_fed = (~use_truth[:, 1:] & fed_positions).sum()
        return loss, {"model_token_fraction": model_fed / fed_positions.sum().clamp(min=1), **stats}


def build_objective(cfg, model: Captioner, cuda_graphs: bool, records=None, vocab=None) -> nn.Module:
    """The objective `objective.name` names (cross_entropy when the config has no `objective` group).
    `records`: the training split's ImageRecords and `vocab` the vocabulary (self_critical's references)."""
    from omegaconf import OmegaConf

    schedule_cfg = OmegaConf.to_container(cfg.schedule, resolve=True)
    cross_entropy = CrossEntropyObjective(
        model,
        build_schedule_from_config(schedule_cfg),
        **sampling_options_from_config(schedule_cfg),
        cuda_graphs=cuda_graphs,
        targets=build_training_targets(cfg, records, vocab),
    )
    name = OmegaConf.select(cfg, "objective.name", default="cross_entropy")
    if name == "cross_entropy":
        return cross_entropy
    if name == "self_critical":
        return build_self_critical(cfg, model, cross_entropy, records, vocab)
    raise ValueError(f"objective.name must be cross_entropy or self_critical (got {name!r})")
