"""Fused norm + adaLN modulation + activation quantization (the producer of a W8A8 GEMM's input).

For each token row x (C,) of a DiT block:
    x̂ = LayerNorm(x) = (x − mean)·rsqrt(var + eps)      or   RMSNorm(x) = x·rsqrt(mean(x²) + eps)
    x̂ = x̂·weight + bias                                  (optional affine)
    y = x̂·(1 + scale) + shift                            (Wan's modulation; scale/shift per sample or per token)
    y_q, s = quantize(y)  per token (dynamic: s = amax/127 or amax/448) or with a static scale.
All in fp32 from one read of x; writes 1 byte per element plus one fp32 per row instead of the
2-byte bf16 activation that a separate norm, a separate modulation and a separate quantization
would write and re-read (DESIGN.md: an unfused eager quantization made the fp8 GEMM slower than
bf16). With quant=None the same kernel writes y in the input dtype (the bf16 baseline).

Reference first, then the kernel, then the host launcher.
"""
from __future__ import annotations

import torch

from turbo_kernels.gemm.quantize import MODES, QDTYPE, quantize_rows_reference, static_inv_scale
from turbo_kernels.utils import check_float_dtype, interpreter_enabled, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl

    from turbo_kernels.gemm.quantize import dynamic_scale, quantize_tile
except ImportError:  # pragma: no cover
    triton = None
    tl = None

NORMS = ("layer", "rms")


