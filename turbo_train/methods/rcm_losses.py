"""rCM losses: TrigFlow preconditioning, the sCM consistency loss with its JVP tangent, the DMD score
regulariser, the fake-score loss, the discrete-time CM fallback, student rollouts, time samplers.

Follows rCM (Zheng et al., "Large Scale Diffusion Distillation via Score-Regularized Continuous-Time
Consistency", arXiv 2510.08431) as specified in shared/RCM.md; section numbers below (§n) refer to
that spec. Each piece is a small callable written with the paper's symbols; the Lightning module in
`turbo_train/methods/rcm.py` only strings them together.

Conventions: t is TrigFlow time in [0, π/2], a (B,) float64 tensor; states x_t = cos t·x0 + sin t·ε
(float32 or float64) of shape (B, C, F, H, W); the wrapped networks are Wan velocity models
`net(x_RF, 1000·s, context) -> v = ε - x0`. Coefficients and everything computed from them are
float64; network inputs are cast to the network's parameter dtype and outputs come back as float32.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from turbo_infer.samplers import shift_time

# Smallest TrigFlow time any sampler returns (EDM σ_min = 2e-4, as the public rCM code's EDMSDE):
# keeps 1/sin²t in the fake-score loss and the F = (cos t·x - x0)/sin t identity finite.
T_MIN = math.atan(2e-4)
HALF_PI = math.pi / 2


def _b(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1, 1) to broadcast a per-sample time against a state x."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------- time maps (§1)


def trig_to_rf(t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow time s = sin t / (sin t + cos t) of a TrigFlow time t (§1)."""
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def rf_to_trig(s: torch.Tensor) -> torch.Tensor:
    """TrigFlow time t = atan(s / (1 - s)) of a rectified-flow time s in [0, 1] (§1); s = 1 -> π/2."""
    return torch.atan2(s, 1 - s)


def edm_sigma_to_trig(sigma: torch.Tensor) -> torch.Tensor:
    """t = atan σ (§1: EDM σ = tan t)."""
    return torch.atan(sigma)


# ----------------------------------------------------------------------------- time samplers


