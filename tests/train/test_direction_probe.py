"""tools/direction_probe_train.py: the left/right learnability experiment runs end to end (seconds of
training: only the plumbing is checked here, not whether anything is learned)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import direction_probe_train as dp  # noqa: E402


def test_scenes_and_captions_agree_on_the_direction():
    from turbo_train.toyworld.generator import render
    from turbo_train.toyworld.motion import motion_from_track, object_track

    for d in dp.DIRECTIONS:
        assert d in dp.caption(d)
        assert motion_from_track(object_track(render(dp.scene(d), 3), "red")) == d  # the data is right


def test_runs_end_to_end_and_writes_results(tmp_path):
    assert dp.main(["--minutes", "0.01", "--per-direction", "1", "--variants", "frame_embed", "--out",
                    str(tmp_path)]) == 0
    r = json.loads((tmp_path / "results.json").read_text())["results"]["frame_embed"]
    assert r["steps"] >= 1 and sum(sum(c.values()) for c in r["counts"].values()) == 2
    assert set(r["counts"]["left"]) == {"left", "right", "still", "vertical", "unreadable"}
    assert (tmp_path / "samples_frame_embed.png").stat().st_size > 0  # what the samples looked like


def test_prerendered_bank_matches_the_renderer_and_feeds_training(tmp_path):
    """The bank's latents are the codec's encoding of the same scenes (pool or not), balanced-ish in
    direction; a run trains from it."""
    import numpy as np
    import torch

    from turbo_infer.vae import ToyCodec
    from turbo_train.toyworld.generator import video_to_float

    codec = ToyCodec()
    lat, dirs = dp.prerender(6, 0, codec, "cpu", workers=2)
    lat1, dirs1 = dp.prerender(6, 0, codec, "cpu", workers=1)
    assert torch.equal(lat, lat1) and torch.equal(dirs, dirs1) and set(dirs.tolist()) <= {0, 1}
    rng = np.random.default_rng(0 + 7919)
    d, seed = int(rng.integers(2)), int(rng.integers(2**31))
    first = codec.encode(video_to_float(torch.from_numpy(dp.render(dp.scene(dp.DIRECTIONS[d]), seed)[None])))
    assert dirs[0].item() == d and torch.equal(lat[:1], first)
    assert dp.main(["--minutes", "0.01", "--per-direction", "1", "--variants", "rope", "--prerender", "8",
                    "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["results"]["rope"]["steps"] >= 1
    with pytest.raises(SystemExit):
        dp.main(["--prerender", "-1"])


def test_unknown_variant_is_refused(capsys):
    with pytest.raises(SystemExit):
        dp.main(["--variants", "alibi"])
    assert "--variants" in capsys.readouterr().err


def test_prior_drift_reads_a_prediction_that_follows_the_caption():
    """prior_drift's sign and scale: a stand-in model whose clean-video prediction is a rendered square
    moving as its caption says gives right - left = the sum of the two squares' speeds (3-4 px/frame each);
    one that ignores the caption gives 0."""
    import torch

    from turbo_infer.vae import ToyCodec
    from turbo_train.toyworld.generator import video_to_float

    codec = ToyCodec()
    text = torch.stack([torch.full((4, 8), float(i)) for i in range(2)])  # (2, L, D): "left" 0, "right" 1
    clean = [codec.encode(video_to_float(torch.from_numpy(dp.render(dp.scene(d), 5)[None]))) for d in dp.DIRECTIONS]

    def follows(x, t, ctx):  # v = (x - x0) / s, so that x - s·v = the square of the caption's direction
        s = (t / 1000.0).view(-1, 1, 1, 1, 1)
        return (x - clean[int(ctx[0, 0, 0].item())]) / s

    def ignores(x, t, ctx):
        return (x - clean[1]) / (t / 1000.0).view(-1, 1, 1, 1, 1)

    drift = dp.prior_drift(follows, text, codec, seed=0, draws=2)
    assert 6 <= drift["s1"] <= 8 and 6 <= drift["s0.98"] <= 8 and drift["s1_stderr"] < 1e-6, drift
    assert 0.7 < drift["mass_s1"] < 1.3  # rendered squares of other sizes: about one square's mass
    assert dp.prior_drift(ignores, text, codec, seed=0, draws=2)["s1"] == 0


def test_position_variant_with_high_noise_times_runs_and_reports_its_prior_drift(tmp_path):
    assert dp.main(["--minutes", "0.01", "--per-direction", "1", "--variants", "position", "--high-noise-fraction",
                    "0.5", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "results.json").read_text())["results"]["position"]
    assert set(r["prior_drift"]) == {"s1", "s1_stderr", "s0.98", "s0.98_stderr", "mass_s1", "mass_s0.98"}
    with pytest.raises(SystemExit):
        dp.main(["--high-noise-fraction", "2"])
