"""Scene truth metrics for the synthetic data set: is each generated caption a true sentence about its image?

The grammar and the per-caption check live in captioning.scenes.grammar (shared with the generator);
this module scores a set of captions, one per image. Keys have no split prefix (callers add "test/").

Per caption (check_caption): grammatical (a sentence of the caption grammar, for any number of objects),
correct (a true caption of its image: SceneOracle.is_caption), the claims of its best reading (each judged
true or false, see scene_grammar.reading_claims) and the shapes it names.

scene_metrics(captions, scenes) -> {
  "scene/captions":              number of captions scored.
  "scene/correct":               fraction of captions that are fully true.
  "scene/grammatical":           fraction of captions that parse.
  "scene/<kind>_precision":      for kind in count, colour, shape, size, relation, position, order: true claims
                                 of that kind / claims of that kind, over the grammatical captions. Every
                                 grammatical caption makes exactly one count claim (its sentence form is for 1, 2
                                 or 3 objects); a sentence for another number of objects than its image has makes
                                 only that (false) count claim, its other claims are not scored. NaN when no
                                 caption made a claim of the kind.
  "scene/hallucinated_objects":  named shapes absent from the image / named shapes, summed over all captions
                                 (CHAIR_i-like; a caption names a shape with any of its words, grammatical or not,
                                 each shape counted once per caption); NaN when no caption names a shape.
  "scene/hallucinated_captions": fraction of captions naming at least one shape absent from their image (CHAIR_s).
  "scene/omitted_objects":       image objects whose shape the caption never names / image objects, summed over
                                 all captions (a vague true caption such as 'three shapes in a row ...' omits all).
}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from captioning.scenes.grammar import CLAIM_KINDS, CaptionCheck, SceneOracle, check_caption

__all__ = ["check_captions", "scene_metrics", "summarize_checks", "CaptionCheck", "SceneOracle", "check_caption"]


def check_captions(captions: Mapping[int, str | Sequence[str]], scenes: Mapping) -> dict[int, CaptionCheck]:
    """check_caption for every image id -> caption (a raw string or a list of words) against scenes[image_id]."""
    missing = [image_id for image_id in captions if image_id not in scenes]
    if missing:
        raise KeyError(
            f"no scene for {len(missing)} captioned image ids (e.g. {missing[:5]}): are these captions "
            f"of this synthetic data set?"
        )
    return {image_id: check_caption(caption, scenes[image_id]) for image_id, caption in captions.items()}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def summarize_checks(checks: Sequence[CaptionCheck], scenes: Sequence) -> dict[str, float]:
    """The scene_metrics figures of already-checked captions; scenes[i] is the image of checks[i]."""
    if len(checks) != len(scenes):
        raise ValueError(f"{len(checks)} checks but {len(scenes)} scenes")
    n = len(checks)
    out = {
        "scene/captions": float(n),
        "scene/correct": _ratio(sum(c.correct for c in checks), n),
        "scene/grammatical": _ratio(sum(c.grammatical for c in checks), n),
    }
    for kind in CLAIM_KINDS:
        claims = [claim for c in checks for claim in c.claims if claim.kind == kind]
        out[f"scene/{kind}_precision"] = _ratio(sum(claim.ok for claim in claims), len(claims))
    present = [{o.shape for o in scene.objects} for scene in scenes]
    hallucinated = [len(c.named - shapes) for c, shapes in zip(checks, present)]
    out["scene/hallucinated_objects"] = _ratio(sum(hallucinated), sum(len(c.named) for c in checks))
    out["scene/hallucinated_captions"] = _ratio(sum(h > 0 for h in hallucinated), n)
    out["scene/omitted_objects"] = _ratio(
        sum(len(shapes - c.named) for c, shapes in zip(checks, present)), sum(len(shapes) for shapes in present)
    )
    return out


def scene_metrics(captions: Mapping[int, str | Sequence[str]], scenes: Mapping) -> dict[str, float]:
    """Scene truth figures (see the module docstring) of one caption per image: captions maps image id -> caption
    (raw string or list of words), scenes maps image id -> scene (synthetic.load_scenes(root))."""
    checks = check_captions(captions, scenes)
    return summarize_checks(list(checks.values()), [scenes[image_id] for image_id in checks])
