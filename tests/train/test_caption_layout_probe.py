"""tools/caption_layout_probe.py: the target pairs are what the docstring says, a fit on an exact target
lowers its error, and the tool runs end to end (tiny settings: the plumbing, not the finding)."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import caption_layout_probe as clp  # noqa: E402


@pytest.fixture(scope="module")
def means():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 2, 4, 4, generator=g) + torch.linspace(0, 1, 4)  # a pair with a layout


def test_target_pairs(means):
    d = clp.targets_for("direction", means)
    assert torch.equal(d, means)
    size = (means[1] - means[0]).norm()
    glob = clp.targets_for("global", means)
    diff = glob[1] - glob[0]
    assert torch.equal(glob[0], means[0]) and diff.norm() == pytest.approx(size.item(), rel=1e-5)
    assert torch.allclose(diff, diff[:, :1, :1, :1].expand_as(diff))  # the same at every frame and place
    same = clp.targets_for("same", means)
    assert torch.equal(same[0], means[1]) and torch.equal(same[1], means[1])
    with pytest.raises(ValueError, match="unknown target 'up'"):
        clp.targets_for("up", means)


def test_fit_moves_the_prediction_towards_a_caption_dependent_target():
    """The small model with tables, 30 steps on a global caption effect: the error falls and the caption
    starts to matter (the probe's easy case; at lr 3e-3 this is quick)."""
    from turbo_infer.vae import ToyCodec

    shape = ToyCodec().latent_shape(8, 64, 64)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape[0], 1, 1, 1, generator=g).expand(shape)  # a colour per channel: quick to learn
    target = clp.targets_for("global", torch.stack([base, base + 0.5]))
    text = torch.zeros(2, 4, 384)
    text[0, 0, 0], text[1, 0, 1] = 5.0, 5.0  # two distinct captions
    model = clp.build_model("scratch", None)
    rows = clp.fit(model, text, target, steps=30, lr=3e-3, batch_size=2, zero_input=True, table_lr_scale=10.0,
                   log_every=30, label="test")
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 30
    assert rows[-1]["err"] < 0.8 * rows[0]["err"]
    assert rows[-1]["gain"] > rows[0]["gain"] + 0.2 and rows[-1]["cos"] > 0.5


def test_runs_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    assert clp.main(["--targets", "same", "--steps", "2", "--videos", "3", "--log-every", "1", "--batch-size", "2",
                     "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["input"] == "zero" and [r["step"] for r in doc["results"]["same"]] == [0, 1, 2]
    assert "gain" not in doc["results"]["same"][0]  # no caption difference to learn


def test_bad_arguments_are_refused(capsys, tmp_path):
    with pytest.raises(SystemExit):
        clp.main(["--targets", "direction,sideways"])
    assert "sideways" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        clp.main(["--init", "teacher", "--teacher", str(tmp_path / "missing.safetensors")])
    assert "missing.safetensors" in capsys.readouterr().err


def test_toy_captions_run_and_save_a_loadable_model(tmp_path):
    """The toy target: scenes drawn as training draws them, their mean renders, a fit and a saved model
    that the pipeline (and so the motion probe) loads."""
    from turbo_infer.pipeline import TurboPipeline
    from turbo_infer.vae import ToyCodec

    captions, means = clp.toy_caption_means(3, 2, 0, ToyCodec())
    assert len(captions) == 3 and len(set(captions)) == 3 and means.shape == (3,) + ToyCodec().latent_shape(8, 64, 64)
    out, save = tmp_path / "r.json", tmp_path / "m.safetensors"
    assert clp.main(["--targets", "toy", "--scenes", "2", "--renders", "2", "--steps", "1", "--batch-size", "2",
                     "--out", str(out), "--save", str(save)]) == 0
    assert [r["step"] for r in json.loads(out.read_text())["results"]["toy"]] == [0, 1]
    TurboPipeline.toy(save)  # the probes' loader reads it with its config


def test_mix_flow_trains_both_losses_and_is_checked(tmp_path, capsys):
    """--mix-flow: the toy fit also runs the flow-matching loss on single renders (the run differs from the
    plain s = 1 fit with the same seed), and asking it without the toy target alone is refused."""
    runs = {}
    for name, extra in (("plain", []), ("mix", ["--mix-flow", "2"]), ("light", ["--mix-flow", "2", "--flow-weight", "0.5"])):
        out, save = tmp_path / f"{name}.json", tmp_path / f"{name}.safetensors"
        assert clp.main(["--targets", "toy", "--scenes", "2", "--renders", "2", "--steps", "2", "--batch-size", "1",
                         "--init", "teacher", "--log-every", "1", "--out", str(out), "--save", str(save)] + extra) == 0
        runs[name] = json.loads(out.read_text())["results"]["toy"]
    assert runs["plain"][0] == runs["mix"][0]  # same start
    # step 1 draws the same s = 1 batch from the same weights, so the mixed loss = that loss + the flow term > it
    assert runs["plain"][1]["loss"] < runs["mix"][1]["loss"]
    assert runs["plain"][2] != runs["mix"][2]  # and the flow gradient moved the weights differently
    # --flow-weight scales only the flow term: at step 1 the loss is plain + weight x flow term
    flow_term = runs["mix"][1]["loss"] - runs["plain"][1]["loss"]
    assert runs["light"][1]["loss"] == pytest.approx(runs["plain"][1]["loss"] + 0.5 * flow_term, rel=1e-3, abs=1e-5)
    with pytest.raises(SystemExit):
        clp.main(["--targets", "direction", "--mix-flow", "2"])
    assert "--mix-flow" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        clp.main(["--targets", "toy", "--mix-flow", "2", "--flow-weight", "0"])
    assert "--flow-weight" in capsys.readouterr().err


def test_flow_min_time_draws_the_mixed_flow_times_above_it(monkeypatch):
    """--flow-min-time S: every mixed flow-matching sample is trained at s in [S, 1] (a high-noise expert)."""
    import turbo_train.methods.flow_matching as fm

    seen = []
    real = fm.rectified_flow_loss

    def spy(net, x0, ctx, s, eps):
        seen.append(s.clone())
        return real(net, x0, ctx, s, eps)

    monkeypatch.setattr(fm, "rectified_flow_loss", spy)
    model = clp.build_model("scratch", None)
    from turbo_infer.vae import ToyCodec

    shape = ToyCodec().latent_shape(8, 64, 64)
    target = torch.zeros((2,) + tuple(shape))
    text = torch.randn(2, 4, 384, generator=torch.Generator().manual_seed(0))
    flow = (torch.randn((2,) + tuple(shape)), torch.zeros(1, 4, 384))  # one video per caption
    clp.fit(model, text, target, steps=3, lr=1e-4, batch_size=1, zero_input=True, table_lr_scale=1.0, log_every=3,
            label="t", flow=flow, flow_batch=4, flow_min_time=0.9)
    s = torch.cat(seen)
    assert len(s) == 12 and s.min() >= 0.9 and s.max() <= 1.0


def test_flow_min_time_needs_mix_flow(capsys):
    with pytest.raises(SystemExit):
        clp.main(["--targets", "toy", "--flow-min-time", "0.9"])
    assert "--flow-min-time must be in [0, 1) and needs --mix-flow" in capsys.readouterr().err
