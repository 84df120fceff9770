"""The toy world's ground truth: attribute vocabularies, how a scene's attributes are sampled, and
the fixed encodings that captions, the judge and the metrics all share.

A scene's attributes are a JSON-able dict::

    {"background": "checker",
     "num_objects": 2,
     "objects": [{"shape": "circle", "color": "red",  "motion": "left"},
                 {"shape": "cross",  "color": "cyan", "motion": "still"}]}

Object order is canonical: the two objects of a scene always have different colors and are listed
by their index in COLORS (red before green before blue ...). Captions name them in that order and
the judge's "obj1"/"obj2" heads follow it, so neither the caption nor the video layout decides
which object is which (a video's left/right arrangement is random and free to differ from a
generated sample's).

Judge heads (`HEADS`, one classifier each): background; obj1 shape/color/motion; obj2 presence
(0 = one object, 1 = two) and obj2 shape/color/motion (label IGNORE when absent). Flat "slots"
(`flatten_attributes`) are what prompt adherence and per-attribute accuracy count.
"""
from __future__ import annotations

from typing import Any

import numpy as np

# ----------------------------------------------------------------------------- vocabularies

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
MOTIONS = ("still", "left", "right", "up", "down")  # image axes: "up" = towards row 0
BACKGROUNDS = ("dark", "gray", "gradient", "checker")
MAX_OBJECTS = 2

# Judge heads in a fixed order: name -> number of classes.
HEADS: dict[str, int] = {
    "background": len(BACKGROUNDS),
    "obj1_shape": len(SHAPES),
    "obj1_color": len(COLORS),
    "obj1_motion": len(MOTIONS),
    "obj2_present": 2,
    "obj2_shape": len(SHAPES),
    "obj2_color": len(COLORS),
    "obj2_motion": len(MOTIONS),
}
IGNORE = -1  # label of an obj2_* head when the scene has one object (cross-entropy ignore_index)

_VOCAB = {"shape": SHAPES, "color": COLORS, "motion": MOTIONS}
_OBJECT_FIELDS = ("shape", "color", "motion")


# ----------------------------------------------------------------------------- sampling


def as_generator(rng: int | np.random.Generator | None) -> np.random.Generator:
    """A numpy Generator from a seed (int), an existing Generator (returned as is) or None (fresh)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        if rng is not None and int(rng) < 0:
            raise ValueError(f"seed must be a non-negative int, got {rng}")
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be an int seed or a numpy Generator, got {type(rng).__name__}")


def sample_attributes(rng: int | np.random.Generator, num_objects: int | None = None) -> dict[str, Any]:
    """Draw a scene: background, 1 or 2 objects (even odds unless `num_objects` is given), each with
    a shape, a color and a motion, uniformly. Two objects get different colors; objects are sorted
    by color index (the canonical order, see the module docstring)."""
    rng = as_generator(rng)
    if num_objects is None:
        num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    if num_objects not in range(1, MAX_OBJECTS + 1):
        raise ValueError(f"num_objects must be 1..{MAX_OBJECTS}, got {num_objects}")
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    colors = sorted(int(c) for c in rng.choice(len(COLORS), size=num_objects, replace=False))
    objects = [
        {
            "shape": SHAPES[int(rng.integers(len(SHAPES)))],
            "color": COLORS[c],
            "motion": MOTIONS[int(rng.integers(len(MOTIONS)))],
        }
        for c in colors
    ]
    return {"background": background, "num_objects": num_objects, "objects": objects}


def validate_attributes(attributes: Any) -> dict[str, Any]:
    """Check a scene dict against the vocabularies and the canonical order; return it.

    Raises ValueError/TypeError naming the offending field."""
    if not isinstance(attributes, dict):
        raise TypeError(f"attributes must be a dict, got {type(attributes).__name__}")
    for key in ("background", "num_objects", "objects"):
        if key not in attributes:
            raise ValueError(f"attributes is missing the field {key!r}")
    if attributes["background"] not in BACKGROUNDS:
        raise ValueError(f"attributes['background'] must be one of {BACKGROUNDS}, got {attributes['background']!r}")
    objects = attributes["objects"]
    if not isinstance(objects, (list, tuple)):
        raise TypeError(f"attributes['objects'] must be a list, got {type(objects).__name__}")
    if attributes["num_objects"] != len(objects) or len(objects) not in range(1, MAX_OBJECTS + 1):
        raise ValueError(
            f"attributes['num_objects'] ({attributes['num_objects']}) must equal len(objects) ({len(objects)}) "
            f"and be 1..{MAX_OBJECTS}"
        )
    for i, obj in enumerate(objects):
        for name in _OBJECT_FIELDS:
            if not isinstance(obj, dict) or name not in obj:
                raise ValueError(f"attributes['objects'][{i}] is missing the field {name!r}")
            if obj[name] not in _VOCAB[name]:
                raise ValueError(f"attributes['objects'][{i}][{name!r}] must be one of {_VOCAB[name]}, got {obj[name]!r}")
    color_idx = [COLORS.index(o["color"]) for o in objects]
    if any(a >= b for a, b in zip(color_idx, color_idx[1:])):
        raise ValueError(
            f"attributes['objects'] must have distinct colors in COLORS order {COLORS}, got {[o['color'] for o in objects]}"
        )
    return attributes


def canonicalize(attributes: dict[str, Any]) -> dict[str, Any]:
    """Sort the objects into the canonical (COLORS index) order and validate; returns a new dict."""
    objects = sorted((dict(o) for o in attributes.get("objects", [])), key=lambda o: COLORS.index(o["color"]))
    out = {**attributes, "objects": objects, "num_objects": len(objects)}
    return validate_attributes(out)


# ----------------------------------------------------------------------------- encodings


def flatten_attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    """Flat slots: {"background", "num_objects", "obj1.shape", "obj1.color", "obj1.motion", ...};
    obj2.* slots exist only for two-object scenes. These are what adherence counts."""
    flat: dict[str, Any] = {"background": attributes["background"], "num_objects": int(attributes["num_objects"])}
    for k, obj in enumerate(attributes["objects"], start=1):
        for name in _OBJECT_FIELDS:
            flat[f"obj{k}.{name}"] = obj[name]
    return flat


def attributes_to_labels(attributes: dict[str, Any]) -> dict[str, int]:
    """Class index per judge head (IGNORE for obj2_* of a one-object scene)."""
    objs = attributes["objects"]
    labels = {"background": BACKGROUNDS.index(attributes["background"]), "obj2_present": int(len(objs) == 2)}
    for k in (1, 2):
        for name in _OBJECT_FIELDS:
            labels[f"obj{k}_{name}"] = _VOCAB[name].index(objs[k - 1][name]) if k <= len(objs) else IGNORE
    return {h: labels[h] for h in HEADS}


def labels_to_attributes(labels: dict[str, int]) -> dict[str, Any]:
    """Inverse of `attributes_to_labels` for predictions. A predicted second object is kept as
    predicted: if the judge reports the same color twice or out of order, the objects are NOT
    re-sorted (that would hide a judge error), so the dict may fail `validate_attributes`."""
    missing = [h for h in HEADS if h not in labels]
    if missing:
        raise ValueError(f"labels is missing the heads {missing}")
    n = 2 if int(labels["obj2_present"]) == 1 else 1
    objects = [{name: _VOCAB[name][int(labels[f"obj{k}_{name}"])] for name in _OBJECT_FIELDS} for k in range(1, n + 1)]
    return {"background": BACKGROUNDS[int(labels["background"])], "num_objects": n, "objects": objects}
