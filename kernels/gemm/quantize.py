"""Quantization primitives for W8A8: per-channel weights, per-token / per-tensor activations.

Formats (DESIGN.md "W8A8 linear"):
  int8: symmetric, scale = amax/127, q = round_half_away(x·127/amax) ∈ [−127, 127];
  fp8:  float8 e4m3fn, scale = amax/448, q = cast_rn(x·448/amax) (448 = largest finite e4m3).
Weights: one scale per output channel (row of the (N, K) weight), done once in torch.
Activations: one scale per token (row of the (M, K) input), dynamic, through a Triton kernel; or
one static per-tensor scale from calibration (values beyond ±127 / ±448 saturate).
Dequantization: x ≈ q·scale. Step size per element ≈ scale, so the relative error of one value
is ≤ 1/254 of the row amax for int8, and ≈ 2⁻⁴ of the value itself for fp8 (3 mantissa bits).

References first, then the kernel, then the host launcher. `round_to_fp8_grid` is also used by
the attention kernels (see its docstring for why).
"""
from __future__ import annotations

import math
import struct

import torch

from turbo_kernels.utils import check_float_dtype, interpreter_enabled, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

QMAX = {"int8": 127.0, "fp8": 448.0}
QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
MODES = tuple(QMAX)


def _check_mode(mode: str) -> None:
    if mode not in QMAX:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------------
def round_half_away(y: torch.Tensor) -> torch.Tensor:
    """round(y), ties away from zero, as the kernels do it: trunc(y ± 0.5)."""
    return torch.trunc(y + torch.where(y >= 0, 0.5, -0.5))


def quantize_rows_reference(x: torch.Tensor, mode: str, static_scale: float | None = None,
                            smooth_inv: torch.Tensor | None = None):
    """Quantize each row of x (..., K) with its own scale (dynamic) or with one static scale.

    smooth_inv: optional (K,) per-channel factors applied first (SmoothQuant: x/s, with s folded
    into the weight). Returns (x_q (..., K) int8/fp8, scale (...,) fp32) with
    x·smooth_inv ≈ x_q·scale[..., None]. An all-zero row gets scale 0 and zeros.
    """
    _check_mode(mode)
    qmax = QMAX[mode]
    xf = x.float()
    if smooth_inv is not None:
        xf = xf * smooth_inv.float()
    if static_scale is None:
        amax = xf.abs().amax(dim=-1)  # (...,)
        inv = torch.where(amax > 0, torch.tensor(qmax) / amax, torch.zeros_like(amax))
        scale = amax / qmax
    else:
        s = torch.tensor(float(static_scale), dtype=torch.float32)
        if not s > 0:
            raise ValueError(f"static act_scale must be > 0, got {static_scale}")
        inv = torch.full(xf.shape[:-1], 1.0, dtype=torch.float32, device=x.device) / s
        scale = torch.full(xf.shape[:-1], float(s), dtype=torch.float32, device=x.device)
    y = xf * inv[..., None]
    if mode == "int8":
        q = round_half_away(y).clamp(-127, 127).to(torch.int8)
    else:
        q = y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale


def quantize_groups_reference(x: torch.Tensor, mode: str, group: int):
    """Dynamic quantization of x (M, K) per row and group of `group` consecutive columns (K % group == 0):
    (x_q (M, K), scales (K // group, M) fp32, group-major as the GEMM's K loop reads them), each group as
    `quantize_rows_reference` quantizes a row."""
    if x.dim() != 2 or not isinstance(group, int) or group <= 0 or x.shape[1] % group:
        raise ValueError(f"x must be (M, K) with K a multiple of group, got {tuple(x.shape)} and group {group!r}")
    M, K = x.shape
    q, s = quantize_rows_reference(x.reshape(M, K // group, group), mode)
    return q.reshape(M, K), s.t().contiguous()


def dequantize_groups(x_q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x_q (M, K) with group scales (K // G, M) → fp32."""
    M, K = x_q.shape
    G = K // scales.shape[0]
    return (x_q.float().view(M, K // G, G) * scales.t()[:, :, None]).view(M, K)


def quantize_weight(weight: torch.Tensor, mode: str):
    """Per-output-channel quantization of a Linear weight (N, K) → (w_q (N, K), scale (N,) fp32)."""
    check_float_dtype("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    return quantize_rows_reference(weight.detach(), mode)


def dequantize(x_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x_q (..., K) · scale (...,) → fp32."""
    return x_q.float() * scale[..., None]


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def round_to_fp8_grid(x):
        """Round fp32 x (|x| ≤ 448) to the nearest-even float8 e4m3 value, in fp32 arithmetic.

        Only used under TRITON_INTERPRET: triton 3.9's interpreter casts fp32→fp8 with
        round-half-up and drops the mantissa carry (124.7 → 64 instead of 128). After this
        rounding the cast is exact, so the interpreter matches torch; on a GPU the hardware
        cvt.rn.satfinite is used instead (same rounding, no extra instructions).
        """
        bits = x.to(tl.int32, bitcast=True)
        lsb = (bits >> 20) & 1
        normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)  # keep 3 mantissa bits, RNE
        sub = ((x * 512.0 + 12582912.0) - 12582912.0) * 0.001953125  # multiples of 2⁻⁹ (e4m3 subnormals), RNE
        return tl.where(tl.abs(x) < 0.015625, sub, normal)

    @triton.jit
    def dynamic_scale(amax, FP8: tl.constexpr):
        """(inv, scale) of a dynamic quantization from an amax (any shape): inv = qmax / amax (0 for an all-zero
        group, which then quantizes to zeros), scale = amax / qmax, both IEEE divisions as the references do."""
        qmax = 448.0 if FP8 else 127.0
        return tl.where(amax > 0, tl.math.div_rn(qmax, tl.maximum(amax, 1e-30)), 0.0), tl.math.div_rn(amax, qmax)

    @triton.jit
    def quantize_tile(y, inv, FP8: tl.constexpr, EXACT_CAST: tl.constexpr):
        """y·inv → int8 (round half away, saturate at ±127) or fp8 e4m3 (RNE, saturate at ±448)."""
        y = y * inv
        if FP8:
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            if EXACT_CAST:
                y = round_to_fp8_grid(y)
            return y.to(tl.float8e4nv)
        else:
            y = y + tl.where(y >= 0, 0.5, -0.5)
            y = tl.minimum(tl.maximum(y, -127.0), 127.0)
            return y.to(tl.int8)

    @triton.jit
    def _quantize_rows_kernel(X, SI, Out, Scale, stride_xm, K, static_inv, static_scale,
                              BLOCK_K: tl.constexpr, STATIC: tl.constexpr, FP8: tl.constexpr,
                              EXACT_CAST: tl.constexpr, ONE_PASS: tl.constexpr, SMOOTH: tl.constexpr):
        """One program = one row: (dynamic) amax pass over K, then the quantize pass.

        ONE_PASS (K ≤ BLOCK_K): the row stays in registers, one read instead of two.
        """
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        if ONE_PASS:
            x = tl.load(X + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
            if SMOOTH:
                x = x * tl.load(SI + offs, mask=offs < K, other=0.0)
            if STATIC:
                inv = static_inv
                scale = static_scale
            else:
                inv, scale = dynamic_scale(tl.max(tl.abs(x), 0), FP8)
            tl.store(Out + row * K + offs, quantize_tile(x, inv, FP8, EXACT_CAST), mask=offs < K)
            tl.store(Scale + row, scale)
            return
        if STATIC:
            inv = static_inv
            scale = static_scale
        else:
            amax = tl.zeros([BLOCK_K], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(X + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                if SMOOTH:
                    x = x * tl.load(SI + k0 + offs, mask=k0 + offs < K, other=0.0)
                amax = tl.maximum(amax, tl.abs(x))
            inv, scale = dynamic_scale(tl.max(amax, 0), FP8)
        for k0 in range(0, K, BLOCK_K):  # second read of the row hits L2
            x = tl.load(X + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            if SMOOTH:
                x = x * tl.load(SI + k0 + offs, mask=k0 + offs < K, other=0.0)
            q = quantize_tile(x, inv, FP8, EXACT_CAST)
            tl.store(Out + row * K + k0 + offs, q, mask=k0 + offs < K)
        tl.store(Scale + row, scale)


# ----------------------------------------------------------------------------------------------
# host launcher
# ----------------------------------------------------------------------------------------------
def _f32(x: float) -> float:
    """x rounded to the nearest fp32 value (as torch.tensor(x, dtype=torch.float32) does; past fp32's range: inf)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def static_inv_scale(static_scale) -> tuple[float, float]:
    """(1/s, s) rounded to fp32 exactly as the reference computes them (fp32 s, then fp32 1/s); static_scale a number
    or a one-element tensor. Plain float arithmetic, no tensors: it runs on every statically quantized layer call.
    1/s in double rounded once to fp32 is the correctly rounded fp32 quotient (double carries > 2·24 + 2 bits)."""
    s = _f32(float(static_scale))
    if not s > 0:  # also a positive scale below fp32's range, which the reference's fp32 tensor rounds to 0
        raise ValueError(f"static act_scale must be > 0, got {static_scale}")
    return _f32(1.0 / s), s


def quantize_rows(x: torch.Tensor, mode: str, static_scale: float | None = None, *,
                  smooth_inv: torch.Tensor | None = None, block_k: int | None = None, num_warps: int | None = None):
    """Per-token (or static per-tensor) activation quantization of x (..., K).

    Returns (x_q (M, K) int8/fp8 contiguous, scale (M,) fp32) with M = x.numel() // K.
    CUDA (or CPU under TRITON_INTERPRET=1) runs the Triton kernel, otherwise the reference.
    smooth_inv: optional (K,) per-channel factors multiplied in first (SmoothQuant).
    block_k / num_warps: tuning. Default: the whole row in one tile up to 16384 elements, except int8 rows
    longer than 4096, which go in 4096-element chunks (H100, K = 8960, M = 32760: 0.342 ms against 0.356 in one
    tile; fp8 is faster in one tile, 0.291 against 0.306, bench_lowbit 2026-12-06).
    """
    _check_mode(mode)
    check_float_dtype("x", x)
    K = x.shape[-1]
    if smooth_inv is not None and (not isinstance(smooth_inv, torch.Tensor) or smooth_inv.shape != (K,)):
        raise ValueError(f"smooth_inv must be a tensor of shape ({K},), got "
                         f"{tuple(smooth_inv.shape) if isinstance(smooth_inv, torch.Tensor) else type(smooth_inv)}")
    x2 = x.reshape(-1, K)  # (M, K)
    if triton is None or not use_triton(x2):
        return quantize_rows_reference(x2, mode, static_scale, smooth_inv)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(M, K, dtype=QDTYPE[mode], device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return out, scale
    inv, s = static_inv_scale(static_scale) if static_scale is not None else (1.0, 1.0)
    if block_k is None:  # the whole row in registers; int8 rows past 4096 in chunks of 4096 (read twice, from L2)
        block_k = 4096 if mode == "int8" and K > 4096 else min(16384, next_power_of_2(K))
    if num_warps is None:
        num_warps = 4 if block_k <= 2048 else 8
    si = smooth_inv.float().contiguous() if smooth_inv is not None else x2
    _quantize_rows_kernel[(M,)](x2, si, out, scale, x2.stride(0), K, inv, s, BLOCK_K=block_k,
                                STATIC=static_scale is not None, FP8=mode == "fp8",
                                EXACT_CAST=interpreter_enabled(), ONE_PASS=K <= block_k,
                                SMOOTH=smooth_inv is not None, num_warps=num_warps)
    return out, scale


__all__ = ["MODES", "QDTYPE", "QMAX", "dequantize", "dequantize_groups", "quantize_groups_reference", "quantize_rows",
           "quantize_rows_reference", "quantize_weight",
           "round_half_away", "static_inv_scale"]