def sample_t_scm(batch: int, P_mean: float, P_std: float, *, device=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """sCM training time (§2.1): tan t ~ LogNormal(P_mean, P_std); (B,) float64 in [T_MIN, π/2)."""
    n = torch.randn(batch, dtype=torch.float64, generator=generator).to(device)
    return torch.atan(torch.exp(P_mean + P_std * n)).clamp(min=T_MIN)


def sample_t_dmd(batch: int, shift: float, *, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """p_D (§3): RF time u ~ U[0, 1), s = shift(u, k), t = atan(s / (1 - s)); (B,) float64 in [T_MIN, π/2)."""
    u = torch.rand(batch, dtype=torch.float64, generator=generator).to(device)
    return rf_to_trig(shift_time(u, shift)).clamp(min=T_MIN)


# Fixed intermediate times of a rollout (§3 "or fixed"), the sampler's §6 grid after t = π/2.
FIXED_MID_TIMES = (1.5, 1.4, 1.0)


def rollout_times(n: int, batch: int, *, mode: str = "random", shift: float = 5.0, device=None,
                  generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """TrigFlow times of the n student calls of a rollout (§3), each (B,) float64.

    The first call is at pure noise t = π/2. mode "random": each next time is min(p_D draw, previous)
    (decreasing, as the public rCM code); mode "fixed": [π/2, 1.5, 1.4, 1.0][:n]."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"rollout steps n must be an int >= 1, got {n!r}")
    if mode not in ("random", "fixed"):
        raise ValueError(f"rollout mode must be 'random' or 'fixed', got {mode!r}")
    if mode == "fixed" and n > 1 + len(FIXED_MID_TIMES):
        raise ValueError(f"fixed rollouts have at most {1 + len(FIXED_MID_TIMES)} steps, got n={n}")
    times = [torch.full((batch,), HALF_PI, dtype=torch.float64, device=device)]
    for i in range(1, n):
        if mode == "fixed":
            times.append(torch.full((batch,), FIXED_MID_TIMES[i - 1], dtype=torch.float64, device=device))
        else:
            times.append(torch.minimum(sample_t_dmd(batch, shift, device=device, generator=generator), times[-1]))
    return times


# ----------------------------------------------------------------------------- preconditioning (§1)


def trigflow_coefficients(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) of a velocity network in TrigFlow time, in float64 (§1).

    c_in = 1/(cos t + sin t) maps the trig state to the RF state, c_noise = 1000·s is Wan's timestep,
    and x0_hat = c_skip·x_t + c_out·v = x_RF - s·v."""
    t = t.double()
    cos, sin = torch.cos(t), torch.sin(t)
    c_in = 1.0 / (cos + sin)
    c_noise = 1000.0 * sin / (cos + sin)
    c_skip = 1.0 / (cos + sin)
    c_out = -sin / (cos + sin)
    return c_skip, c_out, c_in, c_noise


class TrigFlow:
    """A Wan velocity network seen in TrigFlow time: x0_hat(x_t, t) and F_hat(x_t, t) (§1).

    net: `net(x (B, C, F, H, W), timestep (B,), context (B, L, D)) -> v`. The network input is cast to
    the network's parameter dtype (bf16 on GPU runs, fp32 under bf16-mixed autocast and on CPU); the
    timestep c_noise goes in as float32 (the model's sinusoid is fp32), never bf16.
    The velocity F_hat = (cos t·x_t - x0_hat)/sin t is evaluated in the algebraically equal form
    ((cos t - sin t)·x_t + v)/(cos t + sin t), which has no 1/sin t and so stays exact as t -> 0
    (deviation from the spec's printed form for numerics only; tests check the identity)."""

    def __init__(self, net: Callable, dtype: torch.dtype | None = None):
        self.net = net
        self.dtype = dtype

    def _dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        if isinstance(self.net, nn.Module):
            for p in self.net.parameters():
                return p.dtype
        return torch.float32

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The raw network output v at the RF state c_in·x_t and timestep c_noise (float32)."""
        _, _, c_in, c_noise = trigflow_coefficients(t)
        x_in = (_b(c_in, x_t) * x_t).to(self._dtype())
        return self.net(x_in, c_noise.float(), context.to(self._dtype())).float()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, F_hat), float64, x_t's shape."""
        return self.from_velocity(x_t, t, self.velocity(x_t, t, context))

    @staticmethod
    def from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x0_hat = c_skip·x_t + c_out·v and F_hat = ((cos t - sin t)·x_t + v)/(cos t + sin t)."""
        c_skip, c_out, _, _ = trigflow_coefficients(t)
        cos, sin = _b(torch.cos(t.double()), x_t), _b(torch.sin(t.double()), x_t)
        x0 = _b(c_skip, x_t) * x_t + _b(c_out, x_t) * v
        F = ((cos - sin) * x_t + v) / (cos + sin)
        return x0, F

    def x0(self, x_t, t, context) -> torch.Tensor:
        """Consistency function f(x_t, t) = cos t·x_t - sin t·F_hat = x0_hat (§1)."""
        return self(x_t, t, context)[0]

    def F(self, x_t, t, context) -> torch.Tensor:
        """TrigFlow velocity F_hat (target cos t·ε - sin t·x0)."""
        return self(x_t, t, context)[1]

    def guided(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor | None,
               w: float) -> tuple[torch.Tensor, torch.Tensor]:
        """CFG (§2.3): (x0, F) of v_u + w·(v_c - v_u), cond and uncond in ONE batched forward.

        x0 and F are affine in v with weights summing to 1, so guiding v guides both alike.
        uncond: (1 or B, L, D), or None / w == 1 for the conditional prediction only.
        (The public rCM code writes F_c + w·(F_c - F_u), i.e. standard CFG at w + 1; we follow the spec.)"""
        if uncond is None or w == 1.0:
            return self(x_t, t, context)
        B = x_t.shape[0]
        uncond = uncond.expand(B, -1, -1) if uncond.shape[0] == 1 else uncond
        v = self.velocity(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([context, uncond.to(context.dtype)]))
        v_c, v_u = v.chunk(2)  # (B, C, F, H, W) each
        return self.from_velocity(x_t, t, v_u + w * (v_c - v_u))


# ----------------------------------------------------------------------------- sCM term (§2)


@contextmanager
def jvp_attention_context():
    """SDPA's flash / memory-efficient kernels have no forward-mode AD; the math backend does (§5).
    The Wan model's cross-attention always calls F.scaled_dot_product_attention, so the JVP pass runs
    inside this context; a JVP-capable self-attention backend (Triton kernel) is unaffected."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def scm_tangent(student: TrigFlow, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                F_teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F_θ, J) with J = cos t·sin t·dF_θ/dt along the teacher's ODE (§2.4), both detached float64.

    Forward-mode JVP of the whole wrapped student (preconditioning included) at (x_t, t) with
    tangents (cos t·sin t·F_T, cos t·sin t), under no_grad."""
    cs = torch.cos(t.double()) * torch.sin(t.double())  # (B,)
    tx = (_b(cs, x_t) * F_teacher.double()).to(x_t.dtype).detach()
    tt = cs.to(t.dtype).detach()
    # forward-mode AD with dual tensors rather than torch.func.jvp: functorch's transform refuses the
    # in-place copies FSDP2 makes when it all-gathers a sharded student's parameters
    with torch.no_grad(), jvp_attention_context(), fwAD.dual_level():
        out = student.F(fwAD.make_dual(x_t.detach(), tx), fwAD.make_dual(t.detach(), tt), context)
        F, J = fwAD.unpack_dual(out)
    J = torch.zeros_like(F) if J is None else J
    return F.detach(), J.detach()


def tangent_warmup_ratio(step: int, warmup: int) -> float:
    """r = min(1, step / tangent_warmup) (§2.6); warmup 0 means no warmup (r = 1)."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


def scm_loss(F_theta: torch.Tensor, F_teacher: torch.Tensor, J: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             r: float, scale: float = 100.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_sCM per sample (§2.6-2.9), the number of samples zeroed for NaNs, and ‖g‖₂ per sample before
    normalisation (the consistency residual cos t·df/dt at r = 1; the loss value itself stays near
    scale·‖g‖²/(‖g‖ + 0.1)², i.e. ~scale while ‖g‖ >> 0.1).

    g = -cos t·√(1 - r²·sin²t)·(F_sg - F_T) - r·(cos t·sin t·x_t + J); samples whose g or F_θ holds a
    NaN are zeroed; g ← g / (‖g‖₂ + 0.1) per sample in float64; L = scale·Σ_{C,F,H,W}(F_θ - F_sg - g)²,
    whose gradient on F_θ is -2·scale·g. Returns ((B,) float64 loss, scalar int64 NaN count, (B,) ‖g‖₂)."""
    cos, sin = _b(torch.cos(t.double()), x_t), _b(torch.sin(t.double()), x_t)
    F_sg = F_theta.detach().double()
    # r multiplies the whole second term, J included: the spec prints "-(r·cos t·sin t·x_t + J)", but
    # sCM's tangent warmup (Lu & Song 2024, §4.3) and the public rCM code scale both parts by r
    g = -cos * torch.sqrt(1 - r**2 * sin**2) * (F_sg - F_teacher.double()) - r * (cos * sin * x_t.double() + J.double())
    # §2.7: zero the samples with a NaN anywhere in g or F_θ (counted)
    bad = torch.isnan(g).flatten(1).any(1) | torch.isnan(F_theta.detach()).flatten(1).any(1)  # (B,)
    keep = _b(~bad, g)
    g = torch.where(keep, g, 0.0)
    F_theta = torch.where(keep, F_theta.double(), 0.0)
    F_sg = torch.where(keep, F_sg, 0.0)
    # §2.8: per-sample normalisation (the code's ‖g‖₂, not the paper's ‖g‖²)
    g_norm = g.flatten(1).norm(dim=1)  # (B,)
    g = g / (g_norm.reshape(keep.shape) + 0.1)
    loss = scale * ((F_theta - F_sg - g) ** 2).flatten(1).sum(1)
    return loss, bad.sum(), g_norm


# ----------------------------------------------------------------------------- DMD regulariser (§3)


def dmd_loss(G: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """L_DMD per sample (§3): Σ (G - sg(G - (x0_fake - x0_real)/wf))², wf = mean|G - x0_real| ≥ 1e-5.

    G: the student's rollout output (with grad); x0_fake / x0_real: fake-score and CFG-teacher
    denoisings of the re-noised G (no grad). The gradient on G is 2·(x0_fake - x0_real)/wf, the DMD2
    distribution-matching direction. Samples with a NaN give 0. Returns (B,) float64."""
    Gd = G.double()
    with torch.no_grad():
        wf = (Gd - x0_real.double()).abs().flatten(1).mean(1).clamp(min=1e-5)  # (B,)
        grad = (x0_fake.double() - x0_real.double()) / _b(wf, Gd)
    loss = ((Gd - (Gd - grad).detach()) ** 2).flatten(1)
    bad = torch.isnan(loss).any(1)
    return torch.where(bad, 0.0, loss.sum(1))


def fake_score_loss(G: torch.Tensor, x0_fake: torch.Tensor, t_D: torch.Tensor) -> torch.Tensor:
    """L_fake per sample (§3): Σ (G - x0_fake(x_D, t_D))² / sin²t_D — denoising score matching on the
    student's samples G (no grad), conditional only. Returns (B,) float64."""
    err = ((G.detach().double() - x0_fake.double()) ** 2).flatten(1).sum(1)
    return err / torch.sin(t_D.double()) ** 2


# ----------------------------------------------------------------------------- discrete-time CM fallback (§2, end)


def cm_discrete_grid(steps: int = 48, shift: float = 5.0) -> torch.Tensor:
    """(steps + 1,) float64 TrigFlow times π/2 = t_0 > ... > t_steps = 0 of the shifted RF grid
    s_i = shift(1 - i/steps, k) (the teacher's Euler grid with Wan's timestep shift)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"cm_steps must be an int >= 1, got {steps!r}")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return rf_to_trig(shift_time(u, shift))


def ddim_step(x_t: torch.Tensor, F: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One first-order step of the TrigFlow ODE dx/dt = F: x' = cos(t - t')·x_t - sin(t - t')·F.
    Equals the teacher's Euler step in RF time (both are DDIM: x' = cos t'·x0_hat + sin t'·ε_hat)."""
    d = (t.double() - t_next.double())
    return _b(torch.cos(d), x_t) * x_t.double() - _b(torch.sin(d), x_t) * F.double()


def cm_discrete_loss(f_cur: torch.Tensor, f_target: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """Discrete-time consistency loss per sample: Σ (f_θ(x_t, t) - sg(f_θ(x_t', t')))² / (t - t').

    x_t' is one CFG-teacher Euler step from x_t on the grid; the target is the stop-gradient student
    (ECT-style θ⁻ = sg(θ)); at t' = 0 the parameterisation gives f = x exactly (c_skip = 1, c_out = 0).
    The 1/Δt weight (ECT) keeps the per-step gradient scale even across the non-uniform grid.
    Returns (B,) float64."""
    err = ((f_cur.double() - f_target.detach().double()) ** 2).flatten(1).sum(1)
    return err / (t.double() - t_next.double())


# ----------------------------------------------------------------------------- student rollout (§3)


def student_rollout(student: TrigFlow, noise: torch.Tensor, context: torch.Tensor, times: Sequence[torch.Tensor],
                    *, grad_last: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Few-step student sample G (§3): x = noise at times[0] = π/2; per call x0 = student x0_hat(x, t_i);
    re-noise x = cos t_{i+1}·x0 + sin t_{i+1}·ε_new; the last call's x0_hat is G (float64).

    Only the last call keeps its graph (grad_last=True); earlier calls run under no_grad."""
    x = noise.double() * _b(torch.sin(times[0].double()), noise)  # cos(π/2) = 0: pure noise
    for i, t in enumerate(times):
        last = i == len(times) - 1
        with torch.set_grad_enabled(grad_last and last and torch.is_grad_enabled()):
            x0 = student.x0(x, t, context)
        if last:
            return x0
        t_next = times[i + 1]
        eps = torch.randn(noise.shape, dtype=noise.dtype, device=noise.device, generator=generator)
        x = _b(torch.cos(t_next), x0) * x0.detach() + _b(torch.sin(t_next), x0) * eps.double()
    raise AssertionError("unreachable")
