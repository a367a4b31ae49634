"""The caption grammar of the synthetic shape scenes, written once as data, and the three things done with it.

The grammar is a list of templates per number of objects (TEMPLATES). A template is a tuple of *parts*:

    Words("there is")          fixed text                       Pick(VERBS)      one of fixed phrases
    Noun(role)                 '[a|the] [size] colour shape'    Again(role)      the shape word said again
    Say(kind, fact, table)     a phrase stating a scene fact (a relation, the position, the layout), from a
                               table that maps each value of the fact to its phrases
    Maybe(parts, p)            the parts or nothing             Around(inner, before, after)  a phrase before
                                                                                  or after `inner`

Roles are the template's own object slots (subject, other, ...); a *frame* maps roles to objects of the scene
(indices into `scene.objects`, which are in reading order). A template has one frame or two; with two, the
generator picks one with a coin (e.g. which object is the sentence subject).

The same parts are read three ways, and nothing else knows the grammar:

1. `sample_text(template, scene, rng)` draws a caption (what `synthetic.caption_scene` writes). It makes exactly
   the random calls, in exactly the order, of the hand-written template functions it replaced, so data sets
   generated before and after are byte-identical.
2. `check_caption(caption, scene)` parses a caption with every template (all numbers of objects, every value of
   every fact) and lists what it *claims*: the number of objects (the template's), each mentioned object's
   colour, shape and size, the relations, positions and reading order. Each claim is compared with the scene
   under each frame of the template; the reading with the fewest false claims is reported.
3. `SceneOracle(scene)` is the set of TRUE captions of one scene as a token automaton: every template for the
   scene's number of objects, every frame, and of every phrase only the alternatives whose claims hold. It
   answers whether a complete caption is true (`is_caption`) and whether some true caption starts with a prefix
   (`is_prefix`, or word by word with `start` / `advance` / `accepts`).

A caption is *true* of a scene iff the sampler could have drawn it for that scene, ignoring the length window
(5..16 words) the generator applies on top: a true caption is a sentence of the grammar for the scene's number of
objects with every claim true under one of the template's frames. Tokens are `tokenize`d first, so case and
punctuation do not matter.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

# ---------------------------------------------------------------------------------------------------
# Scene vocabulary and phrase tables (the data the generator draws from and the checker parses with)

COLORS: dict[str, tuple[int, int, int]] = {  # colour word -> the RGB the generator draws it in
    "red": (220, 30, 30),
    "blue": (30, 70, 230),
    "green": (30, 170, 50),
    "yellow": (245, 225, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")

SHAPE_WORDS = {
    "circle": ["circle", "disc", "round shape"],
    "square": ["square", "box"],
    "triangle": ["triangle"],
    "star": ["star"],
    "cross": ["cross"],
    "diamond": ["diamond"],
}
SIZE_WORDS = {"large": ["large", "big"], "small": ["small", "little", "tiny"]}
RELATION_WORDS = {
    "left": ["to the left of", "left of", "on the left of"],
    "right": ["to the right of", "right of", "on the right of"],
    "above": ["above", "on top of", "over"],
    "below": ["below", "under", "beneath", "underneath"],
}
RELATION_TO_IT = {
    "left": ["to its left", "on its left"],
    "right": ["to its right", "on its right"],
    "above": ["above it", "over it"],
    "below": ["below it", "under it", "beneath it"],
}
POSITION_WORDS = {
    "center": ["in the middle", "in the center", "at the center"],
    "left": ["on the left", "on the left side"],
    "right": ["on the right", "on the right side"],
    "top": ["at the top", "near the top"],
    "bottom": ["at the bottom", "near the bottom"],
}
# Layout phrases: a list is drawn from (rng.choice), a string is the one phrase (no random draw).
LINE_WORDS = {"horizontal": ["in a row", "in a line"], "vertical": ["in a column", "in a line"]}
TOGETHER_WORDS = {"horizontal": ["side by side", "next to each other"], "vertical": ["one above the other"]}
FIRST_SIDE = {"horizontal": "on the left", "vertical": "at the top"}
LAST_SIDE = {"horizontal": "on the right", "vertical": "at the bottom"}
READING_ORDER = {"horizontal": "from left to right", "vertical": "from top to bottom"}
LINE_NOUN = {"horizontal": "row", "vertical": "column"}
PHRASE_TABLES: dict[str, Mapping[str, str | list[str]]] = {
    "RELATION_WORDS": RELATION_WORDS,
    "RELATION_TO_IT": RELATION_TO_IT,
    "POSITION_WORDS": POSITION_WORDS,
    "LINE_WORDS": LINE_WORDS,
    "TOGETHER_WORDS": TOGETHER_WORDS,
    "FIRST_SIDE": FIRST_SIDE,
    "LAST_SIDE": LAST_SIDE,
    "READING_ORDER": READING_ORDER,
    "LINE_NOUN": LINE_NOUN,
}
# Fixed phrase lists (no claim about the scene).
VERBS = ["is", "sits", "lies", "is placed"]
THINGS = ["shapes", "objects"]
PICTURE = ["a picture of", "an image of", "an image showing", "a picture showing"]
GREY = ["grey", "gray"]
ONE_LEAD = ["there is only one", "there is one", "only one", "one"]
ONE_NOUN = ["shape", "object"]
OF_IMAGE = ["of the image", "of the picture"]

CLAIM_KINDS = ("count", "colour", "shape", "size", "relation", "position", "order")


def tokenize(caption: str) -> list[str]:
    """Karpathy-style tokens: lowercase alphanumeric words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", caption.lower())


