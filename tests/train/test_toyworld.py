"""Toy world generator, captions and on-the-fly stream: determinism, caption <-> attribute agreement
(both caption splits), held-out templates, visible objects and motion in the pixels."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from turbo_train.toyworld import attributes as A
from turbo_train.toyworld.captions import TEMPLATES, caption_for, caption_skeleton, parse_caption
from turbo_train.toyworld.generator import (
    BACKGROUND_JITTER,
    COLOR_JITTER,
    COLOR_RGB,
    HEIGHT,
    NUM_FRAMES,
    WIDTH,
    generate_sample,
    render,
    sample_seed,
    video_to_float,
    video_to_uint8,
)
from turbo_train.toyworld.stream import ToyVideoStream, collate_toy


def _object_masks(video, attributes):
    """Per object: (F, H, W) mask of pixels within the color jitter of that object's color."""
    v = video.astype(np.int32)
    return [np.abs(v - np.array(COLOR_RGB[o["color"]])).max(-1) <= COLOR_JITTER for o in attributes["objects"]]


def test_vocabularies_meet_the_spec():
    assert len(A.SHAPES) >= 4 and len(A.COLORS) >= 6 and len(A.MOTIONS) >= 5 and len(A.BACKGROUNDS) >= 4
    assert "still" in A.MOTIONS and {"checker"} & set(A.BACKGROUNDS)
    assert set(COLOR_RGB) == set(A.COLORS)


def test_generate_sample_is_deterministic_and_seeds_differ():
    a, b, c = generate_sample(7), generate_sample(7), generate_sample(8)
    assert np.array_equal(a.video, b.video) and a.caption == b.caption and a.attributes == b.attributes
    assert not np.array_equal(a.video, c.video)
    g1, g2 = generate_sample(np.random.default_rng(3)), generate_sample(np.random.default_rng(3))
    assert np.array_equal(g1.video, g2.video) and g1.caption == g2.caption


def test_caption_split_changes_only_the_caption():
    tr, ev, canon = generate_sample(11), generate_sample(11, split="eval"), generate_sample(11, paraphrase=False)
    assert np.array_equal(tr.video, ev.video) and np.array_equal(tr.video, canon.video)
    assert tr.attributes == ev.attributes == canon.attributes
    assert canon.caption == caption_for(canon.attributes, paraphrase=False)


def test_video_shape_dtype_and_one_or_two_objects():
    counts = set()
    for seed in range(40):
        s = generate_sample(seed)
        assert s.video.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3) and s.video.dtype == np.uint8
        A.validate_attributes(s.attributes)
        counts.add(s.attributes["num_objects"])
    assert counts == {1, 2}


def test_background_colors_never_collide_with_object_colors():
    # every background pixel, over many seeds, stays far from every object color (beyond its jitter)
    objs = np.array(list(COLOR_RGB.values()), dtype=np.int32)
    for bg in A.BACKGROUNDS:
        for seed in range(10):
            attrs = {"background": bg, "num_objects": 1, "objects": [{"shape": "circle", "color": "red", "motion": "still"}]}
            frame = render(attrs, seed)[0].reshape(-1, 3).astype(np.int32)
            bg_px = np.unique(frame[np.abs(frame - objs[0]).max(-1) > COLOR_JITTER], axis=0)
            dist = np.abs(bg_px[:, None, :] - objs[None]).max(-1)  # Chebyshev distance to each base color
            assert dist.min() > 3 * COLOR_JITTER + BACKGROUND_JITTER, (bg, dist.min())


@pytest.mark.parametrize("num_objects", [1, 2])
def test_objects_are_visible_inside_the_frame_and_apart(num_objects):
    for seed in range(60):
        s = generate_sample(seed, num_objects=num_objects)
        masks = _object_masks(s.video, s.attributes)
        for m in masks:
            area = m.sum(axis=(1, 2))
            assert area.min() >= 60, (seed, area)  # smallest: triangle/cross at 14 px (shrunk once) ~ 80 px
            assert not m[:, 0, :].any() and not m[:, -1, :].any() and not m[:, :, 0].any() and not m[:, :, -1].any()
        if num_objects == 2:  # bounding boxes never touch: objects stay recognisable
            assert not (masks[0] & masks[1]).any()


