"""Captions for toy scenes: templates with paraphrases, a held-out ("eval") template set, and the
parser that inverts both.

A caption is a scene template around the object phrase(s); each object phrase is an object
template filled with a color word, a shape synonym and a motion phrase; two objects are joined by
a joiner. Words (synonyms) are shared by both splits; the *templates* (scene, object, joiner) of
the "eval" split never appear in "train" captions, so turbo-eval can measure adherence on
phrasings the teacher never saw. Objects are named in canonical order (by COLORS index).

`parse_caption` scans the lower-cased words for known phrases (longest match first); every
caption made here, of either split, lists one background, and per object one color, one shape
and one motion, with the first object's words before the second's, so the n-th color/shape/motion
found belongs to the n-th object whatever the template's word order.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from .attributes import BACKGROUNDS, COLORS, MOTIONS, SHAPES, as_generator, canonicalize, validate_attributes

# ----------------------------------------------------------------------------- words (both splits)

COLOR_WORDS = {c: (c,) for c in COLORS}
SHAPE_WORDS = {
    "circle": ("circle", "disc", "ball"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
}
MOTION_PHRASES = {
    "still": ("standing still", "staying in place", "not moving"),
    "left": ("moving left", "sliding to the left", "heading left"),
    "right": ("moving right", "sliding to the right", "heading right"),
    "up": ("moving up", "rising", "heading up"),
    "down": ("moving down", "sinking", "heading down"),
}
BACKGROUND_PHRASES = {
    "dark": ("dark", "black"),
    "gray": ("gray", "light gray"),
    "gradient": ("gradient", "shaded"),
    "checker": ("checkered", "checkerboard"),
}

# ----------------------------------------------------------------------------- templates per split

TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "scene": (
            "{objects} on a {background} background",
            "{objects} over a {background} background",
            "a {background} scene with {objects}",
            "{background} background, {objects}",
        ),
        "object": ("a {color} {shape} {motion}", "one {color} {shape} that is {motion}", "a {color} {shape}, {motion}"),
        "joiner": (" and ", " along with "),
    },
    "eval": {
        "scene": ("in front of a {background} backdrop: {objects}", "a clip of {objects}; the background is {background}"),
        "object": ("a {shape} in {color} {motion}", "a single {color} {shape} which is {motion}"),
        "joiner": (" as well as ",),
    },
}
HELD_OUT_TEMPLATES = TEMPLATES["eval"]  # never used for training captions


def _pick(options: tuple[str, ...], rng: np.random.Generator | None) -> str:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def caption_for(
    attributes: dict[str, Any],
    rng: int | np.random.Generator | None = None,
    paraphrase: bool = True,
    split: str = "train",
) -> str:
    """Caption of a scene.

    rng: seed or Generator choosing templates and synonyms (required when paraphrase=True).
    paraphrase: False gives the split's canonical caption (first template, first synonyms).
    split: "train" templates or the held-out "eval" templates.
    """
    validate_attributes(attributes)
    if split not in TEMPLATES:
        raise ValueError(f"split must be one of {tuple(TEMPLATES)}, got {split!r}")
    if paraphrase and rng is None:
        raise ValueError("rng is required when paraphrase=True (or pass paraphrase=False)")
    rng = as_generator(rng) if paraphrase else None
    t = TEMPLATES[split]
    phrases = [
        _pick(t["object"], rng).format(
            color=_pick(COLOR_WORDS[o["color"]], rng),
            shape=_pick(SHAPE_WORDS[o["shape"]], rng),
            motion=_pick(MOTION_PHRASES[o["motion"]], rng),
        )
        for o in attributes["objects"]
    ]
    objects = _pick(t["joiner"], rng).join(phrases)
    background = _pick(BACKGROUND_PHRASES[attributes["background"]], rng)
    return _pick(t["scene"], rng).format(objects=objects, background=background)


# ----------------------------------------------------------------------------- parsing

_KINDS = (("color", COLOR_WORDS), ("shape", SHAPE_WORDS), ("motion", MOTION_PHRASES), ("background", BACKGROUND_PHRASES))
# token tuple -> (kind, value), e.g. ("sliding", "to", "the", "left") -> ("motion", "left")
_PHRASES: dict[tuple[str, ...], tuple[str, str]] = {
    tuple(p.split()): (kind, value) for kind, table in _KINDS for value, ps in table.items() for p in ps
}
_MAX_LEN = max(len(p) for p in _PHRASES)
assert len(_PHRASES) == sum(len(ps) for _, table in _KINDS for ps in table.values()), "a phrase is ambiguous"
assert set(SHAPE_WORDS) == set(SHAPES) and set(MOTION_PHRASES) == set(MOTIONS) and set(BACKGROUND_PHRASES) == set(BACKGROUNDS)


def tokenize(caption: str) -> list[str]:
    """Lower-cased alphanumeric words."""
    return re.findall(r"[a-z0-9]+", caption.lower())


def find_phrases(caption: str) -> list[tuple[int, int, str, str]]:
    """Known phrases in order: (start token, end token, kind, value), longest match first."""
    tokens, found, i = tokenize(caption), [], 0
    while i < len(tokens):
        for n in range(min(_MAX_LEN, len(tokens) - i), 0, -1):
            hit = _PHRASES.get(tuple(tokens[i : i + n]))
            if hit:
                found.append((i, i + n, *hit))
                i += n
                break
        else:
            i += 1
    return found


def caption_skeleton(caption: str) -> str:
    """The caption's words with every known phrase replaced by its kind in braces: the template
    that made it, as a string (e.g. "a {color} {shape} {motion} on a {background} background")."""
    tokens = tokenize(caption)
    out, last = [], 0
    for start, end, kind, _ in find_phrases(caption):
        out += tokens[last:start] + ["{" + kind + "}"]
        last = end
    return " ".join(out + tokens[last:])


def parse_caption(caption: str) -> dict[str, Any]:
    """Attributes named by a caption (inverse of `caption_for` for both splits), canonical order.

    Raises ValueError when the caption does not name exactly one background and, for 1 or 2
    objects, as many colors as shapes as motions."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    by_kind: dict[str, list[str]] = {"color": [], "shape": [], "motion": [], "background": []}
    for _, _, kind, value in find_phrases(caption):
        by_kind[kind].append(value)
    n = len(by_kind["shape"])
    if len(by_kind["background"]) != 1 or n not in (1, 2) or len(by_kind["color"]) != n or len(by_kind["motion"]) != n:
        counts = {k: len(v) for k, v in by_kind.items()}
        raise ValueError(
            f"caption must name one background and 1-2 objects each with a color, shape and motion; "
            f"found {counts} in {caption!r}"
        )
    objects = [{"shape": s, "color": c, "motion": m} for s, c, m in zip(by_kind["shape"], by_kind["color"], by_kind["motion"])]
    try:
        return canonicalize({"background": by_kind["background"][0], "num_objects": n, "objects": objects})
    except ValueError as err:
        raise ValueError(f"caption {caption!r}: {err}") from None
