"""A CNN pretrained on the synthetic scenes' labels, frozen, its features cached: the synthetic stand-in for
ImageNet pretraining, so the default job trains only the decoder (fast on a CPU) on features that know colour
and shape.

    model.encoder.pretrain: {task: scene_labels, epochs: ..., ...}   (conf/model/show_tell.yaml, the default)

`prepare_inputs(cfg)` (called by the training set-up, captioning.training.recipe, at the start of every run) does,
for synthetic data without `data.features` set:

1. Look up the cache entry keyed by the data set's fingerprint (its synthetic_meta.json: generator hash and
   sizes), the encoder (name, pool, grid size), the image transform (image_size, resize_size) and the
   pretraining settings. Built once, reused by every later run (a file lock makes concurrent runs, DDP ranks
   or a sweep's processes, wait for the one that builds it).
2. If missing: train the torchvision backbone from scratch on the train split's scene labels (below), with a
   linear head per label on its pooled feature; then encode every image of every split with the frozen
   backbone into a feature store (the layout of captioning.data.features / tools/extract_features.py).
3. Return the config with `data.features` = a store, `model.encoder.weights` = the saved backbone (a local
   .pth, so a checkpoint trained on the features still captions JPEGs: captioning-predict rebuilds the
   encoder from it) and `model.encoder.trainable` = false. `feed` (not part of the key: both stores are built)
   picks what the decoder reads: `labels`, the trained heads' probabilities (59 numbers: one distribution per
   label; `model.encoder.label_head` = the saved head, so the encoder computes them from JPEGs too), or
   `features`, the backbone's pooled feature.

Nothing changes for `data=coco`, for a `data.features` folder the user gives, or with `model.encoder.pretrain=null`
(the CNN is then trained end to end from the JPEGs).

Scene labels (one softmax each; absent slots and positions of multi-object scenes are not scored):
    count (1-3), layout (single / horizontal / vertical), position (single object: centre, left, ...),
    slot{0,1,2}_{shape,colour,size}: the objects in reading order (left to right, top to bottom), the
    order the captions name them in.
Training images are flipped left-right with probability `hflip` (every shape is left-right symmetric; the labels
follow: a row's reading order reverses, left and right swap). `precision` auto trains in bf16 autocast where the
device computes bf16 natively (resolve_precision; the resolved value is part of the cache key).

Cache entry (CAPTIONING_CACHE/scene_encoders/<task>_<encoder>_<hash>/):
    encoder.pth      the backbone's state dict without its classifier (model.encoder.weights)
    head.pth         the label heads (model.encoder.label_head; captioning.models.encoder.LabelProbabilities)
    features/        the backbone's features (data.features with feed=features)
    labels/          the heads' probabilities (data.features with feed=labels)
    pretrain.json    settings, data fingerprint, validation accuracy per label, timings; written LAST (complete)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict
from torch import nn

from captioning.errors import ConfigError
from captioning.models.encoder import LabelProbabilities, headless_backbone
from captioning.scenes.generator import max_objects

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the labels, the training or the files change: older cache entries are not reused
TASKS = ("scene_labels",)
FEEDS = ("labels", "features", "true_labels")
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULTS = {
    "task": "scene_labels",
    "extra_images": 16000,
    "epochs": 4,
    "batch_size": 128,
    "lr": 3e-3,
    "weight_decay": 1e-4,
    "hflip": 0.5,
    "seed": 0,
    "feed": "labels",
    "precision": "auto",
}
NOT_IN_KEY = ("feed",)  # settings that pick among the entry's files instead of changing them
EXTRA_SCENES_STREAM = "scene-pretrain-v1"  # the extra scenes' random streams (the same across format versions)
JPEG_QUALITY = 90  # as captioning.scenes.generator.generate_synthetic writes its images
POSITIONS = ("center", "left", "right", "top", "bottom")
LAYOUTS = ("single", "horizontal", "vertical")
MAX_OBJECTS = 3
COMPLETE_FILE = "pretrain.json"


def _heads(max_objects: int = MAX_OBJECTS) -> dict[str, int]:
    from captioning.scenes.grammar import COLORS, SHAPES

    heads = {"count": max_objects, "layout": len(LAYOUTS), "position": len(POSITIONS)}
    for slot in range(max_objects):
        heads.update({f"slot{slot}_shape": len(SHAPES), f"slot{slot}_colour": len(COLORS), f"slot{slot}_size": 2})
    return heads


# -- config ----------------------------------------------------------------------------------------------------
def _slots_of(labels: torch.Tensor) -> int:
    """The object slots of a (N, heads) label matrix: count, layout, position, then 3 labels per slot."""
    return (labels.shape[1] - 3) // 3


def settings_of(cfg) -> dict | None:
    """The validated `model.encoder.pretrain` node (defaults filled in), or None when pretraining is off."""
    node = cfg.model.encoder.get("pretrain")
    if node is None:
        return None
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"model.encoder.pretrain must be null or a node with task: {TASKS[0]} (got {node!r})")
    given = OmegaConf.to_container(node, resolve=True)
    assert isinstance(given, dict)  # node is a DictConfig (checked above)
    settings = {**DEFAULTS, **given}
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"model.encoder.pretrain.{unknown[0]} is not a pretraining setting "
            f"(the keys are {sorted(DEFAULTS)}) (got {settings[unknown[0]]!r})"
        )

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"model.encoder.pretrain.{key} {message} (got {settings[key]!r})")

    require(settings["task"] in TASKS, "task", f"must be one of {list(TASKS)}")
    require(settings["feed"] in FEEDS, "feed", f"must be one of {list(FEEDS)}")
    require(settings["precision"] in PRECISIONS, "precision", f"must be one of {list(PRECISIONS)}")
    for key in ("epochs", "batch_size", "extra_images"):
        value = settings[key]
        low = 0 if key == "extra_images" else 1
        require(
            isinstance(value, int) and not isinstance(value, bool) and value >= low, key, f"must be an integer >= {low}"
        )
    require(
        isinstance(settings["seed"], int) and not isinstance(settings["seed"], bool) and settings["seed"] >= 0,
        "seed",
        "must be an integer >= 0",
    )
    for key in ("lr", "weight_decay", "hflip"):
        value = settings[key]
        require(
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            key,
            "must be a number",
        )
    require(settings["lr"] > 0, "lr", "must be > 0")
    require(settings["weight_decay"] >= 0, "weight_decay", "must be >= 0")
    require(0 <= settings["hflip"] <= 1, "hflip", "must be in [0, 1]")
    settings["lr"], settings["weight_decay"], settings["hflip"] = (
        float(settings[k]) for k in ("lr", "weight_decay", "hflip")
    )
    return settings


def prepare_inputs(cfg):
    """`cfg` itself when pretraining does not apply; else a copy reading the pretrained encoder's cached features
    (built first if missing). Raises ConfigError for settings that contradict pretraining."""
    settings = settings_of(cfg)
    if settings is None or cfg.data.name != "synthetic" or cfg.data.get("features"):
        return cfg  # off, no scene labels (COCO), or the user's own feature store: nothing changes
    e = cfg.model.encoder
    if e.weights is not None:
        raise ConfigError(
            "model.encoder.weights cannot be used with model.encoder.pretrain: pretraining makes the "
            "encoder's weights; set model.encoder.pretrain=null to start from "
            f"model.encoder.weights (got {e.weights!r})"
        )
    if e.get("label_head") is not None:
        raise ConfigError(
            "model.encoder.label_head cannot be used with model.encoder.pretrain: pretraining makes "
            "the label head (model.encoder.pretrain.feed=labels uses it); set model.encoder.pretrain=null "
            f"to read a head of your own (got {e.label_head!r})"
        )
    if e.get("unfreeze_after_steps") is not None:
        raise ConfigError(
            "model.encoder.unfreeze_after_steps cannot be used with model.encoder.pretrain: the "
            "pretrained encoder is frozen and read as cached features; set "
            f"model.encoder.pretrain=null to fine-tune from images (got {e.unfreeze_after_steps!r})"
        )
    if cfg.trainer.get("num_threads"):
        torch.set_num_threads(cfg.trainer.num_threads)
    if settings["feed"] == "true_labels":  # the control without perception errors: no CNN at all
        return prepare_true_labels(cfg)
    entry = ensure_scene_features(cfg.data, e, settings, device=_device(cfg))
    labels = settings["feed"] == "labels"
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.data.features = str(entry / ("labels" if labels else "features"))
        cfg.model.encoder.weights = str(entry / "encoder.pth")
        cfg.model.encoder.label_head = str(entry / "head.pth") if labels else None
        cfg.model.encoder.trainable = False
    return cfg


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 where the device computes it natively (CUDA with bf16; a CPU with AVX-512 BF16 or AMX, as oneDNN
    reports), else fp32. A bf16 entry is another cache entry (the resolved value is in the key)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def _device(cfg) -> torch.device:
    from captioning.runtime.distributed import pick_device, read_env

    return pick_device(str(cfg.trainer.device), read_env())


# -- the cache entry -------------------------------------------------------------------------------------------
def data_fingerprint(root: Path) -> dict:
    """What identifies a synthetic generation: its generation arguments, format version and generator hash."""
    from captioning.scenes.generator import META_FILE

    return json.loads((Path(root) / META_FILE).read_text())


def entry_key(fingerprint: dict, encoder_cfg, cfg_data, settings: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "data": fingerprint,
        "encoder": {
            "name": encoder_cfg.name,
            "pool": encoder_cfg.get("pool", "avg"),
            "grid_size": encoder_cfg.get("grid_size", 2),
        },
        "image_size": cfg_data.image_size,
        "resize_size": cfg_data.resize_size,
        "pretrain": {k: v for k, v in settings.items() if k not in NOT_IN_KEY},
    }


def entry_dir(key: dict) -> Path:
    from captioning.data.build import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (cache_dir() / "scene_encoders" / f"{key['pretrain']['task']}_{key['encoder']['name']}_{digest}").resolve()


def is_complete(entry: Path) -> bool:
    from captioning.data.features import FeatureStore

    if not all((entry / name).is_file() for name in (COMPLETE_FILE, "encoder.pth", "head.pth")):
        return False
    try:
        return FeatureStore(entry / "features").complete() and FeatureStore(entry / "labels").complete()
    except (FileNotFoundError, ValueError, OSError):
        return False


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def ensure_scene_features(cfg_data, encoder_cfg, settings: dict, device: torch.device | str = "cpu") -> Path:
    """The cache entry folder for these settings, built if missing (under a file lock)."""
    from captioning.data.build import load_records, resolve_root

    root = resolve_root(cfg_data)
    settings = {**settings, "precision": resolve_precision(settings["precision"], torch.device(device))}
    key = entry_key(data_fingerprint(root), encoder_cfg, cfg_data, settings)
    entry = entry_dir(key)
    with _locked(entry.parent / f".{entry.name}.lock"):
        if is_complete(entry):
            log.info("pretrained scene encoder: reusing %s", entry)
            return entry
        shutil.rmtree(entry, ignore_errors=True)  # an interrupted build
        entry.mkdir(parents=True)
        build_entry(entry, key, load_records(cfg_data), root, cfg_data, encoder_cfg, settings, torch.device(device))
    return entry


def build_entry(
    entry: Path, key: dict, records: dict, root: Path, cfg_data, encoder_cfg, settings: dict, device: torch.device
) -> dict:
    from captioning.scenes.generator import load_scenes

    started = time.perf_counter()
    unique = {r.image_id: r for split in records.values() for r in split}
    image_ids = sorted(unique)
    pixels, bad = load_pixels([unique[i] for i in image_ids], cfg_data)
    loaded = time.perf_counter()
    scenes = load_scenes(root)
    kind = key["data"]["kwargs"].get("kind", "standard")
    heads = _heads(max_objects(kind))
    labels = scene_labels([scenes[i] for i in image_ids], max_objects(kind))  # (N, heads)
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    usable = lambda split: [row_of[r.image_id] for r in records[split] if r.image_id not in bad]  # noqa: E731
    extra_pixels, extra_labels = generated_scenes(
        settings["extra_images"], key["data"]["kwargs"]["image_size"], cfg_data, settings["seed"], kind
    )
    train_rows = usable("train") + list(range(len(image_ids), len(image_ids) + len(extra_pixels)))
    log.info(
        "pretraining %s on the scene labels of %d training images and %d more generated scenes (%d epochs, "
        "cached in %s)",
        encoder_cfg.name,
        len(usable("train")),
        len(extra_pixels),
        settings["epochs"],
        entry,
    )
    with torch.random.fork_rng(devices=[]):  # the calling run's random stream is left as it was
        torch.manual_seed(settings["seed"])  # the backbone's initialisation, then the head's: one encoder per seed
        backbone, feature_dim = headless_backbone(
            encoder_cfg.name, None, encoder_cfg.get("pool", "avg"), encoder_cfg.get("grid_size", 2)
        )
        history, head = pretrain(
            backbone,
            feature_dim,
            torch.cat([pixels, extra_pixels]),
            torch.cat([labels, extra_labels]),
            train_rows,
            usable("val"),
            settings,
            device,
        )
    trained = time.perf_counter()
    torch.save(backbone.state_dict(), entry / "encoder.pth")
    head = head.cpu()
    torch.save(
        {
            "weight": head.weight.detach().clone(),
            "bias": head.bias.detach().clone(),
            "groups": [[name, size] for name, size in heads.items()],
        },
        entry / "head.pth",
    )
    features = encode(backbone, pixels, device)
    meta = {
        "name": encoder_cfg.name,
        "weights": str(entry / "encoder.pth"),
        "pool": encoder_cfg.get("pool", "avg"),
        "grid_size": encoder_cfg.get("grid_size", 2),
        "label_head": None,
        "image_size": cfg_data.image_size,
        "resize_size": cfg_data.resize_size,
        "images": len(image_ids),
        "feature_dim": feature_dim,
    }
    write_store(entry / "features", image_ids, features.astype(np.float16), bad, meta)
    with torch.no_grad():  # the saved head read as the encoder reads it (model.encoder.label_head)
        label_probs = LabelProbabilities(entry / "head.pth", feature_dim)(torch.from_numpy(features)).numpy()
    write_store(
        entry / "labels",
        image_ids,
        label_probs.astype(np.float16),
        bad,
        {**meta, "label_head": str(entry / "head.pth"), "feature_dim": label_probs.shape[1]},
    )
    done = time.perf_counter()
    report = {
        "key": key,
        "images": len(image_ids),
        "bad_images": len(bad),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "val_accuracy": history[-1]["val_accuracy"] if history else {},
        "history": history,
        "seconds": {
            "load": round(loaded - started, 1),
            "pretrain": round(trained - loaded, 1),
            "extract": round(done - trained, 1),
            "total": round(done - started, 1),
        },
    }
    (entry / COMPLETE_FILE).write_text(json.dumps(report, indent=2))  # LAST: marks the entry complete
    log.info(
        "pretrained scene encoder in %.0f s; validation accuracy %s",
        done - started,
        {k: round(v, 3) for k, v in report["val_accuracy"].items()},
    )
    return report


# -- labels -----------------------------------------------------------------------------------------------------
def scene_labels(scenes, max_objects: int = MAX_OBJECTS) -> torch.Tensor:
    """(N, len(heads)) class indices, -1 where a label does not apply (absent slot, position of a row...)."""
    from captioning.scenes.grammar import COLORS, SHAPES

    names = list(_heads(max_objects))
    colours = list(COLORS)
    out = torch.full((len(scenes), len(names)), -1, dtype=torch.long)
    for n, scene in enumerate(scenes):
        row = {"count": len(scene.objects) - 1, "layout": LAYOUTS.index(scene.layout)}
        if scene.layout == "single":
            row["position"] = POSITIONS.index(scene.position)
        for slot, obj in enumerate(scene.objects):
            row.update(
                {
                    f"slot{slot}_shape": SHAPES.index(obj.shape),
                    f"slot{slot}_colour": colours.index(obj.color),
                    f"slot{slot}_size": int(obj.size == "large"),
                }
            )
        for name, value in row.items():
            out[n, names.index(name)] = value
    return out


def flipped_labels(labels: torch.Tensor) -> torch.Tensor:
    """The labels of the left-right mirrored images: a row's reading order reverses, left and right swap."""
    names = list(_heads(_slots_of(labels)))
    out = labels.clone()
    layout, count = labels[:, names.index("layout")], labels[:, names.index("count")] + 1
    left, right = POSITIONS.index("left"), POSITIONS.index("right")
    single = layout == LAYOUTS.index("single")
    out[single & (labels[:, names.index("position")] == left), names.index("position")] = right
    out[single & (labels[:, names.index("position")] == right), names.index("position")] = left
    for n in torch.nonzero(layout == LAYOUTS.index("horizontal")).flatten().tolist():
        k = int(count[n])
        for slot in range(k):
            for attr in ("shape", "colour", "size"):
                out[n, names.index(f"slot{slot}_{attr}")] = labels[n, names.index(f"slot{k - 1 - slot}_{attr}")]
    return out