def _article(phrase: str) -> str:
    """'a' or 'an' for the phrase that follows (all grammar words starting with a vowel take 'an')."""
    return "an" if phrase[0] in "aeiou" else "a"


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------------
# Parts and templates


@dataclass(frozen=True)
class Words:
    """Fixed template text; its punctuation (',' ':') only shows in the raw caption, tokenize drops it."""

    text: str


@dataclass(frozen=True)
class Pick:
    """One of fixed phrases, drawn with rng.choice; states nothing about the scene."""

    options: tuple[str, ...]


@dataclass(frozen=True)
class Maybe:
    """The parts or nothing: the parts are drawn first, then kept if rng.random() < p."""

    parts: tuple
    p: float = 0.5


@dataclass(frozen=True)
class Around:
    """`inner` (drawn first), then a coin: `before` + inner if rng.random() < 0.5, else inner + `after`."""

    inner: tuple
    before: tuple
    after: tuple


@dataclass(frozen=True)
class Noun:
    """Noun phrase of the object in `role`: '[a|an|the] [size] colour shape'. The size word is there with
    probability 1/2. article=False drops the article; bound=True takes the template's bound shape word for the
    role (drawn once, before the parts) instead of drawing one here."""

    role: int
    definite: bool = False
    article: bool = True
    bound: bool = False


@dataclass(frozen=True)
class Again:
    """The bound shape word of the object in `role`, said again ('... , the circle is left of the box')."""

    role: int


@dataclass(frozen=True)
class Say:
    """A phrase stating a fact about the scene, from PHRASE_TABLES[table]: fact value -> phrase(s).

    fact: "relation" (of the object in roles[0] to the one in roles[1]: left/right/above/below),
    "position" (of the single object: a key of POSITION_WORDS) or "layout" (horizontal/vertical).
    kind: the claim kind it is reported as; what: the claim's subject, '{0}', '{1}' = object numbers of roles."""

    kind: str
    fact: str
    table: str
    roles: tuple[int, ...] = ()
    what: str = ""


Part = Words | Pick | Maybe | Around | Noun | Again | Say


@dataclass(frozen=True)
class Template:
    """One sentence form for `count` objects. frames: role -> object index maps; with two, the generator draws
    rng.random() first and takes frames[0] if it is < 0.5. bind: roles whose shape word is drawn once (in this
    order, after the frame) and used by Noun(bound=True) and Again."""

    name: str
    count: int
    parts: tuple
    frames: tuple[tuple[int, ...], ...]
    bind: tuple[int, ...] = ()

    def __call__(self, scene, rng: random.Random) -> str:  # the signature of the old template functions
        return sample_text(self, scene, rng)


def _relation(a: int, b: int) -> Say:
    return Say("relation", "relation", "RELATION_WORDS", (a, b), "relation of object {0} to object {1}")


def _relation_to_it(a: int, b: int) -> Say:  # 'B with A to its left': A is left of B
    return Say("relation", "relation", "RELATION_TO_IT", (a, b), "relation of object {0} to object {1}")


_POSITION = (
    Say("position", "position", "POSITION_WORDS", (0,), "position of object {0}"),
    Maybe((Pick(tuple(OF_IMAGE)),), 0.3),
)
_LINE = Say("order", "layout", "LINE_WORDS", (), "arrangement of the objects")
_TOGETHER = Say("relation", "layout", "TOGETHER_WORDS", (0, 1), "relation of objects {0} and {1}")
_READING_ORDER = Say("order", "layout", "READING_ORDER", (), "reading order")
_LINE_NOUN = Say("order", "layout", "LINE_NOUN", (), "arrangement of the objects")


def _first_side(role: int) -> Say:
    return Say("position", "layout", "FIRST_SIDE", (role,), "position of object {0}")


def _last_side(role: int) -> Say:
    return Say("position", "layout", "LAST_SIDE", (role,), "position of object {0}")


def _pick(options: Sequence[str]) -> Pick:
    return Pick(tuple(options))


def _maybe(*parts, p: float = 0.5) -> Maybe:
    return Maybe(tuple(parts), p)


