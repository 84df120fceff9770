"""Low-bit dense attention (SageAttention-style): INT8 QKᵀ, FP8 (or FP16) PV, fp32 accumulation.

Follows SageAttention (Zhang et al., ICLR 2025) and SageAttention2 (ICML 2025):
  * smooth K: subtract the token mean of K per (batch, head). softmax(q·(k−k̄)) = softmax(q·k)
    because q·k̄ is constant along a row, so this is exact and removes K's channel offset, which
    would otherwise eat the int8 range;
  * Q quantized to int8 per block of 128 tokens, K per block of 64, scale = amax/127, with the
    softmax scale·log2(e) folded into Q before quantization (so the kernel uses exp2 directly);
  * S = (Q_i8 K_i8ᵀ)·s_q·s_k on int8 tensor cores (int32 accumulate, exact: |S_int| ≤ D·127² < 2²²);
  * online softmax in fp32; P̃ = exp2(S − m + 8) = 256·exp2(S − m) ∈ [0, 256] (the ×256 keeps small
    probabilities out of fp8's subnormal range and cancels against the row sum ℓ, which sums the
    same fp32 P̃), P̃ cast to fp8 e4m3 (or fp16);
  * V quantized to fp8 e4m3 per channel (scale = amax over tokens / 448), stored transposed
    (B, H, D, L) because 8-bit wgmma needs a K-major B operand; fp16 path: V cast to fp16;
  * O = (Σ P̃_q V_q) / ℓ · s_v, fp32 accumulation, cast to the input dtype.

The reference below reproduces this arithmetic step by step (same block order for the online
softmax, same rounding of P̃ and of the int8 values); it is also the CPU path. The kernel differs
from it on a GPU only by fp32 summation order inside the tensor cores and FMA contraction.

File layout: references → @triton.jit kernels → host launchers. Forward only (no peer has a
backward either); calling backward raises.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from turbo_kernels.gemm.quantize import round_half_away as _round_half_away
from turbo_kernels.utils import cdiv, check_float_dtype, heads_output_like, interpreter_enabled, is_power_of_2, use_triton

try:  # Triton is optional: without it only the references run (CPU runtime).
    import triton
    import triton.language as tl
    from turbo_kernels.gemm.quantize import dynamic_scale, quantize_tile, round_to_fp8_grid
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

LOG2E = 1.4426950408889634
QUANT_BLOCK_Q = 128  # tokens per Q scale (SageAttention's choice; one scale per kernel row block)
QUANT_BLOCK_K = 64  # tokens per K scale
P_SHIFT = 8.0  # P̃ = exp2(S − m + P_SHIFT): P scaled by 2⁸ before its fp8/fp16 cast
MAX_RESCALE_TAU = 4.0  # largest lazy-rescale threshold (log2 units) the kernels accept
FP8_MAX = 448.0  # largest finite float8_e4m3fn
PAD = 128  # quantized Q/K/V are zero-padded to a multiple of this many tokens (largest tile)
PV_MODES = ("fp8", "fp16")


# ----------------------------------------------------------------------------------------------
# torch references (the spec and the CPU path)
# ----------------------------------------------------------------------------------------------
def _safe_inv(numer: float, amax: torch.Tensor) -> torch.Tensor:
    """numer / amax in fp32 (IEEE division), 0 where amax == 0 (an all-zero block stays zero)."""
    return torch.where(amax > 0, torch.tensor(numer, dtype=torch.float32) / amax, torch.zeros_like(amax))


def quantize_blocks_int8_reference(x: torch.Tensor, block: int, mul: float = 1.0, mean: torch.Tensor | None = None):
    """Per-block int8 quantization along the token axis.

    x: (B, H, L, D) any float dtype; mean: (B, H, D) fp32 subtracted first (K smoothing); mul: a
    factor applied after (Q: softmax scale·log2 e). Returns (x_i8 (B, H, L, D) int8,
    scale (B, H, cdiv(L, block)) fp32) with x·mul ≈ x_i8·scale.
    """
    B, H, L, D = x.shape
    nb = cdiv(L, block)
    xf = x.float()
    if mean is not None:
        xf = xf - mean[:, :, None, :]
    xf = xf * torch.tensor(mul, dtype=torch.float32)
    xp = torch.zeros(B, H, nb * block, D, dtype=torch.float32, device=x.device)
    xp[:, :, :L] = xf
    xb = xp.view(B, H, nb, block, D)  # (B, H, nb, block, D)
    amax = xb.abs().amax(dim=(-1, -2))  # (B, H, nb)
    inv = _safe_inv(127.0, amax)
    y = _round_half_away(xb * inv[..., None, None]).clamp(-127, 127)
    x_i8 = y.to(torch.int8).view(B, H, nb * block, D)[:, :, :L]
    return x_i8, amax / 127.0


def quantize_qk_reference(q, k, sm_scale: float | None = None, block_q: int = QUANT_BLOCK_Q, block_k: int = QUANT_BLOCK_K,
                          k_mean: torch.Tensor | None = None):
    """Smooth K and quantize Q (×sm_scale·log2 e) and K to per-block int8.

    k_mean: K's token mean (B, H, D) fp32 when already known (a block map's), else computed here.
    Returns (q_i8, q_scale (B, H, cdiv(Lq, block_q)), k_i8, k_scale (B, H, cdiv(Lk, block_k)),
    k_mean (B, H, D) fp32).
    """
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    k_mean = k.mean(dim=2, dtype=torch.float32) if k_mean is None else _checked_mean(k_mean, k)  # (B, H, D)
    q_i8, q_scale = quantize_blocks_int8_reference(q, block_q, mul=sm_scale * LOG2E)
    k_i8, k_scale = quantize_blocks_int8_reference(k, block_k, mean=k_mean)
    return q_i8, q_scale, k_i8, k_scale, k_mean


def quantize_v_reference(v: torch.Tensor, pv: str = "fp8"):
    """V for the PV product. fp8: per-channel e4m3 with scale amax_L/448; fp16: a cast, scale 1.

    Returns (v_q (B, H, L, D), v_scale (B, H, D) fp32) with v ≈ v_q·v_scale.
    """
    if pv == "fp16":
        return v.to(torch.float16), torch.ones(v.shape[0], v.shape[1], v.shape[3], device=v.device)
    amax = v.abs().amax(dim=2).float()  # (B, H, D)
    v_q = (v.float() * _safe_inv(FP8_MAX, amax)[:, :, None, :]).to(torch.float8_e4m3fn)
    return v_q, amax / FP8_MAX


def p_shift(pv_fp8: bool, tau: float) -> float:
    """The exponent offset of P̃ = exp2(S − m + shift) for a lazy-rescale threshold tau.

    With tau > 0 the running max m may lag the true row max by up to tau (log2 units), so P̃ can reach
    2^(shift + tau): fp8 keeps shift + tau = 8 (P̃ ≤ 256 < 448, its largest value); fp16 has the range
    to keep shift = 8 (P̃ ≤ 2^12).
    """
    if not 0.0 <= tau <= MAX_RESCALE_TAU:
        raise ValueError(f"rescale_tau must be in [0, {MAX_RESCALE_TAU}], got {tau!r}")
    return P_SHIFT - tau if pv_fp8 else P_SHIFT


def lazy_max(m: torch.Tensor, m_cand: torch.Tensor, tau: float) -> torch.Tensor:
    """The running max after a tile: the candidate where it exceeds the old one by more than tau, else the
    old one (FlashAttention-4's conditional rescaling; tau = 0 is the plain running max)."""
    return torch.where(m_cand > m + tau, m_cand, m)


def _fma32(a, b, c):
    """fp32 fused multiply-add, emulated in float64 (exact for the operands used here)."""
    return (torch.as_tensor(a, dtype=torch.float64) * torch.as_tensor(b).double() + torch.as_tensor(c).double()).float()


def attention_core_reference(q_i8, q_scale, k_i8, k_scale, v_q, v_scale, lut, *, tile: int, block_q: int,
                             block_k: int, out_dtype: torch.dtype, group: int = 1, i2f: int = 2,
                             rescale_tau: float = 0.0) -> torch.Tensor:
    """Online-softmax attention over key tiles, emulating the kernels' arithmetic.

    q_i8: (B, H, Lq, D) int8; k_i8: (B, H, Lk, D) int8; v_q: (B, H, Lk, D) fp8/fp16; scales as
    returned by the quantizers (Q per block_q tokens, K per block_k); lut: (B, H, cdiv(Lq, block_q),
    n) indices of key tiles of `tile` tokens. Each online-softmax step takes the next `group` tiles
    of the row (dense: all tiles ascending, group 1; sparse: the critical blocks, `group` per
    kernel iteration). i2f: the kernels' int32→fp32 score path (0/1: S = qk·sc; 2: fused FMA, see
    lowbit_online_step). rescale_tau: the lazy-rescale threshold (lazy_max, p_shift).
    Returns (B, H, Lq, D) in out_dtype.
    """
    shift = p_shift(v_q.dtype == torch.float8_e4m3fn, rescale_tau)
    B, H, Lq, D = q_i8.shape
    Lk = k_i8.shape[2]
    nq, nt, n = cdiv(Lq, block_q), cdiv(Lk, tile), lut.shape[-1]
    dev = q_i8.device

    def pad(t, size):  # zero-pad the token axis (dim 2) to size
        out = torch.zeros(t.shape[0], t.shape[1], size, *t.shape[3:], dtype=t.dtype, device=dev)
        out[:, :, : t.shape[2]] = t
        return out

    qb = pad(q_i8, nq * block_q).view(B, H, nq, block_q, D).double()  # (B, H, nq, bq, D)
    qs = q_scale[:, :, :nq]  # one scale per query block  (B, H, nq)
    kt = pad(k_i8, nt * tile).view(B, H, nt, tile, D).double()  # (B, H, nt, T, D)
    vt = pad(v_q.float(), nt * tile).view(B, H, nt, tile, D).double()
    ks_tok = pad(k_scale.repeat_interleave(block_k, dim=-1)[..., :Lk, None], nt * tile)[..., 0]
    ks_t = ks_tok.view(B, H, nt, tile)  # per-token K scale  (B, H, nt, T)
    valid = (torch.arange(nt * tile, device=dev) < Lk).view(nt, tile)

    m = torch.full((B, H, nq, block_q), float("-inf"), device=dev)
    l = torch.zeros(B, H, nq, block_q, device=dev)
    acc = torch.zeros(B, H, nq, block_q, D, device=dev)
    for j0 in range(0, n, group):
        ks, vs, kss, oks = [], [], [], []
        for j in range(j0, j0 + group):  # the tiles of this step, side by side on the key axis
            idx = lut[..., min(j, n - 1)].long()  # (B, H, nq)
            g = idx[..., None, None].expand(B, H, nq, tile, D)
            ks.append(torch.gather(kt, 2, g))  # (B, H, nq, T, D)
            vs.append(torch.gather(vt, 2, g))
            kss.append(torch.gather(ks_t, 2, idx[..., None].expand(B, H, nq, tile)))  # (B, H, nq, T)
            oks.append(valid[idx] & (j < n))  # (B, H, nq, T)
        k_j, v_j, ks_j, ok = (torch.cat(t, dim=3) for t in (ks, vs, kss, oks))
        qk = (qb @ k_j.transpose(-1, -2)).float()  # exact int32 dot products  (B, H, nq, bq, G·T)
        if i2f == 2:
            b = qk + 12582912.0  # 1.5·2²³ + qk, exact
            if tile * group <= block_k:  # one K scale per step: int row max, one FMA per score
                sc = qs * ks_j[..., 0]  # (B, H, nq)
                qk_max = torch.where(ok[..., None, :], qk, float("-inf")).amax(-1)
                m_new = lazy_max(m, torch.maximum(m, qk_max * sc[..., None]), rescale_tau)
                c = _fma32(12582912.0, sc[..., None], m_new - shift)  # (B, H, nq, bq)
                x = _fma32(b, sc[..., None, None], -c[..., None])
            else:
                sc = qs[..., None] * ks_j  # (B, H, nq, G·T)
                s = _fma32(b, sc[..., None, :], -(12582912.0 * sc)[..., None, :])
                s = torch.where(ok[..., None, :], s, float("-inf"))
                m_new = lazy_max(m, torch.maximum(m, s.amax(-1)), rescale_tau)
                x = s - (m_new - shift)[..., None]
            x = torch.where(ok[..., None, :], x, float("-inf"))
        else:
            s = qk * (qs[..., None] * ks_j)[..., None, :]
            s = torch.where(ok[..., None, :], s, float("-inf"))
            m_new = lazy_max(m, torch.maximum(m, s.amax(-1)), rescale_tau)
            x = s - (m_new - shift)[..., None]
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(x)  # 2^shift·softmax numerators, ≤ 256 (fp8)
        l = l * alpha + p.sum(-1)
        p_q = p.to(v_q.dtype).double()
        acc = acc * alpha[..., None] + (p_q @ v_j).float()
        m = m_new
    out = acc / l[..., None] * v_scale[:, :, None, None, :]
    return out.view(B, H, nq * block_q, D)[:, :, :Lq].to(out_dtype)


def lowbit_attention_reference(q, k, v, *, pv: str = "fp8", sm_scale: float | None = None, block_n: int = 128,
                               i2f: int = 2, rescale_tau: float = 0.0):
    """Sage-style low-bit attention in plain torch. q: (B, H, Lq, D), k/v: (B, H, Lk, D).

    block_n, i2f, rescale_tau: the kernel's BLOCK_N, score path and lazy-rescale threshold (they change
    rounding only).
    """
    q_i8, q_s, k_i8, k_s, _ = quantize_qk_reference(q, k, sm_scale)
    v_q, v_s = quantize_v_reference(v, pv)
    B, H, Lq, _ = q.shape
    nq, nt = cdiv(Lq, QUANT_BLOCK_Q), cdiv(k.shape[2], block_n)
    lut = torch.arange(nt, device=q.device).expand(B, H, nq, nt)
    return attention_core_reference(q_i8, q_s, k_i8, k_s, v_q, v_s, lut, tile=block_n, block_q=QUANT_BLOCK_Q,
                                    block_k=QUANT_BLOCK_K, out_dtype=q.dtype, i2f=i2f, rescale_tau=rescale_tau)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _quant_int8_block_kernel(X, Mean, Out, Scale, stride_xb, stride_xh, stride_xl, stride_xd, H, L, L_pad, n_blk,
                                 mul, D: tl.constexpr, BLOCK: tl.constexpr, SUB_MEAN: tl.constexpr):
        """One program = one block of BLOCK tokens of one (b, h): int8 values + one scale."""
        pid = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        offs_l = pid * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        row_ok = offs_l < L
        x = tl.load(X + b * stride_xb + h * stride_xh + offs_l[:, None] * stride_xl + offs_d[None, :] * stride_xd,
                    mask=row_ok[:, None], other=0.0).to(tl.float32)
        if SUB_MEAN:
            mean = tl.load(Mean + bh * D + offs_d)
            x = tl.where(row_ok[:, None], x - mean[None, :], 0.0)
        x = x * mul
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        inv, scale = dynamic_scale(amax, False)
        y = quantize_tile(x, inv, False, False)  # int8, round half away from zero
        tl.store(Out + bh * L_pad * D + offs_l[:, None] * D + offs_d[None, :], y)
        tl.store(Scale + bh * n_blk + pid, scale)

    @triton.jit
    def _quant_v_kernel(X, Inv, Out, stride_xb, stride_xh, stride_xl, stride_xd, H, L, L_pad,
                        D: tl.constexpr, BLOCK: tl.constexpr, FP8: tl.constexpr, EXACT_CAST: tl.constexpr):
        """V·inv_scale per channel → fp8 e4m3 (or V → fp16), stored transposed: Out (B·H, D, L_pad)."""
        pid = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        offs_l = pid * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        x = tl.load(X + b * stride_xb + h * stride_xh + offs_l[:, None] * stride_xl + offs_d[None, :] * stride_xd,
                    mask=(offs_l < L)[:, None], other=0.0).to(tl.float32)
        if FP8:
            inv = tl.load(Inv + bh * D + offs_d)
            y = x * inv[None, :]
            if EXACT_CAST:
                y = round_to_fp8_grid(y)
            y = y.to(tl.float8e4nv)
        else:
            y = x.to(tl.float16)
        tl.store(Out + bh * D * L_pad + offs_d[None, :] * L_pad + offs_l[:, None], y)

    @triton.jit
    def lazy_running_max(m_i, m_cand, TAU: tl.constexpr):
        """The running max after a tile, as `lazy_max`: m_cand = max(m_i, tile max) where it exceeds m_i by
        more than TAU, else m_i; TAU = 0 is m_cand itself."""
        if TAU > 0:
            m_cand = tl.where(m_cand > m_i + TAU, m_cand, m_i)
        return m_cand

    @triton.jit
    def lowbit_online_step(acc, l_i, m_i, qk, qs, ks, valid, v, SCALAR_K: tl.constexpr, I2F: tl.constexpr,
                           PV_FP8: tl.constexpr, EXACT_CAST: tl.constexpr, MASK: tl.constexpr,
                           TAU: tl.constexpr, SHIFT: tl.constexpr):
        """Online-softmax update with one tile of int32 scores qk (BLOCK_M, BLOCK_N) and V (BLOCK_N, D).

        qs: the tile's Q scale; ks: its K scale (a scalar when SCALAR_K, i.e. the tile lies in one
        K quantization block, else one per column); valid: (BLOCK_N,) key mask, used when MASK.
        The score of a column is S = qk·(qs·ks) in log2 units. I2F picks how int32 becomes fp32:
          0: cvt (the quarter-rate conversion unit); 1: b = bits(qk + 0x4B400000) = 1.5·2²³ + qk
          exactly (|qk| < 2²²), S = (b − 1.5·2²³)·sc; 2: fused, S − m' = fma(b, sc, −(1.5·2²³·sc + m'))
          with the row max taken on the int32 scores when SCALAR_K (one IMNMX + one FFMA per score
          instead of I2F + FMUL + FMNMX + FADD). The constant's rounding moves S by ≤ 1 ulp of
          1.5·2²³·sc, i.e. < one int8 score step.
        TAU > 0: lazy rescaling (FlashAttention-4): a row's running max moves only when the tile's max
        exceeds it by more than TAU, and the (BLOCK_M, D) accumulator is rescaled only when some row's
        moved (alpha is exactly 1 elsewhere, so skipping is exact). SHIFT = p_shift(PV_FP8, TAU).
        """
        if I2F == 2:
            b = (qk + 0x4B400000).to(tl.float32, bitcast=True)
            if SCALAR_K:
                sc = qs * ks
                if MASK:
                    qk = tl.where(valid[None, :], qk, -2147483647)
                m_new = tl.maximum(m_i, tl.max(qk, 1).to(tl.float32) * sc)
                m_new = lazy_running_max(m_i, m_new, TAU)
                x = tl.fma(b, sc, -tl.fma(12582912.0, sc, m_new - SHIFT)[:, None])  # S − (m_new − SHIFT)
            else:
                sc = qs * ks
                s = tl.fma(b, sc[None, :], -(12582912.0 * sc)[None, :])
                if MASK:
                    s = tl.where(valid[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_new = lazy_running_max(m_i, m_new, TAU)
                x = s - (m_new - SHIFT)[:, None]
            if MASK:
                x = tl.where(valid[None, :], x, float("-inf"))
        else:
            if I2F == 1:
                qk_f = (qk + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
            else:
                qk_f = qk.to(tl.float32)
            if SCALAR_K:
                s = qk_f * (qs * ks)
            else:
                s = qk_f * (qs * ks)[None, :]
            if MASK:
                s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_new = lazy_running_max(m_i, m_new, TAU)
            x = s - (m_new - SHIFT)[:, None]
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(x)  # 2^SHIFT·softmax numerators
        l_i = l_i * alpha + tl.sum(p, 1)
        if TAU > 0:
            if tl.max((m_new != m_i).to(tl.int32), 0) > 0:  # some row's max moved: rescale the tile
                acc = acc * alpha[:, None]
        else:
            acc = acc * alpha[:, None]
        if PV_FP8:
            if EXACT_CAST:
                p = round_to_fp8_grid(p)
            acc = tl.dot(p.to(tl.float8e4nv), v, acc)
        else:
            acc = tl.dot(p.to(tl.float16), v, acc)
        return acc, l_i, m_new

    @triton.jit
    def lowbit_store_out(acc, l_i, VS, Out, bh, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_ol, stride_od,
                         Lq, D: tl.constexpr):
        """O = acc / l · V's per-channel scale, stored in Out's dtype for the rows < Lq (dense and sparse kernels)."""
        vs = tl.load(VS + bh * D + offs_d)
        out = acc / l_i[:, None] * vs[None, :]
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od,
                 out.to(Out.dtype.element_ty), mask=(offs_m < Lq)[:, None])

    @triton.jit
    def _lowbit_tile(acc, l_i, m_i, q, qs, K_base, V_base, KS_base, start_n, Lk, L_pad,
                     D: tl.constexpr, BLOCK_N: tl.constexpr, QBK: tl.constexpr, PV_FP8: tl.constexpr,
                     I2F: tl.constexpr, EXACT_CAST: tl.constexpr, MASK: tl.constexpr, TAU: tl.constexpr,
                     SHIFT: tl.constexpr):
        """One online-softmax step over keys [start_n, start_n + BLOCK_N)."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        k = tl.load(K_base + offs_n[None, :] * D + offs_d[:, None])  # (D, BLOCK_N) int8, zero-padded
        if BLOCK_N <= QBK:
            ks = tl.load(KS_base + start_n // QBK)  # the whole tile shares one K scale
        else:
            ks = tl.load(KS_base + offs_n // QBK)  # (BLOCK_N,) K scale per token
        qk = tl.dot(q, k, out_dtype=tl.int32)  # (BLOCK_M, BLOCK_N) exact
        v = tl.load(V_base + offs_n[:, None] + offs_d[None, :] * L_pad)  # (BLOCK_N, D) from (D, L_pad)
        return lowbit_online_step(acc, l_i, m_i, qk, qs, ks, offs_n < Lk, v, BLOCK_N <= QBK, I2F, PV_FP8,
                                  EXACT_CAST, MASK, TAU, SHIFT)

    @triton.jit
    def _lowbit_attn_fwd_kernel(Q, K, V, QS, KS, VS, Out, stride_ob, stride_oh, stride_ol, stride_od,
                                H, Lq, Lk, Lq_pad, Lk_pad, n_qs, n_ks,
                                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                QBQ: tl.constexpr, QBK: tl.constexpr, PV_FP8: tl.constexpr, I2F: tl.constexpr,
                                EXACT_CAST: tl.constexpr, WS: tl.constexpr, TAU: tl.constexpr, SHIFT: tl.constexpr):
        """One program = BLOCK_M queries of one (b, h) against all keys (dense)."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + bh * Lq_pad * D + offs_m[:, None] * D + offs_d[None, :])  # (BLOCK_M, D) int8
        qs = tl.load(QS + bh * n_qs + (pid_m * BLOCK_M) // QBQ)
        K_base = K + bh * Lk_pad * D
        V_base = V + bh * D * Lk_pad
        KS_base = KS + bh * n_ks
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        n_full = (Lk // BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WS):  # full tiles: no masking
            acc, l_i, m_i = _lowbit_tile(acc, l_i, m_i, q, qs, K_base, V_base, KS_base, start_n, Lk, Lk_pad,
                                         D, BLOCK_N, QBK, PV_FP8, I2F, EXACT_CAST, False, TAU, SHIFT)
        if n_full < Lk:  # ragged tail: mask keys ≥ Lk
            acc, l_i, m_i = _lowbit_tile(acc, l_i, m_i, q, qs, K_base, V_base, KS_base, n_full, Lk, Lk_pad,
                                         D, BLOCK_N, QBK, PV_FP8, I2F, EXACT_CAST, True, TAU, SHIFT)
        lowbit_store_out(acc, l_i, VS, Out, bh, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_ol, stride_od,
                         Lq, D)

# ----------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LowbitConfig:
    """Tile configuration of the dense kernel. block_m must divide 128 (one Q scale per tile)."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    i2f: int = 2  # int32 → fp32 score path, see lowbit_online_step: 0 cvt, 1 magic add, 2 fused FMA
    warp_specialize: bool = False  # Triton's automatic warp specialization of the key loop
    # lazy rescaling threshold, log2 units (0: rescale at every tile; see p_shift). Measured slower on an H100
    # (2026-12-05, 1.3B, 128x64 w4 s4): tau 0 8.23 ms, tau 2 9.19, tau 4 9.07 (BENCHMARKS.md): stays 0
    rescale_tau: float = 0.0

    def __post_init__(self):
        p_shift(True, self.rescale_tau)  # validates the threshold
        if self.i2f not in (0, 1, 2):
            raise ValueError(f"i2f must be 0, 1 or 2, got {self.i2f!r}")
        if self.block_m not in (16, 32, 64, 128):
            raise ValueError(f"block_m must be one of 16, 32, 64, 128 (it must divide {QUANT_BLOCK_Q}), got {self.block_m}")
        if self.block_n not in (16, 32, 64, 128):
            raise ValueError(f"block_n must be one of 16, 32, 64, 128 (it must divide {PAD}), got {self.block_n}")


# H100 (sm90), Triton 3.6, B1 H12 L32760 D128, kernel only: 128×64 tiles, 4 warps, 4 stages, fused score
# path 8.24 ms (cuDNN bf16 11.37). Sweep (tools/bench_lowbit.py): 3 stages 8.33, 2 stages 9.50; i2f=1 9.15,
# i2f=0 9.03; 64×64 8.98; 64×128 10.11; 128×128 with 8 warps 11.59 (4 warps: 16.69); warp_specialize no gain.
# One warpgroup per CTA and two CTAs per SM overlap one CTA's softmax with the other's tensor-core work.
DEFAULT_CONFIG = LowbitConfig(block_m=128, block_n=64, num_warps=4, num_stages=4, i2f=2)


@dataclass
class QuantizedQKV:
    """Quantized, zero-padded operands of the low-bit kernels.

    q_i8: (B, H, Lq_pad, D) int8; q_scale: (B, H, Lq_pad/block_q) fp32 (includes softmax scale·log2 e);
    k_i8: (B, H, Lk_pad, D) int8 (smoothed); k_scale: (B, H, Lk_pad/block_k); k_mean: (B, H, D);
    v_q: (B, H, D, Lk_pad) fp8 e4m3 or fp16 (transposed); v_scale: (B, H, D) fp32.
    """

    q_i8: torch.Tensor
    q_scale: torch.Tensor
    k_i8: torch.Tensor
    k_scale: torch.Tensor
    k_mean: torch.Tensor
    v_q: torch.Tensor
    v_scale: torch.Tensor
    lq: int
    lk: int
    block_q: int = QUANT_BLOCK_Q
    block_k: int = QUANT_BLOCK_K


def _check_qkv(q, k, v, pv):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_dtype(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, L, D), got {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and D")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"sequence lengths must be >= 1, got Lq={q.shape[2]}, Lk={k.shape[2]}")
    D = q.shape[3]
    if not (is_power_of_2(D) and 16 <= D <= 256):
        raise ValueError(f"head dim D must be a power of two in [16, 256] for the low-bit kernels, got {D}")
    if pv not in PV_MODES:
        raise ValueError(f"pv must be one of {PV_MODES}, got {pv!r}")


def _checked_mean(k_mean: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A given K token mean must be (B, H, D) fp32 on K's device; returned contiguous."""
    B, H, _, D = k.shape
    if k_mean.shape != (B, H, D) or k_mean.dtype != torch.float32 or k_mean.device != k.device:
        raise ValueError(f"k_mean must be a float32 ({B}, {H}, {D}) tensor on {k.device}, got "
                         f"{k_mean.dtype} {tuple(k_mean.shape)} on {k_mean.device}")
    return k_mean.contiguous()


def quantize_qkv(q, k, v, *, pv: str = "fp8", sm_scale: float | None = None, block_q: int = QUANT_BLOCK_Q,
                 block_k: int = QUANT_BLOCK_K, k_mean: torch.Tensor | None = None) -> QuantizedQKV:
    """Launch the quantization kernels (smooth K, int8 Q/K per block, fp8/fp16 V per channel).

    block_q / block_k: tokens per Q / K scale (powers of two in [16, 128]). k_mean: K's token mean (B, H, D) fp32
    when known (a block map's, `BlockMap.k_mean`): the smoothing then needs no pass of its own over K.
    """
    _check_qkv(q, k, v, pv)
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk not in (16, 32, 64, 128):
            raise ValueError(f"{name} must be one of 16, 32, 64, 128, got {blk!r}")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    sm_scale = D ** -0.5 if sm_scale is None else float(sm_scale)
    Lq_pad, Lk_pad = cdiv(Lq, PAD) * PAD, cdiv(Lk, PAD) * PAD  # PAD is a multiple of every block size
    dev = q.device
    k_mean = k.mean(dim=2, dtype=torch.float32).contiguous() if k_mean is None else _checked_mean(k_mean, k)
    q_i8 = torch.empty(B, H, Lq_pad, D, dtype=torch.int8, device=dev)
    k_i8 = torch.empty(B, H, Lk_pad, D, dtype=torch.int8, device=dev)
    q_scale = torch.empty(B, H, Lq_pad // block_q, dtype=torch.float32, device=dev)
    k_scale = torch.empty(B, H, Lk_pad // block_k, dtype=torch.float32, device=dev)
    _quant_int8_block_kernel[(Lq_pad // block_q, B * H)](
        q, k_mean, q_i8, q_scale, *q.stride(), H, Lq, Lq_pad, q_scale.shape[-1], sm_scale * LOG2E,
        D=D, BLOCK=block_q, SUB_MEAN=False, num_warps=8 if block_q * D >= 128 * 128 else 4)
    _quant_int8_block_kernel[(Lk_pad // block_k, B * H)](
        k, k_mean, k_i8, k_scale, *k.stride(), H, Lk, Lk_pad, k_scale.shape[-1], 1.0,
        D=D, BLOCK=block_k, SUB_MEAN=True, num_warps=8 if block_k * D >= 128 * 128 else 4)
    fp8 = pv == "fp8"
    if fp8:
        amax = torch.linalg.vector_norm(v, float("inf"), dim=2, dtype=torch.float32)  # (B, H, D), no |v| copy
        v_inv = _safe_inv(FP8_MAX, amax).contiguous()  # same IEEE division as the reference
        v_scale = amax / FP8_MAX
        v_q = torch.empty(B, H, D, Lk_pad, dtype=torch.float8_e4m3fn, device=dev)
    else:
        v_inv = torch.ones(B, H, D, dtype=torch.float32, device=dev)
        v_scale = v_inv
        v_q = torch.empty(B, H, D, Lk_pad, dtype=torch.float16, device=dev)
    _quant_v_kernel[(Lk_pad // 64, B * H)](v, v_inv, v_q, *v.stride(), H, Lk, Lk_pad, D=D, BLOCK=64, FP8=fp8,
                                           EXACT_CAST=interpreter_enabled(), num_warps=4)
    return QuantizedQKV(q_i8, q_scale, k_i8, k_scale, k_mean, v_q, v_scale, Lq, Lk, block_q, block_k)


def lowbit_attention_quantized(qkv: QuantizedQKV, out: torch.Tensor, config: LowbitConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """Run the dense kernel on pre-quantized operands, writing into out (B, H, Lq, D)."""
    if qkv.block_q % config.block_m:
        raise ValueError(f"config.block_m={config.block_m} must divide the Q quantization block {qkv.block_q}")
    B, H, Lq_pad, D = qkv.q_i8.shape
    Lk_pad = qkv.k_i8.shape[2]
    grid = (cdiv(qkv.lq, config.block_m), B * H)
    _lowbit_attn_fwd_kernel[grid](
        qkv.q_i8, qkv.k_i8, qkv.v_q, qkv.q_scale, qkv.k_scale, qkv.v_scale, out, *out.stride(),
        H, qkv.lq, qkv.lk, Lq_pad, Lk_pad, qkv.q_scale.shape[-1], qkv.k_scale.shape[-1],
        D=D, BLOCK_M=config.block_m, BLOCK_N=config.block_n, QBQ=qkv.block_q, QBK=qkv.block_k,
        PV_FP8=qkv.v_q.dtype == torch.float8_e4m3fn, I2F=config.i2f, EXACT_CAST=interpreter_enabled(),
        WS=config.warp_specialize, TAU=float(config.rescale_tau),
        SHIFT=p_shift(qkv.v_q.dtype == torch.float8_e4m3fn, config.rescale_tau),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out


class _LowbitAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pv, sm_scale, config):
        qkv = quantize_qkv(q, k, v, pv=pv, sm_scale=sm_scale)
        out = heads_output_like(q)
        return lowbit_attention_quantized(qkv, out, config)

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError("lowbit_attention is forward-only (inference); train with the 'sdpa' or 'sla' backend")


def lowbit_attention(q, k, v, *, pv: str = "fp8", sm_scale: float | None = None,
                     config: LowbitConfig | None = None) -> torch.Tensor:
    """Low-bit attention O = softmax(q kᵀ·sm_scale) v. q: (B, H, Lq, D), k/v: (B, H, Lk, D) → (B, H, Lq, D).

    pv: "fp8" (sm89+) or "fp16" (sm80 and older). CUDA tensors (or CPU under TRITON_INTERPRET=1) go
    through the Triton kernels; other CPU tensors through the reference.
    """
    _check_qkv(q, k, v, pv)
    config = DEFAULT_CONFIG if config is None else config
    if triton is None or not use_triton(q, k, v):
        return lowbit_attention_reference(q, k, v, pv=pv, sm_scale=sm_scale, block_n=config.block_n, i2f=config.i2f,
                                          rescale_tau=config.rescale_tau)
    return _LowbitAttention.apply(q, k, v, pv, sm_scale, config)


__all__ = [
    "LowbitConfig", "QuantizedQKV", "attention_core_reference", "lowbit_attention", "lowbit_attention_quantized",
    "lowbit_attention_reference", "quantize_blocks_int8_reference", "quantize_qk_reference", "quantize_qkv",
    "quantize_v_reference", "lazy_max", "p_shift",
]
