"""W8A8 GEMM: y = (x_q·s_x) (w_q·s_w)ᵀ + bias with int8 or fp8 e4m3 operands.

x_q: (M, K) activations quantized per token (scale s_x (M,)); w_q: (N, K) weight quantized per
output channel (scale s_w (N,)), the nn.Linear layout, which is K-major as 8-bit wgmma wants it.
int8: int8×int8 → int32 accumulators (exact: |acc| ≤ K·127²), fused epilogue
acc·s_x[m]·s_w[n] + bias[n] → bf16/fp16/fp32. fp8: e4m3×e4m3 → fp32 accumulators, same epilogue;
fp8 may also go through cuBLAS (`torch._scaled_mm` with row-wise scales), the peer to beat.
Measured backend choice per format: see FP8_BACKEND below and BENCHMARKS.md.

References first, then the kernel, then the host launcher.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from turbo_kernels.gemm.quantize import (MODES, QDTYPE, quantize_groups_reference, quantize_rows_reference,
                                        static_inv_scale)
from turbo_kernels.utils import (TensorDescriptor, cdiv, descriptors_supported, interpreter_enabled, smem_per_block,
                                 use_triton)

try:
    import triton
    import triton.language as tl

    from turbo_kernels.gemm.quantize import dynamic_scale, quantize_tile
except ImportError:  # pragma: no cover
    triton = None
    tl = None

BACKENDS = ("auto", "triton", "scaled_mm")
ACTIVATIONS = (None, "gelu_tanh")
# fp8 path in `auto`. H100, Wan-1.3B FFN shapes, M=32760 (tools/bench_lowbit.py, run 2):
#   1536→8960: Triton 128×256×128 0.910 ms, torch._scaled_mm row-wise 0.915 ms (bf16 1.363);
#   8960→1536: Triton 0.708 ms, torch._scaled_mm 0.908 ms (bf16 1.262). So our kernel.
FP8_BACKEND = "triton"
# The GEMM epilogue's GELU with the GPU's tanh.approx (`_gelu_tanh`) instead of exp + division (the interpreter always
# takes the exact form). H100, fp8 up GEMM 32760 x 1536 -> 8960 with GELU, bf16 out: 1.145 -> 0.973 ms; the compiled
# 4-step DiT with the exact form measured 1.029x slower interleaved (bench_lowbit --only gelu, bench_e2e --ab).
GELU_APPROX = True
GELU_C = 1.5957691216057308  # 2·sqrt(2/π): gelu_tanh(x) = x·sigmoid(2·sqrt(2/π)·(x + 0.044715x³))


def gelu_tanh_reference(y: torch.Tensor) -> torch.Tensor:
    """GELU (tanh form) written as the kernel computes it: x / (1 + exp(−2√(2/π)(x + 0.044715x³)))."""
    u = GELU_C * (y + 0.044715 * y * y * y)
    return y / (1.0 + torch.exp(-u))


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------
def gate_rows_of(M: int, N: int, gate: torch.Tensor | None) -> int:
    """Rows of the output per gate row for a gate (G, N) (or (N,): one row) over M rows: M // G."""
    if gate is None:
        return 1
    G = 1 if gate.dim() == 1 else gate.shape[0]
    if gate.dim() not in (1, 2) or gate.shape[-1] != N or G == 0 or M % G:
        raise ValueError(f"gate must have shape ({N},) or (G, {N}) with G dividing M = {M}, got {tuple(gate.shape)}")
    return M // G


def gate_mode(M: int, gate_rows: int, block_m: int) -> int:
    """How the GEMM epilogue reads a gate of one row per gate_rows output rows with BLOCK_M-row tiles: 1 every
    tile inside one gate row (one load), 2 at most two per tile (two loads and a select), 3 a gather."""
    if gate_rows >= M or gate_rows % block_m == 0:
        return 1
    return 2 if gate_rows >= block_m else 3


