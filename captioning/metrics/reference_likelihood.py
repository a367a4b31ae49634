"""Reference-likelihood probe: how much worse the decoder predicts the REFERENCE word once its own choices are
in the prefix. Not a measure of derailing: once the model has chosen another valid wording, the reference word is
no longer the right continuation, so a paraphrase counts as an error here (He et al. 2019). On synthetic data the
oracle measure (captioning.scenes.oracle_exposure) judges the model's words against the scene instead.

For every reference caption w_1..w_n <eos> of every image (all references, not one), and every word
position t = 1..n+1 (1-based; the <eos> position included, padding ignored):

  teacher-forced (tf)  the decoder is fed the reference prefix <bos> w_1..w_{t-1}; record
                       NLL_t = -log p(w_t | image, w_<t) and acc_t = [argmax p(. | image, w_<t) == w_t].
  free-running (free)  the decoder is fed its own greedy tokens <bos> g_1..g_{t-1}, g_s = argmax of step s;
                       record the NLL of the REFERENCE word, -log p(w_t | image, g_<t), and
                       acc_t = [argmax p(. | image, g_<t) == w_t]: how well the model still predicts the
                       reference once its own earlier choices are in the prefix. Once the model has emitted
                       <eos> it keeps being fed its own argmax (whatever follows <eos>); the reference
                       positions after that point are still scored.

Position 1 has the prefix <bos> in both modes, so it is computed once and the two modes agree exactly
there. Per position the report gives mean NLL and accuracy under both modes, the gaps
(nll_gap = free - tf, acc_gap = tf - free: positive = the reference is predicted worse after the model's own
prefix) and the number of reference tokens at that position; summary() gives the token-weighted means over all
positions under the keys "reference_likelihood/{nll,acc}_{tf,free,gap}" (callers prefix the split:
"val/reference_likelihood/nll_gap"). Reference words outside the vocabulary are scored as <unk>, as in training;
captions longer than max_len are truncated the same way.

Both modes run through the step interface (init_state / step / reorder_state) as one batched loop over
positions (teacher-forced and free-running rows side by side), with no host synchronisation per step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from captioning.models.captioner import never_generated

SUMMARY_KEYS = (
    "reference_likelihood/nll_tf",
    "reference_likelihood/nll_free",
    "reference_likelihood/nll_gap",
    "reference_likelihood/acc_tf",
    "reference_likelihood/acc_free",
    "reference_likelihood/acc_gap",
)


@torch.no_grad()
def probe_captions(
    model, images: torch.Tensor, captions: torch.Tensor, image_index: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-token values for N captions of B images, both modes.

    images (B, ...) as model.init_state takes them; captions (N, L) = w_1..w_n <eos> <pad>...;
    image_index (N,) long: the image of each caption. Returns (N, L) tensors "nll_tf", "nll_free",
    "correct_tf", "correct_free" (bool), "mask" (bool, reference token present) and "free_tokens"
    (the free-running greedy tokens g_1..g_L; position t was fed g_<t). Values at masked-out
    positions are meaningless; the model's train/eval mode is left to the caller.
    """
    n, length = captions.shape
    state = model.reorder_state(model.init_state(images), image_index)  # encode each image once, batch N
    bos = torch.full((n,), model.bos_id, dtype=torch.long, device=captions.device)
    log_probs, state = model.step(bos, state)  # (N, V): the prefix <bos> is shared by both modes
    log_probs = log_probs.repeat(2, 1)  # (2N, V): rows [0, N) teacher-forced, [N, 2N) free-running
    state = model.reorder_state(state, torch.arange(n, device=captions.device).repeat(2))
    reference = captions.repeat(2, 1)  # (2N, L)
    nll, correct, greedy_tokens = [], [], []
    greedy = reference.new_empty(0)  # (2N,) the previous step's argmax: set at the end of each step
    for i in range(length):  # i = t - 1
        if i > 0:
            fed = torch.cat([captions[:, i - 1], greedy[n:]])  # (2N,): reference word | own previous argmax
            log_probs, state = model.step(fed, state)  # (2N, V)
        greedy = never_generated(log_probs, model).argmax(-1)  # (2N,): as greedy decoding, never <pad>/<bos>
        nll.append(-log_probs.gather(1, reference[:, i : i + 1]).squeeze(1))  # (2N,)
        correct.append(greedy == reference[:, i])
        greedy_tokens.append(greedy[n:])
    nll_all, correct_all = torch.stack(nll, 1), torch.stack(correct, 1)  # (2N, L)
    return {
        "nll_tf": nll_all[:n],
        "nll_free": nll_all[n:],
        "correct_tf": correct_all[:n],
        "correct_free": correct_all[n:],
        "mask": captions != model.pad_id,
        "free_tokens": torch.stack(greedy_tokens, 1),
    }  # (N, L)


