"""Samplers: schedule and UniPC against diffusers, exactness/convergence on known flows, CFG, errors."""
import pytest
import torch

from turbo_infer.samplers import (SAMPLERS, FlowEulerSampler, FlowUniPCSampler, batch_randn, flow_schedule,
                                  get_sampler, guided_velocity, shift_time)

# Tolerances:
#   vs diffusers (fp32 state, same float32 sigmas): 1e-5 abs on |x| ~ 5. The only difference is that
#     diffusers computes the UniPC coefficients in float32 tensors and we in float64 scalars
#     (measured max 2.9e-6 over 50 steps).
#   Euler on straight-line flows: exact up to fp32 rounding of ~10 updates -> 1e-5.


def _linear_model(A, mu):
    """A velocity field linear in x with an explicit time dependence (exercises every coefficient)."""
    def model(x, t, ctx):
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        return torch.einsum("ij,bjfhw->bifhw", A, x) * (1 + s) + mu * s
    return model


@pytest.mark.parametrize("steps,shift", [(1, 5.0), (2, 1.0), (7, 3.0), (10, 5.0), (50, 5.0)])
def test_schedule_matches_diffusers_unipc_flow_sigmas(steps, shift):
    from diffusers import UniPCMultistepScheduler

    sch = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                  use_flow_sigmas=True, flow_shift=shift)
    sch.set_timesteps(steps)
    ours = flow_schedule(steps, shift)
    assert ours.shape == (steps + 1,) and ours[-1] == 0
    assert torch.equal(ours, sch.sigmas)
    assert (ours[:-1] > ours[1:]).all()


def test_shift_formula():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_time(u, 1.0), u)
    assert torch.allclose(shift_time(u, 5.0), 5 * u / (1 + 4 * u))
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)


@pytest.mark.parametrize("steps,shift", [(1, 5.0), (2, 1.0), (3, 5.0), (7, 3.0), (12, 5.0)])
def test_unipc_matches_diffusers_scheduler(steps, shift):
    from diffusers import UniPCMultistepScheduler

    A = torch.randn(4, 4) * 0.3
    mu = torch.randn(1, 4, 1, 1, 1)
    model = _linear_model(A, mu)
    noise = torch.randn(2, 4, 3, 4, 4)
    ctx = torch.zeros(2, 1, 1)
    sch = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                  use_flow_sigmas=True, flow_shift=shift, solver_order=2, solver_type="bh2")
    sch.set_timesteps(steps)
    x = noise.clone()
    for i, t in enumerate(sch.timesteps):
        # the network sees 1000*s as a float (diffusers' int timesteps would round it)
        v = model(x, torch.full((2,), 1000 * sch.sigmas[i].item()), ctx)
        x = sch.step(v, t, x).prev_sample
    ours = FlowUniPCSampler().sample(model, noise, ctx, steps=steps, shift=shift)
    err = (ours - x).abs().max().item()
    assert err <= 1e-5, f"UniPC differs from diffusers by {err}"


@pytest.mark.parametrize("steps", [1, 3, 10])
@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_euler_recovers_x0_with_exact_velocity(steps, shift):
    # Path x_s = (1 - s)·x0 + s·ε with x0 known: its velocity at (x, s) is ε - x0 = (x - x0)/s.
    # The path is a straight line, so Euler is exact for any schedule.
    x0 = torch.randn(2, 3, 2, 4, 4)

    def model(x, t, ctx):
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        return (x - x0) / s

    noise = torch.randn_like(x0)
    out = FlowEulerSampler().sample(model, noise, torch.zeros(2, 1, 1), steps=steps, shift=shift)
    assert (out - x0).abs().max().item() <= 1e-5


def _gaussian_flow(mu, sd0):
    """x0 ~ N(mu, sd0²) per element: marginal x_s ~ N((1-s)·mu, std(s)²), std² = (1-s)²·sd0² + s².
    The probability-flow ODE keeps z = (x - (1-s)·mu)/std(s) fixed, so its velocity is
    v = -mu + std'(s)/std(s)·(x - (1-s)·mu) and the exact endpoint is mu + sd0·z (a linear ODE)."""
    def std(s):
        return ((1 - s) ** 2 * sd0 ** 2 + s ** 2) ** 0.5

    def model(x, t, ctx):
        s = (t / 1000).view(-1, 1, 1, 1, 1).double()
        dstd = (-(1 - s) * sd0 ** 2 + s) / std(s)
        return (-mu + dstd / std(s) * (x - (1 - s) * mu)).float()

    def exact(noise, s0):
        return mu + sd0 * (noise - (1 - s0) * mu) / std(s0)

    return model, exact