_VERB, _THINGS, _PICTURE, _GREY = _pick(VERBS), _pick(THINGS), _pick(PICTURE), _pick(GREY)
_ON_GREY = (Words("on a"), _maybe(Words("plain")), _GREY, Words("background"))

ONE = ((0,),)
FIXED_PAIR = ((0, 1),)
SUBJECT = ((0, 1), (1, 0))  # role 0 is the sentence subject: the first object (coin < 0.5) or the second
FIXED_TRIPLE = ((0, 1, 2),)
ENDS = ((1, 2, 0), (1, 0, 2))  # roles (middle, end, other end); coin < 0.5 names the last object first
CHAIN = ((2, 1, 0), (0, 1, 2))  # coin < 0.5 describes the chain from the last object

_S, _O = 0, 1  # subject and other of SUBJECT templates


def _t(name: str, count: int, parts, frames, bind=()) -> Template:
    return Template(name, count, tuple(parts), frames, tuple(bind))


# (template, relative weight); vague templates are drawn less often. tri_sides is never written: its shortest caption
# has 17 words, beyond the generator's MAX_WORDS (16), so it is always redrawn (its random draws still count, and
# the checker accepts its sentences as true).
TEMPLATES: dict[int, list[tuple[Template, float]]] = {
    1: [
        (_t("one_position", 1, (Noun(0), _maybe(_VERB), *_POSITION), ONE), 1.0),
        (_t("one_single", 1, (Words("a single"), Noun(0, article=False), _maybe(*_POSITION)), ONE), 1.0),
        (_t("one_picture", 1, (_PICTURE, Noun(0), _maybe(*_POSITION)), ONE), 1.0),
        (_t("one_background", 1, (Noun(0), *_ON_GREY), ONE), 1.0),
        (_t("one_count", 1, (_pick(ONE_LEAD), _pick(ONE_NOUN), Words(":"), Noun(0)), ONE), 0.7),
    ],
    2: [
        (_t("pair_plain", 2, (Noun(_S), _relation(_S, _O), Noun(_O)), SUBJECT), 1.0),
        (_t("pair_verb", 2, (Noun(_S), _VERB, _relation(_S, _O), Noun(_O)), SUBJECT), 1.0),
        (_t("pair_there", 2, (Words("there is"), Noun(_S), _relation(_S, _O), Noun(_O)), SUBJECT), 1.0),
        (_t("pair_count", 2, (Words("two"), _THINGS, Words(":"), Noun(_S), Words("and"), Noun(_O)), SUBJECT), 0.7),
        (_t("pair_with", 2, (Noun(_O), Words("with"), Noun(_S), _relation_to_it(_S, _O)), SUBJECT), 1.0),
        (_t("pair_together", 2, (Noun(_S), Words("and"), Noun(_O), _TOGETHER), SUBJECT), 0.5),
        (
            _t(
                "pair_definite",
                2,
                (Noun(_S, definite=True), _VERB, _relation(_S, _O), Noun(_O, definite=True)),
                SUBJECT,
            ),
            1.0,
        ),
        (
            _t(
                "pair_picture",
                2,
                (_PICTURE, Words("two"), _THINGS, Words(":"), Noun(_S), _VERB, _relation(_S, _O), Noun(_O)),
                SUBJECT,
            ),
            1.0,
        ),
        (
            _t(
                "pair_refer",
                2,
                (
                    Noun(_S, bound=True),
                    Words("and"),
                    Noun(_O, bound=True),
                    Words(", the"),
                    Again(_S),
                    _VERB,
                    _relation(_S, _O),
                    Words("the"),
                    Again(_O),
                ),
                SUBJECT,
                bind=(_S, _O),
            ),
            1.0,
        ),
        (
            _t(
                "pair_sides",
                2,
                (
                    _first_side(0),
                    Words("there is"),
                    Noun(0),
                    Words("and"),
                    _last_side(1),
                    _maybe(Words("there is")),
                    Noun(1),
                ),
                FIXED_PAIR,
            ),
            1.0,
        ),
        (_t("pair_background", 2, (Noun(_S), _maybe(_VERB), _relation(_S, _O), Noun(_O), *_ON_GREY), SUBJECT), 1.0),
    ],
    3: [
        (
            _t(
                "tri_count",
                3,
                (Words("three"), _THINGS, Words(":"), Noun(0), Words(","), Noun(1), Words("and"), Noun(2), _LINE),
                FIXED_TRIPLE,
            ),
            1.0,
        ),
        (_t("tri_between", 3, (Noun(0), _maybe(_VERB), Words("between"), Noun(1), Words("and"), Noun(2)), ENDS), 1.0),
        (
            _t(
                "tri_order",
                3,
                (
                    Around(
                        (Noun(0), Words(","), Noun(1), Words("and"), Noun(2)),
                        before=(_READING_ORDER, Words(":")),
                        after=(_READING_ORDER,),
                    ),
                ),
                FIXED_TRIPLE,
            ),
            1.0,
        ),
        (
            _t(
                "tri_chain",
                3,
                (Noun(0), _relation(0, 1), Noun(1), Words(", which"), _VERB, _relation(1, 2), Noun(2)),
                CHAIN,
            ),
            1.0,
        ),
        (_t("tri_there", 3, (Words("there are three"), _THINGS, _LINE, *_ON_GREY), FIXED_TRIPLE), 0.25),
        (
            _t(
                "tri_sides",
                3,
                (
                    Noun(1),
                    _maybe(_VERB),
                    Words("between"),
                    Noun(0),
                    _first_side(0),
                    Words("and"),
                    Noun(2),
                    _last_side(2),
                ),
                FIXED_TRIPLE,
            ),
            1.0,
        ),
        (
            _t(
                "tri_middle",
                3,
                (Noun(1), Words("in the middle of a"), _LINE_NOUN, Words("of three"), _THINGS),
                FIXED_TRIPLE,
            ),
            0.5,
        ),
    ],
}


