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
    from captioning.data.images import BadImage, build_transform, load_rgb
    from captioning.decoding import decode
    from captioning.evaluate import load_model

    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                "cpu" if device == "auto" else device)
    files = list_images(inputs)
    model, vocab, train_cfg, _ = load_model(checkpoint, torch_device, for_images=True)
    transform = build_transform(train_cfg.data.image_size, train_cfg.data.resize_size)
    rows = []
    out = open(output, "w", encoding="utf-8") if output else sys.stdout
    try:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            images, good = [], []
            for path in chunk:
                image = load_rgb(path, train_cfg.data.image_size, train_cfg.data.max_image_pixels)
                if isinstance(image, BadImage):
                    rows.append({"file": str(path), "error": image.reason})
                    out.write(json.dumps(rows[-1], ensure_ascii=False) + "\n")
                    continue
                images.append(transform(image))
                good.append(path)
            if not good:
                continue
            batch = torch.stack(images).to(torch_device)  # (B, 3, H, W)
            for path, hyps in zip(good, decode(model, batch, decode_cfg.strategy, **decode_kwargs(decode_cfg))):
                rows.append({"file": str(path), "captions": [{"caption": vocab.decode(ids), "score": float(s)}
                                                             for ids, s in hyps]})
                out.write(json.dumps(rows[-1], ensure_ascii=False) + "\n")
            out.flush()
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
