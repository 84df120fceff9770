"""Rectified-flow samplers for the teacher: Euler and UniPC (bh2, order 2), with timestep shift and
classifier-free guidance.

Time convention (DESIGN.md "The model"): x_s = (1 - s)·x0 + s·ε for s in [0, 1]; the network is
called as `model(x, 1000·s, context)` and predicts the velocity v = ε - x0. Sampling integrates
dx/ds = v from s = 1 (noise) to s = 0 (data).

Schedule (diffusers' UniPCMultistepScheduler with use_flow_sigmas=True, as WanPipeline uses it):
u_i = linspace(1, 1/1000, steps + 1)[:-1], shifted by shift(u, k) = k·u / (1 + (k - 1)·u)
(k > 1 spends more steps at high noise; Wan's default k = 5), the first value nudged to 1 - 1e-6
(UniPC takes log(1 - s)), then a final 0. Stored as float32 like diffusers' sigmas.

Guidance: v = v_u + w·(v_c - v_u), both from ONE batched forward (cond and uncond stacked on the
batch axis); w = 1 or no unconditional context = one conditional forward.

UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), data-prediction form, B(h) = e^h - 1 ("bh2"), multistep order 2, written for
the flow path (α_s = 1 - s, σ_s = s, λ_s = log(α_s/σ_s)): the predictor UniP-2 extrapolates with
the previous x0-prediction, the corrector UniC refines each new state with the model output just
computed there (no extra forward), lower order at the first and last steps. It reproduces
diffusers' scheduler step by step (tests/infer/test_samplers.py).

To add a sampler (e.g. rCM's few-step one), subclass `FlowSampler` and add one entry to `SAMPLERS`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

# model(x (B, C, F, H, W), timestep (B,) = 1000·s, context (B, L, D)) -> v, x's shape
Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def shift_time(u, shift: float):
    """Timestep shift: k·u / (1 + (k - 1)·u); k = 1 is the identity, k > 1 moves u toward 1."""
    return shift * u / (1 + (shift - 1) * u)


def flow_schedule(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) float32 noise levels s_0 ≈ 1 > s_1 > ... > s_steps = 0 (see module docstring)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(shift, (int, float)) or not shift > 0 or not math.isfinite(shift):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    u = torch.linspace(1.0, 1.0 / 1000, steps + 1, dtype=torch.float64)[:-1]
    s = shift_time(u, float(shift))
    if abs(s[0].item() - 1.0) < 1e-6:
        s[0] -= 1e-6  # keep log(1 - s) finite at the first step, as diffusers does
    return torch.cat([s, s.new_zeros(1)]).float()


def guided_velocity(model: Model, x: torch.Tensor, s: float, context: torch.Tensor,
                    uncond: torch.Tensor | None, guidance: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """CFG velocity v_u + w·(v_c - v_u) at noise level s, in one batched forward; float32 result.

    x (B, C, F, H, W); context (B, L, D); uncond (B or 1, L, D) or None (conditional only);
    dtype: the network's input dtype (None = x's)."""
    B = x.shape[0]
    dtype = dtype or x.dtype
    use_cfg = uncond is not None and guidance != 1.0
    if use_cfg:
        uncond = uncond.expand(B, -1, -1) if uncond.shape[0] == 1 else uncond
        x_in = torch.cat([x, x])  # (2B, C, F, H, W): cond first, then uncond
        ctx = torch.cat([context, uncond.to(context.dtype)])  # (2B, L, D)
    else:
        x_in, ctx = x, context
    t = torch.full((x_in.shape[0],), 1000.0 * s, device=x.device, dtype=torch.float32)
    v = model(x_in.to(dtype), t, ctx.to(dtype)).float()
    if not use_cfg:
        return v
    v_c, v_u = v.chunk(2)
    return v_u + guidance * (v_c - v_u)


def batch_randn(shape, generators: list[torch.Generator], device=None) -> torch.Tensor:
    """(len(generators), *shape) float32 N(0, 1): item i drawn on the CPU from generators[i], then
    moved to `device` (same numbers on every device)."""
    out = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators])
    return out.to(device) if device is not None else out


class FlowSampler:
    """Base: integrate the rectified-flow ODE from `noise` (= x at s ≈ 1) to s = 0.

    `sample(model, noise, context, uncond=None, guidance=1.0, steps=50, shift=5.0, progress=False,
    dtype=None, generators=None) -> x0` (float32, noise's shape). guidance: CFG weight w (1 = no CFG);
    uncond: the unconditional context (None = no CFG); dtype: the network's input dtype (None =
    float32); generators: one CPU torch.Generator per batch item, for samplers that draw fresh noise
    during sampling (use `batch_randn`, so an item's result does not depend on its batch); the ODE
    samplers here are deterministic and ignore it.
    """

    name = ""

    def _check(self, noise, context, uncond, guidance):
        if not isinstance(noise, torch.Tensor) or noise.dim() != 5:
            raise ValueError(f"noise must be a (B, C, F, H, W) tensor, got "
                             f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
        if not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[0] != noise.shape[0]:
            raise ValueError(f"context must be a (B={noise.shape[0]}, L, D) tensor, got "
                             f"{tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__}")
        if uncond is not None and (uncond.dim() != 3 or uncond.shape[0] not in (1, noise.shape[0])
                                   or uncond.shape[1:] != context.shape[1:]):
            raise ValueError(f"uncond must have shape (1 or B, {context.shape[1]}, {context.shape[2]}), "
                             f"got {tuple(uncond.shape)}")
        if not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance!r}")

    def sample(self, model: Model, noise: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor | None = None,
               guidance: float = 1.0, steps: int = 50, shift: float = 5.0, progress: bool = False,
               dtype: torch.dtype | None = None, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        raise NotImplementedError


class FlowEulerSampler(FlowSampler):
    """First-order Euler on dx/ds = v: x_{i+1} = x_i + (s_{i+1} - s_i)·v(x_i, s_i)."""

    name = "euler"

    @torch.no_grad()
    def sample(self, model, noise, context, uncond=None, guidance=1.0, steps=50, shift=5.0, progress=False,
               dtype=None, generators=None):
        self._check(noise, context, uncond, guidance)
        sig = flow_schedule(steps, shift).tolist()
        x = noise.float()
        for i in tqdm(range(steps), desc=self.name, disable=not progress):
            v = guided_velocity(model, x, sig[i], context, uncond, guidance, dtype)
            x = x + (sig[i + 1] - sig[i]) * v
        return x


def _lam(s: float) -> float:
    """Half log-SNR of the flow path: λ = log(α/σ) = log((1 - s)/s); +inf at s = 0."""
    return math.inf if s == 0.0 else math.log(1.0 - s) - math.log(s)


class FlowUniPCSampler(FlowSampler):
    """UniPC, bh2, multistep order 2, x0 (data) prediction, on the flow path (see module docstring).

    Notation per step from s0 = s_i to t = s_{i+1}: h = λ_t - λ_s0, α = 1 - s, σ = s, m = x0-prediction
    x - s·v. Base update x_t = (σ_t/σ_s0)·x - α_t·(e^{-h} - 1)·m_s0, plus the UniPC residuals below.
    """

    name = "unipc"
    order = 2

    @torch.no_grad()
    def sample(self, model, noise, context, uncond=None, guidance=1.0, steps=50, shift=5.0, progress=False,
               dtype=None, generators=None):
        self._check(noise, context, uncond, guidance)
        sig = flow_schedule(steps, shift).tolist()
        x = noise.float()
        ms: list[torch.Tensor] = []  # x0-predictions at s_0 .. s_i (the last two are used)
        x_prev = None
        prev_order = 0
        for i in tqdm(range(steps), desc=self.name, disable=not progress):
            v = guided_velocity(model, x, sig[i], context, uncond, guidance, dtype)
            m = x - sig[i] * v  # x0-prediction at the uncorrected state
            if i > 0:
                # UniC: correct the state reached by the last predictor with the new model output m
                x = self._corrector(x_prev, ms, m, sig, i, prev_order)
            ms = (ms + [m])[-self.order:]
            order = min(self.order, steps - i, i + 1)  # warm-up at the start, lower order at the end
            x_prev = x
            x = self._predictor(x, ms, sig, i, order)
            prev_order = order
        return x

    @staticmethod
    def _coeffs(s0: float, t: float):
        h = _lam(t) - _lam(s0)
        hh = -h
        h_phi_1 = math.expm1(hh)  # e^{-h} - 1
        B_h = h_phi_1  # bh2: B(h) = e^h - 1 in data-prediction form
        return h, hh, h_phi_1, B_h

    @staticmethod
    def _predictor(x, ms, sig, i, order):
        """UniP-p from s_i to s_{i+1}: p = 1 is DPM-Solver-1; p = 2 adds ½·B(h)·D1 with
        D1 = (m_{i-1} - m_i) / r, r = (λ_{i-1} - λ_i)/h."""
        s0, t = sig[i], sig[i + 1]
        h, _, h_phi_1, B_h = FlowUniPCSampler._coeffs(s0, t)
        alpha_t, sigma_t = 1.0 - t, t
        m0 = ms[-1]
        x_t = (sigma_t / s0) * x - (alpha_t * h_phi_1) * m0
        if order == 2:
            r = (_lam(sig[i - 1]) - _lam(s0)) / h
            D1 = (ms[-2] - m0) / r
            x_t = x_t - (alpha_t * B_h * 0.5) * D1
        return x_t

    @staticmethod
    def _corrector(x_prev, ms, m_t, sig, i, order):
        """UniC-p for the step s_{i-1} -> s_i, using m_t = x0-prediction at s_i. Weights ρ solve
        R·ρ = b with R_kj = r_j^k, b_k = k!·φ_{k+1}(h)/B(h) (order 1: ρ = ½)."""
        s0, t = sig[i - 1], sig[i]
        h, hh, h_phi_1, B_h = FlowUniPCSampler._coeffs(s0, t)
        alpha_t, sigma_t = 1.0 - t, t
        m0 = ms[-1]
        x_t = (sigma_t / s0) * x_prev - (alpha_t * h_phi_1) * m0
        D1_t = m_t - m0
        if order == 1:
            return x_t - (alpha_t * B_h * 0.5) * D1_t
        # order 2: one previous point r1 and the new point r = 1
        r1 = (_lam(sig[i - 2]) - _lam(s0)) / h
        D1 = (ms[-2] - m0) / r1
        h_phi_k = h_phi_1 / hh - 1.0
        b1 = h_phi_k / B_h
        h_phi_k = h_phi_k / hh - 0.5
        b2 = 2.0 * h_phi_k / B_h
        # solve [[1, 1], [r1, 1]]·[ρ0, ρ1] = [b1, b2]
        rho0 = (b1 - b2) / (1.0 - r1)
        rho1 = b1 - rho0
        return x_t - (alpha_t * B_h) * (rho0 * D1 + rho1 * D1_t)


class RCMSampler(FlowSampler):
    """rCM few-step sampler (Zheng et al. 2025, arXiv 2510.08431; shared/RCM.md §6) for distilled students.

    TrigFlow times [atan(σ_max), 1.5, 1.4, 1.0] truncated to `steps` (1-4), then 0, used as RF times
    s = sin t/(sin t + cos t): 4 steps s = 0.98765, 0.93378, 0.85290, 0.60898, 0 (σ_max = 80, 480p).
    Float64 state, network in `dtype`: x = s_0·z; per step v = net(x, 1000·s_cur), x0 = x - s_cur·v,
    x = (1 - s_next)·x0 + s_next·z_new with fresh noise z_new (from `generators`, one CPU generator per
    item, so a result depends only on its seed; None = the global RNG). The last step returns x0.
    Conditional only: the student has the teacher's CFG distilled in, so `uncond` and `guidance` are
    ignored (one forward per step), and so is `shift` (the grid is fixed; `RCMSampler(mid_times=...)` sets
    another, e.g. `shifted_mid_times(3.0)` for a world sampled with timestep shift 3).
    """

    name = "rcm"
    sigma_max = 80.0  # 480p; Wan at 720p uses 120
    mid_times = (1.5, 1.4, 1.0)  # TrigFlow times after atan(sigma_max)

    def __init__(self, mid_times=None):
        """mid_times: the TrigFlow times after atan(sigma_max) (None = the spec's (1.5, 1.4, 1.0), Wan's grid),
        strictly decreasing in (0, atan(sigma_max)); e.g. a world sampled with another timestep shift may
        want its own (`shifted_mid_times`)."""
        if mid_times is not None:
            self.mid_times = check_mid_times(mid_times, self.sigma_max)

    @classmethod
    def timesteps(cls, steps: int, sigma_max: float | None = None, mid_times=None) -> torch.Tensor:
        """(steps + 1,) float64 RF times s_0 > ... > s_steps = 0 (mid_times None = the class's)."""
        mid = cls.mid_times if mid_times is None else tuple(mid_times)
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1 + len(mid):
            raise ValueError(f"steps must be an int in 1..{1 + len(mid)} for the rcm sampler, got {steps!r}")
        t = torch.tensor([math.atan(sigma_max or cls.sigma_max), *mid][:steps] + [0.0], dtype=torch.float64)
        return torch.sin(t) / (torch.sin(t) + torch.cos(t))

    @torch.no_grad()
    def sample(self, model, noise, context, uncond=None, guidance=1.0, steps=4, shift=5.0, progress=False,
               dtype=None, generators=None):
        self._check(noise, context, uncond, guidance)
        if generators is not None and len(generators) != noise.shape[0]:
            raise ValueError(f"generators: need one per batch item ({noise.shape[0]}), got {len(generators)}")
        sig = self.timesteps(steps, mid_times=self.mid_times).tolist()
        dtype = dtype or torch.float32
        x = sig[0] * noise.double()  # (B, C, F, H, W)
        for i in tqdm(range(steps), desc=self.name, disable=not progress):
            t = torch.full((x.shape[0],), 1000.0 * sig[i], device=x.device, dtype=torch.float32)
            v = model(x.to(dtype), t, context.to(dtype)).double()
            x0 = x - sig[i] * v  # the student's clean estimate at s_i
            if sig[i + 1] == 0.0:
                return x0.float()
            if generators is not None:
                z = batch_randn(noise.shape[1:], generators, noise.device).double()
            else:
                z = torch.randn(noise.shape, device=noise.device, dtype=torch.float64)
            x = (1.0 - sig[i + 1]) * x0 + sig[i + 1] * z  # re-noise to s_{i+1} with fresh noise
        raise AssertionError("unreachable: the last time is 0")


def check_mid_times(mid_times, sigma_max: float = RCMSampler.sigma_max) -> tuple[float, ...]:
    """The rCM sampler's intermediate TrigFlow times as a tuple, or ValueError: at least one, strictly
    decreasing, each in (0, atan(sigma_max))."""
    try:
        mid = tuple(float(t) for t in mid_times)
    except (TypeError, ValueError):
        raise ValueError(f"mid_times must be numbers, got {mid_times!r}") from None
    top = math.atan(sigma_max)
    if not mid or any(not 0.0 < t < top for t in mid) or any(a <= b for a, b in zip(mid, mid[1:])):
        raise ValueError(f"mid_times must be strictly decreasing TrigFlow times in (0, {top:.4f}), got {mid_times!r}")
    return mid


def shifted_mid_times(shift: float, mid_times=RCMSampler.mid_times, from_shift: float = 5.0) -> tuple[float, ...]:
    """The rCM mid times moved from one timestep shift's grid to another's: each TrigFlow time -> its RF
    time s -> the unshifted u of `from_shift` (s = f·u / (1 + (f - 1)·u)) -> s' under `shift` -> TrigFlow
    time. The spec's (1.5, 1.4, 1.0) are Wan's (shift 5); the toy world samples with shift 3:
    shifted_mid_times(3.0) = (1.454, 1.291, 0.751), i.e. RF times 0.895, 0.777, 0.483 instead of 0.934,
    0.853, 0.609."""
    if not shift > 0 or not from_shift > 0:
        raise ValueError(f"shifts must be > 0, got {shift!r} and {from_shift!r}")
    out = []
    for t in mid_times:
        s = math.sin(t) / (math.sin(t) + math.cos(t))
        u = s / (from_shift - (from_shift - 1.0) * s)
        s2 = shift * u / (1.0 + (shift - 1.0) * u)
        out.append(math.atan2(s2, 1.0 - s2))
    return tuple(out)


def mid_times_from_timesteps(timesteps) -> tuple[float, ...]:
    """The rcm mid times of an RF-time grid s_0 > s_1 > ... > s_n = 0 (a bundle manifest's `sampler.timesteps`):
    s_1 .. s_{n-1} as TrigFlow times atan(s / (1 - s)); () for one step. ValueError if the grid is not strictly
    decreasing in (0, 1) ending at 0 or its first time is not the sampler's atan(sigma_max)."""
    ts = [float(t) for t in timesteps]
    if len(ts) < 2 or ts[-1] != 0.0 or any(not 0.0 < t < 1.0 for t in ts[:-1]) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"must be strictly decreasing RF times in (0, 1) ending at 0, got {timesteps!r}")
    if abs(ts[0] - float(RCMSampler.timesteps(1)[0])) > 1e-9:
        raise ValueError(f"the rcm grid starts at {float(RCMSampler.timesteps(1)[0]):.6f} (sigma_max "
                         f"{RCMSampler.sigma_max:g}), got {ts[0]!r}")
    return check_mid_times([math.atan2(t, 1.0 - t) for t in ts[1:-1]]) if len(ts) > 2 else ()


def parse_mid_times(text: str) -> tuple[float, ...]:
    """`--rcm-mid-times`: "T1,T2,..." (TrigFlow times) or "shift=S" (`shifted_mid_times(S)`: the spec's grid moved
    to timestep shift S); ValueError naming the problem."""
    text = text.strip()
    if text.startswith("shift="):
        try:
            shift = float(text.removeprefix("shift="))
        except ValueError:
            raise ValueError(f"rcm mid times {text!r}: shift=S needs a number") from None
        return check_mid_times(shifted_mid_times(shift))
    try:
        return check_mid_times([float(t) for t in text.split(",")])
    except ValueError as e:
        raise ValueError(f"rcm mid times {text!r}: {e}") from None


def mid_times_arg(text: str) -> tuple[float, ...]:
    """argparse `type` of the CLIs' --rcm-mid-times (turbo-infer, turbo-eval, turbo-export): `parse_mid_times`,
    its message as the CLI's error."""
    import argparse

    try:
        return parse_mid_times(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# Registry: the CLI's --sampler choices. One entry per sampler class.
SAMPLERS: dict[str, type[FlowSampler]] = {
    FlowEulerSampler.name: FlowEulerSampler,
    FlowUniPCSampler.name: FlowUniPCSampler,
    RCMSampler.name: RCMSampler,
}


def get_sampler(name: str, **options) -> FlowSampler:
    """Instantiate the sampler registered under `name` with its options (rcm: mid_times)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    try:
        return SAMPLERS[name](**options)
    except TypeError:
        raise ValueError(f"sampler {name!r} takes no options {sorted(options)}") from None