def _modulation_rows(t: torch.Tensor | None, name: str, B: int, L: int, C: int):
    """Accept (C,), (B, C), (B, 1, C) or (B, L, C); return a (B, L|1, C) view (or None)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if t.dim() == 1:
        t = t.view(1, 1, C).expand(B, 1, C)
    elif t.dim() == 2:
        t = t[:, None, :]
    if t.dim() != 3 or t.shape[0] != B or t.shape[1] not in (1, L) or t.shape[2] != C:
        raise ValueError(f"{name} must have shape (C,), (B, C), (B, 1, C) or (B, L, C) with B={B}, L={L}, C={C}; "
                         f"got {tuple(t.shape)}")
    return t


def _check(x, norm, quant):
    check_float_dtype("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (M, C) or (B, L, C), got shape {tuple(x.shape)}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if quant is not None and quant not in MODES:
        raise ValueError(f"quant must be one of {MODES} or None, got {quant!r}")


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------
def norm_modulate_quant_reference(x, shift=None, scale=None, *, norm: str = "layer", weight=None, bias=None,
                                  eps: float = 1e-6, quant: str | None = "int8", act_scale: float | None = None):
    """x: (B, L, C) or (M, C). Returns (y_q (M, C), s (M,)) when quant is set, else y shaped like x."""
    _check(x, norm, quant)
    x3 = x if x.dim() == 3 else x[None]
    B, L, C = x3.shape
    xf = x3.float()
    if norm == "layer":
        mean = xf.sum(-1, keepdim=True) / C
        xc = xf - mean
        xn = xc * torch.rsqrt((xc * xc).sum(-1, keepdim=True) / C + eps)
    else:
        xn = xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) / C + eps)
    if weight is not None:
        xn = xn * weight.float()
    if bias is not None:
        xn = xn + bias.float()
    sc, sh = _modulation_rows(scale, "scale", B, L, C), _modulation_rows(shift, "shift", B, L, C)
    if sc is not None:
        xn = xn * (1.0 + sc.float())
    if sh is not None:
        xn = xn + sh.float()
    if quant is None:
        return xn.to(x.dtype).view(x.shape)
    return quantize_rows_reference(xn.reshape(B * L, C), quant, act_scale)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _norm_modulate_quant_kernel(X, W, Bv, Shift, Scale, Out, OutScale, L, C, stride_xm,
                                    stride_sb, stride_sl, stride_hb, stride_hl, eps, static_inv, static_scale,
                                    BLOCK_C: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                                    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, QUANT: tl.constexpr,
                                    STATIC: tl.constexpr, FP8: tl.constexpr, EXACT_CAST: tl.constexpr):
        """One program = one token row (the whole row fits one tile: C ≤ BLOCK_C)."""
        row = tl.program_id(0).to(tl.int64)
        b, l = row // L, row % L
        offs = tl.arange(0, BLOCK_C)
        ok = offs < C
        x = tl.load(X + row * stride_xm + offs, mask=ok, other=0.0).to(tl.float32)
        if RMS:
            xn = x * tl.math.rsqrt(tl.sum(x * x, 0) / C + eps)
        else:
            xc = tl.where(ok, x - tl.sum(x, 0) / C, 0.0)
            xn = xc * tl.math.rsqrt(tl.sum(xc * xc, 0) / C + eps)
        if HAS_W:
            xn = xn * tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_B:
            xn = xn + tl.load(Bv + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_SCALE:
            xn = xn * (1.0 + tl.load(Scale + b * stride_sb + l * stride_sl + offs, mask=ok, other=0.0).to(tl.float32))
        if HAS_SHIFT:
            xn = xn + tl.load(Shift + b * stride_hb + l * stride_hl + offs, mask=ok, other=0.0).to(tl.float32)
        if QUANT:
            if STATIC:
                inv = static_inv
                s = static_scale
            else:
                inv, s = dynamic_scale(tl.max(tl.where(ok, tl.abs(xn), 0.0), 0), FP8)
            tl.store(Out + row * C + offs, quantize_tile(xn, inv, FP8, EXACT_CAST), mask=ok)
            tl.store(OutScale + row, s)
        else:
            tl.store(Out + row * C + offs, xn.to(Out.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# host launcher
# ----------------------------------------------------------------------------------------------
# warps per row program when the caller names none (None: one per 2048 channels of the padded row, i.e. 64 values
# per thread, 1 to 16). H100, M = 32760, C = 1536, fp8, per-sample modulation (bench_lowbit --only rows, 2026-12-06):
# 1 warp 0.078 ms, 2 0.086, 4 0.106, 8 (the earlier default) 0.105, 16 0.171; in the 4-step DiT's profile the
# kernel's total went 36.2 -> 25.2 ms. Fewer warps per row: the row's sums stay inside one warp (no shared-memory
# round trips between warps) and more rows are in flight per SM.
NUM_WARPS: int | None = None


def norm_modulate_quant(x, shift=None, scale=None, *, norm: str = "layer", weight=None, bias=None, eps: float = 1e-6,
                        quant: str | None = "int8", act_scale: float | None = None, num_warps: int | None = None):
    """Fused norm → modulation → per-token (or static) quantization.

    x: (B, L, C) or (M, C); shift/scale: (C,), (B, C), (B, 1, C) or (B, L, C), or None.
    Returns (y_q (B·L, C) int8/fp8, s (B·L,) fp32) when quant is "int8"/"fp8"; y like x when None.
    num_warps: tuning (default scales with C).
    """
    _check(x, norm, quant)
    if triton is None or not use_triton(x):
        return norm_modulate_quant_reference(x, shift, scale, norm=norm, weight=weight, bias=bias, eps=eps,
                                             quant=quant, act_scale=act_scale)
    x3 = x if x.dim() == 3 else x[None]
    B, L, C = x3.shape
    x2 = x3.reshape(B * L, C)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    sc, sh = _modulation_rows(scale, "scale", B, L, C), _modulation_rows(shift, "shift", B, L, C)
    sc = sc if sc is None or sc.stride(-1) == 1 else sc.contiguous()
    sh = sh if sh is None or sh.stride(-1) == 1 else sh.contiguous()
    M = B * L
    if quant is None:
        out, out_scale = torch.empty(M, C, dtype=x.dtype, device=x.device), x2
    else:
        out = torch.empty(M, C, dtype=QDTYPE[quant], device=x.device)
        out_scale = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        inv, s = static_inv_scale(act_scale) if (quant is not None and act_scale is not None) else (1.0, 1.0)
        block_c = next_power_of_2(C)
        _norm_modulate_quant_kernel[(M,)](
            x2, weight if weight is not None else x2, bias if bias is not None else x2,
            sh if sh is not None else x2, sc if sc is not None else x2, out, out_scale, L, C, x2.stride(0),
            sc.stride(0) if sc is not None else 0, (sc.stride(1) if sc.shape[1] > 1 else 0) if sc is not None else 0,
            sh.stride(0) if sh is not None else 0, (sh.stride(1) if sh.shape[1] > 1 else 0) if sh is not None else 0,
            eps, inv, s, BLOCK_C=block_c, RMS=norm == "rms", HAS_W=weight is not None, HAS_B=bias is not None,
            HAS_SCALE=sc is not None, HAS_SHIFT=sh is not None, QUANT=quant is not None,
            STATIC=act_scale is not None, FP8=quant == "fp8", EXACT_CAST=interpreter_enabled(),
            num_warps=num_warps or NUM_WARPS or min(16, max(1, block_c // 2048)))
    if quant is None:
        return out.view(x.shape)
    return out, out_scale


__all__ = ["NORMS", "norm_modulate_quant", "norm_modulate_quant_reference"]
