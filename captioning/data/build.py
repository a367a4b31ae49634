"""From the `data` config to records, vocabulary, datasets and loaders."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from captioning.checks import resolve_target
from captioning.data.coco import ImageRecord, read_coco_karpathy
from captioning.data.dataset import AllReferencesDataset, EvalImageDataset, TrainCaptionDataset, encode_captions
from captioning.data.text import training_tokens
from captioning.data.vocab import Vocabulary

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("CAPTIONING_CACHE", "~/.cache/captioning")).expanduser()


# Configs saved before `data.generator` existed name no generator; theirs was the synthetic scenes' (by name only:
# data/ imports nothing from the scenes package, which is above it).
GENERATOR_OF_OLD_CONFIGS = {"synthetic": "captioning.scenes.generator.ensure_data"}


def resolve_root(cfg_data) -> Path:
    """The data folder. A data config that names a `generator` (data=synthetic: captioning.scenes.generator.ensure_data,
    the synthetic scenes, generated on first use and reused after) gets its folder from it; others read `data.root`."""
    generator = cfg_data.get("generator", GENERATOR_OF_OLD_CONFIGS.get(cfg_data.get("name")))
    if generator:
        return Path(resolve_target(generator, "data.generator")(cfg_data))
    return Path(str(cfg_data.root)).expanduser()


def load_records(cfg_data) -> dict[str, list[ImageRecord]]:
    root = resolve_root(cfg_data)
    return read_coco_karpathy(
        root, cfg_data.karpathy_file, cfg_data.annotation_files, restval_to_train=cfg_data.restval_to_train
    )


def build_vocab(train_records: list[ImageRecord], cfg_data) -> Vocabulary:
    """From the training split only: val/test words never enter the vocabulary."""
    return Vocabulary.build(
        (training_tokens(c) for r in train_records for c in r.captions), cfg_data.word_count_threshold
    )


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded over ranks, that can start mid-epoch.

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches the
    uninterrupted run would have seen.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0  # samples of this rank's shard to skip (resume mid-epoch)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        per_rank = self.size // self.world_size  # equal shards: every rank takes the same number of steps
        return order[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self):
        offset = self.epoch * self.size  # the dataset reads the epoch from the key (persistent workers)
        return iter([offset + i for i in self._order()[self.start :]])

    def __len__(self) -> int:
        return self.size // self.world_size - self.start


def train_dataset(items, vocab: Vocabulary, cfg_data, seed: int) -> TrainCaptionDataset:
    from captioning.data.features import open_feature_store

    return TrainCaptionDataset(
        items,
        vocab,
        cfg_data.image_size,
        cfg_data.resize_size,
        cfg_data.captions_per_image,
        cfg_data.max_len,
        cfg_data.max_image_pixels,
        seed,
        open_feature_store(cfg_data),
    )


def encoded_train_items(records: list[ImageRecord], vocab: Vocabulary, cfg_data):
    items, _ = encode_captions(records, vocab, cfg_data.max_len, cfg_data.on_bad_caption)
    if not items:
        raise ValueError("data: no training image has a usable caption")
    return items


def make_loader(
    dataset,
    batch_size: int,
    num_workers: int,
    sampler=None,
    drop_last: bool = False,
    pin_memory: bool = False,
    seed: int = 0,
) -> DataLoader:
    """The loader gets its own generator, so starting an iterator never draws from the global torch RNG
    (which dropout and scheduled sampling use): a resumed run draws the same numbers as a straight one."""
    from captioning.data.dataset import collate

    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def eval_dataset(records: list[ImageRecord], cfg_data) -> EvalImageDataset:
    from captioning.data.features import open_feature_store

    return EvalImageDataset(
        records, cfg_data.image_size, cfg_data.resize_size, cfg_data.max_image_pixels, open_feature_store(cfg_data)
    )


def reference_loader(records, vocab, cfg_data, batch_size: int | None = None) -> DataLoader:
    """Loader of {"images", "targets" (B, C, L)} with all references of `records` (e.g. the val split),
    encoded as for training (max_len words, unknown words -> <unk>), for the probes that score references.
    Captions that are empty or only unknown words are skipped (with a logged warning), whatever
    data.on_bad_caption says: with the training vocabulary that is expected of some val captions."""
    from captioning.data.features import open_feature_store

    items, _ = encode_captions(records, vocab, cfg_data.max_len, on_bad_caption="skip")
    if not items:
        raise ValueError("reference loader: no image of the given records has a usable caption")
    captions_per_image = max(len(captions) for _, captions in items)
    dataset = AllReferencesDataset(
        items,
        vocab,
        cfg_data.image_size,
        cfg_data.resize_size,
        captions_per_image,
        cfg_data.max_len,
        cfg_data.max_image_pixels,
        seed=0,
        features=open_feature_store(cfg_data),
    )
    return make_loader(dataset, batch_size or cfg_data.eval_batch_size, num_workers=min(cfg_data.num_workers, 4))
