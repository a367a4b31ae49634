"""Extract CNN features once, for training with a frozen encoder from a feature cache.

    python tools/extract_features.py --out /features/coco_r101 data=coco data.root=/datasets/coco model=show_tell_coco
    captioning-train data=coco data.root=/datasets/coco model=show_tell_coco data.features=/features/coco_r101

The Hydra overrides after --out pick the data and the encoder exactly as for training. Every image of
the train, val and test splits is encoded in batches (bf16 autocast on CUDA) into a memory-mapped
float16 array; progress is flushed every few batches, so a killed extraction resumes where it stopped.
Unreadable images are recorded in bad.json and skipped by training like any bad image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from captioning.data.build import eval_dataset, load_records, make_loader
from captioning.data.images import IMAGE_READER
from captioning.models.captioner import build_image_encoder


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from captioning.config import config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("config", overrides=overrides)


def extract(out: Path, cfg, batch_size: int, device: torch.device, flush_every: int = 20) -> dict:
    records = load_records(cfg.data)
    unique = {r.image_id: r for split in records.values() for r in split}
    image_ids = sorted(unique)
    e = cfg.model.encoder
    meta = {
        "name": e.name,
        "weights": e.weights,
        "pool": e.get("pool", "avg"),
        "grid_size": e.get("grid_size", 2),
        "label_head": e.get("label_head"),
        "image_size": cfg.data.image_size,
        "resize_size": cfg.data.resize_size,
        "images": len(image_ids),
        "image_reader": IMAGE_READER,
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # weights=null: a reproducible random encoder
    encoder = build_image_encoder(e, trainable=False).to(device).eval()
    meta["feature_dim"] = encoder.feature_dim
    if (out / "meta.json").is_file():  # resume: only into a store made with the same settings
        previous = json.loads((out / "meta.json").read_text())
        if previous != meta:
            raise ValueError(f"--out {out} holds features of other settings: {previous} (now {meta})")
        features = np.load(out / "features.npy", mmap_mode="r+")
        done = np.load(out / "done.npy")
        bad = json.loads((out / "bad.json").read_text())
    else:
        features = np.lib.format.open_memmap(
            out / "features.npy", mode="w+", dtype=np.float16, shape=(len(image_ids), encoder.feature_dim)
        )
        done = np.zeros(len(image_ids), dtype=bool)
        bad = {}
        (out / "index.json").write_text(json.dumps({"image_ids": image_ids}))
        (out / "meta.json").write_text(json.dumps(meta, indent=2))

    def flush() -> None:
        features.flush()
        np.save(out / "done.tmp.npy", done)
        Path(out / "done.tmp.npy").replace(out / "done.npy")  # done marks only rows already flushed
        (out / "bad.json").write_text(json.dumps(bad))

    row_of = {i: r for r, i in enumerate(image_ids)}
    todo = [unique[i] for i in image_ids if not done[row_of[i]]]
    cfg.data.features = None  # read pixels
    loader = make_loader(
        eval_dataset(todo, cfg.data), batch_size, cfg.data.num_workers, pin_memory=device.type == "cuda"
    )
    amp = torch.bfloat16 if device.type == "cuda" else None
    start, count = time.perf_counter(), 0
    with torch.no_grad():
        for n, batch in enumerate(loader, 1):
            for item in batch["bad_images"]:
                image_id = next(r.image_id for r in todo if str(r.path) == item.path)
                bad[str(image_id)] = f"{item.path}: {item.reason}"
                done[row_of[image_id]] = True
            if batch["size"]:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    out_features = encoder(batch["images"].to(device, non_blocking=True))  # (B, F)
                rows = [row_of[i] for i in batch["image_ids"].tolist()]
                features[rows] = out_features.float().cpu().numpy().astype(np.float16)
                done[rows] = True
                count += len(rows)
            if n % flush_every == 0:
                flush()
                print(
                    f"{int(done.sum())}/{len(done)} images, {count / (time.perf_counter() - start):.0f} images/s",
                    flush=True,
                )
    flush()
    return {"images": len(image_ids), "extracted_now": count, "bad": len(bad), "out": str(out)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="feature store folder (created or resumed)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for data and model, as for training")
    args = parser.parse_args(argv)
    try:
        summary = extract(args.out, compose_config(args.overrides), args.batch_size, torch.device(args.device))
    except (FileNotFoundError, ValueError) as e:
        print(f"extract_features: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