def w8a8_matmul_reference(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16, *,
                          activation: str | None = None, out_quant: str | None = None,
                          out_scale: float | None = None, residual: torch.Tensor | None = None,
                          gate: torch.Tensor | None = None, out_group: int | None = None):
    """Dequantized product, with the kernel's epilogue order: residual + gate·act((acc·s_x)·s_w + bias).

    acc is computed in float64, exact for int8 (|acc| < 2⁵³) and for fp8 products (rounding only
    in the kernel's fp32 sum); then rounded to fp32 like the kernel's int32→fp32 conversion.
    x_scale (M,) per row, or (K // G, M) per row and group of G columns of K (the kernel's K loop scales each
    group's fp32 partial product by its scales and sums them in fp32, in this order).
    out_quant ("int8" | "fp8") with a static out_scale returns (y_q, scale (M,)) instead: the next
    W8A8 layer's input, quantized in the epilogue; with out_group G instead of a static scale, dynamic scales per
    row and group of G output columns: (y_q, scales (N // G, M)). residual (M, N) (and gate (N,) or (G, N), one
    row per M // G consecutive output rows): the block's gated residual add, in fp32 before the output cast.
    """
    if x_scale.dim() == 2:  # group scales
        G = x_q.shape[1] // x_scale.shape[0]
        acc = torch.zeros(x_q.shape[0], w_q.shape[0], dtype=torch.float32, device=x_q.device)
        for g in range(x_scale.shape[0]):
            part = (x_q[:, g * G:(g + 1) * G].double() @ w_q[:, g * G:(g + 1) * G].double().t()).float()
            acc = acc + part * x_scale[g].float()[:, None]
        y = acc * w_scale.float()[None, :]
    else:
        acc = (x_q.double() @ w_q.double().t()).float()  # (M, N)
        y = acc * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    if activation == "gelu_tanh":
        y = gelu_tanh_reference(y)
    if residual is not None:
        if gate is not None:
            y = y * gate.float().reshape(-1, y.shape[1]).repeat_interleave(gate_rows_of(*y.shape, gate), dim=0)
        y = residual.float() + y
    if out_quant is not None:
        if out_group is not None:
            return quantize_groups_reference(y, out_quant, out_group)
        return quantize_rows_reference(y, out_quant, out_scale)
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _dequantize(acc, sa, BS, Bias, offs_n, n_ok, N, HAS_BIAS: tl.constexpr, G, row0, gate_rows,
                    FOLD_GATE: tl.constexpr):
        """acc·sa·s_w + bias for one tile (sa: (BLOCK_M, 1) per-row scales or a scalar). FOLD_GATE: the tile lies in
        one gate row g (gate mode 1, no activation after): g·(acc·sa·s_w + b) = acc·sa·(g·s_w) + g·b, so the gate
        multiplies the two (BLOCK_N,) vectors instead of the tile, and no third column vector stays live beside the
        accumulator (sm_90, 128 x 256 fp8 tiles, 8 warps: the separate (BLOCK_N,) gate multiply in the epilogue
        spilled 63 / 160 registers in the pointer / descriptor kernels, 27 / 22 without a gate)."""
        sb = tl.load(BS + offs_n, mask=n_ok, other=0.0)
        if FOLD_GATE:
            g = tl.load(G + (row0 // gate_rows).to(tl.int64) * N + offs_n, mask=n_ok, other=0.0)
            sb = sb * g
        y = acc.to(tl.float32) * sa * sb[None, :]
        if HAS_BIAS:
            bias = tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if FOLD_GATE:
                bias = bias * g
            y = y + bias[None, :]
        return y

    @triton.jit
    def _gelu_tanh(y, FAST: tl.constexpr):
        """GELU (tanh form) of an fp32 tile. On the GPU 0.5·y·(1 + tanh(√(2/π)(y + 0.044715y³))) with the hardware
        tanh (tanh.approx.f32, max. relative error ~2^-11, below the bf16 / 8-bit rounding of the output that
        follows): one MUFU and five multiply(-add)s per element; the exp + IEEE division form took ~20
        instructions with two MUFUs per element, as long as the 128x256 tile's K loop at K = 1536 (sm_90 listing,
        tools/kernel_resources.py w8a8_tma_flat_gelu). FAST False (the interpreter, which cannot run PTX; or
        GELU_APPROX off): the exp form, as `gelu_tanh_reference` (the same function)."""
        if not FAST:
            return y / (1.0 + tl.exp(-1.5957691216057308 * (y + 0.044715 * y * y * y)))
        inner = y * (0.7978845608028654 + 0.03567740813636141 * (y * y))
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [inner], dtype=tl.float32, is_pure=True,
                                      pack=1)
        h = 0.5 * y
        return h + h * t

    @triton.jit
    def _store_groups(y, c_ptrs, c_mask, S, offs_m, offs_n, col0, M, N, OUT_FP8: tl.constexpr,
                      EXACT_CAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
        """The tile quantized with dynamic scales per row and group of GROUP columns (the next layer's input with
        group scales): each (row, group)'s amax -> scale = amax / qmax, stored group-major into S (N // GROUP, M)."""
        NG: tl.constexpr = BLOCK_N // GROUP
        y = tl.where((offs_n < N)[None, :], y, 0.0)  # wrapped or padded columns must not enter an amax
        amax = tl.max(tl.abs(tl.reshape(y, (BLOCK_M, NG, GROUP))), axis=2)  # (BLOCK_M, NG)
        inv, scale = dynamic_scale(amax, OUT_FP8)
        inv = tl.reshape(tl.broadcast_to(inv[:, :, None], (BLOCK_M, NG, GROUP)), (BLOCK_M, BLOCK_N))
        tl.store(c_ptrs, quantize_tile(y, inv, OUT_FP8, EXACT_CAST), mask=c_mask)
        offs_g = col0 // GROUP + tl.arange(0, NG)
        tl.store(S + offs_g.to(tl.int64)[None, :] * M + offs_m[:, None], scale,
                 mask=(offs_m < M)[:, None] & (offs_g < N // GROUP)[None, :])

    @triton.jit
    def _store_output(y, C, row0, offs_m, offs_n, M, N, stride_cm, GELU: tl.constexpr, OUT_QUANT: tl.constexpr,
                      OUT_FP8: tl.constexpr, out_inv, EXACT_CAST: tl.constexpr, R, stride_rm, G, gate_rows,
                      RESIDUAL: tl.constexpr, GATE: tl.constexpr, BLOCK_M: tl.constexpr, S, col0,
                      OUT_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, FAST_GELU: tl.constexpr):
        """The GEMMs' epilogue after dequantization and bias: optional GELU(tanh) (`_gelu_tanh`), optional gated
        residual (y = R + G·y: R (M, N) in any float dtype, G (M // gate_rows, N) fp32, one gate row per gate_rows
        rows), then the (BLOCK_M, BLOCK_N) tile stored in C's dtype, or quantized with the static per-tensor scale (the
        next layer's input, 1 byte per element), or with OUT_GROUP > 0 with dynamic scales per row and group of
        OUT_GROUP columns into S (`_store_groups`); rows < M and columns < N. row0, col0: the tile's first row and
        column (offs_m = row0 + arange(BLOCK_M))."""
        if GELU:
            y = _gelu_tanh(y, FAST_GELU)
        c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        if RESIDUAL:
            # GATE (gate_mode): 0 none; 1 every tile inside one gate row (one gate row, or gate_rows a multiple of
            # BLOCK_M): one (BLOCK_N,) load; 2 at most two gate rows per tile (gate_rows >= BLOCK_M): two loads
            # and a select per row; 3 a (BLOCK_M, BLOCK_N) gather. Chosen on the host so that the kernel holds one
            # path: with all three behind run-time branches (and the tile's gate rows from a min / max over its
            # rows) the sm_90 build spilled ~500 registers and the H100 measured 0.393 ms for the gated epilogue
            # at M 32760, N 1536 against 0.204 ms without a gate.
            if GATE == 1:
                g_first = row0 // gate_rows
                y = y * tl.load(G + g_first.to(tl.int64) * N + offs_n, mask=offs_n < N, other=0.0)[None, :]
            elif GATE == 2:
                g_first = row0 // gate_rows
                g_row = tl.minimum(offs_m, M - 1) // gate_rows
                g0 = tl.load(G + g_first.to(tl.int64) * N + offs_n, mask=offs_n < N, other=0.0)
                g_next = tl.minimum(g_first + 1, M // gate_rows - 1)  # the last tile may have no next gate row
                g1 = tl.load(G + g_next.to(tl.int64) * N + offs_n, mask=offs_n < N, other=0.0)
                y = y * tl.where((g_row == g_first)[:, None], g0[None, :], g1[None, :])
            elif GATE == 3:
                g_row = tl.minimum(offs_m, M - 1) // gate_rows
                y = y * tl.load(G + g_row.to(tl.int64)[:, None] * N + offs_n[None, :], mask=c_mask, other=0.0)
            r_ptrs = R + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]
            y = tl.load(r_ptrs, mask=c_mask, other=0.0).to(tl.float32) + y
        if OUT_QUANT:
            if OUT_GROUP > 0:
                _store_groups(y, c_ptrs, c_mask, S, offs_m, offs_n, col0, M, N, OUT_FP8, EXACT_CAST, BLOCK_M, BLOCK_N,
                              OUT_GROUP)
            else:
                tl.store(c_ptrs, quantize_tile(y, out_inv, OUT_FP8, EXACT_CAST), mask=c_mask)
        else:
            tl.store(c_ptrs, y.to(C.dtype.element_ty), mask=c_mask)

    @triton.jit
    def _w8a8_gemm_kernel(A, B, C, AS, BS, Bias, M, N, K, stride_am, stride_bn, stride_cm,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, INT8: tl.constexpr,
                          EVEN_K: tl.constexpr, GELU: tl.constexpr, OUT_QUANT: tl.constexpr,
                          OUT_FP8: tl.constexpr, out_inv, EXACT_CAST: tl.constexpr,
                          A_QUANT: tl.constexpr, a_inv, a_scale, R, stride_rm, G, gate_rows,
                          RESIDUAL: tl.constexpr, GATE: tl.constexpr, A_GROUP: tl.constexpr, S,
                          OUT_GROUP: tl.constexpr, FAST_GELU: tl.constexpr):
        """One program = one (BLOCK_M, BLOCK_N) output tile; tiles grouped along M for L2 reuse.
        A_QUANT: A is the float activation itself, quantized tile by tile in the K loop with the static
        per-tensor scale (a_inv = 1/a_scale), so that no quantized copy of it is written and read back;
        AS is then unused and every row's scale is a_scale. A_GROUP > 0: A has scales per row and group of
        A_GROUP columns, AS (K // A_GROUP, M): each K step's partial product is scaled by its group's row scales
        before it joins the fp32 accumulator (A_GROUP a multiple of BLOCK_K)."""
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_am = (offs_m % M).to(tl.int64)  # wrapped rows: loads stay in bounds without masks
        offs_bn = (offs_n % N).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = A + offs_am[:, None] * stride_am + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
        b_ptrs = B + offs_bn[None, :] * stride_bn + offs_k[:, None]  # (BLOCK_K, BLOCK_N), K-major
        if INT8 and A_GROUP == 0:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0.0)
                b = tl.load(b_ptrs, mask=(k0 + offs_k)[:, None] < K, other=0.0)
            if A_QUANT:
                if INT8 or EXACT_CAST:
                    a = quantize_tile(a.to(tl.float32), a_inv, not INT8, EXACT_CAST)
                else:  # the GPU's fp32->e4m3 cast is cvt.rn.satfinite (saturates at +-448): no clamp needed
                    a = (a.to(tl.float32) * a_inv).to(tl.float8e4nv)
            if A_GROUP > 0:
                sa_k = tl.load(AS + (k0 // A_GROUP) * M + offs_am)  # (BLOCK_M,) this group's scales
                if INT8:
                    acc += tl.dot(a, b, out_dtype=tl.int32).to(tl.float32) * sa_k[:, None]
                else:
                    acc += tl.dot(a, b) * sa_k[:, None]
            elif INT8:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        # epilogue: dequantize, add bias, cast
        if A_QUANT:
            sa = a_scale
        elif A_GROUP > 0:
            sa = 1.0  # applied per K step
        else:
            sa = tl.load(AS + offs_am)[:, None]
        FOLD: tl.constexpr = RESIDUAL and GATE == 1 and not GELU
        y = _dequantize(acc, sa, BS, Bias, offs_bn, offs_bn < N, N, HAS_BIAS, G, pid_m * BLOCK_M, gate_rows, FOLD)
        _store_output(y, C, pid_m * BLOCK_M, offs_m, offs_n, M, N, stride_cm, GELU, OUT_QUANT, OUT_FP8,
                      out_inv, EXACT_CAST, R, stride_rm, G, gate_rows, RESIDUAL, 0 if FOLD else GATE, BLOCK_M, S,
                      pid_n * BLOCK_N, OUT_GROUP, BLOCK_N, FAST_GELU)


    @triton.jit
    def _w8a8_gemm_tma_kernel(a_desc, b_desc, C, AS, BS, Bias, M, N, K, stride_cm,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, INT8: tl.constexpr,
                              GELU: tl.constexpr, OUT_QUANT: tl.constexpr, OUT_FP8: tl.constexpr, out_inv,
                              EXACT_CAST: tl.constexpr, NUM_PROGRAMS: tl.constexpr, R, stride_rm, G, gate_rows,
                              RESIDUAL: tl.constexpr, GATE: tl.constexpr, WS: tl.constexpr, S,
                              OUT_GROUP: tl.constexpr, FLATTEN: tl.constexpr, FAST_GELU: tl.constexpr,
                              c_desc, STORE_DESC: tl.constexpr, SUBTILE: tl.constexpr):
        """`_w8a8_gemm_kernel` with the A (M, K) and B (N, K) tiles fetched by tensor descriptors (TMA on
        sm_90+; out-of-range rows and K columns arrive as zeros, so no wrap or mask), and a persistent grid:
        NUM_PROGRAMS programs walk the output tiles in the grouped order, each tile's epilogue as the pointer
        kernel's. NUM_PROGRAMS = the number of tiles gives one tile per program. WS: Triton's automatic warp
        specialization of the K loop (producer warps issue the copies, consumer warps the MMAs). FLATTEN (persistent
        grids): the tile loop and the K loop fused into one software-pipelined loop (tl.range(flatten=True)), so that
        the next tile's first A / B copies are in flight during this tile's epilogue instead of the pipeline
        refilling after it (at K = 1536 a tile has only 12 K steps). STORE_DESC (plain outputs: no residual, no group
        scales): the finished tile goes out through the output's tensor descriptor c_desc (a TMA store from shared
        memory, rows past M clipped by the copy engine) instead of per-thread stores; SUBTILE: as two (BLOCK_M,
        BLOCK_N / 2) halves, half the staging buffer."""
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_tiles = num_pid_m * num_pid_n
        num_pid_in_group = GROUP_M * num_pid_n
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=FLATTEN):
            group_id = tile // num_pid_in_group
            first_pid_m = group_id * GROUP_M
            group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
            pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
            pid_n = (tile % num_pid_in_group) // group_size_m
            if INT8:
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
            else:
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, warp_specialize=WS):
                a = a_desc.load([pid_m * BLOCK_M, k0])
                b = b_desc.load([pid_n * BLOCK_N, k0])
                if INT8:
                    acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
                else:
                    acc = tl.dot(a, tl.trans(b), acc)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            m_ok = offs_m < M
            n_ok = offs_n < N
            sa = tl.load(AS + offs_m, mask=m_ok, other=0.0)
            FOLD: tl.constexpr = RESIDUAL and GATE == 1 and not GELU
            y = _dequantize(acc, sa[:, None], BS, Bias, offs_n, n_ok, N, HAS_BIAS, G, pid_m * BLOCK_M, gate_rows, FOLD)
            if STORE_DESC:
                if GELU:
                    y = _gelu_tanh(y, FAST_GELU)
                if OUT_QUANT:
                    t = quantize_tile(y, out_inv, OUT_FP8, EXACT_CAST)
                else:
                    t = y.to(C.dtype.element_ty)
                if SUBTILE:
                    halves = tl.permute(tl.reshape(t, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                    t0, t1 = tl.split(halves)
                    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], t0)
                    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], t1)
                else:
                    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], t)
            else:
                _store_output(y, C, pid_m * BLOCK_M, offs_m, offs_n, M, N, stride_cm, GELU, OUT_QUANT, OUT_FP8,
                              out_inv, EXACT_CAST, R, stride_rm, G, gate_rows, RESIDUAL, 0 if FOLD else GATE, BLOCK_M,
                              S, pid_n * BLOCK_N, OUT_GROUP, BLOCK_N, FAST_GELU)