# Long scenes (data.synthetic.kind=long, captioning/scenes/generator.py): 4-6 objects, every one named in reading
# order (one frame: role k is object k), 25-40 words, so that one early wrong word has many words to derail.
NUMBER_WORDS = {4: "four", 5: "five", 6: "six"}


def _long_templates(n: int) -> list[tuple[Template, float]]:
    middle = range(1, n - 1)
    order = [Words(NUMBER_WORDS[n]), _THINGS, _READING_ORDER, Words(":"), Noun(0)]
    order += [part for k in range(1, n) for part in (Words(", followed by"), Noun(k))]
    chain = [Noun(0), _maybe(_VERB), _relation(0, 1), Noun(1)]
    chain += [part for k in middle for part in (Words(", which"), _VERB, _relation(k, k + 1), Noun(k + 1))]
    there = [Words("there are"), Words(NUMBER_WORDS[n]), _THINGS, _LINE, Words(": first"), Noun(0)]
    there += [part for k in middle for part in (Words(", next"), Noun(k))] + [Words(", and last"), Noun(n - 1)]
    frame = (tuple(range(n)),)
    return [
        (_t(f"long_order_{n}", n, order, frame), 1.0),
        (_t(f"long_chain_{n}", n, chain, frame), 1.0),
        (_t(f"long_there_{n}", n, there, frame), 1.0),
    ]


TEMPLATES.update({n: _long_templates(n) for n in NUMBER_WORDS})
ALL_TEMPLATES: tuple[Template, ...] = tuple(t for n in sorted(TEMPLATES) for t, _ in TEMPLATES[n])


# ---------------------------------------------------------------------------------------------------
# 1. Sampling (the generator)


def _object(scene, frame: tuple[int, ...], role: int):
    return scene.objects[frame[role]]


def relation_of(scene, i: int, j: int) -> str | None:
    """Relation of object i to object j (indices in reading order): left/right or above/below; None if i == j."""
    if i == j:
        return None
    if scene.layout == "horizontal":
        return "left" if i < j else "right"
    return "above" if i < j else "below"


def _fact(part: Say, scene, frame: tuple[int, ...]) -> str | None:
    """The true value of the fact a Say part states, for this scene and frame."""
    if part.fact == "relation":
        return relation_of(scene, frame[part.roles[0]], frame[part.roles[1]])
    if part.fact == "position":
        return scene.position
    return scene.layout


def sample_text(template: Template, scene, rng: random.Random) -> str:
    """Draw one caption text of `template` for `scene` (lowercase, spaced punctuation like ' , ' and ' : ')."""
    frame = template.frames[0]
    if len(template.frames) == 2 and rng.random() >= 0.5:
        frame = template.frames[1]
    bound = {role: rng.choice(SHAPE_WORDS[_object(scene, frame, role).shape]) for role in template.bind}
    return _draw(template.parts, scene, frame, bound, rng)


def _noun_text(part: Noun, size_word: str | None, colour: str, shape_word: str) -> str:
    """The words of a Noun part: '[a|an|the] [size] colour shape'."""
    body = " ".join(w for w in (size_word, colour, shape_word) if w)
    if not part.article:
        return body
    return f"{'the' if part.definite else _article(body)} {body}"


def _draw(parts: tuple, scene, frame, bound: dict, rng: random.Random) -> str:
    return _join(*[_draw_part(part, scene, frame, bound, rng) for part in parts])


