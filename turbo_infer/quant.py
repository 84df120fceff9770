"""W8A8 linear layers and the module swap that installs them (DESIGN.md "W8A8 linear").

`W8A8Linear` holds an nn.Linear's weight quantized per output channel (int8 or fp8 e4m3) and
quantizes its input per token (dynamic) or with a static per-tensor scale from calibration.
On a GPU that supports the format (turbo_kernels.capability) it runs the Triton/cuBLAS kernels;
elsewhere it runs the same arithmetic as a dequantized matmul in torch (the CPU fallback).
An input may also arrive already quantized (`QuantizedActivation`, e.g. from the fused
norm + modulation + quantization kernel), which skips the activation-quantization pass.

`quantize_model(model, plan, act_scales, smooth=...)` swaps nn.Linear modules by qualified name
following a mixed-precision plan {name: "int8" | "fp8" | "bf16"}; layers named in `exclude` (SLA's
proj_l, the patch embedding, the head) always stay in floating point.

Outlier input channels (a few channels 10–100× the rest) inflate a per-token int8 scale for the
whole row. SmoothQuant (Xiao et al., ICML 2023) moves that range into the weight: with per-channel
factors s_j = amax(|X_j|)^α / amax(|W_:,j|)^(1−α), y = (x/s)(W·s)ᵀ; `smoothquant_factors` computes
s from calibration statistics and `W8A8Linear.from_linear(..., smooth=s)` applies it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from turbo_kernels.capability import kernel_support
from turbo_kernels.gemm.quantize import MODES, QDTYPE, quantize_weight
from turbo_infer.layers.compile_ops import (norm_quant, quantize_activation, w8a8_gelu_ffn, w8a8_gelu_ffn_q, w8a8_linear,
                                             w8a8_product)

PRECISIONS = ("int8", "fp8", "bf16")
DEFAULT_EXCLUDE = ("proj_l", "patch_embedding", "head")


@dataclass
class QuantizedActivation:
    """A pre-quantized input: data (M, K) int8/fp8, scale (M,) fp32, and the shape to restore (..., K)."""

    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.bfloat16  # output dtype of the consuming linear


class W8A8Linear(nn.Module):
    """y = x Wᵀ + b with W int8/fp8 per output channel and x quantized per token (or static)."""

    def __init__(self, in_features: int, out_features: int, *, mode: str = "int8", bias: bool = True,
                 act_scale: float | None = None, smooth: bool = False, device=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.act_scale = act_scale
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=QDTYPE[mode], device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None)
        # SmoothQuant: inputs are multiplied by smooth_inv = 1/s before quantization (None: off)
        self.register_buffer("smooth_inv", torch.ones(in_features, dtype=torch.float32, device=device)
                             if smooth else None)

    @property
    def act_scale(self) -> float | None:
        """The static per-tensor activation scale (None: dynamic per-token scales)."""
        return self._act_scale

    @act_scale.setter
    def act_scale(self, value: float | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"act_scale must be None (dynamic per token) or a finite float > 0, got {value!r}")
        self._act_scale = None if value is None else float(value)
        # what the kernels' ops take: a 0-d fp32 CPU tensor (turbo_infer.layers.compile_ops: one compiled
        # graph serves blocks with different scales); a plain attribute, so .to(device) leaves it on the CPU
        self.static_scale = (None if value is None else  # on the CPU even under a `with torch.device(...)`
                             torch.tensor(self._act_scale, dtype=torch.float32, device="cpu"))

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "int8", act_scale: float | None = None,
                    smooth: torch.Tensor | None = None) -> "W8A8Linear":
        """Quantize a float nn.Linear (weight per output channel; bias kept in fp32).

        act_scale: None (dynamic per-token scales) or a static per-tensor scale (> 0), calibrated on
        the inputs as this layer sees them (divided by `smooth` when given).
        smooth: optional (in_features,) positive SmoothQuant factors s (see smoothquant_factors).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if smooth is not None:
            if not isinstance(smooth, torch.Tensor) or smooth.shape != (linear.in_features,):
                raise ValueError(f"smooth must be a tensor of shape ({linear.in_features},)")
            if not bool((smooth > 0).all()) or not bool(torch.isfinite(smooth).all()):
                raise ValueError("smooth factors must be finite and > 0")
            weight = weight.float() * smooth.float().to(weight.device)[None, :]  # W·s
        m = cls(linear.in_features, linear.out_features, mode=mode, bias=linear.bias is not None,
                act_scale=act_scale, smooth=smooth is not None, device=linear.weight.device)
        if smooth is not None:
            m.smooth_inv.copy_(1.0 / smooth.float())
        w_q, w_s = quantize_weight(weight, mode)
        m.weight_q.copy_(w_q)
        m.weight_scale.copy_(w_s)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, in the original input space: (W_q·s_w) / s."""
        w = self.weight_q.float() * self.weight_scale[:, None]
        return w if self.smooth_inv is None else w * self.smooth_inv[None, :]

    def _use_kernels(self, t: torch.Tensor) -> bool:
        if not t.is_cuda:
            return False
        cap = kernel_support(t.device)
        return cap.fp8_gemm if self.mode == "fp8" else cap.int8_gemm

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input last dim {x.shape[-1]} != in_features {self.in_features}")

    def quantize_input(self, x: torch.Tensor) -> QuantizedActivation:
        """Quantize x (..., K) per token (or with the static scale)."""
        self._check_input(x)
        q, s = quantize_activation(x, self.mode, self.static_scale, self.smooth_inv, self._use_kernels(x))
        return QuantizedActivation(q, s, tuple(x.shape), x.dtype)

    def forward(self, x: "torch.Tensor | QuantizedActivation") -> torch.Tensor:
        """x: (..., in_features) float, or a QuantizedActivation → (..., out_features) in x's dtype."""
        if isinstance(x, torch.Tensor):  # quantize + GEMM as one opaque op for torch.compile
            self._check_input(x)
            return w8a8_linear(x, self.weight_q, self.weight_scale, self.bias, self.smooth_inv, self.static_scale,
                               self.mode, self._use_kernels(x))
        if x.data.dtype != self.weight_q.dtype:
            raise TypeError(f"activation dtype {x.data.dtype} does not match this layer's mode {self.mode!r}")
        y = w8a8_product(x.data, x.scale, self.weight_q, self.weight_scale, self.bias, x.dtype,
                         self._use_kernels(x.data))
        return y.view(*x.shape[:-1], self.out_features)

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """residual + gate·self(x) for x (B, L, in_features), residual (B, L, out_features), gate (B,
        out_features) fp32 or None: one op, the sum in fp32 in the GEMM's epilogue, rounded once to the
        residual's dtype (`gated_residual` calls it in inference)."""
        self._check_input(x)
        _check_residual_shape(residual, tuple(x.shape), self.out_features)
        return w8a8_linear(x, self.weight_q, self.weight_scale, self.bias, self.smooth_inv, self.static_scale,
                           self.mode, self._use_kernels(x), residual, gate)

    def extra_repr(self) -> str:
        act = "dynamic per-token" if self.act_scale is None else f"static {self.act_scale:g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"bias={self.bias is not None}, act={act}, smooth={self.smooth_inv is not None}")


