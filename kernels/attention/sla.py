"""Sparse-linear attention (SLA): exact softmax attention on critical blocks + linear attention on the rest.

Follows Zhang et al. 2025, "SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable
Sparse-Linear Attention" (arXiv 2509.24006), and DESIGN.md "Sparse-linear attention".

Definition implemented here (per batch and head; q, k, v: (L, D); scale = 1/sqrt(D)):

    M   = block map (turbo_kernels.attention.blockmap): per query block i its n critical key blocks
    O_s = softmax(q k^T * scale restricted to critical blocks) v            # sparse branch, exact
    O_l[r] = sum_{c marginal for r} (phi(q_r).phi(k_c)) v_c
             / (1e-5 + sum_{c marginal for r} phi(q_r).phi(k_c))            # linear branch
    O   = O_s + proj_l(O_l)                                                 # proj_l: Linear(D, D), fp32

Which keys the linear branch sees -- a documented choice. DESIGN.md writes the linear branch over
ALL keys (as thu-ml/SLA's public module computes it), while the paper (Sec. 4, Algorithm 1) splits
the block map into critical (top kh%), marginal and negligible (bottom kl%) blocks and computes
linear attention over the MARGINAL blocks only: for M_c[i, j] = 0 it accumulates
h_j = phi(K_j)^T V_j and z_j = rowsum(phi(K_j)^T), and O_l_i = phi(Q_i) H_i / (phi(Q_i) Z_i).
We follow the paper: the linear branch covers exactly the non-critical key blocks, so no key is
counted by both branches. There is no negligible class (kl = 0, as in DESIGN and the public
code), so "marginal" = "not critical". Consequences: topk = 1.0 leaves no marginal block, the
linear branch is identically 0 and O = O_s + proj_l.bias = dense attention when proj_l is zero.

How it is computed:
- sparse branch: Triton kernels in sla_kernels.py. Forward: one program per (query tile, batch*head) walks
  the query block's row of the ascending lookup table, online softmax in fp32 with exp2 and
  log2(e) folded into the scale. Backward: dQ walks the same query-major table; dK/dV walk the
  key-major inverted table (BlockMap.inverse(), CSR), never a dense Nq x Nk map.
- linear branch: block-level GEMMs on tensor cores plus small per-tile kernels. With
  h_j = phi(K_j)^T V_j (D x D) and z_j = phi(K_j)^T 1 per key block, the marginal sums are one
  dense matrix product over blocks, H = (1 - M) @ h and Z = (1 - M) @ z, then
  O_l = phi(Q_i) H_i / (eps + phi(Q_i) Z_i) per query block. Summing the complement directly
  avoids the cancellation of the paper's "total minus critical" pre-aggregation, and costs
  2 Nq Nk D^2 flops per head on tensor cores. h and z are divided by Lk first (the ratio is
  unchanged, eps is divided too) so that fp16 sums over 75k tokens cannot overflow.
  Forward: `_sla_lin_state_kernel` (h_j, z_j; one read of K, V), the two GEMMs, then
  O_l and proj_l per query tile (`_lin_fwd_tile`). Backward: per query tile dq_lin and this
  tile's dHm, dZm (`_lin_bwd_q_tile`); dh = (1 - M)^T dHm, dz = (1 - M)^T dZm (GEMMs); per key
  tile dk_lin, dv_lin (`_lin_bwd_kv_tile`); dW = dO^T O_l (GEMM). The tile functions run either
  in the epilogues of the sparse kernels or as separate kernels (SLAKernelConfig.fuse_linear,
  fuse_linear_bwd).
  `linear_branch` is the same math in plain torch (documentation and test oracle).

Public API:
    sla_reference(q, k, v, topk, block_q, block_k, feature_map, proj_l, *, block_map, return_branches)
        pure torch, dense masks; returns O, or (O_s, O_l) with return_branches=True.
    sla_attention(q, k, v, proj_weight, proj_bias, topk, block_q, block_k, feature_map, *, block_map, config)
        autograd-capable fast path (Triton on CUDA and under TRITON_INTERPRET=1; the reference on
        other CPU tensors). Returns O in q's dtype.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from turbo_kernels.attention.blockmap import (SELECTS, BlockMap, check_qk, num_selected, sla_block_map,
                                              sla_block_map_reference)
from turbo_kernels.utils import (check_block, check_float_dtype, descriptors_supported, heads_output_like,
                                 next_power_of_2, smem_per_block, token_major, use_triton)

__all__ = ["sla_reference", "sla_torch", "sla_attention", "linear_branch", "add_linear_branch", "sagesla_with_linear",
           "feature_map_fn", "SLAKernelConfig", "sparse_attention", "FEATURE_MAPS", "LINEAR_EPS"]

FEATURE_MAPS = ("softmax", "elu", "relu")
LINEAR_EPS = 1e-5  # denominator epsilon of the linear branch (paper / public code)
LOG2E = 1.4426950408889634


def feature_map_fn(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """phi(x) over the head dimension: softmax (default), elu+1 or relu. Math in >= fp32."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if feature_map == "softmax":
        return torch.softmax(xf, dim=-1)
    if feature_map == "elu":
        return F.elu(xf) + 1.0
    if feature_map == "relu":
        return F.relu(xf)
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def _check_inputs(q, k, v, topk, block_q, block_k, feature_map) -> None:
    check_qk(q, k, topk, block_q, block_k)
    check_float_dtype("v", v, (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if v.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if v.device != q.device:
        raise ValueError(f"v ({v.device}) must be on the device of q ({q.device})")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def _check_proj(proj_weight, proj_bias, D: int) -> None:
    if proj_weight is not None and tuple(proj_weight.shape) != (D, D):
        raise ValueError(f"proj_weight must have shape ({D}, {D}), got {tuple(proj_weight.shape)}")
    if proj_bias is not None and tuple(proj_bias.shape) != (D,):
        raise ValueError(f"proj_bias must have shape ({D},), got {tuple(proj_bias.shape)}")


def _apply_proj(o_l: torch.Tensor, proj_l) -> torch.Tensor:
    """proj_l: None (the zero-initialised projection: contributes 0), an nn.Module, or (weight, bias)."""
    if proj_l is None:
        return torch.zeros_like(o_l)
    if isinstance(proj_l, torch.nn.Module):
        return proj_l(o_l.to(next(proj_l.parameters()).dtype)).to(o_l.dtype)
    weight, bias = proj_l
    return F.linear(o_l, weight.to(o_l.dtype), None if bias is None else bias.to(o_l.dtype))


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def sla_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: float, block_q: int = 128,
                  block_k: int = 64, feature_map: str = "softmax", proj_l=None, *,
                  block_map: BlockMap | None = None, return_branches: bool = False):
    """Pure-torch SLA with dense (L x L) masks: the spec, the CPU path and the test oracle.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D). topk in (0, 1]. proj_l: None (zero projection, so
    O = O_s), an nn.Module, or a (weight (D, D), bias (D,) or None) pair. block_map: reuse a
    precomputed map (default: `sla_block_map_reference`). Math in float32 (float64 for float64
    inputs). Returns O (B, H, Lq, D) in q's dtype, or (O_s, O_l) in the compute dtype when
    return_branches=True.
    """
    _check_inputs(q, k, v, topk, block_q, block_k, feature_map)
    bm = block_map if block_map is not None else sla_block_map_reference(q, k, topk, block_q, block_k)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    critical = bm.token_mask()  # (B, H, Lq, Lk) bool
    # sparse branch: exact softmax over the critical keys only
    s = torch.matmul(qc, kc.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    o_s = torch.matmul(torch.softmax(s.masked_fill(~critical, float("-inf")), dim=-1), vc)
    # linear branch: linear attention over the marginal (non-critical) keys
    a = torch.matmul(feature_map_fn(qc, feature_map), feature_map_fn(kc, feature_map).transpose(-1, -2))
    a = a * (~critical).to(ct)  # (B, H, Lq, Lk) linear scores on marginal keys
    o_l = torch.matmul(a, vc) / (LINEAR_EPS + a.sum(dim=-1, keepdim=True))
    if return_branches:
        return o_s, o_l
    return (o_s + _apply_proj(o_l, proj_l)).to(q.dtype)


def sla_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: float, block_q: int = 128,
              block_k: int = 64, feature_map: str = "softmax", proj_l=None, *,
              block_map: BlockMap | None = None) -> torch.Tensor:
    """SLA in plain torch ops at SLA's cost: the path of devices without the Triton kernels (the CPU).
    Same math and arguments as `sla_reference` (tests hold them equal) and autograd-capable, but the
    sparse branch attends only to each query block's gathered critical key blocks (`sparse_branch`)
    and the linear branch is the block GEMMs of `linear_branch` (O(L·D²)), where the reference builds
    two dense L x L score matrices. float64 inputs go to the reference (the exact oracle)."""
    _check_inputs(q, k, v, topk, block_q, block_k, feature_map)
    if q.dtype == torch.float64:
        return sla_reference(q, k, v, topk, block_q, block_k, feature_map, proj_l, block_map=block_map)
    bm = block_map if block_map is not None else sla_block_map_reference(q, k, topk, block_q, block_k)
    qc, kc, vc = q.float(), k.float(), v.float()
    o = sparse_branch(qc, kc, vc, bm)
    if proj_l is not None:  # O_l is exactly 0 without marginal blocks; proj_l still adds its bias
        o = o + _apply_proj(linear_branch(qc, kc, vc, bm, feature_map), proj_l)
    return o.to(q.dtype)


def sparse_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMap) -> torch.Tensor:
    """O_s by gathering: each query block attends (exact softmax) to the n key blocks of its LUT row,
    gathered into one (n·block_k)-key tile; tail keys past k_len are masked. Plain torch, autograd
    through the gathers; n/Nk of dense attention's work. q: (B, H, Lq, D), k/v: (B, H, Lk, D), same
    float dtype -> (B, H, Lq, D)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    Nq, Nk, bq, bk, n = bm.num_q_blocks, bm.num_k_blocks, bm.block_q, bm.block_k, bm.n
    lut = bm.lut.long()  # (B, H, Nq, n)
    b_idx = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    h_idx = torch.arange(H, device=q.device).view(1, H, 1, 1)
    kb = F.pad(k, (0, 0, 0, Nk * bk - Lk)).view(B, H, Nk, bk, D)[b_idx, h_idx, lut]  # (B, H, Nq, n, bk, D)
    vb = F.pad(v, (0, 0, 0, Nk * bk - Lk)).view(B, H, Nk, bk, D)[b_idx, h_idx, lut]
    kb, vb = kb.reshape(B, H, Nq, n * bk, D), vb.reshape(B, H, Nq, n * bk, D)
    key_pos = (lut.unsqueeze(-1) * bk + torch.arange(bk, device=q.device)).reshape(B, H, Nq, 1, n * bk)
    qb = F.pad(q, (0, 0, 0, Nq * bq - Lq)).view(B, H, Nq, bq, D)
    s = torch.matmul(qb, kb.transpose(-1, -2)) / math.sqrt(D)  # (B, H, Nq, bq, n·bk)
    p = torch.softmax(s.masked_fill(key_pos >= Lk, float("-inf")), dim=-1)
    return torch.matmul(p, vb).view(B, H, Nq * bq, D)[:, :, :Lq]


# ----------------------------------------------------------------------------------------------
# Linear branch (torch, block-level GEMMs; autograd provides the backward)
# ----------------------------------------------------------------------------------------------
def linear_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMap,
                  feature_map: str = "softmax") -> torch.Tensor:
    """O_l over the marginal key blocks of `bm`, as block GEMMs in plain torch (autograd-capable).

    The block-GEMM formulation the Triton path implements, kept as its readable form and a test
    oracle (the fast path does not call it). Returns (B, H, Lq, D) float32.

    GEMM operands are in q's dtype (fp16/bf16 tensor cores, fp32 accumulate), the division in
    fp32. Equals the `o_l` of `sla_reference` (see the module docstring for the derivation).
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    Nq, Nk, bq, bk = bm.num_q_blocks, bm.num_k_blocks, bm.block_q, bm.block_k
    if bm.n == Nk:  # no marginal block: the branch is exactly zero
        return torch.zeros(B, H, Lq, D, device=q.device, dtype=torch.float32)
    cdt = q.dtype
    fq = feature_map_fn(q, feature_map).to(cdt)  # (B, H, Lq, D)
    fk = (feature_map_fn(k, feature_map) / Lk).to(cdt)  # (B, H, Lk, D), pre-divided by Lk (range)
    fk = F.pad(fk, (0, 0, 0, Nk * bk - Lk)).view(B, H, Nk, bk, D)  # zero rows: padding adds nothing
    vb = F.pad(v, (0, 0, 0, Nk * bk - Lk)).view(B, H, Nk, bk, D)
    h = torch.matmul(fk.transpose(-1, -2), vb)  # (B, H, Nk, D, D)  h_j = phi(K_j)^T V_j / Lk
    z = fk.sum(dim=3)  # (B, H, Nk, D)                             z_j = phi(K_j)^T 1 / Lk
    marginal = (~bm.dense()).to(cdt)  # (B, H, Nq, Nk)
    Hm = torch.matmul(marginal, h.reshape(B, H, Nk, D * D)).view(B, H, Nq, D, D)
    Zm = torch.matmul(marginal, z)  # (B, H, Nq, D)
    fq = F.pad(fq, (0, 0, 0, Nq * bq - Lq)).view(B, H, Nq, bq, D)
    num = torch.matmul(fq, Hm)  # (B, H, Nq, bq, D)
    den = torch.matmul(fq, Zm.unsqueeze(-1))  # (B, H, Nq, bq, 1)
    o_l = num.float() / (LINEAR_EPS / Lk + den.float())
    return o_l.view(B, H, Nq * bq, D)[:, :, :Lq]


