"""SLA sparse forward with K and V tiles fetched through tensor descriptors (TMA on Hopper and newer).

The same math as `_sla_fwd_kernel` in sla_kernels.py (online softmax over each query block's selected key
blocks, one LUT entry per tile), but each K/V tile is one descriptor load of BLOCK_N contiguous token rows
instead of a pointer-gather. On sm_90 Triton lowers descriptor loads in a pipelined loop to the bulk tensor
copy engine completing on mbarriers, which frees the warps from address arithmetic and cp.async bookkeeping
(DEVICE README, HOPPER.md). Whether that pays at these shapes is a measurement (`tools/bench_attention.py
--sweep`), so `SLAKernelConfig.fwd_tma` picks between the two kernels.

Descriptors are 2-D views of the (B, H, L, D) operand: tokens are rows, the head dim the columns. Two layouts
have such a view: contiguous (B, H, L, D) (row = (b·H + h)·L + t, column 0) and the model's (B, L, H, D)
permuted to (B, H, L, D) (row = b·L + t, column h·D). Rows past a head's last token belong to the next head
or batch (finite data) or lie outside the view (zero-filled); the tail tile masks their scores to -inf, so
they get zero weight, exactly as the pointer kernel's masked loads. Other layouts use the pointer kernel.
"""
from __future__ import annotations

import torch

from turbo_kernels.utils import TensorDescriptor

try:
    import triton
    import triton.language as tl

    from turbo_kernels.attention.sla_kernels import _dkdv_step, _dq_step, _fwd_step, _key_block_queries
except ImportError:  # CPU-only install: sla.py uses the torch reference
    triton = None


def token_view(x: torch.Tensor) -> tuple[int, int, int, int, int] | None:
    """How a (B, H, L, D) tensor maps onto a 2-D (rows, cols) token view for a descriptor, or None.

    Returns (rows, cols, row_per_b, row_per_h, col_per_h): token t of (b, h) is row
    b·row_per_b + h·row_per_h + t, columns h·col_per_h + [0, D). None when no such view exists or when the
    view breaks TMA's rules (16-byte aligned base and row stride, unit column stride).
    """
    B, H, L, D = x.shape
    sb, sh, sl, sd = x.stride()
    if sd != 1 or x.data_ptr() % 16 or (sl * x.element_size()) % 16:
        return None
    if sl == D and (sh == L * D or H == 1) and (sb == H * L * D or B == 1):  # contiguous (B, H, L, D)
        return B * H * L, D, H * L, L, 0
    if sh == D and sl == H * D and (sb == L * H * D or B == 1):  # (B, L, H, D) seen as (B, H, L, D)
        return B * L, H * D, L, 0, D
    return None


def token_descriptor(x: torch.Tensor, view: tuple[int, int, int, int, int], block_n: int, block_d: int):
    rows, cols = view[0], view[1]
    return TensorDescriptor(x, shape=[rows, cols], strides=[cols, 1], block_shape=[block_n, block_d])


