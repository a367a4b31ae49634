"""A memory-mapped store of CNN features, extracted once (tools/extract_features.py), so that training
with a frozen encoder reads features instead of decoding JPEGs.

Layout of a store folder:
    features.npy   (N, F) float16, memory-mapped
    index.json     {"image_ids": [...]}: row r holds image_ids[r]
    done.npy       (N,) bool: rows written so far (extraction resumes from here)
    bad.json       {image_id: reason} for unreadable images
    meta.json      the encoder (name, weights, pool, grid_size, label_head), image_size, resize_size, feature_dim
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from captioning.data.images import BadImage


class FeatureStore:
    def __init__(self, path: str | Path):
        self.path = Path(str(path)).expanduser()
        if not (self.path / "meta.json").is_file():
            made_by = (
                "the scene-label pretraining, in the cache (CAPTIONING_CACHE): run captioning-train again "
                "to rebuild it, or caption images with captioning-predict, which needs no cache"
                if "scene_encoders" in self.path.parts
                else "tools/extract_features.py"
            )
            raise FileNotFoundError(f"data.features: no feature store at {self.path} (made by {made_by})")
        self.meta = json.loads((self.path / "meta.json").read_text())
        ids = json.loads((self.path / "index.json").read_text())["image_ids"]
        self.row_of = {int(i): r for r, i in enumerate(ids)}
        self.bad = (
            {int(k): v for k, v in json.loads((self.path / "bad.json").read_text()).items()}
            if (self.path / "bad.json").is_file()
            else {}
        )
        self.feature_dim = int(self.meta["feature_dim"])
        self._array = None  # opened lazily in each process (DataLoader workers do not copy it)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path / "features.npy", mmap_mode="r")
        return self._array

    def complete(self) -> bool:
        return bool(np.load(self.path / "done.npy").all())

    def check(self, image_ids, encoder_cfg, cfg_data) -> None:
        """The store must come from the configured encoder and image size and hold every image."""
        if not self.complete():
            raise ValueError(
                f"data.features: extraction into {self.path} is unfinished: run "
                "tools/extract_features.py again, it resumes"
            )
        expected = {
            "name": encoder_cfg.name,
            "weights": encoder_cfg.weights,
            "pool": encoder_cfg.get("pool", "avg"),
            "label_head": encoder_cfg.get("label_head"),
            "image_size": cfg_data.image_size,
            "resize_size": cfg_data.resize_size,
        }
        for key, value in expected.items():
            if self.meta.get(key) != value:
                raise ValueError(
                    f"data.features: {self.path} was extracted with {key}={self.meta.get(key)!r}, "
                    f"but the config says {value!r}"
                )
        missing = [i for i in image_ids if i not in self.row_of]
        if missing:
            raise ValueError(f"data.features: {len(missing)} images are not in {self.path}, e.g. {missing[:5]}")

    def get(self, image_id: int) -> torch.Tensor | BadImage:
        if image_id in self.bad:
            return BadImage(f"image {image_id}", self.bad[image_id])
        return torch.from_numpy(np.asarray(self.array[self.row_of[image_id]], dtype=np.float32))  # (F,)


_OPEN: dict[str, FeatureStore] = {}


def open_feature_store(cfg_data) -> FeatureStore | None:
    """The store named by `data.features`, or None to read images."""
    path = cfg_data.get("features")
    if not path:
        return None
    key = str(Path(str(path)).expanduser())
    if key not in _OPEN:
        _OPEN[key] = FeatureStore(key)
    return _OPEN[key]