def test_unipc_converges_faster_than_euler_on_linear_ode():
    mu = torch.randn(1, 2, 1, 3, 3)
    model, exact = _gaussian_flow(mu, sd0=1.0)
    noise = torch.randn(3, 2, 2, 3, 3)
    ctx = torch.zeros(3, 1, 1)
    err = {}
    for name, sampler in (("euler", FlowEulerSampler()), ("unipc", FlowUniPCSampler())):
        for n in (16, 32, 64):
            ref = exact(noise, flow_schedule(n, 1.0)[0].item())
            err[name, n] = (sampler.sample(model, noise, ctx, steps=n, shift=1.0) - ref).abs().max().item()
    # Euler is first order: doubling the steps halves the error (measured ratios 1.96, 1.98)
    for n in (16, 32):
        assert 1.7 < err["euler", n] / err["euler", 2 * n] < 2.3, err
    # UniPC: far more accurate at equal steps (measured 12x, 31x, 79x) and of higher order
    # (measured ratios 4.9, 5.2 per doubling)
    for n in (16, 32, 64):
        assert err["unipc", n] < err["euler", n] / 8, err
    assert err["unipc", 32] / err["unipc", 64] > 3.5, err
    assert err["unipc", 64] < 2e-3, err


def test_guided_velocity_is_one_batched_cfg_forward():
    calls = []

    def model(x, t, ctx):
        calls.append(x.shape[0])
        return x * ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) + t.view(-1, 1, 1, 1, 1) / 1000

    x = torch.randn(3, 2, 1, 2, 2)
    cond = torch.rand(3, 4, 5)
    uncond = torch.rand(1, 4, 5)
    w = 4.0
    v = guided_velocity(model, x, 0.3, cond, uncond, w)
    assert calls == [6]  # cond + uncond in one forward of batch 2B
    v_c = model(x, torch.full((3,), 300.0), cond)
    v_u = model(x, torch.full((3,), 300.0), uncond.expand(3, -1, -1))
    torch.testing.assert_close(v, v_u + w * (v_c - v_u))
    calls.clear()
    torch.testing.assert_close(guided_velocity(model, x, 0.3, cond, uncond, 1.0), v_c)
    torch.testing.assert_close(guided_velocity(model, x, 0.3, cond, None, 4.0), v_c)
    assert calls == [3, 3]  # w = 1 or no uncond: conditional forward only


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_batched_equals_single(name):
    A = torch.randn(4, 4) * 0.3

    def model(x, t, ctx):  # per-sample: depends on that sample's x, t and context only
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        return torch.einsum("ij,bjfhw->bifhw", A, x) * (1 + s) + ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)

    noise = torch.randn(3, 4, 2, 3, 3)
    ctx = torch.randn(3, 5, 6)
    uncond = torch.zeros(1, 5, 6)
    sampler = get_sampler(name)
    steps = 4 if name == "rcm" else 6  # the rcm sampler takes 1..4 steps
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # per-item noise (rcm re-noises)
    kw = dict(guidance=3.0, steps=steps, shift=3.0)
    both = sampler.sample(model, noise, ctx, uncond, generators=gens(0, 1, 2), **kw)
    again = sampler.sample(model, noise, ctx, uncond, generators=gens(0, 1, 2), **kw)
    assert torch.equal(both, again)  # deterministic
    for i in range(3):
        one = sampler.sample(model, noise[i:i + 1], ctx[i:i + 1], uncond, generators=gens(i), **kw)
        torch.testing.assert_close(one[0], both[i], atol=1e-6, rtol=1e-6)


def test_batch_randn_is_per_item_and_reproducible():
    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a = batch_randn((2, 3), gens(5, 6, 7))
    assert a.shape == (3, 2, 3) and a.dtype == torch.float32
    assert torch.equal(a[1:2], batch_randn((2, 3), gens(6)))  # item noise ignores the rest of the batch
    assert torch.equal(a, batch_randn((2, 3), gens(5, 6, 7)))
    assert not torch.equal(a[0], a[1])


def test_progress_bar_counts_steps(capsys):
    model = _linear_model(torch.eye(2) * 0.1, torch.zeros(1, 2, 1, 1, 1))
    FlowEulerSampler().sample(model, torch.randn(1, 2, 1, 2, 2), torch.zeros(1, 1, 1), steps=3, progress=True)
    assert "3/3" in capsys.readouterr().err


def test_registry_and_errors():
    assert {"euler", "unipc"} <= set(SAMPLERS)
    assert isinstance(get_sampler("unipc"), FlowUniPCSampler)
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        get_sampler("ddim")
    with pytest.raises(ValueError, match="steps"):
        flow_schedule(0, 5.0)
    with pytest.raises(ValueError, match="shift"):
        flow_schedule(4, -1.0)
    model = _linear_model(torch.eye(2), torch.zeros(1, 2, 1, 1, 1))
    noise = torch.randn(2, 2, 1, 2, 2)
    with pytest.raises(ValueError, match="context"):
        FlowEulerSampler().sample(model, noise, torch.zeros(3, 1, 1), steps=2)
    with pytest.raises(ValueError, match="uncond"):
        FlowEulerSampler().sample(model, noise, torch.zeros(2, 4, 8), torch.zeros(1, 3, 8), guidance=2.0, steps=2)
    with pytest.raises(ValueError, match="noise"):
        FlowEulerSampler().sample(model, noise[0], torch.zeros(2, 1, 1), steps=2)
