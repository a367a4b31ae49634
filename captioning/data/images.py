"""Image loading that turns every odd file into a defined outcome.

Every image is turned the way a viewer shows it (its EXIF orientation tag applied: phones store portrait photos
sideways with tag 6), then grayscale, palette, RGBA, CMYK, 16-bit: converted to RGB. Huge images: decoded at reduced
size (JPEG draft mode) and resized. Missing, truncated or unreadable files: a BadImage result naming
the file and the reason; the caller skips and counts it, or raises, by `data.on_bad_image`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What pixels a file gives: part of a feature store's settings (tools/extract_features.py), so that features
# extracted before the EXIF orientation was applied are not taken for these.
IMAGE_READER = "exif_orientation"
# Pixel limits are checked here (data.max_image_pixels) so that huge JPEGs can still be decoded in draft mode.
Image.MAX_IMAGE_PIXELS = None


@dataclass
class BadImage:
    path: str
    reason: str


def build_transform(image_size: int, resize_size: int | None = None) -> T.Compose:
    """Resize the short side, centre-crop a square, scale to [0, 1], ImageNet-normalise."""
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize(resize_size or image_size, antialias=True),
            T.CenterCrop(image_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def load_rgb(path: Path, target_size: int, max_pixels: int) -> Image.Image | BadImage:
    """Open any image file as RGB, decoding huge JPEGs at reduced size."""
    try:
        image = Image.open(path)
        if image.width * image.height > max_pixels and image.format != "JPEG":
            return BadImage(
                str(path), f"{image.width}x{image.height} pixels is over data.max_image_pixels={max_pixels}"
            )
        if image.format == "JPEG":
            image.draft("RGB", (target_size * 2, target_size * 2))  # DCT-domain downscale of big JPEGs
        image = ImageOps.exif_transpose(image)  # as a viewer shows it (a no-op without an orientation tag)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = image.point(lambda v: v / 256).convert("L")
        return image.convert("RGB")
    except FileNotFoundError:
        return BadImage(str(path), "file not found")
    except Exception as e:  # truncated JPEG, not an image, decompression bomb...
        return BadImage(str(path), f"{type(e).__name__}: {e}")