# ----------------------------------------------------------------------------------------------
# Triton kernels (device code in sla_kernels.py)
# ----------------------------------------------------------------------------------------------
try:
    import triton
except ImportError:  # CPU-only install: the reference path is used
    triton = None

if triton is not None:
    from turbo_kernels.attention.sla_kernels import (_sla_bwd_dkdv_kernel, _sla_bwd_dq_kernel, _sla_bwd_preprocess,
                                                     _sla_fwd_kernel, _sla_lin_bwd_kv_kernel, _sla_lin_bwd_q_kernel,
                                                     _sla_lin_fwd_kernel, _sla_lin_state_kernel)
    from turbo_kernels.attention.sla_tma import (_sla_bwd_dkdv_tma_kernel, _sla_bwd_dq_tma_kernel, _sla_fwd_tma_kernel,
                                                 token_descriptor, token_view)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SLAKernelConfig:
    """Tiles, warps and pipeline depth of the sparse-branch kernels.

    fwd_block_m / dq_block_m must divide the map's block_q (clamped to it); dkdv_block_n must
    divide block_k (clamped). fwd_block_n / dq_block_n <= block_k give contiguous tiles with a
    scalar base (fast path); larger values gather several table entries per tile (masked).
    dkdv_block_m <= block_q likewise. Defaults: see DEFAULT_CONFIG's comment.
    """

    fwd_block_m: int = 128
    fwd_block_n: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 2
    dq_block_m: int = 128
    dq_block_n: int = 64
    dq_warps: int = 8
    dq_stages: int = 2
    dkdv_block_m: int = 64
    dkdv_block_n: int = 64
    dkdv_warps: int = 4
    dkdv_stages: int = 2
    state_warps: int = 8
    # key blocks per program of the linear branch's state kernel (W^T loaded once per program, the blocks a pipelined
    # loop). H100, 2026-12-06, 1.3B, topk 0.1, the inference state (kernel + marginal GEMMs), bench_attention --sweep,
    # blocks / warps: 1/8 0.478 ms, 2/8 0.426, 4/8 0.412, 8/8 0.405, 4/4 0.420 (same sums bit for bit)
    state_blocks: int = 8
    # warps of the separate linear-branch kernels (forward epilogue, backward dQ and dK/dV parts): one
    # 64- or 128-row tile each with D x D products; at 4 warps the backward ones spill (sm_90, dQ part
    # 1 400 stack bytes; 8 warps: 496, dK/dV part 40 -> 0; tools/kernel_resources.py), not yet timed
    lin_warps: int = 8
    # Forward: True runs the linear branch (and proj_l) in the sparse kernel's epilogue, False in a
    # separate small kernel after it. False since 2026-12-04: measured whole inference forward 2.15 ms
    # separate vs 2.52 ms fused (H200, 1.3B, topk 0.1, bench_attention --sweep), although the fused
    # kernel's main loop does not spill (tools/kernel_resources.py).
    fuse_linear: bool = False
    # Backward: the same choice for the dQ and dK/dV kernels. False since 2026-12-03 on the compiler's
    # evidence, not a timing: with the linear branch fused, the dQ kernel's main loop spills (255
    # registers, 68 local-memory loads/stores per key tile, sm_90), which matches the measured +3.6 ms
    # (fused 8.41 ms vs 4.82 ms for the sparse backward alone); unfused, its loop is spill-free.
    fuse_linear_bwd: bool = False
    # How sla_attention picks the top-n key blocks when it builds the block map itself (`sla_block_map`'s
    # select): "torch" (topk + sort) or "triton" (`topk_select`, one kernel). triton since 2026-12-04: whole
    # forward 2.31 vs 2.44 ms, block map alone 0.40 vs 0.48 ms (H200, 1.3B, topk 0.1; 14B 720p 1.56 vs 1.97).
    map_select: str = "triton"
    # Inference only, on CUDA: run the linear branch's state kernel on a second stream while the block map
    # is built, and its marginal GEMMs while the sparse kernel runs (neither needs the other's result until
    # the epilogue). Off until timed (bench_attention --sweep "overlap"): the state kernel (0.30 ms) and
    # the map's small kernels (0.42 ms) leave most of an H200 idle, the sparse kernel does not.
    overlap_state: bool = False
    # Forward: lazy rescaling threshold of the sparse kernel's online softmax (log2 units; 0 = rescale the
    # accumulator at every key tile). See _fwd_tile in sla_kernels. Measured slower (H100, 2026-12-05, 1.3B,
    # topk 0.1, sparse forward kernel: tau 0 1.545 ms, tau 8 1.683; bench_attention --sweep): stays 0.
    fwd_rescale_tau: float = 0.0
    # Forward: fetch K/V tiles through tensor descriptors (TMA on sm_90+; `sla_tma.py`) instead of pointer
    # gathers. Used where the operands have a 2-D token view (contiguous (B, H, L, D), or (B, L, H, D)
    # permuted), fwd_block_n <= the map's block_k and the linear branch is not fused into the sparse
    # kernel; elsewhere the pointer kernel runs. Measured slower (H100, 2026-12-06, 1.3B, topk 0.1, sparse
    # forward kernel, same process: pointers 1.555 ms; descriptors 1.798 / 1.644 / 1.646 ms at 2 / 3 / 4 stages,
    # with warp specialization 1.808 / 1.639): stays off, kept in the sweep.
    fwd_tma: bool = False
    # With fwd_tma: Triton's automatic warp specialization of the key loop (tl.range(warp_specialize=...)).
    fwd_warp_spec: bool = False
    # Backward: the dQ kernel's K/V tiles and the dK/dV kernel's Q/dO tiles through tensor descriptors, where
    # the operands have a token view, dq_block_n <= block_k / dkdv_block_m <= block_q, and the linear branch
    # runs in its own kernels (fuse_linear_bwd False). H100, 2026-12-06, 1.3B, topk 0.1, the backward's kernels,
    # same process: pointers 5.72 ms, descriptors 5.55-5.69 ms over four stage choices; pointer variants of the
    # same sweep ranged 5.68-5.89, so the 3 % is not established: stays off, kept in the sweep.
    bwd_tma: bool = False

    def clamp(self, block_q: int, block_k: int) -> "SLAKernelConfig":
        for name in ("fwd_block_m", "fwd_block_n", "dq_block_m", "dq_block_n", "dkdv_block_m", "dkdv_block_n"):
            check_block(f"config.{name}", getattr(self, name))
        if not 0.0 <= self.fwd_rescale_tau <= 8.0:
            raise ValueError(f"config.fwd_rescale_tau must be in [0, 8] (P <= 2^tau), got {self.fwd_rescale_tau!r}")
        if self.map_select not in SELECTS:
            raise ValueError(f"config.map_select must be one of {SELECTS}, got {self.map_select!r}")
        if not isinstance(self.state_blocks, int) or isinstance(self.state_blocks, bool) or self.state_blocks < 1:
            raise ValueError(f"config.state_blocks must be an int >= 1, got {self.state_blocks!r}")
        return replace(self, fwd_block_m=min(self.fwd_block_m, block_q), dq_block_m=min(self.dq_block_m, block_q),
                       dkdv_block_n=min(self.dkdv_block_n, block_k))


