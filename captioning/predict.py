"""`captioning-predict checkpoint=PATH inputs=[IMAGE_OR_FOLDER,...]`: caption image files, JSON lines out.

Each output line: {"file": path, "captions": [{"caption": str, "score": float}, ...]} (best first), or
{"file": path, "error": reason} for an unreadable image. Written to `output` (default stdout).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from captioning.cli import exit_on_user_error
from captioning.config import ConfigError, config_dir, decode_kwargs, validate_decode

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def list_images(inputs) -> list[Path]:
    """Files as given; folders expanded to their image files (recursively, sorted)."""
    files = []
    for item in inputs:
        path = Path(str(item)).expanduser()
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"inputs: no such file or folder: {path}")
    if not files:
        raise FileNotFoundError(f"inputs: no image files found in {list(map(str, inputs))}")
    return files


@torch.no_grad()
def predict(checkpoint, inputs, decode_cfg, device: str = "auto", batch_size: int = 32, output=None) -> list[dict]:
    """Images are read by the evaluation dataset and loader (workers, odd files reported by name)."""
    from captioning.data.build import make_loader
    from captioning.data.coco import ImageRecord
    from captioning.data.dataset import EvalImageDataset
    from captioning.decoding import decode
    from captioning.models.loading import load_model
    from captioning.runtime.distributed import pick_device

    torch_device = pick_device(device)
    files = list_images(inputs)
    model, vocab, train_cfg, _ = load_model(checkpoint, torch_device, for_images=True)
    data = train_cfg.data
    records = [ImageRecord(index, path, "predict") for index, path in enumerate(files)]
    dataset = EvalImageDataset(records, data.image_size, data.resize_size, data.max_image_pixels)
    loader = make_loader(dataset, batch_size, num_workers=min(data.num_workers, 4),
                         pin_memory=torch_device.type == "cuda")
    rows = []
    out = open(output, "w", encoding="utf-8") if output else sys.stdout
    try:
        for batch in loader:
            new_rows = [{"file": bad.path, "error": bad.reason} for bad in batch["bad_images"]]
            if batch["size"]:
                images = batch["images"].to(torch_device, non_blocking=True)  # (B, 3, H, W)
                hypotheses = decode(model, images, decode_cfg.strategy, **decode_kwargs(decode_cfg))
                for index, hyps in zip(batch["image_ids"].tolist(), hypotheses):
                    new_rows.append({"file": str(files[index]), "captions": [
                        {"caption": vocab.decode(ids), "score": float(score)} for ids, score in hyps]})
            for row in new_rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            rows += new_rows
    finally:
        if output:
            out.close()
    return rows


@exit_on_user_error
def _predict_task(cfg: DictConfig) -> None:
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"missing mandatory config value(s): {sorted(missing)} "
                          "(e.g. captioning-predict checkpoint=best.pt inputs=[photos/])")
    validate_decode(OmegaConf.create({"decode": cfg.decode}))
    inputs = cfg.inputs if OmegaConf.is_list(cfg.inputs) else [cfg.inputs]
    predict(cfg.checkpoint, inputs, cfg.decode, cfg.device, cfg.batch_size, cfg.output)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    _predict_task(cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
