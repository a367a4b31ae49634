"""Synthetic shape scenes written exactly in the COCO 2014 + Karpathy-split formats.

This is the project's default data set: it needs no download, generates in seconds, and exercises the
very same reading code as real COCO (image folders, `captions_*2014.json` loadable with pycocotools,
Karpathy's `dataset_coco.json`). Each image shows 1 to 3 shapes on a plain grey-ish background; each
shape has a shape (circle, square, triangle, star, cross, diamond), a named colour, a size class
(small / large) and a position relative to the others. Five reference captions per image come from a
small grammar with synonyms and varied word order (captioning.scenes.grammar, which also checks captions
and prefixes against a scene); every caption is true of its image, and multi-object
scenes always get at least one long caption (12-16 words) so that one early wrong word derails the rest,
which is exactly where teacher forcing and scheduled sampling differ.

Everything is driven by seeded `random.Random` instances (never the global RNG), one per image keyed by
(seed, split, index), so the same arguments give byte-identical files, and the val/test images do not
change when only `num_train` changes.

Layout under `root` (same as a real COCO 2014 + Karpathy download):

    root/train2014/COCO_train2014_%012d.jpg      Karpathy "train" images
    root/val2014/COCO_val2014_%012d.jpg          Karpathy "restval", "val" and "test" images
    root/annotations/captions_train2014.json     COCO caption format
    root/annotations/captions_val2014.json
    root/dataset_coco.json                       Karpathy split file
    root/synthetic_objects.json                  per-image scene metadata (shapes, colours, boxes)
    root/synthetic_meta.json                     generation arguments; written LAST (completion marker)
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from PIL import Image, ImageDraw

from captioning.scenes import grammar as scene_grammar
from captioning.scenes.grammar import (  # noqa: F401  (re-exported: the module's public names since v1)
    COLORS,
    GREY,
    PICTURE,
    POSITION_WORDS,
    RELATION_TO_IT,
    RELATION_WORDS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    TEMPLATES,
    THINGS,
    VERBS,
    tokenize,
)

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "COLORS",
    "SHAPES",
    "SceneObject",
    "Scene",
    "sample_scene",
    "draw_scene",
    "caption_scene",
    "tokenize",
    "generate_synthetic",
    "ensure_synthetic",
    "is_synthetic_root",
    "load_scenes",
]

FORMAT_VERSION = 1  # bump whenever the generated files change, so cached folders are regenerated

META_FILE = "synthetic_meta.json"
OBJECTS_FILE = "synthetic_objects.json"
KARPATHY_FILE = "dataset_coco.json"
INCOMPLETE_MARKER = ".synthetic_incomplete"  # exists while a generation is in progress
LOCK_FILE = ".synthetic.lock"
OWNED_DIRS = ("train2014", "val2014", "annotations")
OWNED_FILES = (KARPATHY_FILE, OBJECTS_FILE, META_FILE)

# ---------------------------------------------------------------------------------------------------
# Scene vocabulary: what can be in an image

# COLORS (colour word -> RGB) and SHAPES come from scene_grammar, the words of the caption grammar.
SIZE_EXTENT = {"small": 0.16, "large": 0.30}  # object extent as a fraction of the image side
SINGLE_POSITIONS = {
    "center": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}


@dataclass
class SceneObject:
    """One shape; `cx`, `cy`, `extent` are fractions of the image side (resolution independent)."""

    shape: str
    color: str
    size: str  # "small" | "large"
    cx: float
    cy: float
    extent: float
    rgb: tuple[int, int, int]  # the drawn colour: the named colour plus a little jitter


@dataclass
class Scene:
    """Objects in reading order: left to right ("horizontal") or top to bottom ("vertical")."""

    background: tuple[int, int, int]
    layout: str  # "single" | "horizontal" | "vertical"
    position: str | None  # for single-object scenes: a key of SINGLE_POSITIONS
    objects: list[SceneObject]


def sample_scene(rng: random.Random) -> Scene:
    """Draw a random scene: 1-3 objects with distinct shapes, clearly separated along one axis."""
    n = rng.choices([1, 2, 3], weights=[0.2, 0.4, 0.4])[0]
    shapes = rng.sample(SHAPES, n)  # distinct shapes, so "the circle" always names one object
    colors = [rng.choice(list(COLORS)) for _ in range(n)]
    sizes = [rng.choice(["small", "large"]) for _ in range(n)]
    if n == 3 and all(s == "large" for s in sizes):  # three large shapes do not fit in a row with gaps
        sizes[rng.randrange(3)] = "small"
    grey = rng.randint(105, 150)
    background = cast(tuple[int, int, int], tuple(grey + rng.randint(-6, 6) for _ in range(3)))
    extents = [SIZE_EXTENT[s] for s in sizes]

    if n == 1:
        position = rng.choice(list(SINGLE_POSITIONS))
        x, y = SINGLE_POSITIONS[position]
        centers = [(x + rng.uniform(-0.04, 0.04), y + rng.uniform(-0.04, 0.04))]
        layout = "single"
    else:
        position = None
        layout = rng.choice(["horizontal", "vertical"])
        centers = centers_in_a_row(rng, extents, layout, min_gap=0.04, jitter=0.06)
    return Scene(background, layout, position, coloured_objects(rng, shapes, colors, sizes, extents, centers))


def centers_in_a_row(
    rng: random.Random, extents: list[float], layout: str, min_gap: float, jitter: float
) -> list[tuple[float, float]]:
    """Object centres in reading order along one axis ("horizontal": left to right), separated by random gaps of at
    least `min_gap`; across the axis a small jitter only, so the relation is clearly left/right (or above/below)."""
    n = len(extents)
    extra = 1.0 - sum(extents) - (n + 1) * min_gap
    weights = [rng.random() + 0.5 for _ in range(n + 1)]
    gaps = [min_gap + extra * w / sum(weights) for w in weights]
    along, pos = [], gaps[0]
    for e, g in zip(extents, gaps[1:]):
        along.append(pos + e / 2)
        pos += e + g
    across = [0.5 + rng.uniform(-jitter, jitter) for _ in range(n)]
    return list(zip(along, across)) if layout == "horizontal" else list(zip(across, along))


def coloured_objects(rng: random.Random, shapes, colors, sizes, extents, centers) -> list[SceneObject]:
    """The scene's objects, each colour jittered a little (the drawn RGB)."""
    objects = []
    for shape, color, size, extent, (cx, cy) in zip(shapes, colors, sizes, extents, centers):
        rgb = cast(tuple[int, int, int], tuple(min(255, max(0, c + rng.randint(-10, 10))) for c in COLORS[color]))
        objects.append(SceneObject(shape, color, size, cx, cy, extent, rgb))
    return objects


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of a non-circle shape with half-extent r."""
    if shape == "square":
        s = 0.88 * r  # slightly smaller than the circle so both look about as heavy
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.85 * r), (cx - r, cy + 0.85 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "cross":
        t = r / 3  # half the arm thickness
        return [
            (cx - t, cy - r),
            (cx + t, cy - r),
            (cx + t, cy - t),
            (cx + r, cy - t),
            (cx + r, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + r),
            (cx - t, cy + r),
            (cx - t, cy + t),
            (cx - r, cy + t),
            (cx - r, cy - t),
            (cx - t, cy - t),
        ]
    if shape == "star":
        points = []
        for k in range(10):  # 5 outer and 5 inner vertices, first one pointing up
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw_scene(scene: Scene, image_size: int) -> Image.Image:
    """Render a scene as an RGB PIL image of image_size x image_size pixels."""
    image = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.cx * image_size, obj.cy * image_size, obj.extent * image_size / 2
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=obj.rgb)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=obj.rgb)
    return image


# ---------------------------------------------------------------------------------------------------
# Captions. The grammar (phrase tables and templates) is data in scene_grammar.py, shared with the truth checker
# (captioning.scenes.truth) so the two cannot drift apart; here: the length window, the raw COCO look, and the
# draw of five distinct captions per image.

MIN_WORDS, MAX_WORDS, LONG_MIN_WORDS = 5, 16, 12


def _surface(text: str, rng: random.Random) -> str:
    """Give a template caption the look of a raw COCO caption (case, period, comma spacing, whitespace)."""
    if rng.random() < 0.3:
        text = text.replace(" ,", ",").replace(" :", ":")
    if rng.random() < 0.4:
        text = text[0].upper() + text[1:] + "."
    roll = rng.random()
    if roll < 0.03:
        text = text + " "
    elif roll < 0.06:
        spaces = [i for i, ch in enumerate(text) if ch == " "]
        i = rng.choice(spaces)
        text = text[:i] + "  " + text[i + 1 :]
    return text


def caption_scene(
    scene: Scene, rng: random.Random, num_captions: int = 5, words: tuple[int, int] = (MIN_WORDS, MAX_WORDS)
) -> list[str]:
    """Distinct true captions of `scene`, words[0]..words[1] words each; for 2-3 object scenes the
    first caption drawn is long (at least LONG_MIN_WORDS words). Returned in random order."""
    templates, weights = zip(*TEMPLATES[len(scene.objects)])
    captions: list[str] = []
    seen: set[str] = set()
    for k in range(num_captions):
        low = max(LONG_MIN_WORDS, words[0]) if (k == 0 and len(scene.objects) > 1) else words[0]
        for _ in range(1000):
            text = scene_grammar.sample_text(rng.choices(templates, weights)[0], scene, rng)
            tokens = tokenize(text)
            if low <= len(tokens) <= words[1] and " ".join(tokens) not in seen:
                break
        else:  # the grammar always has enough variety; reaching this is a bug in the templates
            raise RuntimeError(f"could not draw caption {k} for scene {scene}")
        seen.add(" ".join(tokens))
        captions.append(_surface(text, rng))
    rng.shuffle(captions)
    return captions


# ---------------------------------------------------------------------------------------------------
# Writing the COCO folder


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, then rename: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, json.dumps(obj).encode("utf-8"))


def _cocoid(split_code: int, index: int, seed: int) -> int:
    """Unique, non-contiguous COCO-like image id (an affine bijection modulo a prime, like real ids
    they are sparse, which catches code that confuses ids with list positions)."""
    prime = 999_983
    key = split_code * 300_000 + index  # injective while index < 300_000
    return (key * 7_919 + seed * 104_729) % prime + 1


def _check_args(num_train: int, num_val: int, num_test: int, image_size: int, seed: int) -> None:
    for name, value, low in (
        ("num_train", num_train, 1),
        ("num_val", num_val, 1),
        ("num_test", num_test, 1),
        ("image_size", image_size, 16),
        ("seed", seed, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if value >= 300_000:
            raise ValueError(f"{name} must be < 300000 for unique synthetic ids, got {value}")
    if image_size > 2048:
        raise ValueError(f"image_size must be <= 2048, got {image_size}")


def _clear_previous(root: Path) -> None:
    """Remove a previous (possibly partial) synthetic generation. Refuses folders it did not create,
    so pointing it at a real COCO download by mistake cannot delete anything."""
    ours = any((root / name).exists() for name in (META_FILE, INCOMPLETE_MARKER, OBJECTS_FILE))
    present = [name for name in OWNED_DIRS + OWNED_FILES if (root / name).exists()]
    if present and not ours:
        raise ValueError(
            f"{root} already contains {present} but none of {META_FILE}, {OBJECTS_FILE}, {INCOMPLETE_MARKER}: "
            "it does not look like a synthetic "
            f"data set generated here (a real COCO folder?); refusing to overwrite it. "
            f"Use an empty folder for the synthetic data."
        )
    (root / INCOMPLETE_MARKER).touch()
    (root / META_FILE).unlink(missing_ok=True)
    for name in OWNED_DIRS:
        shutil.rmtree(root / name, ignore_errors=True)
    for name in OWNED_FILES:
        (root / name).unlink(missing_ok=True)
        (root / (name + ".tmp")).unlink(missing_ok=True)


def _generator_fingerprint() -> str:
    """A hash of this file and of the caption grammar: any change to the generator regenerates cached folders,
    even if nobody bumped FORMAT_VERSION (a stale cache would silently evaluate on other images and captions)."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(Path(scene_grammar.__file__).read_bytes())
    return digest.hexdigest()[:16]


