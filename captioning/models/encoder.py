"""CNN image encoder: a torchvision classification backbone with its classifier removed.

`weights` is a torchvision weights name ("DEFAULT", "IMAGENET1K_V1", or the full
"ResNet50_Weights.IMAGENET1K_V2"), a path to a local state-dict file (air-gapped clusters), or
None (random init). The backbone's last nn.Linear becomes the identity, so the encoder returns
the pooled feature the classifier would have read: 512 for resnet18/34, 2048 for resnet50+.
With `label_head` (a file the scene-label pretraining writes), the encoder returns instead what a trained
classifier on that feature says is in the image: one probability distribution per label, concatenated.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn


def _load_local_weights(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or non-torch file
        raise ValueError(f"model.encoder.weights: could not read weights file {path}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensors of other shapes: another architecture
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise ValueError(
            f"model.encoder.weights: {path} does not match the architecture ({first[0].strip()})"
        ) from None
    # The classifier head may be absent from a backbone-only file; anything else is a mismatch.
    missing = [k for k in missing if not k.startswith(("fc.", "classifier.", "heads."))]
    if missing or unexpected:
        raise ValueError(
            f"model.encoder.weights: {path} does not match the architecture: "
            f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}"
        )


def build_backbone(name: str, weights: str | None) -> nn.Module:
    """A torchvision classification model by name, with weights from a name, a local file or none."""
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(
            f"model.encoder.name: unknown torchvision model {name!r}; "
            f"e.g. resnet18, resnet50, resnet101, resnet152, efficientnet_b0, convnext_tiny"
        )
    if weights in (None, "", "none", "None"):
        return torchvision.models.get_model(name, weights=None)
    path = Path(str(weights)).expanduser()
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt") or path.exists() or "/" in str(weights):
        if not path.is_file():
            raise FileNotFoundError(f"model.encoder.weights: weights file not found: {path}")
        model = torchvision.models.get_model(name, weights=None)
        _load_local_weights(model, path)
        return model
    try:
        enum = torchvision.models.get_model_weights(name)
        resolved = enum[str(weights).split(".")[-1]] if str(weights) != "DEFAULT" else enum.DEFAULT
    except KeyError:
        options = ", ".join(["DEFAULT"] + [w.name for w in torchvision.models.get_model_weights(name)])
        raise ValueError(
            f"model.encoder.weights: {weights!r} is not a weights name for {name} "
            f"(one of: {options}), nor an existing file"
        ) from None
    # Downloads into TORCH_HOME on first use; air-gapped clusters pass a local file instead.
    return torchvision.models.get_model(name, weights=resolved)


def headless_backbone(name: str, weights: str | None, pool: str = "avg", grid_size: int = 2) -> tuple[nn.Module, int]:
    """(backbone, feature size): the torchvision classifier `name` (build_backbone) with its last linear layer made
    the identity and, with pool=grid, its global average pool made a `grid_size` x `grid_size` grid whose cells are
    concatenated. ImageEncoder's backbone, and the scene-label pretraining's (captioning.scenes.pretraining), so a
    state dict saved there loads here as model.encoder.weights."""
    backbone = build_backbone(name, weights)
    if pool not in ("avg", "grid"):
        raise ValueError(f"model.encoder.pool must be avg or grid (got {pool!r})")
    cells = 1
    if pool == "grid":
        if not isinstance(getattr(backbone, "avgpool", None), nn.AdaptiveAvgPool2d):
            raise ValueError(
                f"model.encoder.pool=grid needs a backbone with a global average pool "
                f"(resnet, regnet, efficientnet, mobilenet...); {name} has none"
            )
        backbone.avgpool = nn.AdaptiveAvgPool2d(grid_size)
        cells = grid_size * grid_size
    linears = [
        (parent, child_name, child)
        for parent in backbone.modules()
        for child_name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    if not linears:
        raise ValueError(
            f"model.encoder.name: {name} has no linear classifier to remove; "
            "pick a backbone ending in a linear layer (resnet, efficientnet, convnext, vgg...)"
        )
    if pool == "grid" and len(linears) > 1:  # the grid's cells would reach a hidden layer sized for one average
        raise ValueError(
            f"model.encoder.pool=grid needs a classifier of one linear layer on the pooled feature "
            f"(resnet, regnet, efficientnet...); {name}'s has {len(linears)}"
        )
    parent, child_name, linear = linears[-1]
    setattr(parent, child_name, nn.Identity())
    return backbone, linear.in_features * cells


def read_label_head(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, int]]]:
    """(weight, bias, [(label name, size), ...]) of a label head file (LabelProbabilities)."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.encoder.label_head: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state["weight"], state["bias"], [(str(n), int(k)) for n, k in state["groups"]]
    except Exception as e:  # not a torch file, or not a label head's
        raise ValueError(
            f"model.encoder.label_head: {path} is not a label head file (weight, bias, groups): {e}"
        ) from None