# ----------------------------------------------------------------------------------------------
# host launcher
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmConfig:
    """Tile configuration. Default: the Triton matmul tutorial's 8-bit Hopper tile (128×256×128), tiles fetched by
    tensor descriptors."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4  # 192 KiB of shared memory: sm_90 (see DEFAULT_GEMM_CONFIG / POINTER_GEMM_CONFIG)
    # A and B tiles through tensor descriptors (TMA on sm_90+; needs K % 16 == 0, else the pointer kernel), and
    # with persistent=True one program per SM walking the tiles. tma on since 2026-12-06 (H100, M = 32760, same
    # process, ms pointers -> descriptors, 128x256x128 w8 s3): fp8 1536->8960 0.913 -> 0.889, 8960->1536 0.687 ->
    # 0.686; int8 1.031 -> 0.979, 0.819 -> 0.747. Persistent: fp8 up 0.873, down 0.712; int8 0.952 / 0.747: mixed,
    # off. Quantizing A inside the K loop (`w8a8_matmul_static_input`) keeps the pointer kernel.
    tma: bool = True
    # persistent + flatten on since 2026-12-06 (session 30, H100, fp8, M = 32760, ms one tile per program ->
    # persistent -> persistent with the tile and K loops flattened: up with GELU 0.973 -> 0.938 -> 0.824, down 0.693
    # -> 0.686 -> 0.678; the compiled 4-step DiT, timed interleaved with the old default, 0.701 vs 0.726 s)
    persistent: bool = True
    warp_spec: bool = False  # descriptor kernel only: the K loop warp-specialized (tl.range(warp_specialize=True))
    # persistent descriptor kernel only: tile loop and K loop flattened into one pipelined loop (the next tile's copies
    # are in flight during this tile's epilogue)
    flatten: bool = True
    # descriptor kernel, plain outputs (no residual, no group scales; N % 16 == 0): the output tile stored through a
    # tensor descriptor (TMA), as two half-width subtiles with store_subtile
    store_desc: bool = False
    store_subtile: bool = True


# The default where tiles come through tensor descriptors (sm_90+): 4 stages, persistent, flattened (above). H100,
# M = 32760, ms at 3 -> 4 stages (2026-12-06, one process): fp8 up 0.885 -> 0.886, down 0.673 -> 0.664; int8 up
# 0.977 -> 0.947, down 0.726 -> 0.702 (session 27: int8 0.979 -> 0.951, 0.747 -> 0.736; fp8 up 0.889 -> 0.916, the
# one shape it lost). Elsewhere (the a100, rtx4090, rtx5090 targets; `default_gemm_config`) the pointer kernel keeps
# 3 stages (98 304 bytes of shared memory on sm_89 and sm_120: its cp.async pipeline buffers 2 of them).
DEFAULT_GEMM_CONFIG = GemmConfig()
POINTER_GEMM_CONFIG = GemmConfig(num_stages=3, tma=False, persistent=False, flatten=False)
# A with scales per row and group of columns (x_scale (K // G, M)): the pointer kernel, whose K loop scales each
# step's partial product; 128-wide N tiles, since the partial product is a second accumulator-sized tile in
# registers beside the accumulator. H100 (session 30): twice the per-row GEMM's time at the FFN down shape (fp8
# 1.347 vs 0.701 ms), so the runtime does not use it (compile_ops.FFN_HIDDEN_GROUP off).
GROUPED_GEMM_CONFIG = GemmConfig(block_n=128, num_stages=3, tma=False, persistent=False, flatten=False)


# Shared memory per block the descriptor default needs: 4 stages of 128x256x128 8-bit tiles plus the flattened loop's
# epilogue scratch, 229 408 bytes on sm_90 and 213 040 on sm_100 (Triton 3.6 / 3.9 builds, tools/kernel_resources.py).
# GPUs with less (the rtx5090's sm_120: 101 376 bytes per block, where the same kernel needs 155 672) take the
# pointer kernel, whose 3 stages need 98 304 bytes on sm_89 and sm_120 (2 of its 3 stages are buffered).
DESCRIPTOR_CONFIG_SMEM = 229_408


def default_gemm_config(t: torch.Tensor) -> GemmConfig:
    """The GEMM configuration when the caller names none: DEFAULT_GEMM_CONFIG where descriptors run and its stages
    fit the device's shared memory (DESCRIPTOR_CONFIG_SMEM: sm_90 / sm_100), else POINTER_GEMM_CONFIG (the a100,
    rtx4090 and rtx5090 targets)."""
    if not descriptors_supported(t):
        return POINTER_GEMM_CONFIG
    if t.is_cuda and smem_per_block(t.device) < DESCRIPTOR_CONFIG_SMEM:
        return POINTER_GEMM_CONFIG
    return DEFAULT_GEMM_CONFIG


def _fast_gelu() -> bool:
    """FAST_GELU of the kernels: the hardware tanh where PTX runs (not the interpreter) and GELU_APPROX is on."""
    return GELU_APPROX and not interpreter_enabled()


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _check_weight(x, x_name: str, w_q, w_scale, bias):
    """w_q (N, K) int8/fp8 with its (N,) scale and bias, against the activation x (M, K)."""
    if w_q.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise TypeError(f"w_q must be int8 or float8_e4m3fn, got {w_q.dtype}")
    if x.dim() != 2 or w_q.dim() != 2 or x.shape[1] != w_q.shape[1]:
        raise ValueError(f"{x_name} (M, K) and w_q (N, K) must agree in K, got {tuple(x.shape)} and {tuple(w_q.shape)}")
    if w_scale.shape != (w_q.shape[0],):
        raise ValueError(f"w_scale must have shape ({w_q.shape[0]},), got {tuple(w_scale.shape)}")
    if bias is not None and bias.shape != (w_q.shape[0],):
        raise ValueError(f"bias must have shape ({w_q.shape[0]},), got {tuple(bias.shape)}")


def _check_operands(x_q, x_scale, w_q, w_scale, bias):
    if x_q.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise TypeError(f"x_q must be int8 or float8_e4m3fn, got {x_q.dtype}")
    if w_q.dtype != x_q.dtype:
        raise TypeError(f"w_q dtype {w_q.dtype} must match x_q dtype {x_q.dtype}")
    _check_weight(x_q, "x_q", w_q, w_scale, bias)
    M, K = x_q.shape
    grouped = x_scale.dim() == 2 and x_scale.shape[1] == M and x_scale.shape[0] > 0 and K % x_scale.shape[0] == 0
    if x_scale.shape != (M,) and not grouped:
        raise ValueError(f"x_scale must have shape ({M},) (per row) or (K // G, {M}) (per row and group of G of the "
                         f"K = {K} columns), got {tuple(x_scale.shape)}")


def a_group_of(x_q: torch.Tensor, x_scale: torch.Tensor) -> int:
    """The column group of x_q's scales: 0 for one scale per row, else K // x_scale.shape[0]."""
    return 0 if x_scale.dim() == 1 else x_q.shape[1] // x_scale.shape[0]