def _meta(num_train: int, num_val: int, num_test: int, image_size: int, seed: int, kind: str = "standard") -> dict:
    kwargs: dict[str, int | str] = {
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "image_size": image_size,
        "seed": seed,
    }
    if kind != "standard":  # the standard scenes' metadata stays as it was
        kwargs["kind"] = kind
    return {"format_version": FORMAT_VERSION, "generator": _generator_fingerprint(), "kwargs": kwargs}


def generate_synthetic(
    root: str | Path,
    num_train: int = 4000,
    num_val: int = 250,
    num_test: int = 250,
    image_size: int = 64,
    seed: int = 0,
    kind: str = "standard",
) -> Path:
    """Write a synthetic COCO 2014 + Karpathy data set into `root` and return `root` as a Path.

    `num_train` counts Karpathy "train" + "restval" images (like the 113,287 of real COCO); every
    tenth of them is "restval" and lives in val2014, the rest in train2014. val and test images live
    in val2014. Overwrites a previous synthetic generation in `root`; refuses any other COCO-like
    content. Not safe to run concurrently on the same folder: use `ensure_synthetic` for that.
    kind: "standard" (1-3 objects, 5-16 words) or "long" (4-6 objects, 25-40 words: the long scenes below).
    """
    _check_args(num_train, num_val, num_test, image_size, seed)
    sample, words = sampler(kind)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _clear_previous(root)
    for name in OWNED_DIRS:
        (root / name).mkdir()

    # (split, folder, split_code, index): the scene of an image depends only on (seed, split_code, index).
    plan = [
        ("restval" if i % 10 == 9 else "train", "val2014" if i % 10 == 9 else "train2014", 0, i)
        for i in range(num_train)
    ]
    plan += [("val", "val2014", 1, i) for i in range(num_val)]
    plan += [("test", "val2014", 2, i) for i in range(num_test)]

    karpathy_images, scenes_meta = [], {}
    coco: dict[str, dict[str, Any]] = {
        folder: {
            "info": {
                "description": f"Synthetic shape scenes in COCO format ({folder})",
                "version": str(FORMAT_VERSION),
                "year": 2014,
                "contributor": "captioning.data.synthetic",
                "date_created": "2014-01-01",
            },
            "licenses": [],
            "images": [],
            "annotations": [],
        }
        for folder in ("train2014", "val2014")
    }
    sentid = 0
    for imgid, (split, folder, split_code, index) in enumerate(plan):
        rng = random.Random(f"synthetic-v{FORMAT_VERSION}:{seed}:{split_code}:{index}")
        scene = sample(rng)
        captions = caption_scene(scene, rng, words=words)
        cocoid = _cocoid(split_code, index, seed)
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"

        buffer = io.BytesIO()
        draw_scene(scene, image_size).save(buffer, format="JPEG", quality=90)
        _write_atomic(root / folder / filename, buffer.getvalue())

        coco[folder]["images"].append({"id": cocoid, "file_name": filename, "width": image_size, "height": image_size})
        sentences = []
        for j, caption in enumerate(captions):
            coco[folder]["annotations"].append({"id": cocoid * 10 + j, "image_id": cocoid, "caption": caption})
            sentences.append({"tokens": tokenize(caption), "raw": caption, "imgid": imgid, "sentid": sentid + j})
        karpathy_images.append(
            {
                "filepath": folder,
                "sentids": list(range(sentid, sentid + len(captions))),
                "filename": filename,
                "imgid": imgid,
                "split": split,
                "sentences": sentences,
                "cocoid": cocoid,
            }
        )
        sentid += len(captions)
        scenes_meta[str(cocoid)] = {
            "split": split,
            "file": f"{folder}/{filename}",
            "background": list(scene.background),
            "layout": scene.layout,
            "position": scene.position,
            "objects": [
                {
                    "shape": o.shape,
                    "color": o.color,
                    "size": o.size,
                    # COCO-style box [x, y, width, height] in pixels
                    "bbox": [
                        round((o.cx - o.extent / 2) * image_size, 2),
                        round((o.cy - o.extent / 2) * image_size, 2),
                        round(o.extent * image_size, 2),
                        round(o.extent * image_size, 2),
                    ],
                }
                for o in scene.objects
            ],
        }

    _write_json(root / "annotations" / "captions_train2014.json", coco["train2014"])
    _write_json(root / "annotations" / "captions_val2014.json", coco["val2014"])
    _write_json(root / KARPATHY_FILE, {"images": karpathy_images, "dataset": "coco"})
    _write_json(
        root / OBJECTS_FILE, {"format_version": FORMAT_VERSION, "image_size": image_size, "images": scenes_meta}
    )
    _write_json(root / META_FILE, _meta(num_train, num_val, num_test, image_size, seed, kind))  # LAST: marks completion
    (root / INCOMPLETE_MARKER).unlink()
    return root