# -- images -----------------------------------------------------------------------------------------------------
def generated_scenes(
    count: int, drawn_size: int, cfg_data, seed: int, kind: str = "standard"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` more scenes from the generator (sample_scene, draw_scene at the data set's size, JPEG-compressed as
    it writes them), never part of any split (their random streams are keyed apart from the data set's), as the
    transform crops them: (count, 3, S, S) uint8 and their labels. The pretraining set's stand-in for ImageNet
    being much larger than the captioning set."""
    import io
    import random

    from PIL import Image

    from captioning.data.images import build_transform
    from captioning.scenes.generator import Scene, draw_scene, sampler

    sample_scene = sampler(kind)[0]

    geometric = build_transform(cfg_data.image_size, cfg_data.resize_size).transforms[:3]
    size = cfg_data.image_size
    pixels = torch.zeros((count, 3, size, size), dtype=torch.uint8)
    scenes: list[Scene] = []
    for n in range(count):
        scene = sample_scene(random.Random(f"{EXTRA_SCENES_STREAM}:{seed}:{n}"))
        buffer = io.BytesIO()
        draw_scene(scene, drawn_size).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        for t in geometric:
            image = t(image)
        assert isinstance(image, torch.Tensor)  # the transform's first step is PILToTensor
        pixels[n] = image
        scenes.append(scene)
    return pixels, scene_labels(scenes, max_objects(kind))


def load_pixels(records, cfg_data) -> tuple[torch.Tensor, dict[int, str]]:
    """(N, 3, S, S) uint8 crops of every record, exactly as the evaluation transform resizes and crops them (the
    float conversion and normalisation run per batch: `normalise`); bad images stay zero and are listed."""
    from captioning.data.images import BadImage, build_transform, load_rgb

    transform = build_transform(cfg_data.image_size, cfg_data.resize_size)
    geometric, pixel_values = transform.transforms[:3], transform.transforms[3:]
    assert [type(t).__name__ for t in pixel_values] == ["ToDtype", "Normalize"], transform  # the split below
    size = cfg_data.image_size
    out = torch.zeros((len(records), 3, size, size), dtype=torch.uint8)
    bad = {}
    for n, record in enumerate(records):
        image = load_rgb(record.path, size, cfg_data.max_image_pixels)
        if isinstance(image, BadImage):
            bad[record.image_id] = f"{image.path}: {image.reason}"
            continue
        for t in geometric:
            image = t(image)
        assert isinstance(image, torch.Tensor)  # the transform's first step is PILToTensor
        out[n] = image
    return out, bad


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 crops -> the model's input, as the evaluation transform's last two steps compute it."""
    from torchvision.transforms import v2 as T

    from captioning.data.images import IMAGENET_MEAN, IMAGENET_STD

    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToDtype(torch.float32, scale=True)(pixels))


# -- the training -----------------------------------------------------------------------------------------------
def pretrain(
    backbone: nn.Module,
    feature_dim: int,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    train_rows: list[int],
    val_rows: list[int],
    settings: dict,
    device: torch.device,
) -> tuple[list[dict], nn.Linear]:
    """AdamW with a cosine learning rate (one warm-up epoch's first 5%), summed cross-entropy over the heads. The head
    is initialised from torch's global random stream, which build_entry seeds. `precision` bf16: the forward pass in
    bf16 autocast (weights, optimizer and the accuracy passes stay fp32). Returns (history, the trained head)."""
    heads = _heads(_slots_of(labels))
    generator = torch.Generator().manual_seed(settings["seed"])
    head = nn.Linear(feature_dim, sum(heads.values()))
    # channels_last: a training step of batch 128 ran 8% faster so on 2 AMD EPYC cores (146 -> 134 s per 20,000
    # images); the same layout suits CUDA's tensor cores
    # Module.to takes memory_format with a device (torch parses its arguments like Tensor.to); the stubs omit it
    model = nn.Sequential(backbone, head).to(device, memory_format=torch.channels_last).train()  # type: ignore[call-overload]
    batch = settings["batch_size"]
    steps_per_epoch = max(1, len(train_rows) // batch)
    total = steps_per_epoch * settings["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    warmup = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    flipped = flipped_labels(labels)
    rows = torch.tensor(train_rows, dtype=torch.long)
    history = []
    for epoch in range(settings["epochs"]):
        started, loss_sum = time.perf_counter(), 0.0
        order = rows[torch.randperm(len(rows), generator=generator)]
        for step in range(steps_per_epoch):
            index = order[step * batch : (step + 1) * batch]
            flip = torch.rand(len(index), generator=generator) < settings["hflip"]
            images = pixels[index]
            images[flip] = images[flip].flip(-1)
            targets = torch.where(flip[:, None], flipped[index], labels[index])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings["precision"] == "bf16"):
                logits = model(normalise(images).to(device).contiguous(memory_format=torch.channels_last))
            loss = head_losses(logits.float(), targets.to(device), heads)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach())
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / steps_per_epoch,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if val_rows:
            record["val_accuracy"] = accuracy(model, pixels, labels, val_rows, heads, device)
            record["train_accuracy"] = accuracy(model, pixels, labels, train_rows[: len(val_rows)], heads, device)
            model.train()
        history.append(record)
        log.info(
            "scene-label pretraining: epoch %d/%d, loss %.3f, %.0f s, val scene accuracy %.3f",
            epoch + 1,
            settings["epochs"],
            record["loss"],
            record["seconds"],
            record.get("val_accuracy", {}).get("scene", math.nan),
        )
    model.eval()
    return history, head


def head_losses(logits: torch.Tensor, targets: torch.Tensor, heads: dict[str, int]) -> torch.Tensor:
    """Sum over heads of the mean cross-entropy over the images the head applies to (target -1: not scored)."""
    total = logits.new_zeros(())
    for column, piece in enumerate(logits.split(list(heads.values()), dim=1)):
        target = targets[:, column]
        if bool((target >= 0).any()):
            total = total + nn.functional.cross_entropy(piece, target, ignore_index=-1)
    return total


@torch.no_grad()
def accuracy(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    rows: list[int],
    heads: dict[str, int],
    device: torch.device,
    batch: int = 250,
) -> dict[str, float]:
    """Accuracy per head over the images it applies to, and `scene`: the fraction of images with every label right."""
    model.eval()
    predictions = []
    for start in range(0, len(rows), batch):
        index = torch.tensor(rows[start : start + batch], dtype=torch.long)
        logits = model(normalise(pixels[index]).to(device)).float().cpu()
        predictions.append(torch.stack([p.argmax(1) for p in logits.split(list(heads.values()), dim=1)], 1))
    predicted, target = torch.cat(predictions), labels[torch.tensor(rows, dtype=torch.long)]
    scored = target >= 0
    right = (predicted == target) | ~scored
    out = {name: float(right[scored[:, c], c].float().mean()) for c, name in enumerate(heads) if scored[:, c].any()}
    out["scene"] = float(right.all(1).float().mean())
    return out


@torch.no_grad()
def encode(backbone: nn.Module, pixels: torch.Tensor, device: torch.device, batch: int = 256) -> np.ndarray:
    """(N, F) float32 features of the frozen backbone."""
    backbone.eval()
    out = []
    for start in range(0, len(pixels), batch):
        out.append(backbone(normalise(pixels[start : start + batch]).to(device)).float().cpu().numpy())
    return np.concatenate(out)


def write_store(out: Path, image_ids: list[int], features: np.ndarray, bad: dict[int, str], meta: dict) -> None:
    """The feature store layout of captioning.data.features (the files tools/extract_features.py writes)."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "features.npy", features)
    (out / "index.json").write_text(json.dumps({"image_ids": image_ids}))
    (out / "bad.json").write_text(json.dumps({str(k): v for k, v in bad.items()}))
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    np.save(out / "done.npy", np.ones(len(image_ids), dtype=bool))


# -- the true labels as the input (model.encoder.pretrain.feed=true_labels) ---------------------------------
# The scenes' true labels as the decoder's input: a perfect encoder, the control that removes perception errors.
#
#     model.encoder.pretrain.feed=true_labels      (synthetic data only)
#
# Instead of pretraining a CNN, every image's true scene labels (count, layout, position, and each object slot's
# shape, colour and size, captioning.scenes.pretraining.scene_labels) are written one-hot, in the layout of the
# label probabilities a pretrained encoder gives (feed=labels), into a feature store, with a label-head file that
# names the groups (so `model.decoder.attention` finds the object slots). Built once per data set under
# $CAPTIONING_CACHE/true_labels/<hash>/ and reused. A label that does not apply (an absent slot) is all zeros.
#
# A model trained so has no image encoder: it captions the data set's images through the store, never JPEGs (its
# label head reads 1 feature, so captioning-predict on images stops with the label head's size error).
TRUE_LABEL_STORE_VERSION = 1


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
    from captioning.scenes.generator import load_scenes

    root = resolve_root(cfg_data)
    fingerprint = data_fingerprint(root)
    heads = _heads(max_objects(fingerprint["kwargs"].get("kind", "standard")))
    key = {
        "version": TRUE_LABEL_STORE_VERSION,
        "data": fingerprint,
        "heads": heads,
        "encoder": encoder_cfg.name,
        "pool": encoder_cfg.get("pool", "avg"),
        "image_size": cfg_data.image_size,
        "resize_size": cfg_data.resize_size,
    }
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
    torch.save(
        {
            "weight": torch.zeros(features.shape[1], 1),
            "bias": torch.zeros(features.shape[1]),
            "groups": [[name, size] for name, size in heads.items()],
        },
        tmp / "head.pth",
    )
    meta = {
        "name": encoder_cfg.name,
        "weights": None,
        "pool": encoder_cfg.get("pool", "avg"),
        "grid_size": encoder_cfg.get("grid_size", 2),
        "label_head": str(head),
        "image_size": cfg_data.image_size,
        "resize_size": cfg_data.resize_size,
        "images": len(image_ids),
        "feature_dim": features.shape[1],
        "true_labels": True,
    }
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