# Measured on an H100 SXM (Triton 3.6, bf16, B1 H12 L32760 D128, 128x64 map blocks, topk 0.1),
# sweep in tools/bench_attention.py --sweep, first version of the kernels (vector-gathered tiles):
#   forward  (block_m, block_n, warps, stages): (128,64,8,2) 1.86 ms < (128,64,4,3) 1.93
#            < (128,64,8,3) 2.13 < (128,128,8,2) 2.14 < (64,64,4,3) 2.15 < (128,128,8,3) 2.21
#            < (128,128,4,3) 3.43
#   backward (dQ and dK/dV kernels, whole sparse backward): dQ (64,64,4,2) 5.31 ms, (128,64,8,2)
#            5.37, (128,128,8,2) 5.41, (64,64,4,3) 5.48, (64,128,4,2) 6.64; dK/dV (64,64,4,2) 5.44,
#            (32,64,4,2) 5.44, (128,64,8,2) 7.38, (64,64,8,3) 8.50, (128,64,4,2) 16.8.
# Current kernels, same GPU and shape, defaults (BENCHMARKS.md "Attention (SLA)"): sparse forward
# 1.57 ms, 2.17 ms with the fused linear epilogue; sparse backward 4.82 ms, 8.41 ms with the fused
# linear epilogues. The separate linear kernels (fuse_linear / fuse_linear_bwd False) are not timed
# yet: --sweep compares both ways for the forward and for the backward and picks the faster.
# Sweep on one H200, 2026-12-04 (same shape; these kernels): forward (128,64,8,2) 1.53 ms < (128,128,8,2)
# 1.58 = (64,64,4,2) 1.58 < (128,64,8,3) 1.59 < (128,64,8,4) 1.60 < (128,64,4,3) 2.12; whole backward
# with dQ (128,64,8,2) 5.60 < (64,64,4,2) 5.85; dK/dV stages 3 5.56 ~ 2 5.61; linear branch separate
# 2.15 < fused 2.52 (forward); fused top-n 2.31 < torch 2.44 (whole forward). The defaults follow.
DEFAULT_CONFIG = SLAKernelConfig()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_d(D: int) -> int:
    return max(16, next_power_of_2(D))


