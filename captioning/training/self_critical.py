"""Self-critical sequence training (Rennie et al. 2017): REINFORCE on a caption reward, with a baseline.

For each image of the batch the model samples `samples_per_image` captions (Gumbel-max from
softmax(logits / temperature), never <pad> or <bos>; at most `max_len` words, then <eos> if it has not come:
max_len + 1 token steps, as the training targets). The reward r of a sample is `cider_d` * CIDEr-D +
`bleu4` * BLEU-4 against its image's training references (captioning.metrics.cider_d, pycocoevalcap's
figures per caption; document frequencies over all training images, computed once when the objective is
built). The baseline b of a sample is

    greedy: the reward of the image's greedy caption, decoded without dropout (Rennie et al. 2017);
    mean:   the mean reward of the image's other samples (Luo 2020, "a better variant of SCST").

No gradient flows through the choices; the loss is one fused teacher-forced pass over the sampled tokens:

    loss = -mean_{samples i} (r_i - b_i) * sum_{t <= the sample's <eos>} log p(w_it | w_i<t, image)

(a mean over the B * samples_per_image samples, a sum over each sample's tokens, its <eos> included, nothing
after it; log p from log_softmax(logits / temperature), the distribution the sample was drawn from). The
sample's dropout masks are drawn once and applied both when sampling and in the loss's pass (not possible
for a multi-layer RNN with dropout between its layers: there the two passes draw their own).

Before optimizer step `start_step` the objective is the cross-entropy one under the `schedule` group (a
warm start in the same run). Stats per step: `reward` (mean sample reward), `baseline_reward` (mean
baseline; with `mean` it equals `reward` by construction), `beat_baseline_fraction` (share of samples
with r > b). The sampling and greedy loops run a fixed number of steps with a `finished` mask: no host
synchronisation.

What the objective holds beyond the model is the reward's reference tables, rebuilt from the training records
at every start (nothing to checkpoint); its random draws come from the global generators, which checkpoints
carry.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from captioning.data.text import training_tokens
from captioning.metrics.cider_d import CiderD
from captioning.models.captioner import Captioner, DropoutMasks
from captioning.runtime.checkpoint import load_checkpoint
from captioning.training.feeding import choose_tokens

log = logging.getLogger(__name__)


# -- references ------------------------------------------------------------------------------------------
def reference_sets(records, vocab) -> tuple[list[int], list[list[list[int]]]]:
    """(image ids sorted, their reference captions as word ids): every caption through `training_tokens`,
    unknown words -> <unk>, not truncated; empty and unknown-only captions (which training skips) left out,
    and images left without any."""
    sets = {}
    for record in records:
        refs = [[vocab.stoi.get(w, vocab.unk_id) for w in training_tokens(caption)] for caption in record.captions]
        refs = [ref for ref in refs if any(i != vocab.unk_id for i in ref)]
        if refs:
            sets.setdefault(int(record.image_id), []).extend(refs)
    if not sets:
        raise ValueError("objective=self_critical: no training image has a usable reference caption")
    image_ids = sorted(sets)
    return image_ids, [sets[i] for i in image_ids]


class ReferenceRows:
    """Image id -> row of the reward's reference tables (sorted ids, searchsorted)."""

    def __init__(self, image_ids: list[int]):
        self.ids = torch.tensor(image_ids, dtype=torch.long)  # (I,) sorted
        self._on: dict[torch.device, torch.Tensor] = {}

    def __call__(self, image_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """image_ids (B,) -> rows (B,) on `device`. Ids on the CPU (as the loader makes them) are checked
        there; ids already on an accelerator are looked up there, unchecked (no host synchronisation)."""
        if image_ids.device.type == "cpu":
            rows = torch.searchsorted(self.ids, image_ids).clamp(max=len(self.ids) - 1)
            unknown = image_ids[self.ids[rows] != image_ids]
            if unknown.numel():
                raise ValueError(
                    f"objective=self_critical: image(s) {unknown[:5].tolist()} have no training "
                    "references (the reward scores training images only)"
                )
            return rows.to(device, non_blocking=True)
        ids = self._on.setdefault(image_ids.device, self.ids.to(image_ids.device))
        return torch.searchsorted(ids, image_ids).clamp(max=len(ids) - 1).to(device)


# -- sampling ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def evaluating(model: nn.Module):
    """The model in eval mode (no dropout) inside the block, back to its mode after."""
    was_training = model.training
    model.train(False)
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_tokens(
    model: Captioner,
    features: torch.Tensor,
    steps: int,
    token_source: str = "sample",
    temperature: float = 1.0,
    masks: DropoutMasks | None = None,
) -> torch.Tensor:
    """features (N, F) -> tokens (N, steps): the chosen token at each step (`sample` or `argmax`), <pad> after
    the first <eos>. A fixed number of steps and a `finished` mask: no host synchronisation. `masks`: dropout
    drawn for a teacher-forced pass over (N, steps) inputs, applied here the same way."""
    n = features.shape[0]
    state = model.state_from_features(features, None if masks is None else masks.inputs[:, 0])
    token = torch.full((n,), model.bos_id, dtype=torch.long, device=features.device)  # (N,)
    finished = torch.zeros(n, dtype=torch.bool, device=features.device)  # (N,)
    chosen = []
    for t in range(steps):
        step_masks = None if masks is None else (masks.inputs[:, t + 1], masks.outputs[:, t])
        hidden, state = model.step_hidden(token, state, step_masks)  # (N, H)
        token = choose_tokens(model.project(hidden), token_source, temperature, model)  # (N,)
        token = token.masked_fill(finished, model.pad_id)
        chosen.append(token)
        finished = finished | (token == model.eos_id)
    return torch.stack(chosen, 1)  # (N, steps)


def sample_log_probs(
    model: Captioner, features: torch.Tensor, samples: torch.Tensor, masks: DropoutMasks | None, temperature: float
) -> torch.Tensor:
    """One fused teacher-forced pass with gradient: features (N, F), samples (N, L) -> log p of each sampled
    token (N, L) under log_softmax(logits / temperature); 0 after the sample's <eos> (its <pad>s)."""
    bos = torch.full_like(samples[:, :1], model.bos_id)
    inputs = torch.cat([bos, samples[:, :-1]], 1)  # (N, L): <bos> w1 w2 ...
    logits = model.forward_teacher_forcing(features, inputs, masks).float()  # (N, L, V)
    if temperature != 1.0:
        logits = logits / temperature
    nll = F.cross_entropy(logits.flatten(0, 1), samples.flatten(), ignore_index=model.pad_id, reduction="none")
    return -nll.view_as(samples)  # (N, L)


def self_critical_loss(log_probs: torch.Tensor, rewards: torch.Tensor, baselines: torch.Tensor) -> torch.Tensor:
    """log_probs (N, L) masked per sample, rewards (N,), baselines (N,) -> -mean((r - b) * sum_t log p)."""
    advantage = (rewards - baselines).to(log_probs.dtype).detach()  # (N,)
    return -(advantage * log_probs.sum(1)).mean()


def leave_one_out_mean(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (B, S) -> (B, S): the mean reward of the image's other S - 1 samples."""
    return (rewards.sum(1, keepdim=True) - rewards) / (rewards.shape[1] - 1)


# -- the objective -----------------------------------------------------------------------------------------
class SelfCriticalObjective(nn.Module):
    """See the module docstring. `warm_up`: the cross-entropy objective used before `start_step`."""

    name = "self_critical"

    def __init__(
        self,
        model: Captioner,
        reward: CiderD,
        rows: ReferenceRows,
        warm_up: nn.Module,
        baseline: str = "greedy",
        samples_per_image: int = 5,
        temperature: float = 1.0,
        max_len: int = 16,
        reward_weights: dict[str, float] | None = None,
        start_step: int = 0,
    ):
        super().__init__()
        if baseline not in ("greedy", "mean"):
            raise ValueError(f"objective.baseline must be greedy or mean (got {baseline!r})")
        if baseline == "mean" and samples_per_image < 2:
            raise ValueError("objective.samples_per_image must be >= 2 with objective.baseline=mean")
        self.model, self.warm_up = model, warm_up
        self.reward, self.rows = reward, rows  # plain attributes: not buffers (DDP would broadcast them)
        self.baseline, self.samples_per_image, self.temperature = baseline, samples_per_image, temperature
        self.steps = max_len + 1  # max_len words, then <eos>
        self.reward_weights = dict(reward_weights or {"cider_d": 1.0, "bleu4": 0.0})
        self.start_step = start_step

    def step_settings(self, step: int, epoch: int) -> dict[str, float]:
        if step < self.start_step:
            return {**self.warm_up.step_settings(step, epoch), "self_critical": 0.0}
        return {"self_critical": 1.0}

    def describe(self) -> str:
        weights = " + ".join(f"{w:g} {name}" for name, w in self.reward_weights.items() if w)
        warm = f"; cross-entropy before step {self.start_step} ({self.warm_up.describe()})" if self.start_step else ""
        return (
            f"self-critical: reward {weights} (<eos> as a word: {self.reward.append_eos}), baseline "
            f"{self.baseline}, {self.samples_per_image} samples per image at temperature {self.temperature:g}, "
            f"at most {self.steps - 1} words{warm}"
        )

    def scores(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """tokens (B, S, L), rows (B,) -> rewards (B, S) float64."""
        return self.reward.to(tokens.device).scores(tokens, rows, **self.reward_weights)

    def baselines(self, features: torch.Tensor, rewards: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """features (B, F) detached, sample rewards (B, S) -> the baseline of each sample (B, S)."""
        if self.baseline == "mean":
            return leave_one_out_mean(rewards)
        with evaluating(self.model):
            greedy = sample_tokens(self.model, features, self.steps, "argmax")  # (B, L)
        return self.scores(greedy[:, None], rows).expand_as(rewards)  # (B, S)

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        self_critical: float = 1.0,
        teacher_forcing_prob: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, 3, H, W) or features (B, F), targets (B, C, T) (used before start_step only), image_ids (B,)
        -> loss, stats."""
        if not self_critical:
            return self.warm_up(images, targets, teacher_forcing_prob=teacher_forcing_prob, image_ids=image_ids)
        if image_ids is None:
            raise ValueError("objective=self_critical needs the batch's image_ids (its references give the reward)")
        model, s = self.model, self.samples_per_image
        features = model.encode(images)  # (B, F)
        rows = self.rows(image_ids, features.device)  # (B,)
        repeated = features.repeat_interleave(s, dim=0)  # (B*S, F)
        masks = (
            None if model.dropout_inside_rnn else model.draw_dropout_masks(len(repeated), self.steps, features.device)
        )
        samples = sample_tokens(model, repeated.detach(), self.steps, "sample", self.temperature, masks)  # (B*S, L)
        rewards = self.scores(samples.view(len(features), s, -1), rows)  # (B, S)
        baselines = self.baselines(features.detach(), rewards, rows)  # (B, S)
        log_probs = sample_log_probs(model, repeated, samples, masks, self.temperature)  # (B*S, L)
        loss = self_critical_loss(log_probs, rewards.flatten(), baselines.flatten())
        return loss, {
            "reward": rewards.mean().float(),
            "baseline_reward": baselines.mean().float(),
            "beat_baseline_fraction": (rewards > baselines).float().mean(),
        }


# -- building it ------------------------------------------------------------------------------------------
def load_initial_weights(model: Captioner, path: str, vocab) -> None:
    """objective.init_from: the "model" entry of a training checkpoint into `model` (nothing else of it),
    after checking that it was trained with the same vocabulary."""
    device = next(model.parameters()).device
    try:
        checkpoint = load_checkpoint(path, map_location=device)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"objective.init_from: {e}") from None
    theirs = checkpoint["vocab"].get("itos", []) if isinstance(checkpoint["vocab"], dict) else []
    if theirs != vocab.itos:
        diff = next((i for i, (a, b) in enumerate(zip(theirs, vocab.itos)) if a != b), min(len(theirs), len(vocab)))
        raise ValueError(
            f"objective.init_from: {path} was trained with another vocabulary ({len(theirs)} words, "
            f"this run's has {len(vocab)}; they first differ at id {diff}): use the same data and "
            "data.word_count_threshold as the run that wrote it"
        )
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise ValueError(
            f"objective.init_from: {path} does not fit this model (another model config?): {str(e).splitlines()[0]}"
        ) from None
    log.info("objective.init_from: model weights from %s (step %s)", path, checkpoint.get("step"))


def build_self_critical(cfg, model: Captioner, warm_up: nn.Module, records, vocab) -> SelfCriticalObjective:
    """The self_critical objective the config names; `records`: the training records (references), `vocab`."""
    o = cfg.objective
    if records is None or vocab is None:
        raise ValueError("objective=self_critical: build_objective needs the training records and the vocabulary")
    if o.get("init_from"):
        load_initial_weights(model, str(Path(str(o.init_from)).expanduser()), vocab)
    image_ids, references = reference_sets(records, vocab)
    reward = CiderD(references, len(vocab), vocab.eos_id, vocab.pad_id, append_eos=bool(o.reward_eos))
    weights = {name: float(o.reward.get(name, 0.0)) for name in ("cider_d", "bleu4")}
    return SelfCriticalObjective(
        model,
        reward,
        ReferenceRows(image_ids),
        warm_up,
        baseline=str(o.baseline),
        samples_per_image=int(o.samples_per_image),
        temperature=float(o.temperature),
        max_len=int(o.max_len or cfg.data.max_len),
        reward_weights=weights,
        start_step=int(o.start_step),
    )