class LabelProbabilities(nn.Module):
    """A linear classifier of several labels read as the encoder's output: softmax within each group of its outputs
    (one group per label: count, layout, each object's shape, colour...), the distributions concatenated. Feeding a
    captioner what the CNN recognises rather than its raw feature is the attribute input of Wu et al. 2016 ("What
    value do explicit high level concepts have in vision to language problems?") and Yao et al. 2017 (LSTM-A).

    The file (torch.save of a dict): weight (O, F), bias (O,), groups [[label name, size], ...] summing to O."""

    def __init__(self, path: str | Path, in_features: int):
        super().__init__()
        weight, bias, groups = read_label_head(path)
        if weight.dim() != 2 or weight.shape[1] != in_features or sum(k for _, k in groups) != weight.shape[0]:
            raise ValueError(
                f"model.encoder.label_head: {path} reads {weight.shape[1]} features into "
                f"{weight.shape[0]} outputs ({sum(k for _, k in groups)} in its groups), but the "
                f"encoder gives {in_features} features (check model.encoder.name, pool and grid_size)"
            )
        self.weight, self.bias = nn.Parameter(weight.float()), nn.Parameter(bias.float())  # no random init drawn
        self.groups = groups
        self.out_features = weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pieces = nn.functional.linear(features, self.weight, self.bias).split([k for _, k in self.groups], dim=-1)
        return torch.cat([p.softmax(-1) for p in pieces], dim=-1)  # (B, O)


class ImageEncoder(nn.Module):
    """`pool`: "avg" is the classifier's own global average (Show and Tell); "grid" average-pools the last feature
    map to a `grid_size` x `grid_size` grid and concatenates the cells, which keeps where things are (left of,
    above...) at `grid_size**2` times the feature size. `label_head`: a LabelProbabilities file read on top."""

    def __init__(
        self,
        name: str = "resnet18",
        weights: str | None = None,
        trainable: bool = True,
        pool: str = "avg",
        grid_size: int = 2,
        label_head: str | None = None,
    ):
        super().__init__()
        self.backbone, self.feature_dim = headless_backbone(name, weights, pool, grid_size)
        self.label_head = None
        if label_head is not None:
            self.label_head = LabelProbabilities(label_head, self.feature_dim)
            self.feature_dim = self.label_head.out_features
        self.set_trainable(trainable)

    def set_trainable(self, trainable: bool) -> None:
        """Frozen encoders also keep BatchNorm statistics fixed (eval mode), as feature extractors should."""
        self.trainable = trainable
        for p in self.parameters():
            p.requires_grad_(trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        if not self.trainable:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)  # (B, 3, H, W) -> (B, F)
        return features if self.label_head is None else self.label_head(features)


class PrecomputedFeatures(nn.Module):
    """Stands in for the CNN when training reads cached features: its input already is the (B, F) feature."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.feature_dim = feature_dim
        self.trainable = False

    def set_trainable(self, trainable: bool) -> None:
        if trainable:
            raise ValueError("model.encoder.trainable: cached features cannot be fine-tuned")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features  # (B, F)