def _sparse_forward(q, k, v, bm: BlockMap, cfg: SLAKernelConfig, linear=None, bias=None, feature_map="softmax",
                    store_lse: bool = True, store_os: bool = False):
    """Launch the forward kernel(s).

    linear: None, or (Hm, Zm, W^T) of `_linear_state` (linear branch + proj_l, in the sparse
    kernel's epilogue when cfg.fuse_linear, else in `_sla_lin_fwd_kernel` after it); bias: (D,)
    fp32 or None. Returns (O, LSE or None, O_s or None): O_s, the sparse branch alone, is kept
    when store_os (training: the backward's delta needs it).
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = heads_output_like(q)  # token-major when q is: the DiT reads it back as (B, L, H*D) without a copy
    o_s = torch.empty_like(o) if store_os else o
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32) if store_lse else o
    sm_scale = 1.0 / math.sqrt(D)
    feature = FEATURE_MAPS.index(feature_map)
    fused = cfg.fuse_linear or linear is None
    hm, zm, wt = linear if linear is not None else (o, o, o)
    folded = wt is None  # inference: proj_l folded into Hm (`_linear_state(fold=True)`), phi(q) precomputed
    fq = _query_features(q, feature_map) if folded and fused else q
    grid = (triton.cdiv(Lq, cfg.fwd_block_m), B * H)
    tma_ok = cfg.fwd_tma and not (fused and linear is not None) and not (store_os and fused)
    if not _launch_tma_forward(q, k, v, o if fused else o_s, lse, bm, cfg, grid, bias if fused else None, store_lse,
                               tma_ok):
        _sla_fwd_kernel[grid](q, k, v, o if fused else o_s, o_s, lse, bm.lut, hm, zm, hm if folded else wt,
                              bias if bias is not None else o, fq,
                              *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(fq),
                              H, Lq, Lk, D, bm.n, bm.num_q_blocks, sm_scale * LOG2E, LINEAR_EPS / Lk,
                              MAP_BQ=bm.block_q, MAP_BK=bm.block_k, BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.fwd_block_n,
                              BLOCK_D=_block_d(D), EVEN_N=Lk % bm.block_k == 0, STORE_LSE=store_lse,
                              STORE_OS=store_os and fused, LINEAR=fused and linear is not None,
                              HAS_BIAS=fused and bias is not None, FEATURE=feature, PAD_D=D != _block_d(D),
                              FOLDED=folded, TAU=float(cfg.fwd_rescale_tau), num_warps=cfg.fwd_warps,
                              num_stages=cfg.fwd_stages)
    if not fused:  # O = O_s + proj_l(O_l) (+ bias), O_s read back (in place when o_s is o)
        _linear_epilogue(q, o_s, o, linear, bias, bm, Lk, cfg, feature_map)
    return o, (lse if store_lse else None), (o_s if store_os else None)


def _launch_tma_forward(q, k, v, out, lse, bm: BlockMap, cfg: SLAKernelConfig, grid, bias, store_lse: bool,
                        wanted: bool) -> bool:
    """Run the descriptor-fed sparse kernel (`sla_tma`) into out when wanted and the operands allow it;
    False (nothing launched) otherwise, and the caller runs the pointer kernel."""
    if not wanted or cfg.fwd_block_n > bm.block_k or not descriptors_supported(k):
        return False
    B, H, Lq, D = q.shape
    BLOCK_D = _block_d(D)
    kv, vv = token_view(k), token_view(v)
    if kv is None or vv is None:
        return False
    k_desc = token_descriptor(k, kv, cfg.fwd_block_n, BLOCK_D)
    v_desc = token_descriptor(v, vv, cfg.fwd_block_n, BLOCK_D)
    _sla_fwd_tma_kernel[grid](q, k_desc, v_desc, out, lse, bm.lut, bias if bias is not None else out,
                              *_strides(q), *_strides(out), H, Lq, k.shape[2], D, bm.n, bm.num_q_blocks,
                              LOG2E / math.sqrt(D), *kv[2:], *vv[2:],
                              MAP_BQ=bm.block_q, MAP_BK=bm.block_k, BLOCK_M=cfg.fwd_block_m,
                              BLOCK_N=cfg.fwd_block_n, BLOCK_D=BLOCK_D, EVEN_N=k.shape[2] % bm.block_k == 0,
                              STORE_LSE=store_lse, HAS_BIAS=bias is not None, WS=cfg.fwd_warp_spec,
                              num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages)
    return True


def _linear_epilogue(q, o_s, o, linear, bias, bm: BlockMap, Lk: int, cfg: SLAKernelConfig, feature_map: str) -> None:
    """O = O_s + proj_l(O_l) (+ bias) after a sparse kernel (`_sla_lin_fwd_kernel`); linear = (Hm, Zm, W^T)
    of `_linear_state`. O_s is read with O's strides and may be O itself (each tile is read, then written)."""
    B, H, Lq, D = q.shape
    hm, zm, wt = linear
    _sla_lin_fwd_kernel[(triton.cdiv(Lq, cfg.fwd_block_m), B * H)](
        q, o_s, o, hm, zm, hm if wt is None else wt, bias if bias is not None else o,
        *_strides(q), *_strides(o), H, Lq, D, bm.num_q_blocks, LINEAR_EPS / Lk,
        MAP_BQ=bm.block_q, BLOCK_M=cfg.fwd_block_m, BLOCK_D=_block_d(D), HAS_BIAS=bias is not None,
        FEATURE=FEATURE_MAPS.index(feature_map), FOLDED=wt is None, num_warps=cfg.lin_warps)


