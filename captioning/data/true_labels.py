"""The scenes' true labels as the decoder's input: a perfect encoder, the control that removes perception errors.

    model.encoder.pretrain.feed=true_labels      (synthetic data only)

Instead of pretraining a CNN, every image's true scene labels (count, layout, position, and each object slot's
shape, colour and size, captioning.data.scene_features.scene_labels) are written one-hot, in the layout of the
label probabilities a pretrained encoder gives (feed=labels), into a feature store, with a label-head file that
names the groups (so `model.decoder.attention` finds the object slots). Built once per data set under
$CAPTIONING_CACHE/true_labels/<hash>/ and reused. A label that does not apply (an absent slot) is all zeros.

A model trained so has no image encoder: it captions the data set's images through the store, never JPEGs (its
label head reads 1 feature, so captioning-predict on images stops with the label head's size error).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import open_dict

STORE_VERSION = 1


def one_hot_labels(labels: torch.Tensor, sizes: list[int]) -> np.ndarray:
    """(N, heads) class indices (-1: not applicable) -> (N, sum(sizes)) one-hot per head, zeros where -1."""
    parts = []
    for column, size in enumerate(sizes):
        values = labels[:, column]
        part = torch.zeros(len(labels), size)
        known = values >= 0
        part[known, values[known]] = 1.0
        parts.append(part)
    return torch.cat(parts, dim=1).numpy()


def ensure_true_label_store(cfg_data, encoder_cfg) -> Path:
    """The store folder (features/ and head.pth inside) for this data set, written if missing."""
    from captioning.data.build import cache_dir, load_records, resolve_root
    from captioning.data.long_scenes import max_objects
    from captioning.data.scene_features import (
        _heads,
        data_fingerprint,
        scene_labels,
        write_store,
    )
    from captioning.data.synthetic import load_scenes

    root = resolve_root(cfg_data)
    fingerprint = data_fingerprint(root)
    heads = _heads(max_objects(fingerprint["kwargs"].get("kind", "standard")))
    key = {"version": STORE_VERSION, "data": fingerprint, "heads": heads, "encoder": encoder_cfg.name,
           "pool": encoder_cfg.get("pool", "avg"), "image_size": cfg_data.image_size,
           "resize_size": cfg_data.resize_size}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    entry = (cache_dir() / "true_labels" / digest).resolve()
    if (entry / "key.json").is_file():
        return entry
    tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "features").mkdir(parents=True)
    records = load_records(cfg_data)
    image_ids = sorted({r.image_id for split in records.values() for r in split})
    scenes = load_scenes(root)
    labels = scene_labels([scenes[i] for i in image_ids], max_objects(fingerprint["kwargs"].get("kind", "standard")))
    features = one_hot_labels(labels, list(heads.values()))
    head = entry / "head.pth"  # the path the store's meta names: where it lies once renamed
    torch.save({"weight": torch.zeros(features.shape[1], 1), "bias": torch.zeros(features.shape[1]),
                "groups": [[name, size] for name, size in heads.items()]}, tmp / "head.pth")
    meta = {"name": encoder_cfg.name, "weights": None, "pool": encoder_cfg.get("pool", "avg"),
            "grid_size": encoder_cfg.get("grid_size", 2), "label_head": str(head), "image_size": cfg_data.image_size,
            "resize_size": cfg_data.resize_size, "images": len(image_ids), "feature_dim": features.shape[1],
            "true_labels": True}
    write_store(tmp / "features", image_ids, features.astype(np.float16), {}, meta)
    (tmp / "key.json").write_text(json.dumps(key, indent=2))
    try:
        os.replace(tmp, entry)  # atomic: a reader sees the whole store or none
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def prepare_true_labels(cfg):
    """A copy of `cfg` reading the true-label store (model.encoder.pretrain.feed=true_labels)."""
    entry = ensure_true_label_store(cfg.data, cfg.model.encoder)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.data.features = str(entry / "features")
        cfg.model.encoder.label_head = str(entry / "head.pth")
        cfg.model.encoder.trainable = False
    return cfg
