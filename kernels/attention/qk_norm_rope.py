"""Fused RMSNorm + rotary embedding of a query or key projection (what precedes every Wan self-attention).

For each token row x (C = H·D,) of q = Linear(x) (or k), with cos/sin (L, D/2) of the token's position:
    x̂ = x·rsqrt(mean(x²) + eps)·weight                       (RMSNorm across all heads, fp32: Wan's q/k norm)
    out[h, 2i]   = x̂[h, 2i]·cos[l, i] − x̂[h, 2i+1]·sin[l, i]
    out[h, 2i+1] = x̂[h, 2i]·sin[l, i] + x̂[h, 2i+1]·cos[l, i]   (RoPE on consecutive channel pairs, per head)
returned as (B, L, H, D) in x's dtype. The eager model path (turbo_infer.models.wan: RMSNorm, then
RoPE3D.rotate) runs this as some fifteen kernels, each reading and writing the whole (L, C) activation,
some in fp32; the kernel reads x once and writes the result once. One numerical difference: the eager
path rounds the norm's output to x's dtype before rotating it, the kernel does not (≤ 1 unit in the last
place of bf16 per element).

Reference first, then the kernel, then the host launcher.
"""
from __future__ import annotations

import torch

from turbo_kernels.utils import check_float_dtype, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def _check(x, weight, cos, sin, num_heads):
    check_float_dtype("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, C), got shape {tuple(x.shape)}")
    B, L, C = x.shape
    if not isinstance(num_heads, int) or num_heads <= 0 or C % num_heads:
        raise ValueError(f"num_heads must be a positive int dividing C={C}, got {num_heads!r}")
    D = C // num_heads
    if D % 2:
        raise ValueError(f"head dim C/num_heads = {D} must be even (RoPE rotates channel pairs)")
    if weight.shape != (C,):
        raise ValueError(f"weight must have shape ({C},), got {tuple(weight.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (L, D // 2):
            raise ValueError(f"{name} must have shape (L, D/2) = ({L}, {D // 2}), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------
def qk_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           num_heads: int, eps: float = 1e-6) -> torch.Tensor:
    """(B, L, C) -> (B, L, H, D) in x's dtype; all arithmetic in fp32 (see the module docstring)."""
    _check(x, weight, cos, sin, num_heads)
    B, L, C = x.shape
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()  # (B, L, C)
    y1, y2 = y.view(B, L, num_heads, -1, 2).unbind(-1)  # (B, L, H, D/2) each
    c, s = cos.float()[None, :, None, :], sin.float()[None, :, None, :]
    out = torch.stack([y1 * c - y2 * s, y1 * s + y2 * c], dim=-1).flatten(-2)  # (B, L, H, D)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _qk_norm_rope_kernel(X, W, Cos, Sin, Out, L, C, half_d, stride_xm, stride_cl, stride_sl, eps,
                             BLOCK_P: tl.constexpr, SPLIT: tl.constexpr):
        """One program = one token row; the row's C/2 channel pairs fit one tile (C/2 ≤ BLOCK_P). SPLIT: the row
        is read and written as contiguous (BLOCK_P, 2) tiles, split into even / odd channels in registers
        (tl.split / tl.join), instead of two stride-2 loads and stores."""
        row = tl.program_id(0).to(tl.int64)
        pos = row % L
        p = tl.arange(0, BLOCK_P)  # pair index along the row: channels 2p, 2p + 1
        ok = p < C // 2
        if SPLIT:
            ch = 2 * p[:, None] + tl.arange(0, 2)[None, :]  # (BLOCK_P, 2): channel 2p + j
            ok2 = ch < C
            xe, xo = tl.split(tl.load(X + row * stride_xm + ch, mask=ok2, other=0.0).to(tl.float32))
            we, wo = tl.split(tl.load(W + ch, mask=ok2, other=0.0).to(tl.float32))
        else:
            xe = tl.load(X + row * stride_xm + 2 * p, mask=ok, other=0.0).to(tl.float32)
            xo = tl.load(X + row * stride_xm + 2 * p + 1, mask=ok, other=0.0).to(tl.float32)
            we = tl.load(W + 2 * p, mask=ok, other=0.0).to(tl.float32)
            wo = tl.load(W + 2 * p + 1, mask=ok, other=0.0).to(tl.float32)
        r = tl.math.rsqrt((tl.sum(xe * xe, 0) + tl.sum(xo * xo, 0)) / C + eps)
        xe = xe * r * we
        xo = xo * r * wo
        i = p % half_d  # frequency index within the head
        c = tl.load(Cos + pos * stride_cl + i, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(Sin + pos * stride_sl + i, mask=ok, other=0.0).to(tl.float32)
        ye = (xe * c - xo * s).to(Out.dtype.element_ty)
        yo = (xe * s + xo * c).to(Out.dtype.element_ty)
        if SPLIT:
            tl.store(Out + row * C + ch, tl.join(ye, yo), mask=ok2)
        else:
            tl.store(Out + row * C + 2 * p, ye, mask=ok)
            tl.store(Out + row * C + 2 * p + 1, yo, mask=ok)


# ----------------------------------------------------------------------------------------------
# host launcher
# ----------------------------------------------------------------------------------------------
# contiguous row tiles split into channel pairs in registers (True) or stride-2 loads and stores (False), and the
# warps per row program (None: one per 256 channel pairs of the padded row, 1 to 16). H100, M = 32760, C = 1536
# (bench_lowbit --only rows, 2026-12-06), ms by warps 1 / 2 / 4 / 8 / 16: stride-2 0.113 / 0.109 / 0.114 / 0.135 (the
# earlier default) / 0.178; split 0.094 / 0.095 / 0.093 / 0.107 / 0.181. In the 4-step DiT's profile the kernel's
# total went 30.0 -> 21.1 ms.
SPLIT_PAIRS = True
NUM_WARPS: int | None = None


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                 eps: float = 1e-6, num_warps: int | None = None, split: bool | None = None) -> torch.Tensor:
    """Fused RMSNorm(x)·weight + RoPE: x (B, L, C), weight (C,), cos/sin (L, D/2) with D = C/num_heads
    -> (B, L, H, D) contiguous, x's dtype. No autograd (inference); CPU tensors without the Triton
    interpreter take the reference. num_warps, split (contiguous row tiles split into channel pairs in
    registers instead of stride-2 accesses; default SPLIT_PAIRS): tuning (num_warps default scales with C)."""
    _check(x, weight, cos, sin, num_heads)
    if triton is None or not use_triton(x, weight, cos, sin):
        return qk_norm_rope_reference(x, weight, cos, sin, num_heads, eps)
    B, L, C = x.shape
    x2 = x.reshape(B * L, C)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    weight = weight.contiguous()
    out = torch.empty(B, L, num_heads, C // num_heads, dtype=x.dtype, device=x.device)
    if B * L > 0:
        block_p = next_power_of_2(C // 2)
        _qk_norm_rope_kernel[(B * L,)](x2, weight, cos, sin, out, L, C, C // num_heads // 2, x2.stride(0),
                                       cos.stride(0), sin.stride(0), eps, BLOCK_P=block_p,
                                       SPLIT=SPLIT_PAIRS if split is None else bool(split),
                                       num_warps=num_warps or NUM_WARPS or min(16, max(1, block_p // 256)))
    return out


__all__ = ["qk_norm_rope", "qk_norm_rope_reference"]
