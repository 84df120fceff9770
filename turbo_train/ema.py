"""Exponential moving averages of the weights, as pure functions.

EDM2 power EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
2024, Sec. 3.1 and App. C): after update k (k = 0, 1, ...) the averaged weights are
    ema <- beta(k)·ema + (1 - beta(k))·theta,   beta(k) = (1 - 1/(k+1))^(gamma+1),
which weights past iterates by a power function t^gamma of their step, so the averaging window is a
fixed fraction of the run whatever its length. The width is given as sigma_rel, the standard
deviation of that power profile relative to its length (Eq. 3):
    sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))
solved for gamma as the largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0
(EDM2's std_to_exp). sigma_rel 0.05 -> gamma 16.97, 0.1 -> 6.94. beta(0) = 0: the first update
copies theta.
The fixed-decay variant (DiT's update_ema) uses beta(k) = decay for every k.

Extra power EMAs of other widths (`ema.extra_sigma_rels`) run beside the main one on the same updates, so
that one training yields several averaging lengths to evaluate (EDM2 picks the length after training, from
the same observation that the best width depends on the run); each is exported as
ema_sr<sigma_rel>.safetensors next to ema.safetensors (`extra_ema_name`).
"""
from __future__ import annotations

import copy

import numpy as np
import torch


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2 power-EMA exponent gamma for a relative width sigma_rel in (0, sqrt(1/12))."""
    if not 0.0 < sigma_rel < (1.0 / 12.0) ** 0.5:
        raise ValueError(f"sigma_rel must be in (0, {(1 / 12) ** 0.5:.4f}), got {sigma_rel}")
    t = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots.real[np.abs(roots.imag) < 1e-9].max())


def power_ema_beta(k: int, gamma: float) -> float:
    """beta(k) = (1 - 1/(k+1))^(gamma+1) for update k = 0, 1, ... (k = 0 gives 0: copy)."""
    if k < 0:
        raise ValueError(f"EMA update index k must be >= 0, got {k}")
    return (1.0 - 1.0 / (k + 1)) ** (gamma + 1.0)


def fixed_ema_beta(k: int, decay: float) -> float:
    """beta(k) = decay for every update (the EMA starts as a copy of the initial weights)."""
    if k < 0:
        raise ValueError(f"EMA update index k must be >= 0, got {k}")
    return float(decay)


def ema_beta(k: int, kind: str, sigma_rel: float = 0.05, decay: float = 0.999) -> float:
    """beta of update k for an EMA of `kind` ('power' or 'fixed')."""
    if kind == "power":
        return power_ema_beta(k, sigma_rel_to_gamma(sigma_rel))
    if kind == "fixed":
        return fixed_ema_beta(k, decay)
    raise ValueError(f"EMA kind must be 'power' or 'fixed', got {kind!r}")


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    """ema <- beta·ema + (1 - beta)·model for every parameter; buffers are copied."""
    ema_p = list(ema_model.parameters())
    p = [x.detach().to(y.dtype) for x, y in zip(model.parameters(), ema_p)]
    if len(ema_p) != len(list(model.parameters())):
        raise ValueError("ema_model and model have different parameter lists")
    torch._foreach_lerp_(ema_p, p, 1.0 - beta)
    for eb, b in zip(ema_model.buffers(), model.buffers()):
        eb.copy_(b)


def step_ema(ema_model: torch.nn.Module, model: torch.nn.Module, ema_cfg, k: int,
             extras: torch.nn.ModuleList | None = None) -> None:
    """EMA update number k (0-based) after an optimizer step, for a recipe's `ema` section
    (kind 'power' with sigma_rel, or 'fixed' with decay): ema <- beta(k)·ema + (1-beta(k))·model; and the
    same update of each extra power EMA (`extra_copies`) with its own width from ema.extra_sigma_rels."""
    update_ema(ema_model, model, ema_beta(k, ema_cfg.kind, sigma_rel=ema_cfg.sigma_rel, decay=ema_cfg.decay))
    if extras is not None:
        for net, sigma_rel in zip(extras, ema_cfg.extra_sigma_rels, strict=True):
            update_ema(net, model, power_ema_beta(k, sigma_rel_to_gamma(sigma_rel)))


def frozen_copy(model: torch.nn.Module, ema_cfg) -> torch.nn.Module | None:
    """The EMA network for `model` under the recipe's ema section: a frozen fp32 deep copy in eval mode
    without activation checkpointing (meant as a submodule, so that it follows the device and lands
    in checkpoints), or None when ema.kind is "none"."""
    if ema_cfg.kind == "none":
        return None
    ema = copy.deepcopy(model).float().requires_grad_(False).eval()
    if hasattr(ema, "enable_activation_checkpointing"):
        ema.enable_activation_checkpointing(False)
    return ema


def extra_copies(model: torch.nn.Module, ema_cfg) -> torch.nn.ModuleList | None:
    """One frozen fp32 copy of `model` per `ema_cfg.extra_sigma_rels` (power EMAs beside the main one), as a
    ModuleList submodule (follows the device, lands in checkpoints); None when there are none (the recipe
    allows them with ema.kind power only)."""
    if not ema_cfg.extra_sigma_rels:
        return None
    return torch.nn.ModuleList(frozen_copy(model, ema_cfg) for _ in ema_cfg.extra_sigma_rels)


def extra_ema_name(sigma_rel: float) -> str:
    """File name of the extra EMA of width sigma_rel: ema_sr0.2.safetensors for 0.2."""
    return f"ema_sr{float(sigma_rel):g}.safetensors"