def _check_residual(M: int, N: int, residual, gate, out_quant) -> int:
    """The residual (M, N) float tensor and gate of a gated-residual epilogue; returns rows per gate row."""
    if residual is None:
        if gate is not None:
            raise ValueError("gate needs a residual (the epilogue computes residual + gate·y)")
        return 1
    if not isinstance(residual, torch.Tensor) or not residual.is_floating_point() or residual.shape != (M, N):
        raise ValueError(f"residual must be a float tensor of shape ({M}, {N}), got "
                         f"{tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__}")
    if out_quant is not None:
        raise ValueError("residual and out_quant cannot be combined (the sum is the block's state, not a layer input)")
    return gate_rows_of(M, N, gate)


def _scaled_mm(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    """cuBLAS fp8 with row-wise (per-token × per-channel) scales."""
    kw = dict(scale_a=x_scale.float().reshape(-1, 1).contiguous(), scale_b=w_scale.float().reshape(1, -1).contiguous(),
              out_dtype=out_dtype)
    if bias is None:
        return torch._scaled_mm(x_q, w_q.t(), **kw)
    try:
        return torch._scaled_mm(x_q, w_q.t(), bias=bias.to(out_dtype), **kw)
    except RuntimeError:  # some torch builds refuse a bias with row-wise scales
        return torch._scaled_mm(x_q, w_q.t(), **kw) + bias.to(out_dtype)


def w8a8_matmul(x_q, x_scale, w_q, w_scale, bias=None, *, out_dtype=torch.bfloat16, backend: str = "auto",
                config: GemmConfig | None = None, activation: str | None = None, out_quant: str | None = None,
                out_scale: float | None = None, residual: torch.Tensor | None = None,
                gate: torch.Tensor | None = None, out_group: int | None = None):
    """(M, K) × (N, K)ᵀ → (M, N) in out_dtype. backend: auto | triton | scaled_mm (fp8 on CUDA only).

    activation: None or "gelu_tanh" (fused in the epilogue). out_quant: None, or "int8"/"fp8" with a
    static out_scale (> 0, from calibration): the epilogue writes the quantized next-layer input
    and the call returns (y_q (M, N), scale (M,)); or, with out_group G instead of out_scale, dynamic scales per
    row and group of G output columns, (y_q, scales (N // G, M)) — the input of a GEMM whose x_scale is such
    a (K // G, M) array (its K loop scales each group's partial product; the pointer kernel, G a multiple of its
    block_k). residual (M, N) with an optional gate ((N,) or (G, N), one gate row per M // G rows): returns
    residual + gate·y, added in fp32 in the epilogue (a DiT block's gated residual; the product never exists on
    its own). Epilogue options and group scales force the Triton kernel.
    """
    _check_operands(x_q, x_scale, w_q, w_scale, bias)
    gate_rows = _check_residual(x_q.shape[0], w_q.shape[0], residual, gate, out_quant)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    M, K = x_q.shape
    N = w_q.shape[0]
    a_group = a_group_of(x_q, x_scale)
    cfg = (GROUPED_GEMM_CONFIG if a_group else default_gemm_config(x_q)) if config is None else config
    if a_group and a_group % cfg.block_k:
        raise ValueError(f"x_scale's column group {a_group} must be a multiple of config.block_k = {cfg.block_k}")
    if out_quant is not None:
        if out_quant not in MODES:
            raise ValueError(f"out_quant must be None or one of {MODES}, got {out_quant!r}")
        if (out_scale is None) == (out_group is None):
            raise ValueError("out_quant needs either a static out_scale or an out_group (dynamic scales per row and "
                             "group of out_group columns; one row's scale cannot be formed in one tile)")
        if out_group is not None and (not isinstance(out_group, int) or out_group <= 0 or N % out_group
                                      or cfg.block_n % out_group):
            raise ValueError(f"out_group must be a positive int dividing N = {N} and config.block_n = {cfg.block_n}, "
                             f"got {out_group!r}")
        out_inv, out_s = static_inv_scale(out_scale) if out_scale is not None else (1.0, 1.0)
    elif out_group is not None:
        raise ValueError("out_group needs out_quant")
    if triton is None or not use_triton(x_q, w_q):
        return w8a8_matmul_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype, activation=activation,
                                     out_quant=out_quant, out_scale=out_scale, residual=residual, gate=gate,
                                     out_group=out_group)
    fp8 = x_q.dtype == torch.float8_e4m3fn
    if backend == "auto":
        backend = FP8_BACKEND if fp8 else "triton"
    if activation is not None or out_quant is not None or residual is not None or a_group:
        backend = "triton"
    if backend == "scaled_mm":
        if not fp8:
            raise ValueError("backend='scaled_mm' needs float8_e4m3fn operands (use 'triton' for int8)")
        if x_q.is_cuda and K % 16 == 0 and N % 16 == 0:
            return _scaled_mm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    x_q = x_q if x_q.stride(-1) == 1 else x_q.contiguous()
    w_q = w_q if w_q.stride(-1) == 1 else w_q.contiguous()
    out = torch.empty(M, N, dtype=QDTYPE[out_quant] if out_quant else out_dtype, device=x_q.device)
    group_scales = torch.empty(N // out_group, M, dtype=torch.float32, device=x_q.device) if out_group else None
    if M == 0:
        if out_group:
            return out, group_scales
        return (out, torch.empty(0, device=x_q.device)) if out_quant else out
    tiles = cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n)
    if residual is not None:
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        gate = None if gate is None else gate.float().contiguous()
    res = dict(R=residual if residual is not None else out, stride_rm=residual.stride(0) if residual is not None else 0,
               G=gate if gate is not None else out, gate_rows=gate_rows, RESIDUAL=residual is not None,
               GATE=gate_mode(M, gate_rows, cfg.block_m) if gate is not None else 0,
               S=group_scales if out_group else out, OUT_GROUP=out_group or 0)
    if not a_group and cfg.tma and K % 16 == 0 and x_q.data_ptr() % 16 == 0 and w_q.data_ptr() % 16 == 0 \
            and x_q.stride(0) == K and w_q.stride(0) == K and descriptors_supported(x_q):
        programs = min(tiles, _num_sms(x_q.device)) if cfg.persistent else tiles
        # the flattened loop keeps the next tile's A / B stages in flight through the epilogue, so the epilogue's
        # layout-conversion scratch comes on top of them: 32 KiB for 2-byte outputs, the whole 128x256 tile for fp32
        # (calibration's fp32 model; sm_90 at 4 stages: 327 712 bytes, over the 232 448 a block may have). Outputs
        # wider than 2 bytes take the persistent loop without flattening (196 640 bytes; tools/kernel_resources.py).
        flatten = cfg.flatten and cfg.persistent and out.element_size() <= 2
        store_desc = (cfg.store_desc and residual is None and not out_group and N % 16 == 0 and out.data_ptr() % 16 == 0
                      and cfg.block_n % 32 == 0)
        sub_n = cfg.block_n // 2 if cfg.store_subtile else cfg.block_n
        c_desc = TensorDescriptor(out, shape=[M, N], strides=[N, 1], block_shape=[cfg.block_m, sub_n]) \
            if store_desc else None
        _w8a8_gemm_tma_kernel[(programs,)](
            TensorDescriptor(x_q, shape=[M, K], strides=[K, 1], block_shape=[cfg.block_m, cfg.block_k]),
            TensorDescriptor(w_q, shape=[N, K], strides=[K, 1], block_shape=[cfg.block_n, cfg.block_k]),
            out, x_scale.float().contiguous(), w_scale.float().contiguous(), bias if bias is not None else out,
            M, N, K, out.stride(0), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m, HAS_BIAS=bias is not None, INT8=not fp8, GELU=activation == "gelu_tanh",
            OUT_QUANT=out_quant is not None, OUT_FP8=out_quant == "fp8", out_inv=out_inv if out_quant else 1.0,
            EXACT_CAST=interpreter_enabled(), NUM_PROGRAMS=programs, **res, WS=cfg.warp_spec, FAST_GELU=_fast_gelu(),
            FLATTEN=flatten, c_desc=c_desc, STORE_DESC=store_desc,
            SUBTILE=store_desc and cfg.store_subtile, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        _w8a8_gemm_kernel[(tiles,)](
            x_q, w_q, out, x_scale.float().contiguous(), w_scale.float().contiguous(), bias if bias is not None else out,
            M, N, K, x_q.stride(0), w_q.stride(0), out.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            HAS_BIAS=bias is not None, INT8=not fp8, EVEN_K=K % cfg.block_k == 0,
            GELU=activation == "gelu_tanh", OUT_QUANT=out_quant is not None, OUT_FP8=out_quant == "fp8",
            out_inv=out_inv if out_quant else 1.0, EXACT_CAST=interpreter_enabled(), FAST_GELU=_fast_gelu(),
            A_QUANT=False, a_inv=1.0, a_scale=1.0, **res, A_GROUP=a_group, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    if out_group:
        return out, group_scales
    if out_quant:
        return out, torch.full((M,), out_s, dtype=torch.float32, device=x_q.device)
    return out


def w8a8_matmul_static_input_reference(x, act_scale: float, w_q, w_scale, bias=None, out_dtype=torch.bfloat16, *,
                                       activation: str | None = None):
    """x (M, K) float quantized with the static per-tensor act_scale (quantize_rows_reference), then
    w8a8_matmul_reference: what the fused kernel computes."""
    mode = "int8" if w_q.dtype == torch.int8 else "fp8"
    x_q, x_scale = quantize_rows_reference(x, mode, act_scale)
    return w8a8_matmul_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype, activation=activation)


def w8a8_matmul_static_input(x, act_scale: float, w_q, w_scale, bias=None, *, out_dtype=torch.bfloat16,
                             config: GemmConfig | None = None, activation: str | None = None):
    """(M, K) float activations × (N, K)ᵀ int8/fp8 weight → (M, N), the activation quantized inside the
    GEMM with a static per-tensor scale (from calibration): one kernel instead of a quantization pass
    (which writes x_q and the GEMM reads it back) plus the GEMM. The same numbers as quantizing with
    `quantize_rows(x, mode, act_scale)` and calling `w8a8_matmul`. Whether it is faster than the two
    kernels is for tools/bench_lowbit.py to say (the A tile is read in 16 bits and converted on the
    CUDA cores in the K loop). Compiled for sm_90 on the CPU (Triton 3.9, fp8, 128x256x128, 8 warps, no
    spills): the K loop holds ~380 instructions per thread against the plain fp8 GEMM's 94 (shared-memory
    loads of the bf16 tile, unpack, scale, pack, stores of the fp8 tile: 64 A elements per thread per step;
    ~500 with the clamp that the GPU's satfinite cast makes redundant), some 60 % of the issue slots of the
    step's four wgmma: the conversion may bound it; shared memory 176 KiB at 3 stages."""
    if x.dim() != 2 or not x.is_floating_point() or x.dtype == torch.float8_e4m3fn:
        raise TypeError(f"x must be a 2-D float tensor (M, K), got {x.dtype} of shape {tuple(x.shape)}")
    _check_weight(x, "x", w_q, w_scale, bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    a_inv, a_s = static_inv_scale(act_scale)  # refuses a scale <= 0
    if triton is None or not use_triton(x, w_q):
        return w8a8_matmul_static_input_reference(x, act_scale, w_q, w_scale, bias, out_dtype, activation=activation)
    M, K = x.shape
    N = w_q.shape[0]
    cfg = POINTER_GEMM_CONFIG if config is None else config  # the pointer kernel (A quantized in its loop)
    x = x if x.stride(-1) == 1 else x.contiguous()
    w_q = w_q if w_q.stride(-1) == 1 else w_q.contiguous()
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    if M == 0:
        return out
    ws = w_scale.float().contiguous()
    grid = (cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n),)
    _w8a8_gemm_kernel[grid](
        x, w_q, out, ws, ws, bias if bias is not None else out,
        M, N, K, x.stride(0), w_q.stride(0), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        HAS_BIAS=bias is not None, INT8=w_q.dtype == torch.int8, EVEN_K=K % cfg.block_k == 0,
        GELU=activation == "gelu_tanh", OUT_QUANT=False, OUT_FP8=False, out_inv=1.0,
        EXACT_CAST=interpreter_enabled(), FAST_GELU=_fast_gelu(), A_QUANT=True, a_inv=a_inv, a_scale=a_s, R=out,
        stride_rm=0, G=out, gate_rows=1, RESIDUAL=False, GATE=0, A_GROUP=0, S=out, OUT_GROUP=0, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out


__all__ = ["ACTIVATIONS", "BACKENDS", "DEFAULT_GEMM_CONFIG", "FP8_BACKEND", "GROUPED_GEMM_CONFIG", "GemmConfig",
           "POINTER_GEMM_CONFIG", "a_group_of",
           "default_gemm_config", "gate_mode", "gate_rows_of", "gelu_tanh_reference", "w8a8_matmul",
           "w8a8_matmul_reference", "w8a8_matmul_static_input", "w8a8_matmul_static_input_reference"]