def _marginal(bm: BlockMap, dtype) -> torch.Tensor:
    """(B*H, Nq, Nk) 0/1 matrix of the marginal (non-critical) blocks, a GEMM operand: ones with the
    critical blocks scattered to 0 (three launches; the complement of bm.dense() took five)."""
    B, H, Nq, n = bm.lut.shape
    ones = torch.ones(B * H, Nq, bm.num_k_blocks, dtype=dtype, device=bm.lut.device)
    return ones.scatter_(-1, bm.lut.view(B * H, Nq, n).long(), 0)


def _query_features(q: torch.Tensor, feature_map: str) -> torch.Tensor:
    """phi(q) in q's dtype for the inference epilogue (FOLDED): one pass over Q by torch (softmax keeps
    fp32 math inside for half-precision inputs), instead of per-tile row reductions in the kernel."""
    if feature_map == "softmax":
        return torch.softmax(q, dim=-1)
    return feature_map_fn(q, feature_map).to(q.dtype)


# Shared memory the state kernel needs with several key blocks per program (its loop pipelined, Triton's default 3
# stages; D = 128, bf16): 147 456 bytes on sm_90, 131 072 on sm_89 / sm_120 (one block per program: 49 152); where a
# block may have less, one block per program.
STATE_BLOCKS_SMEM = 147_456


def _state_blocks(cfg: SLAKernelConfig, Nk: int, k) -> int:
    """Key blocks per state-kernel program: cfg.state_blocks (at most Nk), or 1 on a CUDA device whose blocks cannot
    have STATE_BLOCKS_SMEM of shared memory (an RTX 4090 / 5090)."""
    blocks = max(1, min(cfg.state_blocks, Nk))
    if blocks > 1 and k.is_cuda and smem_per_block(k.device) < STATE_BLOCKS_SMEM:
        return 1
    return blocks


def _state_sums(k, v, Nk: int, block_k: int, feature_map: str, wt: torch.Tensor, cfg: SLAKernelConfig, fold: bool,
                hs: torch.Tensor, zs: torch.Tensor) -> None:
    """h_j (B*H, Nk, D, D) and z_j (B*H, Nk, D) per key block into hs, zs (one read of K and V; h_j from
    V_j W^T when fold)."""
    B, H, Lk, D = k.shape
    blocks = _state_blocks(cfg, Nk, k)
    _sla_lin_state_kernel[(triton.cdiv(Nk, blocks), B * H)](k, v, wt, hs, zs, *_strides(k), *_strides(v), H, Lk, D,
                                                             Nk, 1.0 / Lk, MAP_BK=block_k, BLOCK_D=_block_d(D),
                                                             FEATURE=FEATURE_MAPS.index(feature_map), FOLD_W=fold,
                                                             BLOCKS=blocks, num_warps=cfg.state_warps)


def _linear_state(q, k, v, bm: BlockMap, feature_map: str, proj_weight: torch.Tensor, cfg: SLAKernelConfig,
                  fold: bool = False):
    """Marginal sums of the linear branch per query block, for the forward epilogue.

    h_j, z_j per key block (Triton, one read of K and V), then Hm = (1 - M) @ h and
    Zm = (1 - M) @ z as batched tensor-core GEMMs. Returns (Hm (B*H, Nq, D, D), Zm (B*H, Nq, D),
    W^T (D, D)), all in q's dtype. fold=True (inference: the backward needs Hm itself) returns
    (Hm W^T, Zm, None): proj_l folded into the state kernel (h_j from V_j W^T), so the epilogue of every
    query tile does one D x D product instead of two (FOLDED in `_lin_fwd_tile`).
    """
    B, H, Lq, D = q.shape
    Lk, Nq, Nk = k.shape[2], bm.num_q_blocks, bm.num_k_blocks
    hs = torch.empty(B * H, Nk, D, D, device=q.device, dtype=q.dtype)
    zs = torch.empty(B * H, Nk, D, device=q.device, dtype=q.dtype)
    wt = proj_weight.t().to(q.dtype).contiguous()
    _state_sums(k, v, Nk, bm.block_k, feature_map, wt, cfg, fold, hs, zs)
    marginal = _marginal(bm, q.dtype)  # (BH, Nq, Nk)
    hm = torch.bmm(marginal, hs.view(B * H, Nk, D * D)).view(B * H, Nq, D, D)  # Hm (W^T folded in when fold)
    zm = torch.bmm(marginal, zs)  # (BH, Nq, D)
    return (hm, zm, None) if fold else (hm, zm, wt)


