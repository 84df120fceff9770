"""rCM few-step sampler (turbo_infer.samplers.RCMSampler, RCM.md §6): timesteps, shapes, the update
rule against a hand-written loop, conditional-only calls, determinism by seed and batch independence."""
import pytest
import torch

from turbo_infer.samplers import (SAMPLERS, RCMSampler, batch_randn, check_mid_times, get_sampler, parse_mid_times,
                                  shifted_mid_times)

SHAPE = (4, 2, 4, 4)  # (C, F, H, W)


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


class Recorder:
    """A linear 'network' v = a·x + b·(timestep/1000) + mean(context), recording its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, timestep, context):
        self.calls.append((x.shape, x.dtype, timestep.clone(), context.shape))
        return 0.3 * x + 0.2 * (timestep / 1000).reshape(-1, 1, 1, 1, 1) + context.mean((1, 2)).reshape(-1, 1, 1, 1, 1)


def test_registered_and_spec_timesteps():
    assert SAMPLERS["rcm"] is RCMSampler and isinstance(get_sampler("rcm"), RCMSampler)
    expect = [0.98765, 0.93378, 0.85290, 0.60898]  # RCM.md §6, 5 printed digits
    for n in (1, 2, 3, 4):
        s = RCMSampler.timesteps(n)
        assert s.dtype == torch.float64 and s.shape == (n + 1,) and s[-1].item() == 0.0
        torch.testing.assert_close(s[:-1], torch.tensor(expect[:n], dtype=torch.float64), atol=6e-6, rtol=0)
    # t = atan(σ_max) in RF time is σ/(1 + σ)
    assert RCMSampler.timesteps(1, sigma_max=120.0)[0].item() == pytest.approx(120 / 121)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="steps"):
            RCMSampler.timesteps(bad)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_matches_hand_written_loop_and_is_conditional_only(steps):
    B = 2
    noise = batch_randn(SHAPE, gens([10, 11]))
    ctx = torch.randn(B, 3, 8)
    net = Recorder()
    out = RCMSampler().sample(net, noise, ctx, uncond=torch.zeros(1, 3, 8), guidance=5.0, steps=steps,
                              generators=_advance(gens([10, 11])))
    assert out.shape == noise.shape and out.dtype == torch.float32
    # one conditional forward per step (uncond and guidance ignored), at timesteps 1000·s_i
    s = RCMSampler.timesteps(steps).tolist()
    assert len(net.calls) == steps
    for i, (shape, dtype, t, cshape) in enumerate(net.calls):
        assert shape == (B, *SHAPE) and dtype == torch.float32 and cshape == (B, 3, 8)
        torch.testing.assert_close(t, torch.full((B,), 1000 * s[i]))
    # the same algorithm written out in float64, with the same fresh noise
    g = _advance(gens([10, 11]))
    x = s[0] * noise.double()
    for i in range(steps):
        v = Recorder()(x.float(), torch.full((B,), 1000 * s[i]), ctx).double()
        x0 = x - s[i] * v
        x = x0 if s[i + 1] == 0 else (1 - s[i + 1]) * x0 + s[i + 1] * batch_randn(SHAPE, g).double()
    torch.testing.assert_close(out, x.float(), atol=1e-6, rtol=1e-6)


def _advance(generators):
    """Generators positioned after the initial noise draw, as the pipeline hands them to the sampler."""
    batch_randn(SHAPE, generators)
    return generators


def test_oracle_student_lands_on_its_x0_at_any_step_count():
    target = torch.randn(2, *SHAPE)

    def oracle(x, timestep, context):  # v such that x - s·v = target
        s = (timestep / 1000).reshape(-1, 1, 1, 1, 1)
        return (x - target) / s

    for n in (1, 2, 3, 4):
        out = RCMSampler().sample(oracle, torch.randn(2, *SHAPE), torch.zeros(2, 3, 8), steps=n, generators=gens([1, 2]))
        torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def test_deterministic_by_seed_and_batch_independent():
    ctx = torch.randn(3, 3, 8)
    net = lambda x, t, c: torch.tanh(x) + c.mean((1, 2)).reshape(-1, 1, 1, 1, 1)  # noqa: E731

    def run(seeds, c):
        g = gens(seeds)
        noise = batch_randn(SHAPE, g)
        return RCMSampler().sample(net, noise, c, steps=4, generators=g)

    a, b = run([5, 6, 7], ctx), run([5, 6, 7], ctx)
    assert torch.equal(a, b)
    assert not torch.allclose(a, run([5, 6, 8], ctx))  # the last item's seed changes its result ...
    torch.testing.assert_close(run([6], ctx[1:2]), a[1:2])  # ... and an item does not depend on its batch
    # fresh noise matters at 2+ steps: same initial noise, different re-noising draws -> different samples
    noise = batch_randn(SHAPE, gens([5]))
    x1 = RCMSampler().sample(net, noise, ctx[:1], steps=2, generators=gens([100]))
    x2 = RCMSampler().sample(net, noise, ctx[:1], steps=2, generators=gens([200]))
    assert not torch.allclose(x1, x2)


def test_bad_arguments_name_the_argument():
    noise, ctx = torch.randn(2, *SHAPE), torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="steps"):
        RCMSampler().sample(lambda x, t, c: x, noise, ctx, steps=50)
    with pytest.raises(ValueError, match="generators"):
        RCMSampler().sample(lambda x, t, c: x, noise, ctx, steps=2, generators=gens([1]))
    with pytest.raises(ValueError, match="context"):
        RCMSampler().sample(lambda x, t, c: x, noise, torch.zeros(3, 3, 8), steps=2)


def test_mid_times_are_an_option_with_checks():
    """Other intermediate times: the grid follows them; the spec's grid moved between timestep shifts is the
    identity at Wan's shift 5 and lands at RF times 0.895 / 0.777 / 0.483 for the toy world's 3."""
    assert shifted_mid_times(5.0) == pytest.approx(RCMSampler.mid_times, abs=1e-12)
    toy = shifted_mid_times(3.0)
    s = RCMSampler.timesteps(4, mid_times=toy)
    assert s[1:4].tolist() == pytest.approx([0.8943, 0.7767, 0.4831], abs=1e-4) and s[-1] == 0.0
    sampler = get_sampler("rcm", mid_times=toy)
    assert sampler.mid_times == pytest.approx(toy) and RCMSampler.mid_times == (1.5, 1.4, 1.0)  # class untouched
    assert parse_mid_times("shift=3") == pytest.approx(toy) and parse_mid_times("1.4, 1.2,0.7") == (1.4, 1.2, 0.7)
    # a sampler with fewer mid times takes fewer steps
    two = RCMSampler(mid_times=(1.2,))
    net = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    x = torch.randn(1, 4, 2, 4, 4)
    ctx = torch.zeros(1, 3, 8)
    assert two.sample(net, x, ctx, steps=2).shape == x.shape
    with pytest.raises(ValueError, match="steps must be an int in 1..2"):
        two.sample(net, x, ctx, steps=3)
    for bad in ((1.0, 1.2), (), (1.6,), (0.0,), ("a",)):
        with pytest.raises(ValueError, match="mid_times"):
            check_mid_times(bad)
    with pytest.raises(ValueError, match="takes no options"):
        get_sampler("euler", mid_times=toy)
    with pytest.raises(ValueError, match="shift=S needs a number"):
        parse_mid_times("shift=three")