def _draw_part(part: Part, scene, frame, bound: dict, rng: random.Random) -> str:
    if isinstance(part, Words):
        return part.text
    if isinstance(part, Pick):
        return rng.choice(part.options)
    if isinstance(part, Maybe):
        text = _draw(part.parts, scene, frame, bound, rng)
        return text if rng.random() < part.p else ""
    if isinstance(part, Around):
        inner = _draw(part.inner, scene, frame, bound, rng)
        if rng.random() < 0.5:
            return _join(_draw(part.before, scene, frame, bound, rng), inner)
        return _join(inner, _draw(part.after, scene, frame, bound, rng))
    if isinstance(part, Noun):
        obj = _object(scene, frame, part.role)
        size_word = rng.choice(SIZE_WORDS[obj.size]) if rng.random() < 0.5 else None
        shape_word = bound[part.role] if part.bound else rng.choice(SHAPE_WORDS[obj.shape])
        return _noun_text(part, size_word, obj.color, shape_word)
    if isinstance(part, Again):
        return bound[part.role]
    if isinstance(part, Say):
        fact = _fact(part, scene, frame)
        assert fact is not None  # a frame maps a relation's two roles to two different objects
        phrases = PHRASE_TABLES[part.table][fact]
        return phrases if isinstance(phrases, str) else rng.choice(phrases)
    raise TypeError(f"unknown grammar part {part!r}")


# ---------------------------------------------------------------------------------------------------
# Alternatives of a part: every way to say it, over every scene, with what each way says


class NounSaid(NamedTuple):
    size: str | None  # size class said, None when no size word
    colour: str
    shape: str
    word: str  # the shape word ("disc", "round shape", ...)


class ShapeSaid(NamedTuple):
    shape: str
    word: str


class PhraseSaid(NamedTuple):
    phrase: str
    values: frozenset  # the fact values this phrase is a true phrase for ("in a line": both layouts)


Tokens = tuple[str, ...]


def _noun_alternatives(part: Noun) -> Iterator[tuple[Tokens, NounSaid]]:
    for size, size_words in [(None, [None])] + list(SIZE_WORDS.items()):
        for size_word in size_words:
            for colour in COLORS:
                for shape in SHAPES:
                    for word in SHAPE_WORDS[shape]:
                        tokens = tuple(tokenize(_noun_text(part, size_word, colour, word)))
                        yield tokens, NounSaid(size, colour, shape, word)


@cache
def alternatives(part: Part) -> tuple[tuple[Tokens, NounSaid | ShapeSaid | PhraseSaid | None], ...]:
    """Every token sequence an atomic part can be, in any scene, with what it says (None: says nothing)."""
    if isinstance(part, Words):
        return ((tuple(tokenize(part.text)), None),)
    if isinstance(part, Pick):
        return tuple((tuple(tokenize(option)), None) for option in part.options)
    if isinstance(part, Noun):
        return tuple(_noun_alternatives(part))
    if isinstance(part, Again):
        return tuple((tuple(tokenize(word)), ShapeSaid(shape, word)) for shape in SHAPES for word in SHAPE_WORDS[shape])
    if isinstance(part, Say):
        values: dict[str, set] = {}
        for value, phrases in PHRASE_TABLES[part.table].items():
            for phrase in [phrases] if isinstance(phrases, str) else phrases:
                values.setdefault(phrase, set()).add(value)
        return tuple((tuple(tokenize(phrase)), PhraseSaid(phrase, frozenset(v))) for phrase, v in values.items())
    raise TypeError(f"not an atomic grammar part: {part!r}")


@cache
def _index(part: Part) -> tuple[dict[Tokens, list], tuple[int, ...]]:
    """alternatives(part) as {tokens: [said, ...]} and the distinct token lengths, ascending."""
    by_tokens: dict[Tokens, list] = {}
    for tokens, said in alternatives(part):
        by_tokens.setdefault(tokens, []).append(said)
    return by_tokens, tuple(sorted({len(t) for t in by_tokens}))


def _flatten(parts: tuple) -> list[tuple]:
    """Expand Maybe and Around into the plain part sequences they allow (each a tuple of atomic parts)."""
    sequences: list[tuple] = [()]
    for part in parts:
        if isinstance(part, Maybe):
            options = [()] + _flatten(part.parts)
        elif isinstance(part, Around):
            inner = _flatten(part.inner)
            options = [b + i for b in _flatten(part.before) for i in inner] + [
                i + a for i in inner for a in _flatten(part.after)
            ]
        else:
            options = [(part,)]
        sequences = [s + o for s in sequences for o in options]
    return sequences


@cache
def _variants(template: Template) -> tuple[tuple, ...]:
    return tuple(_flatten(template.parts))


# ---------------------------------------------------------------------------------------------------
# Claims


@dataclass(frozen=True)
class Claim:
    """One thing a caption says. kind: one of CLAIM_KINDS; what: its subject ("colour of object 2"; objects are
    numbered 1.. in reading order); said / truth: what the caption says and what a true caption says there."""

    kind: str
    what: str
    said: str
    truth: str
    ok: bool

    def __str__(self) -> str:
        return f"{self.what}: said {self.said}, is {self.truth}"


def _truth_text(part: Say, value: str | None) -> str:
    if value is None:
        return "the same object"
    phrases = PHRASE_TABLES[part.table][value]
    return phrases if isinstance(phrases, str) else phrases[0]