def _sparse_backward(do, q, k, v, o_s, lse, bm: BlockMap, cfg: SLAKernelConfig, linear=None, feature_map="softmax"):
    """dQ, dK, dV of the sparse branch, plus the linear branch's when linear = (Hm, Zm, W).

    Returns (dq, dk, dv, o_l): o_l (B, H, Lq, D) is the linear branch's output (for dW), or None.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    BLOCK_D = _block_d(D)
    sm_scale = 1.0 / math.sqrt(D)
    feature = FEATURE_MAPS.index(feature_map)
    do = _last_dim_contiguous(do)
    delta = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    _sla_bwd_preprocess[(triton.cdiv(Lq, 64), B * H)](o_s, do, delta, H, Lq, D, *_strides(o_s), *_strides(do),
                                                       BLOCK_M=64, BLOCK_D=BLOCK_D, num_warps=4)
    dq = torch.empty(B, H, Lq, D, device=q.device, dtype=q.dtype)
    n_tiles = triton.cdiv(Lq, cfg.dq_block_m)
    split = bm.block_q // cfg.dq_block_m  # dQ tiles per query block
    tiles_per_bh = bm.num_q_blocks * split
    if linear is not None:
        hm, zm, w = linear
        dhm = torch.empty(B * H, tiles_per_bh, D, D, device=q.device, dtype=q.dtype)  # per-tile dHm parts
        dzm = torch.empty(B * H, tiles_per_bh, D, device=q.device, dtype=q.dtype)
        dhm[:, n_tiles:].zero_()  # tiles past Lq (at most split - 1) are never written
        dzm[:, n_tiles:].zero_()
        o_l = torch.empty_like(dq)
    else:
        hm = zm = w = dhm = dzm = o_l = dq
    fused = cfg.fuse_linear_bwd and linear is not None
    tma = cfg.bwd_tma and not fused and descriptors_supported(q)
    kv_views = (token_view(k), token_view(v)) if tma else (None, None)
    if None not in kv_views and cfg.dq_block_n <= bm.block_k:
        _sla_bwd_dq_tma_kernel[(n_tiles, B * H)](
            q, token_descriptor(k, kv_views[0], cfg.dq_block_n, BLOCK_D),
            token_descriptor(v, kv_views[1], cfg.dq_block_n, BLOCK_D), do, dq, lse, delta, bm.lut,
            *_strides(q), *_strides(do), *_strides(dq), H, Lq, Lk, D, bm.n, bm.num_q_blocks, sm_scale * LOG2E,
            sm_scale, *kv_views[0][2:], *kv_views[1][2:], MAP_BQ=bm.block_q, MAP_BK=bm.block_k,
            BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n, BLOCK_D=BLOCK_D, EVEN_N=Lk % bm.block_k == 0,
            num_warps=cfg.dq_warps, num_stages=cfg.dq_stages)
    else:
        _sla_bwd_dq_kernel[(n_tiles, B * H)](
            q, k, v, do, dq, lse, delta, bm.lut, hm, zm, w, dhm, dzm, o_l,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            H, Lq, Lk, D, bm.n, bm.num_q_blocks, tiles_per_bh, sm_scale * LOG2E, sm_scale, LINEAR_EPS / Lk,
            MAP_BQ=bm.block_q, MAP_BK=bm.block_k, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n, BLOCK_D=BLOCK_D,
            EVEN_N=Lk % bm.block_k == 0, LINEAR=fused, FEATURE=feature, PAD_D=D != BLOCK_D,
            num_warps=cfg.dq_warps, num_stages=cfg.dq_stages)
    if linear is not None and not fused:
        _sla_lin_bwd_q_kernel[(n_tiles, B * H)](
            q, do, dq, hm, zm, w, dhm, dzm, o_l, *_strides(q), *_strides(do), *_strides(dq),
            H, Lq, D, bm.num_q_blocks, tiles_per_bh, LINEAR_EPS / Lk, MAP_BQ=bm.block_q, BLOCK_M=cfg.dq_block_m,
            BLOCK_D=BLOCK_D, FEATURE=feature, num_warps=cfg.lin_warps)
    if linear is not None:
        # gradients of h_j, z_j: sum over the query-block tiles for which key block j is marginal
        marginal_t = _marginal(bm, q.dtype).repeat_interleave(split, dim=1).transpose(1, 2)  # (BH, Nk, tiles)
        dh = torch.bmm(marginal_t, dhm.view(B * H, tiles_per_bh, D * D))  # (BH, Nk, D*D)
        dz = torch.bmm(marginal_t, dzm)  # (BH, Nk, D)
    else:
        dh = dz = dq
    kv_off, kv_qidx = bm.inverse(cache=False)  # built per backward: its cost belongs to the backward
    dk = torch.empty(B, H, Lk, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, H, Lk, D, device=q.device, dtype=v.dtype)
    qd_views = (token_view(q), token_view(do)) if tma else (None, None)
    if None not in qd_views and cfg.dkdv_block_m <= bm.block_q:
        _sla_bwd_dkdv_tma_kernel[(triton.cdiv(Lk, cfg.dkdv_block_n), B * H)](
            token_descriptor(q, qd_views[0], cfg.dkdv_block_m, BLOCK_D), k, v,
            token_descriptor(do, qd_views[1], cfg.dkdv_block_m, BLOCK_D), dk, dv, lse, delta, kv_off, kv_qidx,
            *_strides(k), *_strides(v), *_strides(dk), H, Lq, Lk, D, bm.num_k_blocks, kv_qidx.shape[-1],
            sm_scale * LOG2E, sm_scale, *qd_views[0][2:], *qd_views[1][2:], MAP_BQ=bm.block_q, MAP_BK=bm.block_k,
            BLOCK_M=cfg.dkdv_block_m, BLOCK_N=cfg.dkdv_block_n, BLOCK_D=BLOCK_D,
            num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages)
    else:
        _sla_bwd_dkdv_kernel[(triton.cdiv(Lk, cfg.dkdv_block_n), B * H)](
            q, k, v, do, dk, dv, lse, delta, kv_off, kv_qidx, dh, dz, *_strides(q), *_strides(k), *_strides(v),
            *_strides(do), *_strides(dk), H, Lq, Lk, D, bm.num_k_blocks, kv_qidx.shape[-1], sm_scale * LOG2E,
            sm_scale, 1.0 / Lk, MAP_BQ=bm.block_q, MAP_BK=bm.block_k, BLOCK_M=cfg.dkdv_block_m,
            BLOCK_N=cfg.dkdv_block_n, BLOCK_D=BLOCK_D, LINEAR=fused, FEATURE=feature,
            num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages)
    if linear is not None and not fused:
        _sla_lin_bwd_kv_kernel[(triton.cdiv(Lk, cfg.dkdv_block_n), B * H)](
            k, v, dk, dv, dh, dz, *_strides(k), *_strides(v), *_strides(dk), H, Lk, D, bm.num_k_blocks, 1.0 / Lk,
            MAP_BK=bm.block_k, BLOCK_N=cfg.dkdv_block_n, BLOCK_D=BLOCK_D, FEATURE=feature,
            num_warps=cfg.lin_warps)
    return dq, dk, dv, (o_l if linear is not None else None)


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class _SparseAttention(torch.autograd.Function):
    """The sparse branch alone (O_s), for proj_l = None / no marginal block."""

    @staticmethod
    def forward(ctx, q, k, v, bm: BlockMap, cfg: SLAKernelConfig):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, lse, _ = _sparse_forward(q, k, v, bm, cfg)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.bm, ctx.cfg = bm, cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv, _ = _sparse_backward(do, q, k, v, o, lse, ctx.bm, ctx.cfg)
        return dq, dk, dv, None, None


class _SparseLinearAttention(torch.autograd.Function):
    """Whole SLA: O = O_s + proj_l(O_l); gradients to q, k, v, proj weight and bias."""

    @staticmethod
    def forward(ctx, q, k, v, weight, bias, bm: BlockMap, cfg: SLAKernelConfig, feature_map: str):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        hm, zm, wt = _linear_state(q, k, v, bm, feature_map, weight, cfg)
        b32 = None if bias is None else bias.float().contiguous()
        o, lse, o_s = _sparse_forward(q, k, v, bm, cfg, (hm, zm, wt), b32, feature_map, store_os=True)
        ctx.save_for_backward(q, k, v, o_s, lse, hm, zm, weight)
        ctx.bm, ctx.cfg, ctx.feature_map, ctx.has_bias = bm, cfg, feature_map, bias is not None
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o_s, lse, hm, zm, weight = ctx.saved_tensors
        w = weight.to(q.dtype).contiguous()  # (out, in): dO_l = dO W
        dq, dk, dv, o_l = _sparse_backward(do, q, k, v, o_s, lse, ctx.bm, ctx.cfg, (hm, zm, w), ctx.feature_map)
        D = q.shape[-1]
        dw = db = None
        if ctx.needs_input_grad[3]:  # dW = dO^T O_l over all rows (tensor-core GEMM, fp32 out)
            dw = torch.matmul(do.reshape(-1, D).t(), o_l.reshape(-1, D)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            db = do.sum(dim=(0, 1, 2), dtype=torch.float32)
        return dq, dk, dv, dw, db, None, None, None


@torch.no_grad()
def add_linear_branch(o_s: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMap,
                      proj_weight: torch.Tensor | None, proj_bias: torch.Tensor | None, feature_map: str = "softmax",
                      config: SLAKernelConfig | None = None, inplace: bool = False) -> torch.Tensor:
    """Inference: O = O_s + O_l @ proj_weight^T + proj_bias for a sparse-branch output O_s computed
    elsewhere (sagesla's low-bit kernel), in q's dtype. Where Triton runs: SLA's own linear state (one
    kernel + three GEMMs, proj_l folded in) and its epilogue kernel after the sparse one (`_sla_lin_fwd_kernel`, the
    fuse_linear=False path of sla_attention) — one implementation of the linear branch for `sla` and
    `sagesla`; inplace=True writes the result over O_s when it is in q's dtype and `heads_output_like(q)`'s
    layout (a temporary of the caller's). Elsewhere: `linear_branch`."""
    has_linear = _check_linear(q, k, v, bm, proj_weight, proj_bias, feature_map)  # else O_l = 0: only the bias
    if o_s.shape != q.shape:
        raise ValueError(f"o_s must have q's shape {tuple(q.shape)}, got {tuple(o_s.shape)}")
    if (bm.q_len, bm.k_len, *bm.lut.shape[:2]) != (q.shape[2], k.shape[2], *q.shape[:2]):
        raise ValueError(f"block map built for (B, H, Lq, Lk) = ({bm.lut.shape[0]}, {bm.lut.shape[1]}, {bm.q_len}, "
                         f"{bm.k_len}), inputs are ({q.shape[0]}, {q.shape[1]}, {q.shape[2]}, {k.shape[2]})")
    if triton is None or not use_triton(q, k, v, o_s) or not has_linear:
        out = o_s.float()
        if has_linear:
            out = out + F.linear(linear_branch(q, k, v, bm, feature_map), proj_weight.float())
        if proj_bias is not None:
            out = out + proj_bias.float()
        return out.to(q.dtype)
    q, k, v, cfg, linear, bias = _folded_linear(q, k, v, bm, proj_weight, proj_bias, feature_map, config)
    reuse = inplace and o_s.dtype == q.dtype and (token_major(o_s) if token_major(q) else o_s.is_contiguous())
    out = o_s if reuse else heads_output_like(q)
    o_s = o_s if o_s.stride() == out.stride() else o_s.contiguous()  # the kernel reads O_s with O's strides
    _linear_epilogue(q, o_s, out, linear, bias, bm, k.shape[2], cfg, feature_map)
    return out


def _check_linear(q, k, v, bm: BlockMap, proj_weight, proj_bias, feature_map: str) -> bool:
    """The inference linear branch's input checks; returns whether there is a branch to add (a proj_l and marginal
    blocks, i.e. topk < 1), else O_l = 0."""
    _check_inputs(q, k, v, bm.n / bm.num_k_blocks, bm.block_q, bm.block_k, feature_map)
    _check_proj(proj_weight, proj_bias, q.shape[-1])
    return proj_weight is not None and bm.n < bm.num_k_blocks


def _folded_linear(q, k, v, bm: BlockMap, proj_weight, proj_bias, feature_map: str, config: SLAKernelConfig | None):
    """(q, k, v with contiguous last dims, the kernel config, (Hm W^T, Zm, None), proj_l's bias in fp32 or None):
    the inference linear branch's state with proj_l folded in (`_linear_state`), for an epilogue kernel."""
    cfg = (config or DEFAULT_CONFIG).clamp(bm.block_q, bm.block_k)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    linear = _linear_state(q, k, v, bm, feature_map, proj_weight, cfg, fold=True)
    bias = None if proj_bias is None else proj_bias.float().contiguous()
    return q, k, v, cfg, linear, bias


@torch.no_grad()
def sagesla_with_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMap,
                        proj_weight: torch.Tensor | None, proj_bias: torch.Tensor | None, feature_map: str = "softmax",
                        pv: str = "fp8", config: SLAKernelConfig | None = None, sparse_config=None) -> torch.Tensor:
    """Inference sagesla, O = O_s^lowbit + O_l @ proj_weight^T + proj_bias in q's dtype, with the linear branch
    added in the low-bit sparse kernel's epilogue: SLA's linear state (`_linear_state`, proj_l folded in) first,
    then one sparse-kernel launch that writes O (`lowbit_sparse.LinearEpilogue`), instead of the sparse kernel
    writing O_s and `add_linear_branch`'s epilogue kernel reading it, Q and the state back. Where that cannot run
    (no Triton, or no linear branch: topk 1 or no proj_l) it is `sagesla_sparse` + `add_linear_branch`."""
    from turbo_kernels.attention.lowbit_sparse import LinearEpilogue, sagesla_sparse

    has_linear = _check_linear(q, k, v, bm, proj_weight, proj_bias, feature_map)
    if triton is None or not use_triton(q, k, v) or not has_linear:
        o_s = sagesla_sparse(q, k, v, bm, pv=pv, config=sparse_config)
        return add_linear_branch(o_s, q, k, v, bm, proj_weight, proj_bias, feature_map, config, inplace=True)
    q, k, v, _, (hm, zm, _), bias = _folded_linear(q, k, v, bm, proj_weight, proj_bias, feature_map, config)
    linear = LinearEpilogue(q, hm, zm, bias, LINEAR_EPS / k.shape[2], FEATURE_MAPS.index(feature_map))
    return sagesla_sparse(q, k, v, bm, pv=pv, config=sparse_config, linear=linear)


