"""Long scenes: the exposure-bias data set (`data=synthetic_long`, `data.synthetic.kind=long`).

Each image shows 4 to 6 shapes (distinct shapes, so "the circle" still names one object) in one row or one column,
and every caption names every object in reading order (left to right, top to bottom) in 25-40 words, from the
long_* templates of the one caption grammar (captioning.data.scene_grammar), so the truth checker and the prefix
oracle read these captions and their prefixes exactly as the generator writes them. With five or six nouns to say
in order, one early wrong word (a skipped or repeated object, a wrong colour) leaves many words after it to go
wrong: the setting where errors made while free-running can compound, which exposure bias is about.

The shapes are drawn smaller than in the standard scenes (the same small/large ratio) so that six fit in a row.
"""
from __future__ import annotations

import random

KINDS = ("standard", "long")
LONG_OBJECTS = (4, 6)       # fewest and most objects of a long scene
LONG_WORDS = (25, 40)       # caption length window of long scenes (tokens, <eos> not counted)
MIN_GAP = 0.02              # smallest gap between neighbours and to the border, a fraction of the image side


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"data.synthetic.kind must be one of {list(KINDS)} (got {kind!r})")
    return kind


def max_objects(kind: str) -> int:
    """The most objects a scene of this kind has (the scene-label heads' slot count)."""
    return LONG_OBJECTS[1] if check_kind(kind) == "long" else 3


def sampler(kind: str):
    """(scene sampler, (fewest, most) caption words) of a kind of scene."""
    from captioning.data import synthetic

    if check_kind(kind) == "long":
        return sample_long_scene, LONG_WORDS
    return synthetic.sample_scene, (synthetic.MIN_WORDS, synthetic.MAX_WORDS)


def sample_long_scene(rng: random.Random):
    """4-6 objects with distinct shapes along one axis, in reading order, clearly separated."""
    from captioning.data.scene_grammar import COLORS, SHAPES
    from captioning.data.synthetic import SIZE_EXTENT, Scene, SceneObject

    n = rng.randint(*LONG_OBJECTS)
    shapes = rng.sample(SHAPES, n)
    colors = [rng.choice(list(COLORS)) for _ in range(n)]
    sizes = [rng.choice(["small", "large"]) for _ in range(n)]
    grey = rng.randint(105, 150)
    background = tuple(grey + rng.randint(-6, 6) for _ in range(3))
    # the largest scale at which six large shapes still fit with their gaps: every scene drawn at that scale
    scale = (1.0 - (LONG_OBJECTS[1] + 1) * MIN_GAP) / (LONG_OBJECTS[1] * SIZE_EXTENT["large"])
    extents = [SIZE_EXTENT[s] * scale for s in sizes]
    layout = rng.choice(["horizontal", "vertical"])
    extra = 1.0 - sum(extents) - (n + 1) * MIN_GAP
    weights = [rng.random() + 0.5 for _ in range(n + 1)]
    gaps = [MIN_GAP + extra * w / sum(weights) for w in weights]
    along, pos = [], gaps[0]
    for e, g in zip(extents, gaps[1:]):
        along.append(pos + e / 2)
        pos += e + g
    across = [0.5 + rng.uniform(-0.04, 0.04) for _ in range(n)]
    centers = list(zip(along, across)) if layout == "horizontal" else list(zip(across, along))
    objects = []
    for shape, color, size, extent, (cx, cy) in zip(shapes, colors, sizes, extents, centers):
        rgb = tuple(min(255, max(0, c + rng.randint(-10, 10))) for c in COLORS[color])
        objects.append(SceneObject(shape, color, size, cx, cy, extent, rgb))
    return Scene(background, layout, None, objects)