def part_claims(part: Part, said, scene, frame: tuple[int, ...]) -> list[Claim]:
    """What an atomic part, read as `said`, claims about the scene under `frame`, each judged."""
    if isinstance(part, Noun):
        obj = _object(scene, frame, part.role)
        number = frame[part.role] + 1
        claims = [
            Claim("colour", f"colour of object {number}", said.colour, obj.color, said.colour == obj.color),
            Claim("shape", f"shape of object {number}", said.word, obj.shape, said.shape == obj.shape),
        ]
        if said.size is not None:
            claims.append(Claim("size", f"size of object {number}", said.size, obj.size, said.size == obj.size))
        return claims
    if isinstance(part, Again):
        obj = _object(scene, frame, part.role)
        number = frame[part.role] + 1
        return [Claim("shape", f"shape of object {number}", said.word, obj.shape, said.shape == obj.shape)]
    if isinstance(part, Say):
        value = _fact(part, scene, frame)
        what = part.what.format(*[frame[r] + 1 for r in part.roles])
        return [Claim(part.kind, what, said.phrase, _truth_text(part, value), value in said.values)]
    return []


# ---------------------------------------------------------------------------------------------------
# 2. Checking a caption: parse with every template, judge every claim


@dataclass(frozen=True)
class Reading:
    """One parse of a caption: the template and, per stating part, the part and what it was read as."""

    template: Template
    items: tuple[tuple[Part, object], ...]


def _match(parts: tuple, tokens: Tokens, i: int, items: tuple) -> Iterator[tuple]:
    if not parts:
        if i == len(tokens):
            yield items
        return
    part, rest = parts[0], parts[1:]
    by_tokens, lengths = _index(part)
    for n in lengths:
        if i + n > len(tokens):
            break
        for said in by_tokens.get(tokens[i : i + n], ()):
            if said is None:
                yield from _match(rest, tokens, i + n, items)
            elif _consistent(part, said, items):
                yield from _match(rest, tokens, i + n, items + ((part, said),))


def _consistent(part: Part, said, items: tuple) -> bool:
    """Again(role) repeats the Noun's shape word: a same-shape synonym there is not a sentence of the grammar
    (another shape is: it is then a false shape claim)."""
    if not isinstance(part, Again):
        return True
    noun = next(s for p, s in items if isinstance(p, Noun) and p.role == part.role)
    return said.shape != noun.shape or said.word == noun.word


def readings(tokens: Sequence[str]) -> list[Reading]:
    """Every parse of the tokens by any template (of any number of objects), in template order."""
    tokens = tuple(tokens)
    return [
        Reading(template, items)
        for template in ALL_TEMPLATES
        for parts in _variants(template)
        for items in _match(parts, tokens, 0, ())
    ]


def reading_claims(reading: Reading, scene) -> tuple[Claim, ...]:
    """The claims of a reading judged against the scene, under the frame with the fewest false claims (first
    frame on ties). The count claim comes first. A reading for another number of objects than the scene has makes
    only the (false) count claim: its other claims have no object to be about."""
    n, count = len(scene.objects), reading.template.count
    count_claim = Claim("count", "count of objects", str(count), str(n), count == n)
    if count != n:
        return (count_claim,)
    best = None
    for frame in reading.template.frames:
        claims = (count_claim,) + tuple(
            claim for part, said in reading.items for claim in part_claims(part, said, scene, frame)
        )
        if best is None or _false(claims) < _false(best):
            best = claims
    assert best is not None  # every template has at least one frame
    return best


def _false(claims: Sequence[Claim]) -> int:
    return sum(not c.ok for c in claims)


SHAPE_OF_WORD = {word: shape for shape, words in SHAPE_WORDS.items() for word in words}


def named_shapes(tokens: Sequence[str]) -> frozenset[str]:
    """The shapes a caption names (any shape word anywhere, grammatical or not; 'round' only as 'round shape')."""
    tokens = list(tokens)
    bigrams = [" ".join(pair) for pair in zip(tokens, tokens[1:])]
    return frozenset(SHAPE_OF_WORD[w] for w in tokens + bigrams if w in SHAPE_OF_WORD and w != "round")


@dataclass(frozen=True)
class CaptionCheck:
    """The verdict on one caption of one scene.

    grammatical: some template parses it (any number of objects). correct: it is a true caption of the scene
    (SceneOracle.is_caption). claims: those of the best reading (fewest false claims; count-matching readings
    first on ties), () when not grammatical. true_prefix_length: how many leading tokens some true caption starts
    with. named: the shapes it names (see named_shapes)."""

    tokens: tuple[str, ...]
    grammatical: bool
    correct: bool
    template: str | None
    claims: tuple[Claim, ...]
    true_prefix_length: int
    named: frozenset[str]

    @property
    def false_claims(self) -> tuple[Claim, ...]:
        return tuple(c for c in self.claims if not c.ok)

    @property
    def reason(self) -> str | None:
        """None if correct; else the first false claim, or why it does not parse."""
        if self.correct:
            return None
        if not self.grammatical:
            return (
                f"grammar: not a sentence of the caption grammar (true up to word {self.true_prefix_length} "
                f"of {len(self.tokens)})"
            )
        false = self.false_claims
        return str(false[0]) if false else "grammar: not a true sentence of this scene"