_SIDE_STREAMS: dict = {}  # device index -> the second stream of `_overlapped_inference`


class _TwoStreams:
    """The current stream and a second one on a CUDA device; off CUDA (the interpreter) everything runs in
    order on one, through the same calls."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.main = torch.cuda.current_stream(device)
            if device.index not in _SIDE_STREAMS:
                _SIDE_STREAMS[device.index] = torch.cuda.Stream(device)
            self.side = _SIDE_STREAMS[device.index]

    def side_waits(self) -> None:
        if self.cuda:
            self.side.wait_stream(self.main)

    def main_waits(self) -> None:
        if self.cuda:
            self.main.wait_stream(self.side)

    def on_side(self):
        return torch.cuda.stream(self.side) if self.cuda else nullcontext()


def _overlapped_inference(q, k, v, proj_weight, proj_bias, topk, block_q, block_k, feature_map, cfg):
    """The inference forward of `sla_attention` (separate linear epilogue) on two CUDA streams:

        main:  block map ──────────► sparse kernel (O_s) ─────────────► wait ─► epilogue O = O_s + proj_l(O_l)
        side:  state kernel (h_j, z_j) ─► wait map ─► marginal GEMMs (Hm, Zm) ──┘

    Every tensor is allocated on the main stream before the side stream uses it, and the main stream
    waits for the side stream before the epilogue, so the caching allocator never hands memory the
    side stream still reads to another allocation. Same arithmetic as the one-stream path."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    Nk = triton.cdiv(Lk, block_k)
    streams = _TwoStreams(q.device)
    hs = torch.empty(B * H, Nk, D, D, device=q.device, dtype=q.dtype)
    zs = torch.empty(B * H, Nk, D, device=q.device, dtype=q.dtype)
    wt = proj_weight.t().to(q.dtype).contiguous()
    streams.side_waits()  # q, k, v and the buffers above are ready
    with streams.on_side():
        _state_sums(k, v, Nk, block_k, feature_map, wt, cfg, True, hs, zs)
    bm = sla_block_map(q, k, topk, block_q, block_k, select=cfg.map_select)  # main, meanwhile
    cfg = cfg.clamp(bm.block_q, bm.block_k)
    Nq = bm.num_q_blocks
    marginal = torch.ones(B * H, Nq, Nk, dtype=q.dtype, device=q.device)
    hm = torch.empty(B * H, Nq, D * D, device=q.device, dtype=q.dtype)
    zm = torch.empty(B * H, Nq, D, device=q.device, dtype=q.dtype)
    streams.side_waits()  # the map and the buffers
    with streams.on_side():
        marginal.scatter_(-1, bm.lut.view(B * H, Nq, bm.n).long(), 0)
        torch.bmm(marginal, hs.view(B * H, Nk, D * D), out=hm)
        torch.bmm(marginal, zs, out=zm)
    o = _sparse_forward(q, k, v, bm, cfg, store_lse=False)[0]  # main, meanwhile: O_s alone
    streams.main_waits()
    bias = None if proj_bias is None else proj_bias.float().contiguous()
    _linear_epilogue(q, o, o, (hm.view(B * H, Nq, D, D), zm, None), bias, bm, Lk, cfg, feature_map)
    return o


