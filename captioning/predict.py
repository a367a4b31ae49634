"""`captioning-predict checkpoint=PATH inputs=[IMAGE_OR_FOLDER,...]`: caption image files, JSON lines out.

Each output line: {"file": path, "captions": [{"caption": str, "score": float}, ...]} (best first), or
{"file": path, "error": reason} for an unreadable or missing one. Written to `output` (default stdout).

The rule: every readable input is captioned; every input gets one row, in input order (folders expanded in sorted
order), a failed one an error row naming the file and why; the exit status is 1 when any input failed (with one
summary line on stderr), 0 when all were captioned, 2 for a user error that stops the command before any image
(a bad checkpoint, device or decode value, no input that exists).
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
    """Files as given (a missing one too: it is reported by name in its place); folders expanded to their image
    files (recursively, sorted). FileNotFoundError when nothing given exists or no image file is found."""
    files, missing = [], []
    for item in inputs:
        path = Path(str(item)).expanduser()
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(path)
            if not path.exists():
                missing.append(path)
    if missing and len(missing) == len(files):
        raise FileNotFoundError(f"inputs: no such file or folder: {', '.join(map(str, missing))}")
    if not files:
        raise FileNotFoundError(f"inputs: no image files found in {list(map(str, inputs))}")
    return files


def _error_row(path: str, reason: str) -> dict:
    return {"file": path, "error": "no such file or folder" if reason == "file not found" else reason}


@torch.no_grad()
def predict(checkpoint, inputs, decode_cfg, device: str = "auto", batch_size: int = 32, output=None) -> list[dict]:
    """Images are read by the evaluation dataset and loader (workers, odd files reported by name). Every readable
    input is captioned; one row per input, in input order, an unreadable or missing one as an error row."""
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
    loader = make_loader(
        dataset, batch_size, num_workers=min(data.num_workers, 4), pin_memory=torch_device.type == "cuda"
    )
    indices_of: dict[str, list[int]] = {}
    for index, path in enumerate(files):
        indices_of.setdefault(str(path), []).append(index)
    rows = []
    out = open(output, "w", encoding="utf-8") if output else sys.stdout
    try:
        for batch in loader:  # batches come in input order; within one, rows are put back in it
            new_rows = {}
            for bad in batch["bad_images"]:
                index = next(i for i in indices_of[bad.path] if i not in new_rows)
                new_rows[index] = _error_row(bad.path, bad.reason)
            if batch["size"]:
                images = batch["images"].to(torch_device, non_blocking=True)  # (B, 3, H, W)
                hypotheses = decode(model, images, decode_cfg.strategy, **decode_kwargs(decode_cfg))
                for index, hyps in zip(batch["image_ids"].tolist(), hypotheses):
                    new_rows[index] = {
                        "file": str(files[index]),
                        "captions": [{"caption": vocab.decode(ids), "score": float(score)} for ids, score in hyps],
                    }
            for index in sorted(new_rows):
                out.write(json.dumps(new_rows[index], ensure_ascii=False) + "\n")
                rows.append(new_rows[index])
            out.flush()
    finally:
        if output:
            out.close()
    return rows


@exit_on_user_error
def _predict_task(cfg: DictConfig) -> int:
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(
            f"missing mandatory config value(s): {sorted(missing)} "
            "(e.g. captioning-predict checkpoint=best.pt inputs=[photos/])"
        )
    validate_decode(OmegaConf.create({"decode": cfg.decode}))
    inputs = cfg.inputs if OmegaConf.is_list(cfg.inputs) else [cfg.inputs]
    rows = predict(cfg.checkpoint, inputs, cfg.decode, cfg.device, cfg.batch_size, cfg.output)
    failed = [row["file"] for row in rows if "error" in row]
    if failed:  # each one is already reported, by name and reason, in its row
        print(
            f"error: {len(failed)} of {len(rows)} inputs could not be captioned (their rows say why): "
            f"{', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}",
            file=sys.stderr,
        )
        return 1
    return 0


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    _predict_task(cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
