"""tools/high_noise_oracle.py: modes parse with clear errors, the oracle start is the exact straight-path
state, the teacher mode is turbo-eval's sampling, and the tool runs end to end (tiny settings)."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import high_noise_oracle as hno  # noqa: E402


def test_parse_mode():
    assert hno.parse_mode("teacher") == ("teacher", None, None)
    assert hno.parse_mode("mean@0.95") == ("mean", 0.95, None)
    assert hno.parse_mode("single@0.5") == ("single", 0.5, None)
    assert hno.parse_mode("expert@0.9") == ("expert", 0.9, None)
    assert hno.parse_mode("cfg@0.9:8") == ("cfg", 0.9, 8.0)
    for bad, msg in [("prior@0.9", "unknown kind 'prior'"), ("mean", "with a flow time"), ("mean@x", "with a flow time"),
                     ("single@1.0", r"S must be in \(0, 1\)"), ("teacher@0.9", "takes no @S"),
                     ("cfg@0.9", "cfg@S:W"), ("mean@0.9:3", r"mean@S \(no :W\)"), ("cfg@0.9:x", "must be a number"),
                     ("cfg@0.9:-1", r"in \[0, 50\]")]:
        with pytest.raises(ValueError, match=msg):
            hno.parse_mode(bad)


class _Recorder:
    """A stand-in pipeline whose network returns zero velocity and records the flow times it is called at."""

    def __init__(self):
        self.times = []
        self.dtype = torch.float32

        def net(x, t, ctx):
            self.times.append(float(t[0]) / 1000.0)
            return torch.zeros_like(x)

        self.transformer = net


def test_oracle_start_is_the_straight_path_state():
    from turbo_infer.samplers import flow_schedule

    pipe = _Recorder()
    g = torch.Generator().manual_seed(0)
    noise, target = torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 4, 4, generator=g)
    ctx = torch.zeros(2, 4, 8)
    x = hno.sample_from(pipe.transformer, noise, ctx, None, steps=10, guidance=1.0, shift=3.0, start=0.9,
                        target=target)
    sig = flow_schedule(10, 3.0).tolist()
    first = next(i for i, s in enumerate(sig) if s <= 0.9)
    assert first > 0 and pipe.times == pytest.approx(sig[first:-1], abs=1e-4)  # only the steps at or below S run
    torch.testing.assert_close(x, sig[first] * noise + (1 - sig[first]) * target)  # zero velocity: the start state
    pipe.times.clear()
    x = hno.sample_from(pipe.transformer, noise, ctx, None, steps=10, guidance=1.0, shift=3.0)
    assert len(pipe.times) == 10 and torch.equal(x, noise)


def test_expert_runs_the_steps_above_s_and_the_teacher_the_rest():
    from turbo_infer.samplers import flow_schedule

    pipe, expert = _Recorder(), _Recorder()
    noise = torch.randn(1, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    from turbo_infer.models.experts import BoundaryExperts

    net = BoundaryExperts(pipe.transformer, expert.transformer, 0.9)  # what the tool's expert@0.9 mode samples
    x = hno.sample_from(net, noise, torch.zeros(1, 4, 8), None, steps=10, guidance=1.0, shift=3.0)
    sig = flow_schedule(10, 3.0).tolist()
    first = next(i for i, s in enumerate(sig) if s <= 0.9)
    assert expert.times == pytest.approx(sig[:first], abs=1e-4) and pipe.times == pytest.approx(sig[first:-1], abs=1e-4)
    assert torch.equal(x, noise)  # zero velocities: the expert did not jump to an oracle state


def test_high_guidance_applies_above_s_only():
    """cfg@S:W: the steps at s >= S combine the two predictions with weight W, the others with --guidance."""
    from turbo_infer.samplers import flow_schedule

    def spy(x, t, ctx):  # conditional velocity 1, unconditional 0: the guided velocity is the weight itself
        return ctx[:, 0, 0].view(-1, 1, 1, 1, 1).expand_as(x).clone()

    noise = torch.zeros(1, 1, 1, 2, 2)
    ctx, unc = torch.ones(1, 2, 3), torch.zeros(1, 2, 3)
    x = hno.sample_from(spy, noise, ctx, unc, steps=10, guidance=2.0, shift=3.0, high_guidance=(0.9, 7.0))
    sig = flow_schedule(10, 3.0).tolist()
    want = sum((sig[i + 1] - sig[i]) * (7.0 if sig[i] >= 0.9 else 2.0) for i in range(10))
    assert any(s >= 0.9 for s in sig[:-1]) and any(s < 0.9 for s in sig[:-1])
    torch.testing.assert_close(x, torch.full_like(x, want))
    plain = hno.sample_from(spy, noise, ctx, unc, steps=10, guidance=2.0, shift=3.0)
    torch.testing.assert_close(plain, torch.full_like(x, 2.0 * (sig[-1] - sig[0])))


def test_teacher_mode_is_turbo_eval_sampling(tmp_path):
    """The probe's teacher videos equal the pipeline's own generate() for the same prompt and seed."""
    from turbo_infer.pipeline import TurboPipeline
    from turbo_infer.samplers import batch_randn
    from turbo_train.eval import eval_prompts

    pipe = TurboPipeline.toy()
    caption = eval_prompts(1, 0)[0][0]
    want = pipe.generate([caption], steps=3, guidance=5.0, seed=0, shift=3.0, progress=False)
    noise = batch_randn(pipe.vae.latent_shape(8, 64, 64), [torch.Generator().manual_seed(0)])
    lat = hno.sample_from(pipe.transformer, noise, pipe.text_encoder.encode([caption]),
                          pipe.text_encoder.empty_embedding(), steps=3, guidance=5.0, shift=3.0, dtype=pipe.dtype)
    got = torch.cat(list(pipe.decode_uint8(lat)), dim=1)
    assert torch.equal(got, want)


def test_runs_end_to_end(tmp_path):
    out = tmp_path / "o.json"
    assert hno.main(["--prompts", "2", "--renders", "2", "--steps", "2", "--batch-size", "2", "--no-progress",
                     "--modes", "teacher,single@0.3", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["modes"]) == {"teacher", "single@0.3"}
    assert "minus_teacher" in doc["modes"]["single@0.3"] and 0 <= doc["modes"]["teacher"]["adherence"] <= 1


def test_bad_modes_exit_with_a_message(capsys, tmp_path):
    with pytest.raises(SystemExit):
        hno.main(["--modes", "mean@2"])
    assert "--modes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hno.main(["--modes", "teacher,expert@0.9"])  # an expert mode without --expert
    assert "--expert and the expert@S modes go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hno.main(["--modes", "expert@0.9", "--expert", str(tmp_path / "missing.safetensors")])
    assert "--expert: file not found" in capsys.readouterr().err
