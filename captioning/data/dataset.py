"""Datasets: one item is one image with `captions_per_image` encoded captions (training) or the
image alone (evaluation). The encoder then runs once per image, as COCO training usually does.

Caption problems are settled once, in the main process, when the dataset is built (empty,
only unknown words); image problems are found when a worker reads the file and are reported
back in the batch (`bad_images`), so the main process warns by file name, counts, or raises.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from captioning.data.coco import ImageRecord
from captioning.data.images import BadImage, build_transform, load_rgb
from captioning.data.text import training_tokens
from captioning.data.vocab import Vocabulary

log = logging.getLogger(__name__)


class BadInputError(ValueError):
    """An input file or caption that the strictness setting says must stop the run."""


@dataclass
class CaptionProblems:
    """What was dropped while building a dataset, for the run's log."""

    empty: list[tuple[int, str]] = field(default_factory=list)
    unknown_only: list[tuple[int, str]] = field(default_factory=list)
    images_without_captions: list[int] = field(default_factory=list)


def encode_captions(
    records: list[ImageRecord], vocab: Vocabulary, max_len: int, on_bad_caption: str
) -> tuple[list[tuple[ImageRecord, list[list[int]]]], CaptionProblems]:
    """Word ids per caption; drop (and count) empty and unknown-only captions, or raise."""
    problems = CaptionProblems()
    kept = []
    for record in records:
        encoded = []
        for caption in record.captions:
            tokens = training_tokens(caption)
            ids = vocab.encode(tokens, max_len)
            kind = "empty" if not tokens else "unknown_only" if all(i == vocab.unk_id for i in ids) else None
            if kind is None:
                encoded.append(ids)
                continue
            if on_bad_caption == "error":
                raise BadInputError(
                    f"image {record.image_id} ({record.path}): caption {caption!r} is "
                    f"{'empty' if kind == 'empty' else 'only unknown words'} "
                    "(set data.on_bad_caption=skip to drop such captions)"
                )
            getattr(problems, kind).append((record.image_id, caption))
        if encoded:
            kept.append((record, encoded))
        else:
            problems.images_without_captions.append(record.image_id)
    for kind in ("empty", "unknown_only"):
        items = getattr(problems, kind)
        if items:
            log.warning(
                "skipped %d %s captions, e.g. image %d: %r",
                len(items),
                kind.replace("_", "-"),
                items[0][0],
                items[0][1],
            )
    if problems.images_without_captions:
        log.warning(
            "skipped %d images with no usable caption, e.g. image %d",
            len(problems.images_without_captions),
            problems.images_without_captions[0],
        )
    return kept, problems


class TrainCaptionDataset(Dataset):
    """(image, C captions) per item; which C captions an image gets depends only on (seed, epoch, index)."""

    def __init__(
        self,
        items: list[tuple[ImageRecord, list[list[int]]]],
        vocab: Vocabulary,
        image_size: int,
        resize_size: int | None,
        captions_per_image: int,
        max_len: int,
        max_image_pixels: int,
        seed: int,
        features=None,
    ):
        self.items = items
        self.features = features  # a FeatureStore: items carry cached CNN features instead of images
        self.vocab = vocab
        self.transform = build_transform(image_size, resize_size)
        self.image_size = image_size
        self.captions_per_image = captions_per_image
        self.max_len = max_len
        self.max_image_pixels = max_image_pixels
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def pick_captions(self, index: int, epoch: int) -> list[list[int]]:
        captions = self.items[index][1]
        rng = np.random.default_rng((self.seed, epoch, index))
        if len(captions) >= self.captions_per_image:
            chosen = rng.choice(len(captions), self.captions_per_image, replace=False)
        else:  # fewer references than slots: all of them, then random repeats
            extra = rng.choice(len(captions), self.captions_per_image - len(captions), replace=True)
            chosen = np.concatenate([np.arange(len(captions)), extra])
        return [captions[i] for i in chosen]

    def __getitem__(self, key: int):
        """key = epoch * len(self) + index (see ResumableSampler): workers need no epoch state of their own."""
        epoch, index = divmod(key, len(self.items))
        record, _ = self.items[index]
        image = load_input(record, self.image_size, self.max_image_pixels, self.transform, self.features)
        if isinstance(image, BadImage):
            return image
        targets = torch.full((self.captions_per_image, self.max_len + 1), self.vocab.pad_id, dtype=torch.long)
        for row, ids in enumerate(self.pick_captions(index, epoch)):
            targets[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            targets[row, len(ids)] = self.vocab.eos_id
        return {"image": image, "targets": targets, "image_id": record.image_id}


class EvalImageDataset(Dataset):
    def __init__(
        self, records: list[ImageRecord], image_size: int, resize_size: int | None, max_image_pixels: int, features=None
    ):
        self.records = records
        self.features = features
        self.transform = build_transform(image_size, resize_size)
        self.image_size = image_size
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        image = load_input(record, self.image_size, self.max_image_pixels, self.transform, self.features)
        if isinstance(image, BadImage):
            return image
        return {"image": image, "image_id": record.image_id}


def load_input(record: ImageRecord, image_size: int, max_image_pixels: int, transform, features=None):
    """The model's input for one image: its cached feature (F,) or its transformed pixels (3, H, W)."""
    if features is not None:
        return features.get(record.image_id)
    image = load_rgb(record.path, image_size, max_image_pixels)
    return image if isinstance(image, BadImage) else transform(image)


def collate(items: list) -> dict:
    """Stack good items; bad images travel back by name so the main process can warn or raise."""
    good = [it for it in items if not isinstance(it, BadImage)]
    batch = {"bad_images": [it for it in items if isinstance(it, BadImage)], "size": len(good)}
    if good:
        batch["images"] = torch.stack([it["image"] for it in good])  # (B, 3, H, W)
        batch["image_ids"] = torch.tensor([it["image_id"] for it in good], dtype=torch.long)  # (B,)
        if "targets" in good[0]:
            targets = torch.stack([it["targets"] for it in good])  # (B, C, max_len + 1)
            longest = int((targets != 0).sum(-1).max())  # trim the columns that are padding in every caption
            batch["targets"] = targets[..., :longest].contiguous()  # (B, C, L)
    return batch


class BadImageTracker:
    """Counts and warns about skipped images by file name, or raises, by `data.on_bad_image`."""

    def __init__(self, policy: str):
        self.policy = policy
        self.skipped: dict[str, str] = {}

    def __call__(self, batch: dict) -> None:
        for bad in batch["bad_images"]:
            if self.policy == "error":
                raise BadInputError(f"bad image {bad.path}: {bad.reason} (set data.on_bad_image=skip to skip it)")
            if bad.path not in self.skipped:
                self.skipped[bad.path] = bad.reason
                log.warning("skipped image %s: %s (%d skipped so far)", bad.path, bad.reason, len(self.skipped))


class AllReferencesDataset(TrainCaptionDataset):
    """Every reference caption of every image exactly once (the training dataset picks a random subset or
    repeats): row r holds the image's r-th caption, rows beyond its own captions stay padding (probes
    skip them). captions_per_image must be the largest number of captions of any image."""

    def pick_captions(self, index: int, epoch: int) -> list[list[int]]:
        return self.items[index][1]
