"""rCM loss pieces (turbo_train/methods/rcm_losses.py): TrigFlow coefficients and time maps, the JVP
tangent (vs central differences and vs a chain-rule torch.func.jvp formulation), sCM / DMD / fake-score
/ discrete-CM losses and their gradients, time samplers, student rollouts."""
import math

import pytest
import torch

from turbo_infer.models.wan import WanConfig, WanModel
from turbo_train.methods.rcm_losses import (
    FIXED_MID_TIMES,
    T_MIN,
    TrigFlow,
    cm_discrete_grid,
    cm_discrete_loss,
    ddim_step,
    dmd_loss,
    fake_score_loss,
    jvp_attention_context,
    rf_to_trig,
    rollout_times,
    sample_t_dmd,
    sample_t_scm,
    scm_loss,
    scm_tangent,
    student_rollout,
    tangent_warmup_ratio,
    trig_to_rf,
    trigflow_coefficients,
)

TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, in_channels=4, out_channels=4, freq_dim=32)
SHAPE = (2, 4, 2, 4, 4)  # (B, C, F, H, W)


def b(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    m = WanModel(WanConfig(**TINY)).eval()
    with torch.no_grad():  # the head starts at zero output: give it weights so v depends on the input
        m.head.head.weight.normal_(std=0.1)
    return m


class ExactVelocity:
    """A 'network' that returns the exact velocity ε - x0 of a known (x0, ε) pair, and records what
    it was called with."""

    def __init__(self, x0, eps):
        self.x0, self.eps, self.calls = x0, eps, []

    def __call__(self, x, timestep, context):
        self.calls.append((x.detach().clone(), timestep.detach().clone(), torch.is_grad_enabled()))
        return (self.eps - self.x0).float()


# ----------------------------------------------------------------------------- coefficients, time maps


def test_time_maps_roundtrip_and_spec_values():
    t = torch.tensor([T_MIN, 0.1, 0.7, 1.0, 1.4, 1.5, math.atan(80.0), math.pi / 2], dtype=torch.float64)
    s = trig_to_rf(t)
    torch.testing.assert_close(rf_to_trig(s), t, atol=1e-12, rtol=0)
    torch.testing.assert_close(rf_to_trig(torch.tensor([0.0, 1.0], dtype=torch.float64)),
                               torch.tensor([0.0, math.pi / 2], dtype=torch.float64))
    # RCM.md §6: the trig grid [atan 80, 1.5, 1.4, 1.0] in RF time (5 printed digits)
    grid = torch.tensor([math.atan(80.0), 1.5, 1.4, 1.0], dtype=torch.float64)
    expect = torch.tensor([0.98765, 0.93378, 0.85290, 0.60898], dtype=torch.float64)
    torch.testing.assert_close(trig_to_rf(grid), expect, atol=6e-6, rtol=0)
    # x_RF(s) = x_trig(t) / (cos t + sin t) for the same (x0, ε)
    x0, eps = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    for tv in (0.3, 1.1):
        tt = torch.tensor(tv, dtype=torch.float64)
        sv = trig_to_rf(tt)
        x_trig = torch.cos(tt) * x0 + torch.sin(tt) * eps
        torch.testing.assert_close(x_trig / (torch.cos(tt) + torch.sin(tt)), (1 - sv) * x0 + sv * eps)


def test_coefficients_recover_x0_and_F_from_exact_velocity():
    torch.manual_seed(0)
    x0, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    t = torch.tensor([1e-3, 1.2], dtype=torch.float64)
    x_t = b(torch.cos(t), x0) * x0 + b(torch.sin(t), x0) * eps
    net = ExactVelocity(x0, eps)
    wrapper = TrigFlow(net, dtype=torch.float64)
    x0_hat, F_hat = wrapper(x_t, t, torch.zeros(2, 3, 16))
    # exact velocity -> exact x0 and TrigFlow velocity cos t·ε - sin t·x0 (fp64: only the fp32 cast of v)
    torch.testing.assert_close(x0_hat, x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(F_hat, b(torch.cos(t), x0) * eps - b(torch.sin(t), x0) * x0, atol=1e-6, rtol=0)
    # ... and F_hat equals the spec's printed form (cos t·x_t - x0_hat)/sin t
    torch.testing.assert_close(F_hat, (b(torch.cos(t), x0) * x_t - x0_hat) / b(torch.sin(t), x0), atol=1e-6, rtol=0)
    # the network saw the RF state (1-s)·x0 + s·ε at timestep 1000·s (c_in, c_noise)
    s = trig_to_rf(t)
    x_in, timestep, _ = net.calls[0]
    torch.testing.assert_close(x_in, b(1 - s, x0) * x0 + b(s, x0) * eps)
    torch.testing.assert_close(timestep.double(), 1000 * s, atol=1e-4, rtol=0)
    assert timestep.dtype == torch.float32  # never bf16
    c_skip, c_out, c_in, c_noise = trigflow_coefficients(t)
    assert all(c.dtype == torch.float64 for c in (c_skip, c_out, c_in, c_noise))
    torch.testing.assert_close(c_out, -s)  # x0_hat = x_RF - s·v
    torch.testing.assert_close(c_noise, 1000 * s)


def test_guided_is_cfg_on_velocity_in_one_batched_call():
    m = tiny_model()
    w = TrigFlow(m)
    x_t, t = torch.randn(SHAPE), torch.tensor([0.4, 1.3], dtype=torch.float64)
    ctx, unc = torch.randn(2, 5, 16), torch.zeros(1, 5, 16)
    with torch.no_grad():
        x0_c, F_c = w(x_t, t, ctx)
        x0_u, F_u = w(x_t, t, unc.expand(2, -1, -1))
        x0_g, F_g = w.guided(x_t, t, ctx, unc, 5.0)
    torch.testing.assert_close(F_g, F_u + 5.0 * (F_c - F_u), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0_g, x0_u + 5.0 * (x0_c - x0_u), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- JVP tangent


def _jvp_setup():
    m = tiny_model(1)
    st = TrigFlow(m)
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(SHAPE, generator=g)
    t = torch.tensor([0.35, 1.2], dtype=torch.float64)
    ctx = torch.randn(2, 5, 16, generator=g)
    F_T = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return st, x_t, t, ctx, F_T


def test_jvp_tangent_matches_central_differences():
    st, x_t, t, ctx, F_T = _jvp_setup()
    F, J = scm_tangent(st, x_t, t, ctx, F_T)
    assert not F.requires_grad and not J.requires_grad and J.dtype == torch.float64
    cs = torch.cos(t) * torch.sin(t)
    tx, tt = b(cs, x_t) * F_T, cs
    h = 1e-3
    with torch.no_grad(), jvp_attention_context():
        fd = (st.F(x_t + h * tx, t + h * tt, ctx) - st.F(x_t - h * tx, t - h * tt, ctx)) / (2 * h)
    # fp32 network, h = 1e-3: central differences carry O(h²) truncation + ~1e-7/h rounding -> compare in norm
    rel = ((J - fd).norm() / fd.norm()).item()
    assert rel < 1e-2, rel


def test_jvp_tangent_matches_chain_rule_formulation():
    """Second formulation (the public rCM code's): JVP of the raw network in its own (x_RF, timestep)
    inputs, then the TrigFlow preconditioning differentiated by hand."""
    st, x_t, t, ctx, F_T = _jvp_setup()
    _, J = scm_tangent(st, x_t, t, ctx, F_T)
    cos, sin = torch.cos(t), torch.sin(t)
    cs = cos * sin
    dx, dt = b(cs, x_t) * F_T, cs  # tangents of (x_t, t)
    # x_RF = x_t/(cos+sin), timestep = 1000·sin/(cos+sin); d/dt of 1/(c+s) = -(c-s)/(c+s)², d/dt of s/(c+s) = 1/(c+s)²
    k = 1 / (cos + sin)
    x_rf = b(k, x_t) * x_t
    dx_rf = b(k, x_t) * dx - b((cos - sin) * k**2 * dt, x_t) * x_t
    ts = (1000 * sin * k).float()
    dts = (1000 * k**2 * dt).float()
    with torch.no_grad(), jvp_attention_context():
        v, dv = torch.func.jvp(lambda x, tt_: st.net(x, tt_, ctx), (x_rf.float(), ts), (dx_rf.float(), dts))
    # F = ((c - s)·x_t + v)/(c + s): product rule by hand
    v, dv = v.double(), dv.double()
    num = b(cos - sin, x_t) * x_t + v
    dnum = b(-(sin + cos) * dt, x_t) * x_t + b(cos - sin, x_t) * dx + dv
    J2 = dnum * b(k, x_t) - num * b((cos - sin) * k**2 * dt, x_t)
    # both are fp32-network JVPs of the same function: agree to fp32 rounding of the inputs
    torch.testing.assert_close(J, J2, atol=1e-4 * J2.abs().max().item(), rtol=1e-4)


# ----------------------------------------------------------------------------- sCM loss


def test_scm_loss_gradient_is_normalised_g_and_nan_samples_are_zeroed():
    torch.manual_seed(0)
    x_t = torch.randn(SHAPE, dtype=torch.float64)
    t = torch.tensor([0.5, 1.1], dtype=torch.float64)
    F_theta = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    F_T, J = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    r = 0.3
    loss, n_nan, g_norm = scm_loss(F_theta, F_T, J, x_t, t, r, scale=100.0)
    assert loss.shape == (2,) and n_nan.item() == 0
    cos, sin = b(torch.cos(t), x_t), b(torch.sin(t), x_t)
    g = -cos * torch.sqrt(1 - r**2 * sin**2) * (F_theta.detach() - F_T) - r * (cos * sin * x_t + J)
    torch.testing.assert_close(g_norm, g.flatten(1).norm(dim=1))
    g = g / (g.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1, 1) + 0.1)
    # at F_θ = F_sg the loss is scale·‖g‖² and its gradient on F_θ is -2·scale·g
    torch.testing.assert_close(loss, 100.0 * (g**2).flatten(1).sum(1))
    loss.sum().backward()
    torch.testing.assert_close(F_theta.grad, -200.0 * g)

    F_bad = F_theta.detach().clone()
    F_bad[1, 0, 0, 0, 0] = float("nan")
    F_bad.requires_grad_(True)
    loss, n_nan, _ = scm_loss(F_bad, F_T, J, x_t, t, r)
    assert n_nan.item() == 1 and torch.isfinite(loss).all() and loss[1].item() == 0.0
    loss.sum().backward()
    assert torch.isfinite(F_bad.grad).all() and F_bad.grad[1].abs().sum().item() == 0.0
    J_bad = J.clone()
    J_bad[0, 1, 1, 1, 1] = float("nan")
    assert scm_loss(F_theta, F_T, J_bad, x_t, t, r)[1].item() == 1


def test_tangent_warmup_ratio():
    assert tangent_warmup_ratio(0, 1000) == 0.0
    assert tangent_warmup_ratio(250, 1000) == 0.25
    assert tangent_warmup_ratio(5000, 1000) == 1.0
    assert tangent_warmup_ratio(0, 0) == 1.0  # 14B: no warmup


# ----------------------------------------------------------------------------- DMD, fake score, discrete CM


def test_dmd_loss_gradient_is_normalised_score_difference():
    torch.manual_seed(0)
    G = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    x0_fake, x0_real = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    loss = dmd_loss(G, x0_fake, x0_real)
    loss.sum().backward()
    wf = (G.detach() - x0_real).abs().flatten(1).mean(1).reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(G.grad, 2 * (x0_fake - x0_real) / wf)
    torch.testing.assert_close(loss, (((x0_fake - x0_real) / wf) ** 2).flatten(1).sum(1))
    G2 = G.detach().clone()
    G2[0, 0, 0, 0, 0] = float("nan")
    l2 = dmd_loss(G2, x0_fake, x0_real)
    assert l2[0].item() == 0.0 and torch.isfinite(l2).all()


def test_fake_score_loss_weights_by_inverse_sin_squared():
    G, x0f = torch.ones(SHAPE), torch.zeros(SHAPE, requires_grad=True)
    t_D = torch.tensor([math.pi / 2, math.pi / 6], dtype=torch.float64)
    loss = fake_score_loss(G, x0f, t_D)
    n = math.prod(SHAPE[1:])
    torch.testing.assert_close(loss, torch.tensor([n, 4.0 * n], dtype=torch.float64))
    loss.sum().backward()
    assert x0f.grad is not None


def test_discrete_cm_grid_ddim_step_and_loss():
    grid = cm_discrete_grid(48, 5.0)
    assert grid.shape == (49,) and grid.dtype == torch.float64
    assert grid[0].item() == pytest.approx(math.pi / 2) and grid[-1].item() == 0.0
    assert (grid[1:] < grid[:-1]).all()
    torch.testing.assert_close(trig_to_rf(grid[1:2]), torch.tensor([5 * (47 / 48) / (1 + 4 * 47 / 48)], dtype=torch.float64))
    # the exact TrigFlow velocity of a single (x0, ε) pair moves x_t exactly onto x_t'
    x0, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    t, tn = torch.full((2,), 1.2, dtype=torch.float64), torch.full((2,), 0.4, dtype=torch.float64)
    x_t = b(torch.cos(t), x0) * x0 + b(torch.sin(t), x0) * eps
    F = b(torch.cos(t), x0) * eps - b(torch.sin(t), x0) * x0
    torch.testing.assert_close(ddim_step(x_t, F, t, tn), b(torch.cos(tn), x0) * x0 + b(torch.sin(tn), x0) * eps)
    f = torch.zeros(SHAPE, dtype=torch.float64, requires_grad=True)
    loss = cm_discrete_loss(f, torch.ones(SHAPE), t, tn)
    torch.testing.assert_close(loss, torch.full((2,), math.prod(SHAPE[1:]) / 0.8, dtype=torch.float64))
    with pytest.raises(ValueError, match="cm_steps"):
        cm_discrete_grid(0)


# ----------------------------------------------------------------------------- time samplers, rollout


def test_time_samplers_ranges_and_distribution():
    g = torch.Generator().manual_seed(0)
    t = sample_t_scm(20000, 0.7, 1.6, generator=g)
    assert t.dtype == torch.float64 and (t >= T_MIN).all() and (t < math.pi / 2).all()
    # median of tan t is exp(P_mean); std of log tan t is P_std
    assert torch.tan(t).median().log().item() == pytest.approx(0.7, abs=0.05)
    assert torch.tan(t).log().std().item() == pytest.approx(1.6, abs=0.05)
    tD = sample_t_dmd(20000, 5.0, generator=g)
    assert (tD >= T_MIN).all() and (tD < math.pi / 2).all()
    # shift 5: median RF time is shift(0.5, 5) = 5/6
    assert trig_to_rf(tD).median().item() == pytest.approx(5 / 6, abs=0.01)


def test_rollout_times_random_decreasing_and_fixed():
    g = torch.Generator().manual_seed(0)
    times = rollout_times(4, 64, mode="random", generator=g)
    assert len(times) == 4 and all(x.shape == (64,) for x in times)
    assert (times[0] == math.pi / 2).all()
    for a, c in zip(times[:-1], times[1:]):
        assert (c <= a).all()
    fixed = rollout_times(4, 2, mode="fixed")
    assert [x[0].item() for x in fixed] == [math.pi / 2, *FIXED_MID_TIMES]
    with pytest.raises(ValueError, match="rollout mode"):
        rollout_times(2, 1, mode="linear")
    with pytest.raises(ValueError, match="n must be"):
        rollout_times(0, 1)


def test_student_rollout_reaches_the_oracle_x0_and_keeps_only_the_last_graph():
    torch.manual_seed(0)
    target = torch.randn(SHAPE)
    param = torch.zeros((), requires_grad=True)
    calls = []

    def oracle(x, timestep, context):  # v such that x0_hat = x_RF - s·v = target (+ param, to test the graph)
        calls.append(torch.is_grad_enabled())
        s = (timestep.double() / 1000).reshape(-1, 1, 1, 1, 1)
        return ((x.double() - target - param) / s).float()

    times = rollout_times(3, 2, mode="fixed")
    G = student_rollout(TrigFlow(oracle, dtype=torch.float32), torch.randn(SHAPE), torch.zeros(2, 3, 16), times)
    torch.testing.assert_close(G, target.double(), atol=1e-5, rtol=0)
    assert calls == [False, False, True]
    G.sum().backward()
    assert param.grad is not None
    calls.clear()
    G = student_rollout(TrigFlow(oracle, dtype=torch.float32), torch.randn(SHAPE), torch.zeros(2, 3, 16), times,
                        grad_last=False)
    assert calls == [False, False, False] and not G.requires_grad
