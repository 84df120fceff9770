"""The judge-free motion tracker (turbo_train/toyworld/motion.py) and tools/toy_motion_probe.py."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from turbo_infer.models.wan import WanConfig, WanModel
from turbo_infer.models.wan_keys import save_wan_checkpoint
from turbo_train.toyworld.generator import generate_sample
from turbo_train.toyworld.motion import motion_confusion, motion_from_track, object_track

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import toy_motion_probe  # noqa: E402

TINY = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=384, in_channels=48, out_channels=48)


@pytest.fixture(scope="module")
def real():
    samples = [generate_sample(1000 + i) for i in range(40)]
    return np.stack([s.video for s in samples]), [s.attributes for s in samples]


def test_tracker_is_exact_on_real_videos(real):
    videos, attrs = real
    report = motion_confusion(videos, attrs)
    assert report["n"] >= 40 and report["unreadable"] == 0
    assert report["direction_acc"] == 1.0 and report["axis_acc"] == 1.0 and report["sign_acc"] == 1.0
    assert set(report["confusion"]) == {"still", "left", "right", "up", "down"}  # every motion is in the sample
    for labels, a in zip(report["tracked"], attrs):  # per object, None where its colour is not unique
        colors = [o["color"] for o in a["objects"]]
        assert labels == [o["motion"] if colors.count(o["color"]) == 1 else None for o in a["objects"]]


def test_reversed_videos_keep_the_axis_and_lose_the_sign(real):
    videos, attrs = real
    report = motion_confusion(videos[:, ::-1], attrs)  # frames played backwards
    assert report["axis_acc"] == 1.0 and report["sign_acc"] == 0.0
    assert report["confusion"]["still"] == {"still": sum(o["motion"] == "still" for a in attrs for o in a["objects"]
                                                         if [x["color"] for x in a["objects"]].count(o["color"]) == 1)}


def test_track_of_one_object():
    s = generate_sample(7)
    obj = s.attributes["objects"][0]
    track = object_track(s.video, obj["color"])
    assert track.shape == (8, 3) and np.all(track[:, 2] >= 6)
    assert motion_from_track(track) == obj["motion"]
    absent = next(c for c in ("red", "green", "blue", "yellow", "magenta", "cyan")
                  if c not in [o["color"] for o in s.attributes["objects"]])
    assert motion_from_track(object_track(s.video, absent)) is None  # no pixels of that colour: no read-out


def test_tracker_refusals():
    video = generate_sample(0).video
    with pytest.raises(ValueError, match="color must be one of"):
        object_track(video, "purple")
    with pytest.raises(ValueError, match=r"video must be \(F, H, W, 3\)"):
        object_track(video[..., 0], "red")
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        motion_confusion(np.stack([video, video]), [generate_sample(0).attributes])


def test_caption_pairs_differ_only_in_the_direction():
    caps, flipped, attrs, attrs_flipped = toy_motion_probe.caption_pairs(8, seed=0)
    for c, f, a, b in zip(caps, flipped, attrs, attrs_flipped):
        m, mb = a["objects"][0]["motion"], b["objects"][0]["motion"]
        assert toy_motion_probe.OPPOSITE[m] == mb
        assert {k: v for k, v in a["objects"][0].items() if k != "motion"} == \
               {k: v for k, v in b["objects"][0].items() if k != "motion"}
        assert c != f and len(c.split()) == len(f.split())  # same template and phrasing
    assert {a["objects"][0]["motion"] for a in attrs} == {"left", "right", "up", "down"}


def _checkpoint(tmp_path, patch_size):
    torch.manual_seed(0)
    model = WanModel(replace(TINY, patch_size=patch_size)).eval()
    for p in model.parameters():  # Wan zero-inits the head: give every weight some signal
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path / f"tiny_{''.join(map(str, patch_size))}.safetensors"
    save_wan_checkpoint(model, path)
    return path


def test_probe_end_to_end_and_the_time_symmetry_of_a_one_frame_patch(tmp_path, capsys):
    """A DiT whose patch spans one frame has nothing but RoPE to tell the frames' order by (its random
    initialisation nearly commutes with reversing time); a patch over two frames breaks that symmetry."""
    gaps = {}
    for ps in ((1, 2, 2), (2, 2, 1)):
        out = tmp_path / f"probe_{ps[0]}.json"
        assert toy_motion_probe.main(["--checkpoint", str(_checkpoint(tmp_path, ps)), "--pairs", "2", "--steps", "2",
                                      "--real-videos", "2", "--flow-times", "0.8", "--out", str(out),
                                      "--prior-scenes", "2", "--prior-draws", "2", "--prior-times", "1.0",
                                      "--no-progress"]) == 0
        doc = json.loads(out.read_text())
        figs = doc["figures"]
        assert set(figs) == {"toy_motion_time_reversal_gap", "toy_motion_hflip_gap", "toy_motion_word_flip_unchanged",
                             "toy_motion_direction_acc", "toy_motion_axis_acc", "toy_motion_sign_acc",
                             "toy_motion_prior_drift_gap_s1", "toy_motion_prior_drift_gap_s1_stderr",
                             "toy_motion_prior_drift_mass_ratio_s1", "toy_motion_prior_drift_gap_data"}
        assert all(0 <= figs[k] <= 1 for k in figs if not k.endswith("_gap") and "prior_drift" not in k)
        # rendered videos: a caption's object and its twin move apart at the sum of two speeds in [3, 4]
        assert 6 <= figs["toy_motion_prior_drift_gap_data"] <= 8
        assert doc["device"].startswith("CPU") and doc["command"].startswith("python tools/toy_motion_probe.py")
        gaps[ps] = figs["toy_motion_time_reversal_gap"]
    assert gaps[(1, 2, 2)] < 0.05 < 0.3 < gaps[(2, 2, 1)]
    assert "time-reversal gap" in capsys.readouterr().out


@pytest.mark.parametrize("args, match", [
    (["--pairs", "0"], "--pairs and --real-videos must be >= 1"),
    (["--flow-times", "0.5,1.5"], "--flow-times must be in (0, 1]"),
    (["--flow-times", "a"], "--flow-times must be comma-separated numbers"),
    (["--checkpoint", "/nonexistent.safetensors"], "checkpoint not found: /nonexistent.safetensors"),
    (["--prior-draws", "1"], "--prior-draws 2"),
    (["--prior-times", "0"], "--prior-times must be in (0, 1]"),
])
def test_probe_refusals(args, match, capsys):
    with pytest.raises(SystemExit):
        toy_motion_probe.main(args)
    assert match in capsys.readouterr().err


def test_soft_centroid_slope_reads_the_speed_of_a_rendered_object():
    from turbo_train.toyworld.generator import render

    for motion, axis, sign in (("right", 0, 1), ("left", 0, -1), ("down", 1, 1), ("up", 1, -1)):
        a = {"background": "checker", "num_objects": 1, "objects": [{"shape": "cross", "color": "cyan", "motion": motion}]}
        slope = toy_motion_probe.soft_centroid_slope(render(a, 3), "cyan", axis)
        assert 2.9 <= sign * slope <= 4.1, (motion, slope)  # speeds are drawn from [3, 4] px/frame
        assert abs(toy_motion_probe.soft_centroid_slope(render(a, 3), "cyan", 1 - axis)) < 0.2  # not across


def test_colour_mass_is_linear_in_a_blend_and_zero_on_backgrounds():
    """A blurred prediction (object colour blended into the background) must still weigh in: the mass of a
    20 % blend is ~1/5 of the object's; the neutral backgrounds (grey plus the generator's blue hint of 6)
    read 0; the centroid of a blend moves as the object's."""
    from turbo_train.toyworld.generator import COLOR_RGB, render, shape_mask

    xs = 14 + 3.5 * np.arange(8)  # a square moving right at 3.5 px/frame
    mask = shape_mask("square", xs, np.full(8, 30.0), 16.0)  # (F, H, W)
    for grey in (18, 60, 105, 160, 178):
        bg = np.broadcast_to(np.array([grey, grey, grey + 6], dtype=np.float64), (8, 64, 64, 3))
        for color in COLOR_RGB:
            video = np.where(mask[..., None], np.asarray(COLOR_RGB[color], dtype=np.float64), bg)
            mass = toy_motion_probe.colour_mass(video, color)
            assert mass[~mask].max() == 0 and mass[mask].min() > 50, (grey, color)
            blend = 0.2 * video + 0.8 * bg
            ratio = toy_motion_probe.colour_mass(blend, color)[mask].mean() / mass[mask].mean()
            assert 0.1 < ratio < 0.25, (grey, color, ratio)  # 0.2 less the floor's share
            for v in (video, blend):
                assert abs(toy_motion_probe.soft_centroid_slope(v, color, 0) - 3.5) < 0.05, (grey, color)
    for bgname in ("dark", "gray", "gradient", "checker"):  # rendered backgrounds read 0 around the object
        a = {"background": bgname, "num_objects": 1, "objects": [{"shape": "cross", "color": "blue", "motion": "up"}]}
        mass = toy_motion_probe.colour_mass(render(a, 2), "blue")
        assert (mass > 50).sum() > 100 and ((mass > 0) & (mass <= 50)).sum() == 0, bgname
