"""JVP-capable flash attention: softmax attention and its forward-mode derivative in one pass.

rCM (Zheng et al. 2025, arXiv 2510.08431) needs dF/dt of the student by a forward-mode JVP through
the whole DiT (RCM.md section 5). For attention O = softmax(S) V with S = Q K^T * scale, the
tangent along (tQ, tK, tV) is, with P = softmax(S) row-wise:

    tS = (tQ K^T + Q tK^T) * scale
    tP = P * (tS - rowsum(P * tS))                     # softmax Jacobian, row by row
    tO = tP V + P tV = P tV + (P * tS) V - rowsum(P * tS) O

Flash-attention form (FA2 with the tangent, RCM.md section 5): per query block stream over K/V
blocks with running row max m and row sum l of P~ = exp(S - m); keep unnormalised accumulators

    O~ = P~ V,   T~ = P~ tV + H~ V  (H~ = P~ * tS),   r = rowsum(H~)

and rescale all of them by alpha = exp(m_old - m_new) when the running max grows; at the end

    O = O~ / l,   tO = T~ / l - (r / l) O.

Six GEMMs per K/V block (QK^T, tQ K^T, Q tK^T, P~V, P~tV, H~V) against FA2's two: 3x a forward at
equal efficiency. A^ = P~tV and B^ = H~V of the spec share one accumulator (only their sum is used),
which keeps the register budget at two (BLOCK_M, D) fp32 tiles.

Second form, `tangent given stats`: when a primal pass has already produced O and the log-sum-exp
(LSE) of each row, P = exp(S - LSE) is exact block by block, no running max, no rescaling and no
P V GEMM: tO = sum_blocks(P tV + (P*tS) V) - r O with O read back. Five GEMMs. The autograd.Function
uses it under forward AD (forward pass -> O, LSE; jvp -> tO).

Measured on one H100 at B1 H12 L32760 D128 bf16 (benchmarks/jvp_attention.json): fused (O, tO)
36.7 ms = 3.26x cuDNN's forward (11.26 ms), 539 TFLOP/s counting six GEMMs; flash forward with LSE
13.0 ms; tangent from LSE 31.0 ms. Forward + tangent (44 ms) is slower than the fused pass, so
`jvp_flash_attention` sends a no-grad JVP (rCM's tangent pass) straight to the fused kernel by
unpacking the forward-AD duals itself; the autograd.Function serves the cases that need grad.

Masking (the public FA2-JVP kernel produced NaNs at ragged boundaries): out-of-range keys get
S = -inf so P~ = 0 exactly, and their K/tK/V/tV loads are zero, so tS = 0 and H~ = 0 -- no inf*0.
The first key block always holds key 0, so every row's running max is finite after it (padded query
rows see S = 0, are computed and never stored). Only the last, ragged key block pays for the mask.

Layout: q, tq (B, H, Lq, D); k, tk (B, H, Lk, D); v, tv (B, H, Lk, Dv); any strides with a
unit-stride last dim (others are copied). tK = tV = None for cross-attention (no GEMM on them).

File order (STYLE.md): references, @triton.jit kernels, host launchers, autograd.Function.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from turbo_kernels.utils import cdiv, check_block, check_float_dtype, next_power_of_2, use_triton

__all__ = ["attention_reference", "jvp_attention_reference", "jvp_attention", "flash_attention_lse",
           "jvp_attention_tangent", "JVPAttentionFunction", "jvp_flash_attention", "check_attention_inputs"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------
# Input checks (shared by reference, launchers and the autograd.Function)
# ----------------------------------------------------------------------------------------------
def check_attention_inputs(q, k, v, tq=None, tk=None, tv=None, scale=None) -> float:
    """Validate shapes/dtypes/devices; return the softmax scale (default 1/sqrt(D))."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_dtype(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, L, D), got {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"k and v must have batch and heads {(B, H)} of q, got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"k must have head dim {D} of q, got {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have the sequence length {k.shape[2]} of k, got {tuple(v.shape)}")
    if k.shape[2] == 0:
        raise ValueError("k must hold at least one key (softmax over an empty set is undefined)")
    for name, t, p in (("tq", tq, q), ("tk", tk, k), ("tv", tv, v)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.shape != p.shape:
            raise ValueError(f"{name} must have the shape {tuple(p.shape)} of its primal, got {tuple(t.shape)}")
        if t.dtype != p.dtype:
            raise TypeError(f"{name} must have the dtype {p.dtype} of its primal, got {t.dtype}")
        if t.device != p.device:
            raise ValueError(f"{name} must be on {p.device} like its primal, got {t.device}")
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    return float(scale)


# ----------------------------------------------------------------------------------------------
# References (pure torch, fp32 math): the spec, the CPU fallback and the test oracle
# ----------------------------------------------------------------------------------------------
def attention_reference(q, k, v, scale=None):
    """softmax(q k^T * scale) v in fp32, returned in q's dtype. Shapes as in the module docstring."""
    scale = check_attention_inputs(q, k, v, scale=scale)
    p = torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)  # (B, H, Lq, Lk)
    return (p @ v.float()).to(q.dtype)