@dataclass
class ReferenceLikelihoodReport:
    """per_position: lists indexed by position t - 1 (t = 1..T, T = the longest reference + <eos>), keys
    "position", "tokens", "nll_tf", "nll_free", "nll_gap", "acc_tf", "acc_free", "acc_gap"."""

    per_position: dict[str, list[float]]
    images: int
    captions: int

    def summary(self) -> dict[str, float]:
        """Token-weighted means over all positions (each position's mean weighted by its token count)."""
        p = self.per_position
        tokens = sum(p["tokens"])
        mean = {
            name: sum(m * n for m, n in zip(p[name], p["tokens"])) / tokens
            for name in ("nll_tf", "nll_free", "acc_tf", "acc_free")
        }
        return {
            "reference_likelihood/nll_tf": mean["nll_tf"],
            "reference_likelihood/nll_free": mean["nll_free"],
            "reference_likelihood/nll_gap": mean["nll_free"] - mean["nll_tf"],
            "reference_likelihood/acc_tf": mean["acc_tf"],
            "reference_likelihood/acc_free": mean["acc_free"],
            "reference_likelihood/acc_gap": mean["acc_tf"] - mean["acc_free"],
        }

    def to_json(self) -> dict:
        return {
            "summary": self.summary(),
            "per_position": self.per_position,
            "images": self.images,
            "captions": self.captions,
            "tokens": int(sum(self.per_position["tokens"])),
        }

    def plot(self, path: str | Path) -> Path:
        """Two panels, NLL and accuracy per word position, teacher-forced vs free-running (PNG)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: never touches the global backend

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        p = self.per_position
        fig = Figure(figsize=(11, 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        panels = fig.subplots(1, 2)
        for ax, name, label in (
            (panels[0], "nll", "NLL of the reference word"),
            (panels[1], "acc", "accuracy (argmax = reference word)"),
        ):
            ax.plot(p["position"], p[f"{name}_tf"], "o-", label="teacher-forced (reference prefix)")
            ax.plot(p["position"], p[f"{name}_free"], "s--", label="free-running (own greedy prefix)")
            ax.set_xlabel("word position t (last = <eos> of the longest caption)")
            ax.set_ylabel(label)
            ax.set_xticks(p["position"])
            ax.grid(alpha=0.3)
            ax.legend()
        panels[1].set_ylim(-0.02, 1.02)
        s = self.summary()
        fig.suptitle(
            f"reference likelihood, own vs reference prefix: {self.images} images, {self.captions} captions, "
            f"{sum(p['tokens'])} tokens; NLL gap {s['reference_likelihood/nll_gap']:+.3f}, "
            f"accuracy gap {s['reference_likelihood/acc_gap']:+.3f}"
        )
        fig.savefig(path, dpi=100)
        return path


def _check_batch(batch: dict, max_len: int) -> None:
    for key in ("images", "targets"):
        if key not in batch:
            raise ValueError(
                f"reference-likelihood probe: batch has no {key!r} (keys: {sorted(batch)}); it needs the training "
                "dataset's batches (images and targets (B, C, L))"
            )
    images, targets = batch["images"], batch["targets"]
    if targets.dim() != 3 or targets.dtype != torch.long:
        raise ValueError(
            f"reference-likelihood probe: targets must be a (B, C, L) long tensor (got {tuple(targets.shape)}, "
            f"{targets.dtype})"
        )
    if targets.shape[0] != images.shape[0]:
        raise ValueError(f"reference-likelihood probe: {images.shape[0]} images but targets for {targets.shape[0]}")
    if targets.shape[2] > max_len + 1:
        raise ValueError(
            f"reference-likelihood probe: targets have {targets.shape[2]} positions, more than max_len + 1 = "
            f"{max_len + 1} (max_len={max_len} words plus <eos>)"
        )


def reference_likelihood_probe(
    model, batches: Iterable[dict], device: torch.device | str, max_len: int
) -> ReferenceLikelihoodReport:
    """Teacher-forced vs free-running NLL and accuracy per word position over all captions in `batches`
    (dicts with "images" (B, ...) and "targets" (B, C, L), as the training dataset + collate give them;
    all-padding caption rows are skipped, batches with no good image (size 0) too). Runs under no_grad in
    eval mode and restores the model's mode afterwards."""
    if max_len < 1:
        raise ValueError(f"reference-likelihood probe: max_len must be >= 1 (got {max_len})")
    device = torch.device(device)
    positions = max_len + 1
    sums = torch.zeros(5, positions, dtype=torch.float64, device=device)  # tokens, nll tf/free, acc tf/free
    images_seen = captions_seen = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if batch.get("size", None) == 0:
                continue
            _check_batch(batch, max_len)
            targets = batch["targets"].to(device, non_blocking=True)  # (B, C, L)
            rows = (targets != model.pad_id).any(-1).flatten().nonzero().squeeze(1)  # (N,) one sync per batch
            if rows.numel() == 0:
                continue
            images = batch["images"].to(device, non_blocking=True)
            captions = targets.flatten(0, 1)[rows]  # (N, L)
            out = probe_captions(model, images, captions, rows // targets.shape[1])
            mask = out["mask"].double()  # (N, L)
            length = captions.shape[1]
            sums[:, :length] += torch.stack(
                [
                    mask,
                    out["nll_tf"].double().where(out["mask"], 0.0),
                    out["nll_free"].double().where(out["mask"], 0.0),
                    out["correct_tf"].double() * mask,
                    out["correct_free"].double() * mask,
                ]
            ).sum(1)  # (5, L)
            images_seen += images.shape[0]
            captions_seen += rows.numel()
    finally:
        model.train(was_training)
    sums = sums.cpu()
    tokens = sums[0]
    if tokens.sum() == 0:
        raise ValueError("reference-likelihood probe: the batches hold no reference token (no batch, or only padding)")
    last = int(tokens.nonzero().max()) + 1
    sums, tokens = sums[:, :last], tokens[:last]
    means = sums[1:] / tokens.clamp(min=1)  # (4, T)
    per_position = {
        "position": list(range(1, last + 1)),
        "tokens": [int(x) for x in tokens.tolist()],
        "nll_tf": means[0].tolist(),
        "nll_free": means[1].tolist(),
        "nll_gap": (means[1] - means[0]).tolist(),
        "acc_tf": means[2].tolist(),
        "acc_free": means[3].tolist(),
        "acc_gap": (means[2] - means[3]).tolist(),
    }
    return ReferenceLikelihoodReport(per_position, images_seen, captions_seen)
