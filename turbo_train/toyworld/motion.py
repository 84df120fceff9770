"""Judge-free motion read-out for toy videos: where an object of a known colour is in each frame, and
which way it moves.

The judge reads a whole video at once; to tell *why* a generator gets motion wrong (no motion, the
wrong axis, or the right axis and the wrong sign) this tracks the pixels of one object colour frame by
frame: a pixel belongs to the object when its L1 distance to the colour's nominal RGB is under
`COLOR_TOLERANCE`; the track is the centroid per frame, and the motion is read from a least-squares line
through the centroids (px per frame): "still" under `STILL_SPEED`, else the dominant axis and its sign
(image axes, as the generator's: "up" = towards row 0).

Exact on real toy videos whose two objects have different colours (a test checks it). Two objects of
one colour cannot be told apart by colour: callers skip them.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .generator import COLOR_JITTER, COLOR_RGB

# The generator jitters each channel by at most COLOR_JITTER (L1 <= 36); the nearest other object
# colour is 145 away in L1 (blue / cyan) and every neutral grey >= 150: 70 keeps both margins wide.
COLOR_TOLERANCE = 70
STILL_SPEED = 1.0  # px per frame; moving objects move 3-4
MIN_PIXELS = 6  # fewer object pixels in a frame: no centroid for that frame
MIN_FRAMES = 4  # fewer frames with a centroid: no motion read-out

assert 3 * COLOR_JITTER < COLOR_TOLERANCE


def object_track(video: np.ndarray, color: str, tolerance: float = COLOR_TOLERANCE,
                 min_pixels: int = MIN_PIXELS) -> np.ndarray:
    """Centroid track of the pixels of `color` in a uint8 video (F, H, W, 3) -> float (F, 3) of (x, y,
    pixel count); x and y are NaN in frames with fewer than `min_pixels` object pixels."""
    if color not in COLOR_RGB:
        raise ValueError(f"color must be one of {tuple(COLOR_RGB)}, got {color!r}")
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be (F, H, W, 3), got {video.shape}")
    dist = np.abs(video.astype(np.int32) - np.array(COLOR_RGB[color], np.int32)).sum(-1)  # (F, H, W)
    track = np.full((video.shape[0], 3), np.nan)
    for f, mask in enumerate(dist < tolerance):
        ys, xs = np.nonzero(mask)
        track[f, 2] = len(xs)
        if len(xs) >= min_pixels:
            track[f, :2] = xs.mean(), ys.mean()
    return track


def motion_from_track(track: np.ndarray, still_speed: float = STILL_SPEED, min_frames: int = MIN_FRAMES) -> str | None:
    """"still" / "left" / "right" / "up" / "down" from a track (object_track), or None when fewer than
    `min_frames` frames have a centroid."""
    ok = ~np.isnan(track[:, 0])
    if ok.sum() < min_frames:
        return None
    t = np.arange(len(track))[ok]
    vx, vy = (np.polyfit(t, track[ok, i], 1)[0] for i in (0, 1))
    if max(abs(vx), abs(vy)) < still_speed:
        return "still"
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


AXIS = {"still": "none", "left": "x", "right": "x", "up": "y", "down": "y"}


def motion_confusion(videos: np.ndarray, prompt_attrs: list[dict[str, Any]]) -> dict[str, Any]:
    """Tracked motion of every object whose colour is unique in its prompt, against the prompt's:
    {"n", "direction_acc", "axis_acc" (moving objects: right axis, either sign), "sign_acc" (moving
    objects on the right axis: right sign), "unreadable" (no track), "confusion": {prompt: {tracked: n}},
    "tracked": per video, the tracked motion of each object ("unreadable": no track; None: skipped)}."""
    if len(videos) != len(prompt_attrs):
        raise ValueError(f"{len(videos)} videos but {len(prompt_attrs)} prompts")
    confusion: dict[str, dict[str, int]] = {}
    tracked: list[list[str | None]] = []
    n = right = moving = axis_ok = sign_ok = unreadable = 0
    for video, attrs in zip(videos, prompt_attrs):
        colors = [o["color"] for o in attrs["objects"]]
        tracked.append([])
        for obj in attrs["objects"]:
            if colors.count(obj["color"]) > 1:
                tracked[-1].append(None)
                continue
            got = motion_from_track(object_track(video, obj["color"])) or "unreadable"
            tracked[-1].append(got)
            want = obj["motion"]
            row = confusion.setdefault(want, {})
            row[got] = row.get(got, 0) + 1
            n += 1
            right += got == want
            unreadable += got == "unreadable"
            if want != "still":
                moving += 1
                if got != "unreadable" and AXIS[got] == AXIS[want]:
                    axis_ok += 1
                    sign_ok += got == want
    return {"n": n, "direction_acc": right / max(n, 1), "axis_acc": axis_ok / max(moving, 1),
            "sign_acc": sign_ok / max(axis_ok, 1), "unreadable": unreadable, "confusion": confusion,
            "tracked": tracked}
