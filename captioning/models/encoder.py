"""CNN image encoder: a torchvision classification backbone with its classifier removed.

`weights` is a torchvision weights name ("DEFAULT", "IMAGENET1K_V1", or the full
"ResNet50_Weights.IMAGENET1K_V2"), a path to a local state-dict file (air-gapped clusters), or
None (random init). The backbone's last nn.Linear becomes the identity, so the encoder returns
the pooled feature the classifier would have read: 512 for resnet18/34, 2048 for resnet50+.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
import torchvision


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
        raise ValueError(f"model.encoder.weights: {path} does not match the architecture ({first[0].strip()})") from None
    # The classifier head may be absent from a backbone-only file; anything else is a mismatch.
    missing = [k for k in missing if not k.startswith(("fc.", "classifier.", "heads."))]
    if missing or unexpected:
        raise ValueError(f"model.encoder.weights: {path} does not match the architecture: "
                         f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")


def build_backbone(name: str, weights: str | None) -> nn.Module:
    """A torchvision classification model by name, with weights from a name, a local file or none."""
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"model.encoder.name: unknown torchvision model {name!r}; "
                         f"e.g. resnet18, resnet50, resnet101, resnet152, efficientnet_b0, convnext_tiny")
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
        raise ValueError(f"model.encoder.weights: {weights!r} is not a weights name for {name} "
                         f"(one of: {options}), nor an existing file") from None
    # Downloads into TORCH_HOME on first use; air-gapped clusters pass a local file instead.
    return torchvision.models.get_model(name, weights=resolved)


class ImageEncoder(nn.Module):
    """`pool`: "avg" is the classifier's own global average (Show and Tell); "grid" average-pools the last feature
    map to a `grid_size` x `grid_size` grid and concatenates the cells, which keeps where things are (left of,
    above...) at `grid_size**2` times the feature size."""

    def __init__(self, name: str = "resnet18", weights: str | None = None, trainable: bool = True,
                 pool: str = "avg", grid_size: int = 2):
        super().__init__()
        self.backbone = build_backbone(name, weights)
        if pool not in ("avg", "grid"):
            raise ValueError(f"model.encoder.pool must be avg or grid (got {pool!r})")
        cells = 1
        if pool == "grid":
            if not isinstance(getattr(self.backbone, "avgpool", None), nn.AdaptiveAvgPool2d):
                raise ValueError(f"model.encoder.pool=grid needs a backbone with a global average pool "
                                 f"(resnet, regnet, efficientnet, mobilenet...); {name} has none")
            self.backbone.avgpool = nn.AdaptiveAvgPool2d(grid_size)
            cells = grid_size * grid_size
        last_linear = None
        for parent in self.backbone.modules():
            for child_name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    last_linear = (parent, child_name, child)
        if last_linear is None:
            raise ValueError(f"model.encoder.name: {name} has no linear classifier to remove; "
                             "pick a backbone ending in a linear layer (resnet, efficientnet, convnext, vgg...)")
        parent, child_name, linear = last_linear
        setattr(parent, child_name, nn.Identity())
        self.feature_dim = linear.in_features * cells
        self.set_trainable(trainable)

    def set_trainable(self, trainable: bool) -> None:
        """Frozen encoders also keep BatchNorm statistics fixed (eval mode), as feature extractors should."""
        self.trainable = trainable
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        if not self.trainable:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)  # (B, 3, H, W) -> (B, F)


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