def ensure_synthetic(
    root: str | Path,
    num_train: int = 4000,
    num_val: int = 250,
    num_test: int = 250,
    image_size: int = 64,
    seed: int = 0,
    kind: str = "standard",
) -> Path:
    """Return `root` holding the synthetic data set for these arguments, generating it only if needed.

    Reuses a complete generation with identical arguments and format version; regenerates (in place)
    when the completion marker is missing (interrupted run) or the arguments differ. Safe to call from
    several processes at once (e.g. every DDP rank): generation happens under an exclusive file lock,
    and processes that wait on the lock then find the finished data set and reuse it.
    """
    _check_args(num_train, num_val, num_test, image_size, seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    check_kind(kind)
    wanted = _meta(num_train, num_val, num_test, image_size, seed, kind)
    with open(root / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        try:
            existing = json.loads((root / META_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            existing = None
        if existing != wanted or (root / INCOMPLETE_MARKER).exists():
            generate_synthetic(root, num_train, num_val, num_test, image_size, seed, kind)
    return root


# ---------------------------------------------------------------------------------------------------
# Reading a generation back


def is_synthetic_root(root: str | Path) -> bool:
    """Is `root` a finished synthetic generation (its scene metadata present, no generation in progress)?
    False for a real COCO folder, which has no synthetic_objects.json."""
    root = Path(root)
    return (root / OBJECTS_FILE).is_file() and not (root / INCOMPLETE_MARKER).exists()


def load_scenes(root: str | Path, split: str | None = None) -> dict[int, Scene]:
    """Scenes of a synthetic generation, by COCO image id (cocoid), read from root/synthetic_objects.json;
    only those of one Karpathy split ("train", "restval", "val", "test") if `split` is given.

    Objects keep their reading order; centres and extents come from the stored boxes (rounded to 0.01 pixel) and
    `rgb` is the named colour (the drawn jitter is not stored). Raises ValueError for a folder that is not a
    synthetic generation or was written by another FORMAT_VERSION (its captions follow another grammar)."""
    root = Path(root)
    if not is_synthetic_root(root):
        raise ValueError(
            f"{root} is not a synthetic data set generated here (no {OBJECTS_FILE}, or a generation in progress)"
        )
    meta = json.loads((root / OBJECTS_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{root / OBJECTS_FILE} has format_version {meta.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}: regenerate the data set"
        )
    size = meta["image_size"]
    scenes = {}
    for cocoid, info in meta["images"].items():
        if split is not None and info["split"] != split:
            continue
        objects = [
            SceneObject(
                o["shape"],
                o["color"],
                o["size"],
                (o["bbox"][0] + o["bbox"][2] / 2) / size,
                (o["bbox"][1] + o["bbox"][3] / 2) / size,
                o["bbox"][2] / size,
                COLORS[o["color"]],
            )
            for o in info["objects"]
        ]
        scenes[int(cocoid)] = Scene(tuple(info["background"]), info["layout"], info["position"], objects)
    return scenes


# -- long scenes: the exposure-bias data set (data=synthetic_long, data.synthetic.kind=long) ----------------
# Long scenes: the exposure-bias data set (`data=synthetic_long`, `data.synthetic.kind=long`).
#
# Each image shows 4 to 6 shapes (distinct shapes, so "the circle" still names one object) in one row or one column,
# and every caption names every object in reading order (left to right, top to bottom) in 25-40 words, from the
# long_* templates of the one caption grammar (captioning.scenes.grammar), so the truth checker and the prefix
# oracle read these captions and their prefixes exactly as the generator writes them. With five or six nouns to say
# in order, one early wrong word (a skipped or repeated object, a wrong colour) leaves many words after it to go
# wrong: the setting where errors made while free-running can compound, which exposure bias is about.
#
# The shapes are drawn smaller than in the standard scenes (the same small/large ratio) so that six fit in a row.
KINDS = ("standard", "long")
LONG_OBJECTS = (4, 6)  # fewest and most objects of a long scene
LONG_WORDS = (25, 40)  # caption length window of long scenes (tokens, <eos> not counted)
MIN_GAP = 0.02  # smallest gap between neighbours and to the border, a fraction of the image side


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"data.synthetic.kind must be one of {list(KINDS)} (got {kind!r})")
    return kind


def max_objects(kind: str) -> int:
    """The most objects a scene of this kind has (the scene-label heads' slot count)."""
    return LONG_OBJECTS[1] if check_kind(kind) == "long" else 3


def sampler(kind: str):
    """(scene sampler, (fewest, most) caption words) of a kind of scene."""
    if check_kind(kind) == "long":
        return sample_long_scene, LONG_WORDS
    return sample_scene, (MIN_WORDS, MAX_WORDS)


def sample_long_scene(rng: random.Random):
    """4-6 objects with distinct shapes along one axis, in reading order, clearly separated."""
    n = rng.randint(*LONG_OBJECTS)
    shapes = rng.sample(SHAPES, n)
    colors = [rng.choice(list(COLORS)) for _ in range(n)]
    sizes = [rng.choice(["small", "large"]) for _ in range(n)]
    grey = rng.randint(105, 150)
    background = cast(tuple[int, int, int], tuple(grey + rng.randint(-6, 6) for _ in range(3)))
    # the largest scale at which six large shapes still fit with their gaps: every scene drawn at that scale
    scale = (1.0 - (LONG_OBJECTS[1] + 1) * MIN_GAP) / (LONG_OBJECTS[1] * SIZE_EXTENT["large"])
    extents = [SIZE_EXTENT[s] * scale for s in sizes]
    layout = rng.choice(["horizontal", "vertical"])
    centers = centers_in_a_row(rng, extents, layout, min_gap=MIN_GAP, jitter=0.04)
    return Scene(background, layout, None, coloured_objects(rng, shapes, colors, sizes, extents, centers))


# -- the data config's generator (data.generator) -------------------------------------------------------------
def ensure_data(cfg_data) -> Path:
    """`data.generator` of data=synthetic (captioning.data.build.resolve_root calls it): the folder of the data set
    `data.synthetic` describes, generated on first use and reused after; `data.root` null puts it in the cache
    folder ($CAPTIONING_CACHE/synthetic_<sizes>)."""
    from captioning.data.build import cache_dir

    s = cfg_data.synthetic
    kind = s.get("kind", "standard")
    root = (
        Path(str(cfg_data.root)).expanduser()
        if cfg_data.root
        else cache_dir()
        / (
            f"synthetic_{s.num_train}_{s.num_val}_{s.num_test}_{s.image_size}px_seed{s.seed}"
            + ("" if kind == "standard" else f"_{kind}")
        )
    )
    if cfg_data.root:
        check_synthetic_root(root)
    return ensure_synthetic(
        root,
        num_train=s.num_train,
        num_val=s.num_val,
        num_test=s.num_test,
        image_size=s.image_size,
        seed=s.seed,
        kind=kind,
    )


def check_synthetic_root(root: Path) -> None:
    """A data.root the user named for synthetic data is written into only when it is new, empty or already a
    synthetic generation of ours; anything else (a typo'd path to real data, a folder of other files) is a
    ValueError naming the folder. Generating into a new or empty folder is said in the log."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"data.root={root} is a file, not a folder")
    entries = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if any(name in entries for name in (META_FILE, INCOMPLETE_MARKER)):
        return  # ours: reused, or regenerated by ensure_synthetic
    others = [name for name in entries if name != LOCK_FILE]
    if others:
        raise ValueError(
            f"data.root={root} holds other files ({', '.join(others[:5])}"
            f"{' ...' if len(others) > 5 else ''}) and no synthetic data set: with data=synthetic, name "
            "a new or empty folder, or leave data.root unset (generated in the cache); for real COCO "
            "use data=coco"
        )
    log.warning(
        "data.root=%s %s: generating the synthetic data set there",
        root,
        "is empty" if root.is_dir() else "does not exist",
    )


def load_scene_truth(cfg_data) -> dict | None:
    """image_id -> Scene for synthetic data (the exact truth the scene checker judges captions against);
    None for COCO or any folder that is not a synthetic generation."""
    if cfg_data.get("name") != "synthetic":
        return None
    from captioning.data.build import resolve_root

    root = resolve_root(cfg_data)
    return load_scenes(root) if is_synthetic_root(root) else None


def embedded_text(num_train: int = 4000, num_val: int = 250, num_test: int = 250, seed: int = 0) -> str:
    """`data.embedded.generator` of data=text (captioning.data.text_corpus.load_text calls it): the captions of the
    synthetic data set one per line, in the order of its images (train, val, test), drawn by the same grammar and
    seeds as `data=synthetic` without drawing images."""
    lines = []
    for split_code, count in ((0, num_train), (1, num_val), (2, num_test)):
        for index in range(count):
            rng = random.Random(f"synthetic-v{FORMAT_VERSION}:{seed}:{split_code}:{index}")
            lines += caption_scene(sample_scene(rng), rng)
    return "\n".join(lines) + "\n"