if triton is not None:

    @triton.jit
    def _view_origin(b, h, rb, rh, ch):
        """(row, column) of (batch b, head h)'s first token in a descriptor's 2-D token view (`token_view`'s
        row strides rb, rh and column offset ch per head)."""
        return b * rb + h * rh, h * ch

    @triton.jit
    def _tma_tile(acc, l_i, m_i, q, k_desc, v_desc, k_row, k_col, v_row, v_col, t0, Lk, qk_scale,
                  BLOCK_N: tl.constexpr, MASK: tl.constexpr):
        # `_fwd_step` over the BLOCK_N keys starting at token t0 (a tile inside one map block), fetched by the
        # descriptors. MASK: the ragged tail block; its rows past Lk may hold the next head's K/V (finite) or
        # zeros, and their scores are set to -inf, so p is exactly 0 there.
        k = k_desc.load([k_row + t0, k_col])
        v = v_desc.load([v_row + t0, v_col])
        return _fwd_step(acc, l_i, m_i, q, k, v, t0 + tl.arange(0, BLOCK_N) < Lk, qk_scale, MASK, 0.0)

    @triton.jit
    def _sla_fwd_tma_kernel(Q, k_desc, v_desc, O, LSE, LUT, BIAS,
                            sqb, sqh, sql, sob, soh, sol, H, Lq, Lk, D, n_sel, num_qb, qk_scale,
                            k_rb, k_rh, k_ch, v_rb, v_rh, v_ch,
                            MAP_BQ: tl.constexpr, MAP_BK: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr,
                            STORE_LSE: tl.constexpr, HAS_BIAS: tl.constexpr, WS: tl.constexpr):
        # One program: BLOCK_M queries (inside one map block) of one (batch, head); BLOCK_N <= MAP_BK, so
        # every tile is BLOCK_N contiguous tokens of one LUT block and only the last entry can be ragged.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_m = offs_m < Lq
        bq = b.to(tl.int64)
        hq = h.to(tl.int64)
        q = tl.load(Q + bq * sqb + hq * sqh + offs_m[:, None] * sql + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        k_row, k_col = _view_origin(b, h, k_rb, k_rh, k_ch)
        v_row, v_col = _view_origin(b, h, v_rb, v_rh, v_ch)
        lut = LUT + (pid_bh.to(tl.int64) * num_qb + (pid_m * BLOCK_M) // MAP_BQ) * n_sel
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_even = n_sel * MAP_BK if EVEN_N else (n_sel - 1) * MAP_BK
        for start in tl.range(0, n_even, BLOCK_N, warp_specialize=WS):
            t0 = tl.load(lut + start // MAP_BK) * MAP_BK + start % MAP_BK
            acc, l_i, m_i = _tma_tile(acc, l_i, m_i, q, k_desc, v_desc, k_row, k_col, v_row, v_col, t0, Lk,
                                      qk_scale, BLOCK_N, False)
        for start in range(n_even, n_sel * MAP_BK, BLOCK_N):  # the ragged tail block
            t0 = tl.load(lut + start // MAP_BK) * MAP_BK + start % MAP_BK
            acc, l_i, m_i = _tma_tile(acc, l_i, m_i, q, k_desc, v_desc, k_row, k_col, v_row, v_col, t0, Lk,
                                      qk_scale, BLOCK_N, True)
        acc = acc / l_i[:, None]
        if STORE_LSE:
            tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, m_i + tl.log2(l_i), mask=mask_m)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_d, mask=mask_d, other=0.0)[None, :]
        tl.store(O + bq * sob + hq * soh + offs_m[:, None] * sol + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d[None, :])

    @triton.jit
    def _dq_tma_tile(dq, q, do, lse, delta, k_desc, v_desc, k_row, k_col, v_row, v_col, t0, Lk, qk_scale,
                     BLOCK_N: tl.constexpr, MASK: tl.constexpr):
        # `_dq_step` over the BLOCK_N keys from token t0, fetched by the descriptors; MASK: the ragged tail block,
        # whose rows past Lk are another head's keys or zeros, gets P = 0 there.
        k = k_desc.load([k_row + t0, k_col])
        v = v_desc.load([v_row + t0, v_col])
        return _dq_step(dq, q, do, lse, delta, k, v, t0 + tl.arange(0, BLOCK_N) < Lk, qk_scale, MASK)

    @triton.jit
    def _sla_bwd_dq_tma_kernel(Q, k_desc, v_desc, DO, DQ, LSE, DELTA, LUT,
                               sqb, sqh, sql, sdb, sdh, sdl, sgb, sgh, sgl,
                               H, Lq, Lk, D, n_sel, num_qb, qk_scale, sm_scale, k_rb, k_rh, k_ch, v_rb, v_rh, v_ch,
                               MAP_BQ: tl.constexpr, MAP_BK: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr):
        # `_sla_bwd_dq_kernel` (sparse branch only, BLOCK_N <= MAP_BK) with K/V tiles fetched by descriptors:
        # dQ = scale * sum over the LUT's keys of dS K, dS = P * (dO V^T - delta), P = exp2(S * c - lse2).
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        bq = b.to(tl.int64)
        hq = h.to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_qd = (offs_m[:, None] < Lq) & (offs_d < D)[None, :]
        q = tl.load(Q + bq * sqb + hq * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=mask_qd, other=0.0)
        do = tl.load(DO + bq * sdb + hq * sdh + offs_m[:, None] * sdl + offs_d[None, :], mask=mask_qd, other=0.0)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        k_row, k_col = _view_origin(b, h, k_rb, k_rh, k_ch)
        v_row, v_col = _view_origin(b, h, v_rb, v_rh, v_ch)
        lut = LUT + (pid_bh.to(tl.int64) * num_qb + (pid_m * BLOCK_M) // MAP_BQ) * n_sel
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_even = n_sel * MAP_BK if EVEN_N else (n_sel - 1) * MAP_BK
        for start in tl.range(0, n_even, BLOCK_N):
            t0 = tl.load(lut + start // MAP_BK) * MAP_BK + start % MAP_BK
            dq = _dq_tma_tile(dq, q, do, lse, delta, k_desc, v_desc, k_row, k_col, v_row, v_col, t0, Lk, qk_scale,
                              BLOCK_N, False)
        for start in range(n_even, n_sel * MAP_BK, BLOCK_N):  # the ragged tail block
            t0 = tl.load(lut + start // MAP_BK) * MAP_BK + start % MAP_BK
            dq = _dq_tma_tile(dq, q, do, lse, delta, k_desc, v_desc, k_row, k_col, v_row, v_col, t0, Lk, qk_scale,
                              BLOCK_N, True)
        tl.store(DQ + bq * sgb + hq * sgh + offs_m[:, None] * sgl + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=mask_qd)

    @triton.jit
    def _sla_bwd_dkdv_tma_kernel(q_desc, K, V, do_desc, DK, DV, LSE, DELTA, KV_OFF, KV_QIDX,
                                 skb, skh, skl, svb, svh, svl, sgb, sgh, sgl, H, Lq, Lk, D, num_kb, inv_len,
                                 qk_scale, sm_scale, q_rb, q_rh, q_ch, d_rb, d_rh, d_ch,
                                 MAP_BQ: tl.constexpr, MAP_BK: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # `_sla_bwd_dkdv_kernel` (sparse branch only, BLOCK_M <= MAP_BQ) with Q/dO tiles fetched by descriptors.
        # Query rows past Lq may hold another head's tokens: their LSE loads as +inf, so P^T = 0 there and
        # both their dV and dK terms vanish (dS^T = P^T * (...) = 0).
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        bq = b.to(tl.int64)
        hq = h.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_m = tl.arange(0, BLOCK_M)
        mask_kd = (offs_n[:, None] < Lk) & (offs_d < D)[None, :]
        k = tl.load(K + bq * skb + hq * skh + offs_n[:, None] * skl + offs_d[None, :], mask=mask_kd, other=0.0)
        v = tl.load(V + bq * svb + hq * svh + offs_n[:, None] * svl + offs_d[None, :], mask=mask_kd, other=0.0)
        LSE += pid_bh.to(tl.int64) * Lq
        DELTA += pid_bh.to(tl.int64) * Lq
        q_row, q_col = _view_origin(b, h, q_rb, q_rh, q_ch)
        d_row, d_col = _view_origin(b, h, d_rb, d_rh, d_ch)
        qidx, count = _key_block_queries(KV_OFF, KV_QIDX, pid_bh, num_kb, inv_len, (pid_n * BLOCK_N) // MAP_BK)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start in tl.range(0, count * MAP_BQ, BLOCK_M):
            t0 = tl.load(qidx + start // MAP_BQ) * MAP_BQ + start % MAP_BQ
            tok = t0 + offs_m
            q = q_desc.load([q_row + t0, q_col])
            do = do_desc.load([d_row + t0, d_col])
            lse = tl.load(LSE + tok, mask=tok < Lq, other=float("inf"))
            delta = tl.load(DELTA + tok, mask=tok < Lq, other=0.0)
            dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, qk_scale)
        tl.store(DK + bq * sgb + hq * sgh + offs_n[:, None] * sgl + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                 mask=mask_kd)
        tl.store(DV + bq * sgb + hq * sgh + offs_n[:, None] * sgl + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=mask_kd)