class W8A8GeluFFN(nn.Sequential):
    """The DiT's feed-forward block Sequential(W8A8Linear, GELU(tanh), W8A8Linear) run as one op: GELU in
    the up GEMM's epilogue and, when the down layer has a static activation scale and no smoothing, its
    input quantized there too (`turbo::w8a8_gelu_ffn`). Same children, so the same state-dict keys as
    the plain Sequential; where the two layers would not both take the kernels (or both the CPU
    fallback) it runs them one after the other as the Sequential does."""

    def __init__(self, up: W8A8Linear, act: nn.GELU, down: W8A8Linear):
        if not (isinstance(up, W8A8Linear) and isinstance(down, W8A8Linear)):
            raise TypeError("W8A8GeluFFN needs W8A8Linear up and down layers")
        if not (isinstance(act, nn.GELU) and act.approximate == "tanh"):
            raise TypeError(f"W8A8GeluFFN fuses GELU(approximate='tanh') only, got {act!r}")
        if up.out_features != down.in_features:
            raise ValueError(f"up.out_features {up.out_features} != down.in_features {down.in_features}")
        super().__init__(up, act, down)

    def forward(self, x: "torch.Tensor | QuantizedActivation") -> torch.Tensor:
        """x: (..., dim) float, or the up layer's input already quantized (`norm_quantized_input`)."""
        return self._run(x, None, None)

    def forward_residual(self, x: "torch.Tensor | QuantizedActivation", residual: torch.Tensor,
                         gate: torch.Tensor | None) -> torch.Tensor:
        """residual + gate·self(x) (see W8A8Linear.forward_residual), the sum in the down GEMM's epilogue. A fused
        op like W8A8Linear.forward_residual: hooks on up / down do not run (`wan.gated_residual` checks for them)."""
        _check_residual_shape(residual, x.shape if isinstance(x, QuantizedActivation) else tuple(x.shape),
                              self[2].out_features)
        return self._run(x, residual, gate)

    def _run(self, x, residual, gate):
        up, down = self[0], self[2]
        if residual is None and has_data_hooks(self):  # probes on up / down see their inputs: the plain Sequential
            return down(self[1](up(x)))
        if isinstance(x, QuantizedActivation):
            if x.data.dtype != up.weight_q.dtype:
                raise TypeError(f"activation dtype {x.data.dtype} does not match the up layer's mode {up.mode!r}")
            y = w8a8_gelu_ffn_q(x.data, x.scale, up.weight_q, up.weight_scale, up.bias, down.weight_q,
                                down.weight_scale, down.bias, down.smooth_inv, down.static_scale, down.mode, x.dtype,
                                up._use_kernels(x.data), residual, gate)
            return y.view(*x.shape[:-1], down.out_features)
        up._check_input(x)
        use = up._use_kernels(x)
        if use != down._use_kernels(x):  # one after the other, as the Sequential
            h = self[1](up(x))
            return down(h) if residual is None else down.forward_residual(h, residual, gate)
        return w8a8_gelu_ffn(x, up.weight_q, up.weight_scale, up.bias, up.smooth_inv, up.static_scale, up.mode,
                             down.weight_q, down.weight_scale, down.bias, down.smooth_inv, down.static_scale, down.mode,
                             use, residual, gate)


