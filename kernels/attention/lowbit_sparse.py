"""sagesla: the sparse branch of SLA computed with SageAttention's low-bit arithmetic.

Same quantization as turbo_kernels.attention.lowbit (smoothed K; int8 Q per query block and K per
key block, with SLA's block sizes as the quantization blocks; fp8 e4m3 V per channel, or fp16),
but each query block visits only its critical key blocks, read from the SLA block map
(`turbo_kernels.attention.blockmap.sla_block_map`, the one implementation shared with `sla`):

    O_s[i] = softmax_{keys in critical blocks of i}(q kᵀ·scale) v        (int8 QKᵀ, fp8/fp16 PV)

The full sagesla output adds the linear branch of SLA unchanged: O = O_s + proj_l(O_l)
(turbo_kernels.attention.sla.linear_branch; see turbo_infer.layers.lowbit_attention).

Kernel: one program per (query block, batch·head) walks the block's row of the ascending lookup
table, GROUP key blocks per online-softmax step (GROUP·block_k keys gathered into one tile, so the
tensor-core tiles stay as deep as the dense kernel's). Ragged tails and a short last group are
masked only on the steps that contain them. Forward only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from turbo_kernels.attention.blockmap import BlockMap
from turbo_kernels.attention.lowbit import (QuantizedQKV, _check_qkv, attention_core_reference, p_shift,
                                           quantize_qk_reference, quantize_qkv, quantize_v_reference)
from turbo_kernels.utils import (TensorDescriptor, cdiv, descriptors_supported, heads_output_like, interpreter_enabled,
                                 use_triton)

try:
    import triton
    import triton.language as tl

    from turbo_kernels.attention.lowbit import lowbit_online_step, lowbit_store_out
    from turbo_kernels.attention.sla_kernels import _phi
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def _check_map(q, k, bm: BlockMap):
    if not isinstance(bm, BlockMap):
        raise TypeError(f"block_map must be a BlockMap, got {type(bm).__name__}")
    B, H, Lq, _ = q.shape
    if bm.q_len != Lq or bm.k_len != k.shape[2] or tuple(bm.lut.shape[:2]) != (B, H):
        raise ValueError(f"block_map was built for (B, H, Lq, Lk) = ({bm.lut.shape[0]}, {bm.lut.shape[1]}, {bm.q_len}, "
                         f"{bm.k_len}), inputs are ({B}, {H}, {Lq}, {k.shape[2]})")
    for name, blk in (("block_q", bm.block_q), ("block_k", bm.block_k)):
        if blk not in (16, 32, 64, 128):
            raise ValueError(f"block_map.{name} must be one of 16, 32, 64, 128 for the low-bit kernels, got {blk}")


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------
def sagesla_sparse_reference(q, k, v, block_map: BlockMap, *, pv: str = "fp8", sm_scale: float | None = None,
                             group: int = 1, i2f: int = 2, rescale_tau: float = 0.0) -> torch.Tensor:
    """Low-bit sparse branch in plain torch (emulates the kernel; `group`, `i2f`, `rescale_tau` = its GROUP,
    I2F, TAU)."""
    _check_qkv(q, k, v, pv)
    _check_map(q, k, block_map)
    bq, bk = block_map.block_q, block_map.block_k
    q_i8, q_s, k_i8, k_s, _ = quantize_qk_reference(q, k, sm_scale, block_q=bq, block_k=bk, k_mean=block_map.k_mean)
    v_q, v_s = quantize_v_reference(v, pv)
    return attention_core_reference(q_i8, q_s, k_i8, k_s, v_q, v_s, block_map.lut, tile=bk, block_q=bq, block_k=bk,
                                    out_dtype=q.dtype, group=group, i2f=i2f, rescale_tau=rescale_tau)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _sparse_tile(acc, l_i, m_i, q, qs, K_base, V_base, KS_base, lut_row, j0, n, Lk, L_pad,
                     D: tl.constexpr, BLOCK_N: tl.constexpr, BLK_K: tl.constexpr, PV_FP8: tl.constexpr,
                     I2F: tl.constexpr, EXACT_CAST: tl.constexpr, MASK: tl.constexpr, TAU: tl.constexpr,
                     SHIFT: tl.constexpr):
        """One online-softmax step over LUT entries j0 .. j0 + BLOCK_N/BLK_K − 1 (gathered tile)."""
        t = tl.arange(0, BLOCK_N)
        entry = j0 + t // BLK_K  # LUT entry of each tile column
        kb = tl.load(lut_row + tl.minimum(entry, n - 1))  # its key block
        offs_n = kb * BLK_K + t % BLK_K  # key token index  (BLOCK_N,)
        offs_d = tl.arange(0, D)
        k = tl.load(K_base + offs_n[None, :] * D + offs_d[:, None])  # (D, BLOCK_N) int8 (padded rows are 0)
        if BLOCK_N == BLK_K:
            ks = tl.load(KS_base + tl.load(lut_row + j0))  # one key block: one scale
        else:
            ks = tl.load(KS_base + kb)  # (BLOCK_N,) one scale per key block
        qk = tl.dot(q, k, out_dtype=tl.int32)
        v = tl.load(V_base + offs_n[:, None] + offs_d[None, :] * L_pad)  # (BLOCK_N, D) from (D, L_pad)
        return lowbit_online_step(acc, l_i, m_i, qk, qs, ks, (entry < n) & (offs_n < Lk), v, BLOCK_N == BLK_K, I2F,
                                  PV_FP8, EXACT_CAST, MASK, TAU, SHIFT)

    @triton.jit
    def _store_out(acc, l_i, VS, Out, QF, HM, ZM, BIAS, bh, b, h, qblock, offs_m, offs_d, stride_ob, stride_oh,
                   stride_ol, stride_od, sqb, sqh, sql, Lq, lin_eps, D: tl.constexpr, LINEAR: tl.constexpr,
                   HAS_BIAS: tl.constexpr, FEATURE: tl.constexpr):
        """O_s (`lowbit_store_out`), or with LINEAR the whole sagesla output O = O_s + proj_l(O_l) (+ bias) of the
        tile: O_s rounded to Out's dtype as the separate epilogue kernel reads it, then phi(q) Hm W^T / den added
        as one tensor-core product accumulating into it (the row scaling 1/den applied to phi(q) first, which
        commutes with the right product). QF: the float Q (B, H, Lq, D) with strides sqb, sqh, sql; HM (B·H, Nq,
        D, D) Hm W^T and ZM (B·H, Nq, D) this query block's marginal sums at `qblock`; BIAS proj_l's (D,) fp32."""
        lowbit_store_out(acc, l_i, VS, Out, bh, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_ol, stride_od,
                         Lq, D)
        if LINEAR:
            # O_s is stored first and read back (from L2) as the product's accumulator: kept in registers through
            # phi(q) instead, the sm_90 build (Triton 3.6) had 172 spill loads in this epilogue, now 56
            tl.debug_barrier()  # the tile's O_s, written by other threads of this program, visible to all
            rows = offs_m < Lq
            qf = tl.load(QF + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=rows[:, None],
                         other=0.0).to(tl.float32)
            zm = tl.load(ZM + qblock * D + offs_d).to(tl.float32)
            if FEATURE == 0:  # softmax: phi(q)/den = e·c per row, c = (1/Σe) / ((1/Σe)·Σ e·zm + eps), no divisions
                e = tl.math.exp2((qf - tl.max(qf, axis=1)[:, None]) * 1.4426950408889634)
                inv_s = 1.0 / tl.sum(e, axis=1)
                fq = e * (inv_s / (inv_s * tl.sum(e * zm[None, :], axis=1) + lin_eps))[:, None]
            else:
                fq = _phi(qf, offs_d < D, FEATURE)
                fq = fq * (1.0 / (tl.sum(fq * zm[None, :], axis=1) + lin_eps))[:, None]
            hm = tl.load(HM + qblock * D * D + offs_d[:, None] * D + offs_d[None, :])
            o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od
            o = tl.dot(fq.to(hm.dtype), hm, tl.load(o_ptrs, mask=rows[:, None], other=0.0).to(tl.float32))
            if HAS_BIAS:
                o += tl.load(BIAS + offs_d)[None, :]
            tl.debug_barrier()  # every thread's read of O_s before any overwrites it
            tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=rows[:, None])

    @triton.jit
    def _lowbit_sparse_fwd_kernel(Q, K, V, QS, KS, VS, LUT, Out, stride_ob, stride_oh, stride_ol, stride_od,
                                  H, Lq, Lk, Lq_pad, Lk_pad, n_qs, n_ks, n_qblk, n,
                                  QF, HM, ZM, BIAS, sqb, sqh, sql, lin_eps,
                                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLK_Q: tl.constexpr, BLK_K: tl.constexpr,
                                  GROUP: tl.constexpr, PV_FP8: tl.constexpr, I2F: tl.constexpr,
                                  EXACT_CAST: tl.constexpr, TAU: tl.constexpr, SHIFT: tl.constexpr,
                                  LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, FEATURE: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        qblk = (pid_m * BLOCK_M) // BLK_Q  # the block-map row of this tile
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + bh * Lq_pad * D + offs_m[:, None] * D + offs_d[None, :])
        qs = tl.load(QS + bh * n_qs + qblk)
        K_base = K + bh * Lk_pad * D
        V_base = V + bh * D * Lk_pad
        KS_base = KS + bh * n_ks
        lut_row = LUT + (bh * n_qblk + qblk) * n
        n_kblk = tl.cdiv(Lk, BLK_K)
        ragged = (Lk % BLK_K) != 0
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for j0 in range(0, n, GROUP):
            # mask only a short last group, or the step holding the ragged last key block
            last = tl.load(lut_row + tl.minimum(j0 + GROUP, n) - 1)
            if (j0 + GROUP > n) | (ragged & (last == n_kblk - 1)):
                acc, l_i, m_i = _sparse_tile(acc, l_i, m_i, q, qs, K_base, V_base, KS_base, lut_row, j0, n, Lk,
                                             Lk_pad, D, GROUP * BLK_K, BLK_K, PV_FP8, I2F, EXACT_CAST, True, TAU,
                                             SHIFT)
            else:
                acc, l_i, m_i = _sparse_tile(acc, l_i, m_i, q, qs, K_base, V_base, KS_base, lut_row, j0, n, Lk,
                                             Lk_pad, D, GROUP * BLK_K, BLK_K, PV_FP8, I2F, EXACT_CAST, False, TAU,
                                             SHIFT)
        _store_out(acc, l_i, VS, Out, QF, HM, ZM, BIAS, bh, b, h, bh * n_qblk + qblk, offs_m, offs_d, stride_ob,
                   stride_oh, stride_ol, stride_od, sqb, sqh, sql, Lq, lin_eps, D, LINEAR, HAS_BIAS, FEATURE)


    @triton.jit
    def _lowbit_tma_tile(acc, l_i, m_i, q, qs, k_desc, v_desc, k_row, v_row, KS_base, start_n, Lk,
                         BLOCK_N: tl.constexpr, QBK: tl.constexpr, PV_FP8: tl.constexpr, I2F: tl.constexpr,
                         EXACT_CAST: tl.constexpr, MASK: tl.constexpr, TAU: tl.constexpr, SHIFT: tl.constexpr):
        """_lowbit_tile over descriptors: K rows [start_n, +BLOCK_N) as (BLOCK_N, D), V^T columns as (D, BLOCK_N)."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = k_desc.load([k_row + start_n, 0])  # (BLOCK_N, D) int8
        if BLOCK_N <= QBK:
            ks = tl.load(KS_base + start_n // QBK)
        else:
            ks = tl.load(KS_base + offs_n // QBK)
        qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
        v = tl.trans(v_desc.load([v_row, start_n]))  # (BLOCK_N, D), keys contiguous in memory
        return lowbit_online_step(acc, l_i, m_i, qk, qs, ks, offs_n < Lk, v, BLOCK_N <= QBK, I2F, PV_FP8,
                                  EXACT_CAST, MASK, TAU, SHIFT)

    @triton.jit
    def _lowbit_sparse_fwd_tma_kernel(Q, k_desc, v_desc, QS, KS, VS, LUT, Out, stride_ob, stride_oh, stride_ol,
                                      stride_od, H, Lq, Lk, Lq_pad, Lk_pad, n_qs, n_ks, n_qblk, n,
                                      QF, HM, ZM, BIAS, sqb, sqh, sql, lin_eps,
                                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLK_Q: tl.constexpr,
                                      BLK_K: tl.constexpr, PV_FP8: tl.constexpr, I2F: tl.constexpr,
                                      EXACT_CAST: tl.constexpr, TAU: tl.constexpr, SHIFT: tl.constexpr,
                                      LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, FEATURE: tl.constexpr):
        """_lowbit_sparse_fwd_kernel for one key block per step (GROUP 1), K and V tiles fetched by tensor
        descriptors (TMA on sm_90+): k_desc over the int8 K as (B·H·Lk_pad, D), v_desc over the transposed V as
        (B·H·D, Lk_pad); zero-padded to Lk_pad, so a tile never leaves its head."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        qblk = (pid_m * BLOCK_M) // BLK_Q
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + bh * Lq_pad * D + offs_m[:, None] * D + offs_d[None, :])
        qs = tl.load(QS + bh * n_qs + qblk)
        k_row = tl.program_id(1) * Lk_pad
        v_row = tl.program_id(1) * D
        KS_base = KS + bh * n_ks
        lut_row = LUT + (bh * n_qblk + qblk) * n
        ragged = (Lk % BLK_K) != 0
        n_kblk = tl.cdiv(Lk, BLK_K)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # the LUT is ascending, so only its last entry can be the ragged last key block
        n_even = n - 1 if ragged and tl.load(lut_row + n - 1) == n_kblk - 1 else n
        for j in range(0, n_even):
            acc, l_i, m_i = _lowbit_tma_tile(acc, l_i, m_i, q, qs, k_desc, v_desc, k_row, v_row, KS_base,
                                             tl.load(lut_row + j) * BLK_K, Lk, BLK_K, BLK_K, PV_FP8, I2F,
                                             EXACT_CAST, False, TAU, SHIFT)
        for j in range(n_even, n):
            acc, l_i, m_i = _lowbit_tma_tile(acc, l_i, m_i, q, qs, k_desc, v_desc, k_row, v_row, KS_base,
                                             tl.load(lut_row + j) * BLK_K, Lk, BLK_K, BLK_K, PV_FP8, I2F,
                                             EXACT_CAST, True, TAU, SHIFT)
        _store_out(acc, l_i, VS, Out, QF, HM, ZM, BIAS, bh, b, h, bh * n_qblk + qblk, offs_m, offs_d, stride_ob,
                   stride_oh, stride_ol, stride_od, sqb, sqh, sql, Lq, lin_eps, D, LINEAR, HAS_BIAS, FEATURE)

# ----------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseLowbitConfig:
    """block_m: query rows per program (divides block_q); group: key blocks per softmax step."""

    block_m: int = 128
    group: int = 1
    num_warps: int = 4
    num_stages: int = 3
    i2f: int = 2  # int32 → fp32 score path (turbo_kernels.attention.lowbit.lowbit_online_step)
    # lazy rescaling threshold (turbo_kernels.attention.lowbit.p_shift); H100, 1.3B, topk 0.1: tau 0 1.13 ms,
    # tau 2 1.27, tau 4 1.22: stays 0
    rescale_tau: float = 0.0
    # K and V tiles through tensor descriptors (TMA on sm_90+) where one key block is one step (group 1, and
    # not raised by key_group; elsewhere the pointer kernel). On since 2026-12-06: H100, 1.3B, topk 0.1, kernel
    # only, same process: 0.951 ms vs 1.122 (4 warps, 3 stages; 4 stages 0.956; 8 warps 1.313)
    tma: bool = True
    # sagesla's linear branch added in the sparse kernel's epilogue (`turbo_kernels.attention.sla.
    # sagesla_with_linear`; the layer's forward checks this flag) instead of SLA's separate epilogue kernel after it,
    # which reads O_s, Q and the marginal state back (0.23 ms per call at the 1.3B shape, 28 ms per 4-step video in
    # the s32 profile). On since session 33 (H100, same process): the whole sagesla forward at the 1.3B shape 1.928
    # ms against 1.977 (0.975×); the eager 4-step DiT 0.645 s against 0.648 s (min of 5 interleaved rounds, 0.995×)
    fuse_linear: bool = True

    def __post_init__(self):
        p_shift(True, self.rescale_tau)  # validates the threshold
        if self.i2f not in (0, 1, 2):
            raise ValueError(f"i2f must be 0, 1 or 2, got {self.i2f!r}")
        if self.block_m not in (16, 32, 64, 128):
            raise ValueError(f"block_m must be one of 16, 32, 64, 128, got {self.block_m}")
        if self.group not in (1, 2, 4):
            raise ValueError(f"group must be 1, 2 or 4, got {self.group}")


# H100, 1.3B shape, topk 0.1, 128×64 map blocks, kernel only (pointer loads): group 1, 4 warps, 3 stages 1.129 ms
# (SLA bf16 sparse kernel 2.135). group 2 with 8 warps 1.50; group 1 with 8 warps 1.56; 64-row tiles 1.54.
DEFAULT_SPARSE_CONFIG = SparseLowbitConfig()


def key_group(config: SparseLowbitConfig, block_k: int, pv_fp8: bool) -> int:
    """Key blocks gathered per online-softmax step: config.group, capped so a tile holds <= 128 keys,
    and raised so that an fp8 P·V product has >= 32 keys (Hopper's fp8 MMA takes K in multiples of 32;
    the toy's 16-key blocks would otherwise give a 16-deep fp8 dot)."""
    cap = max(1, 128 // block_k)
    group = max(1, min(config.group, cap))
    if pv_fp8 and group * block_k < 32:
        group = min(cap, -(-32 // block_k))
    return group


class LinearEpilogue(NamedTuple):
    """SLA's linear branch for the sparse kernel's epilogue (`turbo_kernels.attention.sla.sagesla_with_linear`):
    q the float queries (B, H, Lq, D), last dim contiguous; hm (B·H, Nq, D, D) = Hm W^T (proj_l folded in) and zm
    (B·H, Nq, D), the marginal sums per query block, contiguous; bias (D,) fp32 or None; eps the denominator's
    epsilon; feature the feature map's index (`sla.FEATURE_MAPS`)."""

    q: torch.Tensor
    hm: torch.Tensor
    zm: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    feature: int


def _linear_args(linear: LinearEpilogue | None, out: torch.Tensor) -> tuple[list, dict]:
    """The kernels' linear-epilogue arguments (placeholders and LINEAR=False without one)."""
    if linear is None:
        return [out, out, out, out, 0, 0, 0, 0.0], dict(LINEAR=False, HAS_BIAS=False, FEATURE=0)
    q = linear.q
    if q.shape != out.shape or q.stride(-1) != 1:
        raise ValueError(f"linear epilogue: q must be shaped like the output {tuple(out.shape)} with a contiguous "
                         f"last dim, got {tuple(q.shape)} strides {q.stride()}")
    bias = linear.bias if linear.bias is not None else out
    return ([q, linear.hm, linear.zm, bias, q.stride(0), q.stride(1), q.stride(2), float(linear.eps)],
            dict(LINEAR=True, HAS_BIAS=linear.bias is not None, FEATURE=int(linear.feature)))


def sagesla_sparse_quantized(qkv: QuantizedQKV, block_map: BlockMap, out: torch.Tensor,
                             config: SparseLowbitConfig = DEFAULT_SPARSE_CONFIG,
                             linear: LinearEpilogue | None = None) -> torch.Tensor:
    """Run the sparse kernel on operands quantized with the map's block sizes; writes out (B, H, Lq, D): O_s, or
    with `linear` the whole sagesla output O_s + proj_l(O_l) (+ bias)."""
    if (qkv.block_q, qkv.block_k) != (block_map.block_q, block_map.block_k):
        raise ValueError(f"operands were quantized with blocks ({qkv.block_q}, {qkv.block_k}), the map uses "
                         f"({block_map.block_q}, {block_map.block_k})")
    block_m = min(config.block_m, block_map.block_q)
    group = key_group(config, block_map.block_k, qkv.v_q.dtype == torch.float8_e4m3fn)
    B, H, Lq_pad, D = qkv.q_i8.shape
    Lk_pad = qkv.k_i8.shape[2]
    lut = block_map.lut if block_map.lut.dtype == torch.int32 and block_map.lut.is_contiguous() else \
        block_map.lut.to(torch.int32).contiguous()
    grid = (cdiv(qkv.lq, block_m), B * H)
    pv_fp8 = qkv.v_q.dtype == torch.float8_e4m3fn
    lin_args, lin_flags = _linear_args(linear, out)
    if config.tma and group == 1 and descriptors_supported(qkv.k_i8):
        bk = block_map.block_k
        _lowbit_sparse_fwd_tma_kernel[grid](
            qkv.q_i8, TensorDescriptor(qkv.k_i8, shape=[B * H * Lk_pad, D], strides=[D, 1], block_shape=[bk, D]),
            TensorDescriptor(qkv.v_q, shape=[B * H * D, Lk_pad], strides=[Lk_pad, 1], block_shape=[D, bk]),
            qkv.q_scale, qkv.k_scale, qkv.v_scale, lut, out, *out.stride(),
            H, qkv.lq, qkv.lk, Lq_pad, Lk_pad, qkv.q_scale.shape[-1], qkv.k_scale.shape[-1], block_map.num_q_blocks,
            block_map.n, *lin_args, D=D, BLOCK_M=block_m, BLK_Q=block_map.block_q, BLK_K=bk, PV_FP8=pv_fp8,
            I2F=config.i2f, EXACT_CAST=interpreter_enabled(), TAU=float(config.rescale_tau),
            SHIFT=p_shift(pv_fp8, config.rescale_tau), **lin_flags, num_warps=config.num_warps,
            num_stages=config.num_stages)
        return out
    _lowbit_sparse_fwd_kernel[grid](
        qkv.q_i8, qkv.k_i8, qkv.v_q, qkv.q_scale, qkv.k_scale, qkv.v_scale, lut, out, *out.stride(),
        H, qkv.lq, qkv.lk, Lq_pad, Lk_pad, qkv.q_scale.shape[-1], qkv.k_scale.shape[-1], block_map.num_q_blocks,
        block_map.n, *lin_args, D=D, BLOCK_M=block_m, BLK_Q=block_map.block_q, BLK_K=block_map.block_k, GROUP=group,
        PV_FP8=pv_fp8, I2F=config.i2f, EXACT_CAST=interpreter_enabled(), TAU=float(config.rescale_tau),
        SHIFT=p_shift(pv_fp8, config.rescale_tau), **lin_flags, num_warps=config.num_warps,
        num_stages=config.num_stages)
    return out


def sagesla_sparse(q, k, v, block_map: BlockMap, *, pv: str = "fp8", sm_scale: float | None = None,
                   config: SparseLowbitConfig | None = None, linear: LinearEpilogue | None = None) -> torch.Tensor:
    """Low-bit sparse branch: softmax over each query block's critical key blocks. Forward only.

    q: (B, H, Lq, D), k/v: (B, H, Lk, D) → (B, H, Lq, D) in q's dtype. Triton on CUDA (and on CPU
    under TRITON_INTERPRET=1), else the reference. linear: SLA's linear branch added in the kernel's epilogue
    (Triton only: `sla.sagesla_with_linear` builds it and falls back elsewhere).
    """
    _check_qkv(q, k, v, pv)
    _check_map(q, k, block_map)
    config = DEFAULT_SPARSE_CONFIG if config is None else config
    if triton is None or not use_triton(q, k, v):
        if linear is not None:
            raise ValueError("sagesla_sparse: the linear epilogue runs in the Triton kernel only")
        group = key_group(config, block_map.block_k, pv == "fp8")
        return sagesla_sparse_reference(q, k, v, block_map, pv=pv, sm_scale=sm_scale, group=group, i2f=config.i2f,
                                        rescale_tau=config.rescale_tau)
    qkv = quantize_qkv(q, k, v, pv=pv, sm_scale=sm_scale, block_q=block_map.block_q, block_k=block_map.block_k,
                       k_mean=block_map.k_mean)  # the map's smoothing mean: no pass of its own over K
    with torch.no_grad():
        return sagesla_sparse_quantized(qkv, block_map, heads_output_like(q), config, linear)


__all__ = ["LinearEpilogue", "SparseLowbitConfig", "sagesla_sparse", "sagesla_sparse_quantized",
           "sagesla_sparse_reference"]