def sparse_attention(q, k, v, bm: BlockMap, config: SLAKernelConfig | None = None) -> torch.Tensor:
    """Sparse branch alone: softmax attention over the critical blocks of `bm` (Triton, autograd)."""
    cfg = (config or DEFAULT_CONFIG).clamp(bm.block_q, bm.block_k)
    return _SparseAttention.apply(q, k, v, bm, cfg)


def sla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor | None,
                  proj_bias: torch.Tensor | None, topk: float, block_q: int = 128, block_k: int = 64,
                  feature_map: str = "softmax", *, block_map: BlockMap | None = None,
                  config: SLAKernelConfig | None = None) -> torch.Tensor:
    """SLA forward with autograd: O = O_s + O_l @ proj_weight^T + proj_bias, in q's dtype.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D), fp16/bf16 (fp32 works too, slower). proj_weight:
    (D, D) or None (zero projection), proj_bias: (D,) or None. Gradients flow to q, k, v and the
    projection (when no block is marginal, e.g. topk = 1, proj_weight is unused and gets no
    .grad). CPU tensors without TRITON_INTERPRET=1 take `sla_torch`, float64 inputs `sla_reference`.
    """
    _check_inputs(q, k, v, topk, block_q, block_k, feature_map)
    _check_proj(proj_weight, proj_bias, q.shape[-1])
    if triton is None or not use_triton(q, k, v) or q.dtype == torch.float64:
        return sla_torch(q, k, v, topk, block_q, block_k, feature_map,
                         None if proj_weight is None else (proj_weight, proj_bias), block_map=block_map)
    cfg = config or DEFAULT_CONFIG
    bm = block_map if block_map is not None else sla_block_map(q, k, topk, block_q, block_k, select=cfg.map_select)
    cfg = cfg.clamp(bm.block_q, bm.block_k)
    has_linear = proj_weight is not None and bm.n < bm.num_k_blocks  # else O_l = 0: proj_l adds its bias
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, proj_weight, proj_bias))
    if needs_grad and has_linear:
        return _SparseLinearAttention.apply(q, k, v, proj_weight, proj_bias, bm, cfg, feature_map)
    if needs_grad:
        o_s = _SparseAttention.apply(q, k, v, bm, cfg)
        return o_s if proj_bias is None else (o_s.float() + proj_bias.float()).to(q.dtype)
    if (block_map is None and cfg.overlap_state and not cfg.fuse_linear and proj_weight is not None
            and num_selected(topk, triton.cdiv(k.shape[2], block_k)) < triton.cdiv(k.shape[2], block_k)):
        return _overlapped_inference(q, k, v, proj_weight, proj_bias, topk, block_q, block_k, feature_map, cfg)
    # inference: block map, linear state (kernel + 3 GEMMs, proj_l folded in), phi(q), one fused kernel
    # for O_s + proj_l(O_l)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    linear = _linear_state(q, k, v, bm, feature_map, proj_weight, cfg, fold=True) if has_linear else None
    bias = None if proj_bias is None else proj_bias.float().contiguous()
    return _sparse_forward(q, k, v, bm, cfg, linear, bias, feature_map, store_lse=False)[0]