@pytest.mark.parametrize("motion", A.MOTIONS)
def test_motion_moves_the_centroid_the_right_way(motion):
    want = {"still": (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[motion]
    for seed in range(20):
        shape = A.SHAPES[seed % len(A.SHAPES)]
        attrs = {"background": A.BACKGROUNDS[seed % 4], "num_objects": 1,
                 "objects": [{"shape": shape, "color": "blue", "motion": motion}]}
        m = _object_masks(render(attrs, seed), attrs)[0]
        ys, xs = [], []
        for f in range(NUM_FRAMES):
            yy, xx = np.nonzero(m[f])
            ys.append(yy.mean()), xs.append(xx.mean())
        d = np.array([xs[-1] - xs[0], ys[-1] - ys[0]])
        for axis in (0, 1):
            if want[axis] == 0:
                assert abs(d[axis]) < 1.0, (motion, seed, d)
            else:  # 3-4 px per frame over 7 steps; centroid rounding costs at most ~1 px
                assert 19 <= want[axis] * d[axis] <= 29, (motion, seed, d)
        steps = np.abs(np.diff(xs if want[0] else ys))
        if motion != "still":
            assert steps.min() >= 2.0, (motion, seed, steps)  # visible every frame


def test_two_objects_have_distinct_colors_in_canonical_order():
    for seed in range(200):
        attrs = A.sample_attributes(seed, num_objects=2)
        idx = [A.COLORS.index(o["color"]) for o in attrs["objects"]]
        assert idx[0] < idx[1]


def _captioned(seed, split):
    """(attributes, caption) as generate_sample draws them, without rendering the video."""
    rng = np.random.default_rng(seed)
    attrs = A.sample_attributes(rng)
    return attrs, caption_for(attrs, rng, split=split)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_parse_caption_inverts_caption_for(split):
    for seed in range(3000):
        attrs, caption = _captioned(seed, split)
        assert parse_caption(caption) == attrs, caption
        assert parse_caption(caption_for(attrs, paraphrase=False, split=split)) == attrs
    s = generate_sample(5, split=split)
    assert parse_caption(s.caption) == s.attributes


def test_captions_paraphrase_and_eval_templates_are_unseen_in_training():
    skel = {split: {caption_skeleton(_captioned(seed, split)[1]) for seed in range(3000)} for split in ("train", "eval")}
    assert len(skel["train"]) >= 10 and len(skel["eval"]) >= 4  # templates x joiners actually vary
    assert not skel["train"] & skel["eval"]
    # every eval scene template's fixed words appear in no training caption
    train_text = " | ".join(_captioned(seed, "train")[1] for seed in range(3000))
    for scene in TEMPLATES["eval"]["scene"]:
        fixed = [w.strip(" :;,") for w in scene.replace("{objects}", "|").replace("{background}", "|").split("|")]
        assert any(w and w not in train_text for w in fixed), scene
    # synonyms vary within a split
    assert len({_captioned(seed, "train")[1] for seed in range(50)}) == 50


def test_parse_caption_names_bad_captions():
    with pytest.raises(ValueError, match="background"):
        parse_caption("a red circle moving left")
    with pytest.raises(ValueError, match="distinct colors"):
        parse_caption("a red circle moving left and a red box rising on a dark background")
    with pytest.raises(TypeError, match="caption"):
        parse_caption(3)
    # out-of-canonical order in a hand-written caption is sorted, pairing kept
    a = parse_caption("a cyan box rising and a red disc sinking, dark background")
    assert [o["color"] for o in a["objects"]] == ["red", "cyan"] and a["objects"][0]["motion"] == "down"


def test_validation_and_label_codes():
    with pytest.raises(ValueError, match=r"\['objects'\]\[0\]\['shape'\]"):
        A.validate_attributes({"background": "dark", "num_objects": 1, "objects": [{"shape": "hexagon", "color": "red", "motion": "up"}]})
    with pytest.raises(ValueError, match="background"):
        A.validate_attributes({"background": "red", "num_objects": 1, "objects": []})
    with pytest.raises(ValueError, match="num_objects"):
        A.sample_attributes(0, num_objects=3)
    with pytest.raises(ValueError, match="paraphrase"):
        caption_for(A.sample_attributes(0))
    for seed in range(100):
        attrs = A.sample_attributes(seed)
        labels = A.attributes_to_labels(attrs)
        assert list(labels) == list(A.HEADS)
        assert all(0 <= labels[h] < n for h, n in A.HEADS.items() if labels[h] != A.IGNORE)
        assert A.labels_to_attributes(labels) == attrs


def test_sample_seed_is_distinct_across_indices_and_splits():
    seeds = {sample_seed(0, i, sp) for i in range(500) for sp in ("train", "eval")} | {sample_seed(1, i) for i in range(500)}
    assert len(seeds) == 1500
    with pytest.raises(ValueError, match="split"):
        sample_seed(0, 0, "test")


def test_video_float_round_trip():
    v = generate_sample(2).video
    x = video_to_float(v)
    assert x.shape == (3, NUM_FRAMES, HEIGHT, WIDTH) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(video_to_uint8(x), torch.from_numpy(v))
    with pytest.raises(ValueError, match="uint8"):
        video_to_float(x)


def test_stream_is_split_across_workers_and_ranks(monkeypatch):
    ref = [s["key"] for s in ToyVideoStream(seed=4, split="eval", num_samples=10)]
    assert ref == [f"eval-{i:08d}" for i in range(10)]
    # the stream's video i is generate_sample(sample_seed(seed, i, split))
    first = next(iter(ToyVideoStream(seed=4, split="eval")))
    assert np.array_equal(first["video"].numpy(), generate_sample(sample_seed(4, 0, "eval"), split="eval").video)
    # two DataLoader workers: same samples, none twice
    loader = DataLoader(ToyVideoStream(seed=4, split="eval", num_samples=10), batch_size=2, num_workers=2, collate_fn=collate_toy)
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == ref
    # two ranks: disjoint halves, together everything
    parts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank)), monkeypatch.setenv("WORLD_SIZE", "2")
        parts.append([s["key"] for s in ToyVideoStream(seed=4, split="eval", num_samples=10)])
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == ref


def test_collate_batches_labels():
    batch = collate_toy(list(ToyVideoStream(seed=0, num_samples=4)))
    assert batch["video"].shape == (4, NUM_FRAMES, HEIGHT, WIDTH, 3) and batch["video"].dtype == torch.uint8
    assert set(batch["labels"]) == set(A.HEADS) and all(v.shape == (4,) for v in batch["labels"].values())
    two = torch.tensor([a["num_objects"] == 2 for a in batch["attributes"]])
    assert torch.equal(batch["labels"]["obj2_present"].bool(), two)
    assert torch.equal(batch["labels"]["obj2_shape"] == A.IGNORE, ~two)