def _check_residual_shape(residual: torch.Tensor, x_shape: tuple, out_features: int) -> None:
    """A forward_residual's residual must be shaped like the layer's output for an input of x_shape."""
    want = (*x_shape[:-1], out_features)
    if residual.shape != want:
        raise ValueError(f"residual shape {tuple(residual.shape)} != {want}")


def has_data_hooks(module: nn.Module) -> bool:
    """Whether forward (pre-)hooks that read tensors are registered on the module or any module inside it
    (calibration's probes; a W8A8GeluFFN's up or down layer): the fused paths that skip those modules' forwards
    must not run then. Hooks with a true `profiler_scope` attribute (tools/e2e_breakdown.py: they only open and
    close a profiler range) do not count, so a profiled run takes the path a timed one does."""
    for m in module.modules():
        hooks = [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
        if any(not getattr(h, "profiler_scope", False) for h in hooks):
            return True
    return False


def norm_quantized_input(x: torch.Tensor, norm: nn.LayerNorm, shift: torch.Tensor, scale: torch.Tensor,
                         consumers: list) -> "QuantizedActivation | None":
    """LayerNorm(x)·(1 + scale) + shift, quantized in one pass for W8A8 consumers that would each quantize
    it the same way (q, k and v of a self-attention; a W8A8GeluFFN): all W8A8 with one mode, all static or
    all dynamic (static ones with the first's scale), no smoothing, all on the kernels or all on the CPU
    fallback, and no hooks on them (hooks expect the tensor; calibration's probes are such).
    x (B, L, C); shift, scale (B, C) fp32 or None (no modulation). None where that does not hold (the
    caller normalizes as usual)."""
    if any(has_data_hooks(c) for c in consumers):
        return None
    layers = [c[0] if isinstance(c, W8A8GeluFFN) else c for c in consumers]
    if not layers or not all(isinstance(m, W8A8Linear) and m.smooth_inv is None for m in layers):
        return None
    first = layers[0]
    # all static or all dynamic; static ones are quantized with the first's scale: consumers of one tensor
    # were calibrated on the same values. The scales are not compared by value: that would make each
    # block's scales constants of the compiled graph (a recompile per block)
    if any((m.mode, m.static_scale is None, m.in_features) != (first.mode, first.static_scale is None,
                                                                first.in_features) for m in layers):
        return None
    use = first._use_kernels(x)
    downs = [c[2] for c in consumers if isinstance(c, W8A8GeluFFN)]  # the fused FFN op runs both on `use`
    if any(m._use_kernels(x) != use for m in layers + downs) or x.shape[-1] != first.in_features:
        return None
    if not isinstance(norm, nn.LayerNorm) or norm.normalized_shape != (x.shape[-1],):
        return None
    q, s = norm_quant(x, norm.weight, norm.bias, norm.eps, shift, scale, first.mode, first.static_scale, use)
    return QuantizedActivation(q, s, tuple(x.shape), x.dtype)


def fuse_gelu_ffns(model: nn.Module) -> list[str]:
    """Replace, in place, every Sequential(W8A8Linear, GELU(tanh), W8A8Linear) by a W8A8GeluFFN over the
    same modules; returns their names."""
    fused = []
    for name, m in list(model.named_modules()):
        if (type(m) is nn.Sequential and len(m) == 3 and isinstance(m[0], W8A8Linear)
                and isinstance(m[1], nn.GELU) and m[1].approximate == "tanh" and isinstance(m[2], W8A8Linear)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, W8A8GeluFFN(*m))
            fused.append(name)
    return fused


def smoothquant_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5,
                        min_factor: float = 1e-5) -> torch.Tensor:
    """SmoothQuant per-input-channel factors s_j = amax|X_j|^α / amax|W_:,j|^(1−α).

    act_amax: (K,) calibration amax of each input channel; weight: (N, K); alpha in [0, 1] (0.5
    balances the two ranges). Channels with no signal get factor 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if act_amax.dim() != 1 or weight.dim() != 2 or act_amax.shape[0] != weight.shape[1]:
        raise ValueError(f"act_amax (K,) and weight (N, K) must agree, got {tuple(act_amax.shape)} and "
                         f"{tuple(weight.shape)}")
    a = act_amax.float().clamp_min(0)
    w = weight.detach().float().abs().amax(dim=0)
    s = a.pow(alpha) / w.clamp_min(min_factor).pow(1.0 - alpha)
    return torch.where((a > 0) & (w > 0), s.clamp_min(min_factor), torch.ones_like(s))


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(e in parts for e in exclude)


def quantizable_linears(model: nn.Module, exclude: Iterable[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Qualified names of the nn.Linear modules that quantize_model may swap."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _excluded(n, exclude)]


def quantize_model(model: nn.Module, plan: dict[str, str], act_scales: dict[str, float] | None = None, *,
                   smooth: dict[str, torch.Tensor] | None = None, exclude: Iterable[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Swap nn.Linear modules named in `plan` for W8A8Linear, in place.

    plan: {qualified module name: "int8" | "fp8" | "bf16"}; "bf16" leaves the layer as it is.
    act_scales: {name: static per-tensor activation scale} from calibration; absent = dynamic
    per-token scales. smooth: {name: (in_features,) SmoothQuant factors}. Names whose dotted path
    contains an `exclude` entry are never quantized (a warning says so). Returns the names swapped.
    """
    if not isinstance(plan, dict):
        raise TypeError(f"plan must be a dict {{module name: precision}}, got {type(plan).__name__}")
    act_scales = act_scales or {}
    smooth = smooth or {}
    modules = dict(model.named_modules())
    for name, prec in plan.items():
        if prec not in PRECISIONS:
            raise ValueError(f"plan[{name!r}] must be one of {PRECISIONS}, got {prec!r}")
        if name not in modules:
            raise ValueError(f"plan names module {name!r}, which the model does not have")
        if not isinstance(modules[name], (nn.Linear, W8A8Linear)):
            raise ValueError(f"plan[{name!r}]: module is a {type(modules[name]).__name__}, not an nn.Linear")
    for what, table in (("act_scales", act_scales), ("smooth", smooth)):
        for name in table:
            if name not in plan:
                raise ValueError(f"{what} names {name!r}, which is not in the plan")
    swapped = []
    for name, prec in plan.items():
        if prec == "bf16" or not isinstance(modules[name], nn.Linear):
            continue
        if _excluded(name, exclude):
            warnings.warn(f"quantize_model: {name!r} is excluded ({tuple(exclude)}) and stays in floating point")
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, W8A8Linear.from_linear(modules[name], prec, act_scales.get(name), smooth.get(name)))
        swapped.append(name)
    return swapped


__all__ = ["DEFAULT_EXCLUDE", "PRECISIONS", "QuantizedActivation", "W8A8GeluFFN", "W8A8Linear", "fuse_gelu_ffns",
           "norm_quantized_input", "quantizable_linears", "quantize_model", "smoothquant_factors"]