def caption_tokens(caption: str | Sequence[str]) -> tuple[str, ...]:
    """Tokens of a raw caption or a list of words, both through tokenize ('<unk>' becomes 'unk')."""
    return tuple(tokenize(caption if isinstance(caption, str) else " ".join(caption)))


def check_caption(caption: str | Sequence[str], scene, oracle: SceneOracle | None = None) -> CaptionCheck:
    """Parse and judge one caption (a raw string or a list of words) against `scene` (anything with
    .objects[i].color/.shape/.size in reading order, .layout and .position, e.g. synthetic.Scene). Pass the
    scene's oracle to reuse it."""
    tokens = caption_tokens(caption)
    oracle = oracle or SceneOracle(scene)
    best_reading: Reading | None = None
    best_claims: tuple[Claim, ...] = ()
    for reading in readings(tokens):
        claims = reading_claims(reading, scene)
        key = (_false(claims), not claims[0].ok)
        if best_reading is None or key < (_false(best_claims), not best_claims[0].ok):
            best_reading, best_claims = reading, claims
    return CaptionCheck(
        tokens=tokens,
        grammatical=best_reading is not None,
        correct=oracle.is_caption(tokens),
        template=best_reading.template.name if best_reading else None,
        claims=best_claims,
        true_prefix_length=oracle.true_prefix_length(tokens),
        named=named_shapes(tokens),
    )


# ---------------------------------------------------------------------------------------------------
# 3. The true captions of one scene as a token automaton (the prefix oracle)


@cache
def _true_tokens(part: Part, truth: tuple, bound_word: str | None) -> tuple[Tokens, ...]:
    """The token sequences of an atomic part whose claims all hold, given `truth` (the facts the part's claims
    are about, see _truth_key) and the bound shape word."""
    if isinstance(part, (Words, Pick)):
        return tuple(tokens for tokens, _ in alternatives(part))
    out = []
    for tokens, said in alternatives(part):
        if isinstance(part, Noun):
            assert isinstance(said, NounSaid)
            colour, shape, size = truth
            ok = said.colour == colour and said.shape == shape and said.size in (None, size)
            ok = ok and (bound_word is None or said.word == bound_word)
        elif isinstance(part, Again):
            assert isinstance(said, ShapeSaid)
            ok = said.word == bound_word
        else:  # Say
            assert isinstance(said, PhraseSaid)
            ok = truth[0] in said.values
        if ok:
            out.append(tokens)
    return tuple(out)


def _truth_key(part: Part, scene, frame) -> tuple:
    if isinstance(part, Noun):
        obj = _object(scene, frame, part.role)
        return obj.color, obj.shape, obj.size
    if isinstance(part, Say):
        return (_fact(part, scene, frame),)
    return ()


def _bound_word(part: Part, bound: dict[int, str]) -> str | None:
    if isinstance(part, Again) or (isinstance(part, Noun) and part.bound):
        return bound[part.role]
    return None


def true_paths(scene) -> list[tuple[tuple[Tokens, ...], ...]]:
    """The true captions of `scene` as paths: per template of its number of objects, frame, bound shape words and
    Maybe/Around variant, the tuple of the true alternatives of each part (() is the empty alternative)."""
    paths = []
    for template, _ in TEMPLATES[len(scene.objects)]:
        for frame in template.frames:
            choices = [SHAPE_WORDS[_object(scene, frame, role).shape] for role in template.bind]
            for words in itertools.product(*choices):
                bound = dict(zip(template.bind, words))
                for parts in _variants(template):
                    paths.append(
                        tuple(_true_tokens(p, _truth_key(p, scene, frame), _bound_word(p, bound)) for p in parts)
                    )
    return [path for path in paths if all(path)]


State = frozenset  # of positions: (path, part) between parts, or (path, part, alternative, offset) inside one