def jvp_attention_reference(q, k, v, tq=None, tk=None, tv=None, scale=None):
    """(O, tO): attention and its JVP along (tq, tk, tv) in closed form (softmax Jacobian).

    None tangents are zero. Computed in fp32 with the whole (Lq, Lk) score matrix; returns q.dtype.
    """
    scale = check_attention_inputs(q, k, v, tq, tk, tv, scale)
    qf, kf, vf = q.float(), k.float(), v.float()
    p = torch.softmax(qf @ kf.transpose(-1, -2) * scale, dim=-1)                 # (B, H, Lq, Lk)
    o = p @ vf                                                                   # (B, H, Lq, Dv)
    ts = torch.zeros_like(p)                                                     # tS (B, H, Lq, Lk)
    if tq is not None:
        ts = ts + tq.float() @ kf.transpose(-1, -2) * scale
    if tk is not None:
        ts = ts + qf @ tk.float().transpose(-1, -2) * scale
    tp = p * (ts - (p * ts).sum(dim=-1, keepdim=True))                          # softmax Jacobian . tS
    to = tp @ vf
    if tv is not None:
        to = to + p @ tv.float()
    return o.to(q.dtype), to.to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # the runtime works without Triton (CPU fallback)
    triton = None

if triton is not None:

    @triton.jit
    def _load_tile(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
        # (rows, BLOCK_D) tile; masked elements read as 0 (never garbage: 0 * NaN would poison sums)
        if MASK_ROWS:
            if EVEN_D:
                x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
            else:
                x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            if EVEN_D:
                x = tl.load(ptrs)
            else:
                x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        return x

    @triton.jit
    def _jvp_attn_inner(
        acc_o, acc_t, m_i, l_i, r_i, q, tq, lse2,
        k_ptr, tk_ptr, v_ptr, tv_ptr, skn, stkn, svn, stvn,
        offs_n, offs_d, offs_dv, d_ok, dv_ok, lo, hi, LK, qk_scale_log2, scale,
        MASK_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
        COMPUTE_T: tl.constexpr, STATS_GIVEN: tl.constexpr,
        HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
        DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        for start_n in range(lo, hi, BLOCK_N):
            n_idx = start_n + offs_n
            n_ok = n_idx < LK
            k = _load_tile(k_ptr + n_idx[:, None] * skn + offs_d[None, :], n_ok, d_ok, MASK_N, EVEN_D)
            # S in log2 units: s2 = (q k^T) * scale * log2(e)                      # (BLOCK_M, BLOCK_N)
            s2 = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale_log2
            if MASK_N:
                s2 = tl.where(n_ok[None, :], s2, float("-inf"))
            if STATS_GIVEN:
                # exact P = exp(S - LSE): no running max, nothing to rescale
                p = tl.math.exp2(s2 - lse2[:, None])
            else:
                m_new = tl.maximum(m_i, tl.max(s2, 1))
                p = tl.math.exp2(s2 - m_new[:, None])                              # P~
                alpha = tl.math.exp2(m_i - m_new)                                  # rescale of every accumulator
                l_i = l_i * alpha + tl.sum(p, 1)
                acc_o = acc_o * alpha[:, None]
                m_i = m_new
            v = _load_tile(v_ptr + n_idx[:, None] * svn + offs_dv[None, :], n_ok, dv_ok, MASK_N, EVEN_DV)
            if not STATS_GIVEN:
                acc_o = tl.dot(p.to(v.dtype), v, acc_o, input_precision=DOT_PREC)     # O~ += P~ V
            if COMPUTE_T:
                if not STATS_GIVEN:
                    acc_t = acc_t * alpha[:, None]
                    r_i = r_i * alpha
                if HAS_TV:
                    tv = _load_tile(tv_ptr + n_idx[:, None] * stvn + offs_dv[None, :], n_ok, dv_ok, MASK_N, EVEN_DV)
                    acc_t = tl.dot(p.to(tv.dtype), tv, acc_t, input_precision=DOT_PREC)  # A~ += P~ tV
                if HAS_TQ or HAS_TK:
                    # tS = (tQ K^T + Q tK^T) * scale; masked keys have k = tk = 0 -> tS = 0, H~ = 0
                    if HAS_TQ:
                        ts = tl.dot(tq, tl.trans(k), input_precision=DOT_PREC)
                        if HAS_TK:
                            tk = _load_tile(tk_ptr + n_idx[:, None] * stkn + offs_d[None, :], n_ok, d_ok,
                                            MASK_N, EVEN_D)
                            ts = tl.dot(q, tl.trans(tk), ts, input_precision=DOT_PREC)
                    else:
                        tk = _load_tile(tk_ptr + n_idx[:, None] * stkn + offs_d[None, :], n_ok, d_ok,
                                        MASK_N, EVEN_D)
                        ts = tl.dot(q, tl.trans(tk), input_precision=DOT_PREC)
                    h = p * (ts * scale)                                               # H~ = P~ * tS
                    r_i = r_i + tl.sum(h, 1)
                    acc_t = tl.dot(h.to(v.dtype), v, acc_t, input_precision=DOT_PREC)   # B~ += H~ V
        return acc_o, acc_t, m_i, l_i, r_i

    @triton.jit
    def _jvp_attn_fwd_kernel(
        Q, K, V, TQ, TK, TV, O, TO, LSE,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
        stqb, stqh, stqm, stkb, stkh, stkn, stvb, stvh, stvn,
        sob, soh, som, stob, stoh, stom,
        H, LQ, LK, D, DV, scale, qk_scale_log2,
        COMPUTE_T: tl.constexpr, STATS_GIVEN: tl.constexpr, WRITE_LSE: tl.constexpr,
        HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
        EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        """One program = one BLOCK_M query block of one (batch, head).

        Modes: COMPUTE_T=0 -> plain FA2 forward (O, LSE); COMPUTE_T=1, STATS_GIVEN=0 -> fused (O, tO,
        LSE) with online softmax; COMPUTE_T=1, STATS_GIVEN=1 -> tO only from given O and LSE.
        LSE is natural-log, fp32, (B*H, LQ).
        """
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        m_ok = offs_m < LQ
        d_ok = offs_d < D
        dv_ok = offs_dv < DV

        q = _load_tile(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], m_ok, d_ok, True, EVEN_D)
        if HAS_TQ:
            tq = _load_tile(TQ + b * stqb + h * stqh + offs_m[:, None] * stqm + offs_d[None, :], m_ok, d_ok,
                            True, EVEN_D)
        else:
            tq = q  # unused placeholder
        k_ptr = K + b * skb + h * skh
        v_ptr = V + b * svb + h * svh
        tk_ptr = TK + b * stkb + h * stkh
        tv_ptr = TV + b * stvb + h * stvh

        if STATS_GIVEN:
            lse2 = tl.load(LSE + pid_bh * LQ + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
            acc_o = tl.zeros([1, 1], dtype=tl.float32)  # unused
        else:
            lse2 = tl.zeros([BLOCK_M], dtype=tl.float32)  # unused
            acc_o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        if COMPUTE_T:
            acc_t = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        else:
            acc_t = tl.zeros([1, 1], dtype=tl.float32)  # unused

        # full key blocks without masks, then the ragged tail block (if any) with them
        n_full = (LK // BLOCK_N) * BLOCK_N
        acc_o, acc_t, m_i, l_i, r_i = _jvp_attn_inner(
            acc_o, acc_t, m_i, l_i, r_i, q, tq, lse2, k_ptr, tk_ptr, v_ptr, tv_ptr, skn, stkn, svn, stvn,
            offs_n, offs_d, offs_dv, d_ok, dv_ok, 0, n_full, LK, qk_scale_log2, scale,
            False, EVEN_D, EVEN_DV, COMPUTE_T, STATS_GIVEN, HAS_TQ, HAS_TK, HAS_TV, DOT_PREC, BLOCK_N)
        if n_full < LK:
            acc_o, acc_t, m_i, l_i, r_i = _jvp_attn_inner(
                acc_o, acc_t, m_i, l_i, r_i, q, tq, lse2, k_ptr, tk_ptr, v_ptr, tv_ptr, skn, stkn, svn, stvn,
                offs_n, offs_d, offs_dv, d_ok, dv_ok, n_full, LK, LK, qk_scale_log2, scale,
                True, EVEN_D, EVEN_DV, COMPUTE_T, STATS_GIVEN, HAS_TQ, HAS_TK, HAS_TV, DOT_PREC, BLOCK_N)

        out_mask = m_ok[:, None] & dv_ok[None, :]
        o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :]
        if STATS_GIVEN:
            # tO = sum(P tV + H V) - r O, with P already normalised and O read back
            o = tl.load(o_ptrs, mask=out_mask, other=0.0).to(tl.float32)
            t_out = acc_t - r_i[:, None] * o
        else:
            inv_l = 1.0 / l_i
            o = acc_o * inv_l[:, None]                                           # O = O~ / l
            tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=out_mask)
            if WRITE_LSE:
                tl.store(LSE + pid_bh * LQ + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=m_ok)
            if COMPUTE_T:
                t_out = acc_t * inv_l[:, None] - (r_i * inv_l)[:, None] * o          # tO = T~/l - (r/l) O
        if COMPUTE_T:
            to_ptrs = TO + b * stob + h * stoh + offs_m[:, None] * stom + offs_dv[None, :]
            tl.store(to_ptrs, t_out.to(TO.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
# Default tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per mode on CUDA, head dim <= 128.
# Sweep on one H100, B1 H12 L32760 D128 bf16 (tools/bench_jvp_attention.py --sweep, ms):
#   fused    128x64x8x2 36.7 | 128x32x8x3 40.4 | 64x32x4x3 47.8 | 128x32x8x2 50.7 | 64x64x4x2 55.8
#            128x64x8x3 does not fit: 256 KiB of shared memory (K, tK, V, tV x 3 stages + Q, tQ)
#            against the H100's 227 KiB (OutOfResources)
#   tangent  128x64x8x2 31.0 | 128x32x8x3 32.2 | 64x64x4x2 47.7
#   fwd      128x64x8x3 13.0 | 128x128x8x2 14.7 | 128x64x4x3 15.9
# Configs that do not fit a GPU (less shared memory: A100, consumer cards) are stepped down at
# launch (`_fit_tiles`: fewer stages, then smaller BLOCK_N, then BLOCK_M); head dims > 128 start
# from BLOCK_M 64.
_CUDA_TILES = {
    "fwd": (128, 64, 8, 3),
    "fused": (128, 64, 8, 2),
    "tangent": (128, 64, 8, 2),
}
_INTERPRETER_TILES = (32, 32, 4, 1)  # CPU interpreter: small tiles keep numpy fast


def _tiles(mode: str, device: torch.device, d: int, block_m, block_n, num_warps, num_stages):
    bm, bn, w, s = _CUDA_TILES[mode] if device.type == "cuda" else _INTERPRETER_TILES
    if device.type == "cuda" and d > 128:
        bm = 64
    bm, bn = block_m or bm, block_n or bn
    check_block("block_m", bm)
    check_block("block_n", bn)
    return bm, bn, num_warps or w, num_stages or s


_FITTED: dict = {}  # launch key -> the (BLOCK_M, BLOCK_N, num_warps, num_stages) that fitted


def fitted_tiles(mode: str, asked: tuple) -> set:
    """The tile configs actually launched for `mode` when `asked` was requested (for benchmarks)."""
    return {v for k, v in _FITTED.items() if k[0] == mode and k[5:9] == tuple(asked)}


def _fit_tiles(key, bm, bn, warps, stages):
    """Tile configs to try in order: the fitted one if known, else the asked one stepped down."""
    if key in _FITTED:
        yield _FITTED[key]
        return
    while True:
        yield bm, bn, warps, stages
        if stages > 1:
            stages -= 1
        elif bn > 16:
            bn //= 2
        elif bm > 16:
            bm //= 2
        else:
            return


def _unit_last(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _launch_impl(mode, q, k, v, tq, tk, tv, o, lse, scale, block_m, block_n, num_warps, num_stages):
    """Launch the kernel in `mode` in {"fwd", "fused", "tangent"}; returns (o, to, lse).

    Outputs a mode does not produce come back as empty tensors (never aliases of the inputs:
    "tangent" reads o and lse and returns only to), as torch.library.custom_op requires.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed: use the *_reference functions on this machine")
    if mode not in ("fwd", "fused", "tangent"):
        raise ValueError(f"mode must be 'fwd', 'fused' or 'tangent', got {mode!r}")
    q, k, v, tq, tk, tv, o = (_unit_last(t) for t in (q, k, v, tq, tk, tv, o))
    B, H, LQ, D = q.shape
    LK, DV = k.shape[2], v.shape[3]
    bm, bn, warps, stages = _tiles(mode, q.device, max(D, DV), block_m, block_n, num_warps, num_stages)
    bd, bdv = max(16, next_power_of_2(D)), max(16, next_power_of_2(DV))
    compute_t = mode in ("fused", "tangent")
    stats_given = mode == "tangent"
    if stats_given:
        if o is None or lse is None:
            raise ValueError("mode 'tangent' needs o and lse from a forward pass")
        lse = lse.contiguous()
    else:
        o = torch.empty((B, H, LQ, DV), device=q.device, dtype=q.dtype)
        lse = torch.empty((B, H, LQ), device=q.device, dtype=torch.float32)
    to = torch.empty((B, H, LQ, DV), device=q.device, dtype=q.dtype) if compute_t else o
    if B * H > 0 and LQ > 0:
        dummy = q  # placeholder pointer for absent tangents (never read: HAS_T* is constexpr False)
        tq_, tk_, tv_ = (t if t is not None else dummy for t in (tq, tk, tv))
        args = (
            q, k, v, tq_, tk_, tv_, o, to, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            tq_.stride(0), tq_.stride(1), tq_.stride(2), tk_.stride(0), tk_.stride(1), tk_.stride(2),
            tv_.stride(0), tv_.stride(1), tv_.stride(2),
            o.stride(0), o.stride(1), o.stride(2), to.stride(0), to.stride(1), to.stride(2),
            H, LQ, LK, D, DV, scale, scale * LOG2E,
        )
        meta = dict(
            COMPUTE_T=compute_t, STATS_GIVEN=stats_given, WRITE_LSE=not stats_given,
            HAS_TQ=compute_t and tq is not None, HAS_TK=compute_t and tk is not None,
            HAS_TV=compute_t and tv is not None,
            EVEN_D=bd == D, EVEN_DV=bdv == DV,
            # fp32 inputs: full fp32 products (the reference path); 16-bit inputs: Triton's default
            DOT_PREC="ieee" if q.dtype == torch.float32 else None,
            BLOCK_D=bd, BLOCK_DV=bdv,
        )
        key = (mode, q.device.index, q.dtype, D, DV, bm, bn, warps, stages, meta["HAS_TQ"], meta["HAS_TK"],
               meta["HAS_TV"])
        for bm_, bn_, warps_, stages_ in _fit_tiles(key, bm, bn, warps, stages):
            try:
                _jvp_attn_fwd_kernel[(cdiv(LQ, bm_), B * H)](
                    *args, **meta, BLOCK_M=bm_, BLOCK_N=bn_, num_warps=warps_, num_stages=stages_)
            except OutOfResources:
                continue  # raised at load, before the launch: nothing was written
            _FITTED[key] = (bm_, bn_, warps_, stages_)
            break
        else:
            raise RuntimeError(f"no tile config of {mode!r} fits this GPU, starting from {(bm, bn, warps, stages)}")
    if stats_given:
        return q.new_empty(0), to, q.new_empty(0, dtype=torch.float32)
    return o, (to if compute_t else q.new_empty(0)), lse


# The launch is a torch.library custom op so that it can run inside torch.func transforms: under
# torch.func.jvp, JVPAttentionFunction.jvp sees functorch wrapper tensors without storage, which
# Triton cannot take pointers of; the dispatcher unwraps them on the way into a custom op.
@torch.library.custom_op("turbo::jvp_attention_launch", mutates_args=())
def _launch_op(mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: Optional[torch.Tensor],
               tk: Optional[torch.Tensor], tv: Optional[torch.Tensor], o: Optional[torch.Tensor],
               lse: Optional[torch.Tensor], scale: float, block_m: int, block_n: int, num_warps: int,
               num_stages: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_impl(mode, q, k, v, tq, tk, tv, o, lse, scale, block_m, block_n, num_warps, num_stages)


@_launch_op.register_fake
def _(mode, q, k, v, tq, tk, tv, o, lse, scale, block_m, block_n, num_warps, num_stages):
    B, H, LQ, _ = q.shape
    out = q.new_empty((B, H, LQ, v.shape[3]))
    stats = q.new_empty((B, H, LQ), dtype=torch.float32)
    if mode == "tangent":
        return q.new_empty(0), out, q.new_empty(0, dtype=torch.float32)
    return out, (torch.empty_like(out) if mode == "fused" else q.new_empty(0)), stats


def _launch(mode, q, k, v, tq=None, tk=None, tv=None, scale=1.0, o=None, lse=None, *, block_m=None,
            block_n=None, num_warps=None, num_stages=None):
    o, to, lse = _launch_op(mode, q, k, v, tq, tk, tv, o, lse, float(scale), block_m or 0, block_n or 0,
                            num_warps or 0, num_stages or 0)
    return o, to, lse


def jvp_attention(q, k, v, tq=None, tk=None, tv=None, scale=None, **tiles):
    """(O, tO) in one fused pass (six GEMMs per key block); no autograd.

    q, tq: (B, H, Lq, D); k, tk: (B, H, Lk, D); v, tv: (B, H, Lk, Dv); None tangents are zero
    (cross-attention: tk = tv = None). scale defaults to 1/sqrt(D). Triton on CUDA (or on CPU under
    TRITON_INTERPRET=1), else the closed-form reference. `tiles`: block_m, block_n, num_warps, num_stages.
    """
    scale = check_attention_inputs(q, k, v, tq, tk, tv, scale)
    if not use_triton(q, k, v):
        return jvp_attention_reference(q, k, v, tq, tk, tv, scale)
    o, to, _ = _launch("fused", q, k, v, tq, tk, tv, scale, **tiles)
    return o, to


def flash_attention_lse(q, k, v, scale=None, **tiles):
    """(O, LSE): plain flash-attention forward; LSE (B, H, Lq) fp32 natural log. Triton only."""
    scale = check_attention_inputs(q, k, v, scale=scale)
    o, _, lse = _launch("fwd", q, k, v, None, None, None, scale, **tiles)
    return o, lse


def jvp_attention_tangent(q, k, v, o, lse, tq=None, tk=None, tv=None, scale=None, **tiles):
    """tO from a finished forward (O and its LSE): five GEMMs per key block, no rescaling. Triton only."""
    scale = check_attention_inputs(q, k, v, tq, tk, tv, scale)
    B, H, LQ, _ = q.shape
    if o.shape != (B, H, LQ, v.shape[3]) or o.dtype != q.dtype:
        raise ValueError(f"o must be ({B}, {H}, {LQ}, {v.shape[3]}) {q.dtype}, got {tuple(o.shape)} {o.dtype}")
    if lse.shape != (B, H, LQ) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be ({B}, {H}, {LQ}) float32, got {tuple(lse.shape)} {lse.dtype}")
    _, to, _ = _launch("tangent", q, k, v, tq, tk, tv, scale, o=o, lse=lse, **tiles)
    return to


# ----------------------------------------------------------------------------------------------
# autograd.Function: reverse mode (backward) and forward mode (jvp), torch.func compatible
# ----------------------------------------------------------------------------------------------
class JVPAttentionFunction(torch.autograd.Function):
    """softmax(q k^T * scale) v with both a backward and a jvp rule (setup_context style).

    forward:  inputs that need grad (the student's forward with grad) -> SDPA (cuDNN/flash on GPU,
              its fastest forward). Otherwise -> our flash forward, which also returns each row's
              LSE so that jvp needs no second softmax pass (measured 13.0 + 31.0 ms at the 1.3B
              shape vs an estimated 11.3 + 36.7 for SDPA + fused).
    jvp:      with a saved LSE -> `tangent` kernel (5 GEMMs); without (forward ran SDPA) -> the
              fused kernel (6 GEMMs; its O is recomputed and dropped). CPU without Triton -> reference.
    backward: recompute through SDPA with autograd and take its VJP (SDPA's own backward kernel:
              flash/cuDNN on GPU, math on CPU). Costs one extra SDPA forward per backward; chosen over
              private aten backward entry points, whose signatures change across torch releases.
    Returns (O, LSE); LSE is non-differentiable and empty on the SDPA path.
    """

    @staticmethod
    def forward(q, k, v, scale, tiles):
        needs_grad = any(t.requires_grad for t in (q, k, v))
        if use_triton(q, k, v) and not needs_grad and triton is not None:
            o, _, lse = _launch("fwd", q, k, v, None, None, None, scale, **tiles)
            return o, lse
        return F.scaled_dot_product_attention(q, k, v, scale=scale), q.new_empty(0, dtype=torch.float32)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, tiles = inputs
        o, lse = output
        ctx.scale, ctx.tiles = scale, tiles
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # absent tangents arrive as None: no GEMMs on zeros
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v, o, lse)

    @staticmethod
    def backward(ctx, grad_o, grad_lse):
        q, k, v = ctx.saved_tensors
        if grad_o is None:
            return None, None, None, None, None
        with torch.enable_grad():
            qg, kg, vg = (t.detach().requires_grad_(n) for t, n in zip((q, k, v), ctx.needs_input_grad[:3]))
            o = F.scaled_dot_product_attention(qg, kg, vg, scale=ctx.scale)
            wrt = [t for t in (qg, kg, vg) if t.requires_grad]
            grads = iter(torch.autograd.grad(o, wrt, grad_o))
        return (*(next(grads) if n else None for n in ctx.needs_input_grad[:3]), None, None)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _scale, _tiles):
        q, k, v, o, lse = ctx.saved_tensors
        if tq is None and tk is None and tv is None:
            return torch.zeros_like(o), None
        if not use_triton(q, k, v) or triton is None:
            return jvp_attention_reference(q, k, v, tq, tk, tv, ctx.scale)[1], None
        if lse.numel():
            _, to, _ = _launch("tangent", q, k, v, tq, tk, tv, ctx.scale, o=o, lse=lse, **ctx.tiles)
        else:
            _, to, _ = _launch("fused", q, k, v, tq, tk, tv, ctx.scale, **ctx.tiles)
        return to, None


def jvp_flash_attention(q, k, v, scale=None, **tiles):
    """Attention that works under autograd (backward) and torch.func.jvp / forward AD.

    q: (B, H, Lq, D), k: (B, H, Lk, D), v: (B, H, Lk, Dv) -> (B, H, Lq, Dv). Dispatch:
      no input needs grad, some carry a forward-AD tangent (rCM's no-grad JVP pass) -> the fused
          kernel on the unpacked primals/tangents, one pass for (O, tO), re-packed as a dual;
      no input needs grad, no tangents (inference) -> SDPA (cuDNN on GPU);
      inputs that need grad, no tangents (a training forward: rCM's student and fake-score steps) ->
          SDPA with its own autograd: its backward kernel reuses the saved O and log-sum-exp, where
          JVPAttentionFunction's backward must run the forward once more;
      inputs that need grad and carry tangents -> JVPAttentionFunction (SDPA forward and backward, jvp
          rule for forward AD).
    Only the innermost forward-AD level is seen (no nested torch.func.jvp through this op).
    """
    scale = check_attention_inputs(q, k, v, scale=scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        if all(fwAD.unpack_dual(t).tangent is None for t in (q, k, v)):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return JVPAttentionFunction.apply(q, k, v, scale, tiles)[0]
    if not use_triton(q, k, v) or triton is None:
        return JVPAttentionFunction.apply(q, k, v, scale, tiles)[0]  # jvp via the reference on CPU
    (pq, tq), (pk, tk), (pv, tv) = (fwAD.unpack_dual(t) for t in (q, k, v))
    if tq is None and tk is None and tv is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    check_attention_inputs(pq, pk, pv, tq, tk, tv, scale)
    o, to, _ = _launch("fused", pq, pk, pv, tq, tk, tv, scale, **tiles)
    return fwAD.make_dual(o, to)