class SceneOracle:
    """The true captions of one scene, for complete captions and for prefixes.

    A state is the set of places the tokens so far can have reached in the true captions; it is empty exactly when
    no true caption starts with them. `accepts(state)`: the tokens so far are themselves a complete true caption
    (so ending there, <eos>, is right). States are cached, so walking many prefixes of one scene is cheap."""

    def __init__(self, scene) -> None:
        self.paths = true_paths(scene)
        self._first = [[self._by_first_word(alts) for alts in path] for path in self.paths]
        self._ends = frozenset((p, len(path)) for p, path in enumerate(self.paths))
        self.start: State = self._close((p, 0) for p in range(len(self.paths)))
        self._steps: dict[tuple[State, str], State] = {}

    @staticmethod
    def _by_first_word(alts: tuple[Tokens, ...]) -> dict[str, list[int]]:
        index: dict[str, list[int]] = {}
        for a, tokens in enumerate(alts):
            if tokens:
                index.setdefault(tokens[0], []).append(a)
        return index

    def _close(self, positions) -> State:
        """Add the boundaries reachable through empty alternatives."""
        out, stack = set(), list(positions)
        while stack:
            pos = stack.pop()
            if pos in out:
                continue
            out.add(pos)
            if len(pos) == 2:
                p, k = pos
                path = self.paths[p]
                if k < len(path) and () in path[k]:
                    stack.append((p, k + 1))
        return frozenset(out)

    def advance(self, state: State, word: str) -> State:
        """The state after one more token (empty: no true caption continues so)."""
        key = (state, word)
        if key in self._steps:
            return self._steps[key]
        reached = []
        for pos in state:
            if len(pos) == 2:
                p, k = pos
                if k == len(self.paths[p]):
                    continue
                for a in self._first[p][k].get(word, ()):
                    reached.append((p, k + 1) if len(self.paths[p][k][a]) == 1 else (p, k, a, 1))
            else:
                p, k, a, offset = pos
                tokens = self.paths[p][k][a]
                if tokens[offset] == word:
                    reached.append((p, k + 1) if offset + 1 == len(tokens) else (p, k, a, offset + 1))
        result = self._close(reached)
        self._steps[key] = result
        return result

    def accepts(self, state: State) -> bool:
        return not self._ends.isdisjoint(state)

    def state(self, tokens: Sequence[str]) -> State:
        state = self.start
        for word in tokens:
            if not state:
                break
            state = self.advance(state, word)
        return state

    def is_prefix(self, tokens: Sequence[str]) -> bool:
        """Does some true caption start with these tokens (the empty prefix included)?"""
        return bool(self.state(tokens))

    def is_caption(self, tokens: Sequence[str]) -> bool:
        """Are these tokens a complete true caption?"""
        return self.accepts(self.state(tokens))

    def true_prefix_length(self, tokens: Sequence[str]) -> int:
        """The largest k such that tokens[:k] is a true prefix."""
        state = self.start
        for k, word in enumerate(tokens):
            state = self.advance(state, word)
            if not state:
                return k
        return len(tokens)

    def next_words(self, state: State) -> set[str]:
        """The tokens that keep the state alive."""
        words = set()
        for pos in state:
            if len(pos) == 2:
                p, k = pos
                if k < len(self.paths[p]):
                    words.update(self._first[p][k])
            else:
                p, k, a, offset = pos
                words.add(self.paths[p][k][a][offset])
        return words

    def words(self) -> set[str]:
        """Every token of every true caption of the scene."""
        return {w for path in self.paths for alts in path for tokens in alts for w in tokens}

    def graph(self) -> TokenGraph:
        """The same automaton as an acyclic graph with one node per position (see TokenGraph)."""
        nodes: dict[tuple, int] = {}

        def node(pos: tuple) -> int:
            return nodes.setdefault(pos, len(nodes))

        edges: list[tuple[int, int, str | None]] = []
        for p, path in enumerate(self.paths):
            for k, alts in enumerate(path):
                after = node((p, k + 1))
                for a, tokens in enumerate(alts):
                    if not tokens:
                        edges.append((node((p, k)), after, None))
                        continue
                    places = [(p, k), *((p, k, a, offset) for offset in range(1, len(tokens)))]
                    ends = [*(node(place) for place in places[1:]), after]
                    edges += [(node(place), end, word) for place, end, word in zip(places, ends, tokens)]
        # places in path order: (p, k), then the places inside part k (by offset), then (p, k + 1)
        place_of = sorted(nodes, key=lambda pos: (pos[0], pos[1], pos[3] if len(pos) == 4 else 0))
        rank = {nodes[pos]: i for i, pos in enumerate(place_of)}
        level = [0] * len(nodes)
        for source, target, _ in sorted(edges, key=lambda edge: rank[edge[0]]):
            level[target] = max(level[target], level[source] + 1)
        return TokenGraph(
            len(nodes),
            tuple(edges),
            tuple(nodes[(p, 0)] for p in range(len(self.paths))),
            tuple(nodes[end] for end in self._ends),
            tuple(level),
        )


class TokenGraph(NamedTuple):
    """The true captions of a scene as an acyclic graph: nodes are places in the token automaton, an edge
    (source, target, word) reads one token (word None: an empty alternative, reading nothing). The true captions
    are the words along the paths from a node of `starts` to a node of `accepting`; every node lies on one.
    `level[v]`: the most edges on a path from a start to v, so every edge goes to a higher level."""

    nodes: int
    edges: tuple[tuple[int, int, str | None], ...]
    starts: tuple[int, ...]
    accepting: tuple[int, ...]
    level: tuple[int, ...]
