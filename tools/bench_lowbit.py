"""Benchmark the low-bit kernels on one GPU in one run (issue 6); writes benchmarks/lowbit.json.

    python tools/bench_lowbit.py [--quick]

1. correctness on the GPU: every kernel vs its torch reference (small shapes), accuracy at 1.3B;
2. dense low-bit attention vs cuDNN SDPA (bf16) and vs sageattention 1.0.6, Wan 1.3B and 14B
   self-attention shapes, with a small tile sweep (end-to-end times include quantization);
3. sagesla vs our bf16 SLA (block map + sparse + linear branch + proj_l) at topk 0.1;
4. W8A8 at the Wan-1.3B FFN shapes vs bf16 nn.Linear, with activation quantization included,
   and the bare GEMMs (torch._scaled_mm, torch._int_mm, our Triton kernel).
Figures (BENCHMARKS.md "Low-bit attention and W8A8" explains each):
  lowbit_attn_speedup_1.3b, lowbit_attn_speedup_vs_sage1_1.3b, lowbit_attn_cossim_1.3b,
  sagesla_speedup_vs_sla_1.3b_topk0.1, w8a8_fp8_speedup_ffn_up, w8a8_fp8_speedup_ffn_down,
  w8a8_int8_speedup_ffn_up, plus supporting figures.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from dataclasses import replace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_harness import Harness, make_proj  # noqa: E402

from turbo_kernels.attention import lowbit as LB  # noqa: E402
from turbo_kernels.attention import lowbit_sparse as LS  # noqa: E402
from turbo_kernels.gemm import norm_quant as NQ  # noqa: E402
from turbo_kernels.gemm import quantize as Q  # noqa: E402
from turbo_kernels.gemm import w8a8 as W  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16


def cos(a, b):
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def guarded(label, fn):
    """Run one section; print the traceback and go on if it fails (one GPU run must finish)."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - report and continue
        print(f"!! {label} failed:\n{traceback.format_exc()}", flush=True)
        return None


def qkv(B, H, L, D, seed=0, k_offset=0.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, device=DEV, generator=g, dtype=BF16) for _ in range(3))
    if k_offset:
        k = k + k_offset
    return q, k, v


# ------------------------------------------------------------------------------------------
# 1. correctness on the GPU
# ------------------------------------------------------------------------------------------
def check_correctness(h: Harness):
    print("== correctness vs torch references (GPU)", flush=True)
    # dense + sparse attention, ragged lengths, both PV formats
    q, k, v = qkv(2, 3, 1000, 128, seed=1, k_offset=0.5)
    for pv in ("fp8", "fp16"):
        for cfg in (LB.LowbitConfig(), LB.LowbitConfig(128, 128, 8, 3, i2f=2),
                    LB.LowbitConfig(block_m=64, block_n=64, num_warps=4, i2f=0)):
            o = LB.lowbit_attention(q, k, v, pv=pv, config=cfg)
            r = LB.lowbit_attention_reference(q, k, v, pv=pv, block_n=cfg.block_n, i2f=cfg.i2f)
            d = (o.float() - r.float()).abs()
            h.note("check", f"dense_{pv}_bn{cfg.block_n}_i2f{cfg.i2f}", "fwd",
                   max_abs=d.max().item(),
                   frac_gt_1e2=(d > 1e-2).float().mean().item(), cos_vs_ref=cos(o, r))
    qkv_q = LB.quantize_qkv(q, k, v, pv="fp8")
    rq = LB.quantize_qk_reference(q, k)
    rv = LB.quantize_v_reference(v, "fp8")
    h.note("check", "quant_q_int8", "fwd", mismatch=(qkv_q.q_i8[:, :, :1000] != rq[0]).float().mean().item())
    h.note("check", "quant_k_int8", "fwd", mismatch=(qkv_q.k_i8[:, :, :1000] != rq[2]).float().mean().item())
    h.note("check", "quant_v_fp8", "fwd",
           mismatch=(qkv_q.v_q.transpose(-1, -2)[:, :, :1000].float() != rv[0].float()).float().mean().item())
    from turbo_kernels.attention.blockmap import sla_block_map
    bm = sla_block_map(q, k, 0.3, 128, 64)
    for pv in ("fp8", "fp16"):
        for g, tma in ((1, False), (2, False), (1, True)):
            o = LS.sagesla_sparse(q, k, v, bm, pv=pv, config=LS.SparseLowbitConfig(group=g, tma=tma))
            r = LS.sagesla_sparse_reference(q, k, v, bm, pv=pv, group=g)
            d = (o.float() - r.float()).abs()
            h.note("check", f"sparse_{pv}_g{g}{'_tma' if tma else ''}", "fwd", max_abs=d.max().item(),
                   frac_gt_1e2=(d > 1e-2).float().mean().item(), cos_vs_ref=cos(o, r))
    # the linear branch in the sparse kernel's epilogue (the default) vs the separate epilogue kernel and the
    # references, at the Wan head dim and the toy model's (64), both kernels, a random proj_l with bias
    from turbo_kernels.attention.sla import add_linear_branch, linear_branch, sagesla_with_linear
    for D in (128, 64):
        qd, kd, vd = qkv(2, 3, 1000, D, seed=3, k_offset=0.5)
        bmd = sla_block_map(qd, kd, 0.3, 128, 64)
        w_l, bias = make_proj(D, seed=3, device=DEV)
        ref = (LS.sagesla_sparse_reference(qd, kd, vd, bmd, pv="fp8").float() + bias
               + F.linear(linear_branch(qd.float(), kd.float(), vd.float(), bmd, "softmax"), w_l))
        for tma in (True, False):
            cfg = LS.SparseLowbitConfig(tma=tma)
            o = sagesla_with_linear(qd, kd, vd, bmd, w_l, bias, "softmax", pv="fp8", sparse_config=cfg)
            two = add_linear_branch(LS.sagesla_sparse(qd, kd, vd, bmd, pv="fp8", config=cfg), qd, kd, vd, bmd, w_l, bias,
                                    "softmax")
            d = (o.float() - two.float()).abs()
            h.note("check", f"sparse_linear_epilogue_d{D}{'_tma' if tma else ''}", "fwd",
                   max_abs_vs_two_kernels=d.max().item(), frac_gt_1e2=(d > 1e-2).float().mean().item(),
                   cos_vs_ref=cos(o, ref), cos_two_kernels_vs_ref=cos(two, ref))
    # W8A8 GEMMs, activation quantization, fused norm
    g = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randn(1000, 1536, device=DEV, generator=g, dtype=BF16)
    w = torch.randn(2000, 1536, device=DEV, generator=g, dtype=BF16) * 0.02
    b = torch.randn(2000, device=DEV, generator=g, dtype=BF16)
    f = F.linear(x.float(), w.float(), b.float())
    for mode in ("int8", "fp8"):
        xq, xs = Q.quantize_rows(x, mode)
        xr, xsr = Q.quantize_rows_reference(x, mode)
        h.note("check", f"act_quant_{mode}", "fwd", mismatch=(xq.float() != xr.float()).float().mean().item(),
               scale_max_abs=(xs - xsr).abs().max().item())
        wq, ws = Q.quantize_weight(w, mode)
        r = W.w8a8_matmul_reference(xq, xs, wq, ws, b, out_dtype=torch.float32)
        backends = ("triton", "scaled_mm") if mode == "fp8" else ("triton",)
        for be in backends:
            y = W.w8a8_matmul(xq, xs, wq, ws, b, out_dtype=torch.float32, backend=be)
            h.note("check", f"gemm_{mode}_{be}", "fwd", rel_vs_ref=rel(y, r), rel_vs_float=rel(y, f))
    sh = torch.randn(1, 1536, device=DEV, generator=g)
    sc = torch.randn(1, 1536, device=DEV, generator=g) * 0.1
    xx = x[None]
    for mode in ("int8", "fp8"):
        a, s_a = NQ.norm_modulate_quant(xx, sh, sc, quant=mode)
        r, s_r = NQ.norm_modulate_quant_reference(xx, sh, sc, quant=mode)
        h.note("check", f"norm_quant_{mode}", "fwd", rel_dequant=rel(Q.dequantize(a, s_a), Q.dequantize(r, s_r)))


# ------------------------------------------------------------------------------------------
# 2. dense attention
# ------------------------------------------------------------------------------------------
# H100, 1.3B shape (kernel only, ms). run 1 (i2f=1): 128x64 w4 s3 9.92; 128x128 w8 s3 11.45; 128x128 w8 s2
# 12.23; 128x128 w4 s3 16.69; 128x64 w8 s3 13.56; 128x128 w8 s3 cvt 11.31 (cuDNN 11.26).
# run 2: 128x64 w4 s3 i2f=2 8.33, i2f=1 9.15, i2f=0 9.03; 64x128 w4 s3 10.11; 64x64 w4 s3 8.98; 128x64 w4 s4
# 8.24, s2 9.50; 128x128 w8 s3 11.59; 64x128 w4 s4 12.75; warp_specialize: 128x64 8.37, 128x128 11.59.
ATTN_CONFIGS = [
    LB.LowbitConfig(128, 64, 4, 4, i2f=2),
    LB.LowbitConfig(128, 64, 4, 3, i2f=2),
    LB.LowbitConfig(128, 64, 4, 5, i2f=2),
    LB.LowbitConfig(64, 64, 4, 4, i2f=2),
    # lazy rescaling (FlashAttention-4): the accumulator is rescaled only in tiles where a row's max rose by > tau
    LB.LowbitConfig(128, 64, 4, 4, i2f=2, rescale_tau=2.0),
    LB.LowbitConfig(128, 64, 4, 4, i2f=2, rescale_tau=4.0),
    LB.LowbitConfig(128, 128, 8, 3, i2f=2, rescale_tau=4.0),
]
# K/V tiles through tensor descriptors (session 27, H100, kernel only): 128x64 w4 s4 8.68 ms vs pointers 8.30 (s5
# 8.19), s3 8.66, with warp specialization 8.67; 128x128 w8 s3 11.73 both. Slower: the variant was removed.


def cudnn_sdpa(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def sage1():
    try:
        from sageattention import sageattn
    except ImportError:
        print("sageattention not installed: no sage1 figures", flush=True)
        return None
    return sageattn


def bench_dense(h: Harness, name: str, B, H, L, D, configs):
    print(f"== dense attention {name}: B{B} H{H} L{L} D{D}", flush=True)
    q, k, v = qkv(B, H, L, D, seed=3)
    t_cudnn = h.measure(name, "cudnn_bf16", "fwd", lambda: cudnn_sdpa(q, k, v))
    sg = sage1()
    t_sage = h.measure(name, "sageattention_1.0.6", "fwd", lambda: sg(q, k, v)) if sg else None
    best, best_cfg = float("inf"), None
    for cfg in configs:
        qq = LB.quantize_qkv(q, k, v, pv="fp8")
        out = torch.empty_like(q)
        tag = (f"bm{cfg.block_m}bn{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}i{cfg.i2f}"
               f"{'ws' if cfg.warp_specialize else ''}{f't{cfg.rescale_tau:g}' if cfg.rescale_tau else ''}")
        t = guarded(tag, lambda: h.measure(name, f"ours_kernel_{tag}", "fwd",
                                           lambda: LB.lowbit_attention_quantized(qq, out, cfg)))
        if t is not None and t < best:
            best, best_cfg = t, cfg
    print(f"   best config {best_cfg}", flush=True)
    t_quant = h.measure(name, "ours_quantize_qkv", "fwd", lambda: LB.quantize_qkv(q, k, v, pv="fp8"))
    t_ours = h.measure(name, "ours_e2e_fp8", "fwd", lambda: LB.lowbit_attention(q, k, v, pv="fp8", config=best_cfg))
    t_ours16 = h.measure(name, "ours_e2e_fp16pv", "fwd", lambda: LB.lowbit_attention(q, k, v, pv="fp16", config=best_cfg))
    tflops = 4 * B * H * L * L * D / (t_ours * 1e-3) / 1e12
    h.note(name, "ours_e2e_fp8", "fwd", tflops_equiv=tflops, best=str(best_cfg))
    h.figure(f"lowbit_attn_speedup_{name}", t_cudnn / t_ours)
    h.figure(f"lowbit_attn_kernel_only_speedup_{name}", t_cudnn / best)
    h.figure(f"lowbit_attn_fp16pv_speedup_{name}", t_cudnn / t_ours16)
    h.figure(f"lowbit_attn_ms_{name}", t_ours)
    h.figure(f"cudnn_attn_ms_{name}", t_cudnn)
    h.figure(f"lowbit_quantize_ms_{name}", t_quant)
    if t_sage:
        h.figure(f"lowbit_attn_speedup_vs_sage1_{name}", t_sage / t_ours)
        h.figure(f"sage1_speedup_{name}", t_cudnn / t_sage)
    if name == "1.3b":  # accuracy vs an fp32 reference at the real shape
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        o = LB.lowbit_attention(q, k, v, pv="fp8", config=best_cfg)
        h.figure("lowbit_attn_cossim_1.3b", cos(o, ref))
        h.figure("lowbit_attn_fp16pv_cossim_1.3b", cos(LB.lowbit_attention(q, k, v, pv="fp16", config=best_cfg), ref))
        h.figure("cudnn_bf16_cossim_1.3b", cos(cudnn_sdpa(q, k, v), ref))
        if sg:
            h.figure("sage1_cossim_1.3b", cos(sg(q, k, v), ref))
        del ref
    return best_cfg


# ------------------------------------------------------------------------------------------
# 3. sagesla vs SLA
# ------------------------------------------------------------------------------------------
def bench_sparse(h: Harness, B, H, L, D, topk=0.1, quick: bool = False):
    from turbo_kernels.attention.blockmap import sla_block_map
    from turbo_kernels.attention.sla import sparse_attention
    from turbo_infer.layers.lowbit_attention import SageSparseLinearAttention
    from turbo_infer.layers.sla import SparseLinearAttention
    name = "1.3b"
    print(f"== sagesla vs sla {name} topk {topk}", flush=True)
    q, k, v = qkv(B, H, L, D, seed=4)
    sla = SparseLinearAttention(D, topk=topk).to(DEV)
    with torch.no_grad():  # a trained-like proj_l (it starts at zero), so the linear branch's output is not all zeros
        w_l, b_l = make_proj(D, seed=5, device=DEV)
        sla.proj_l.weight.copy_(w_l)
        sla.proj_l.bias.copy_(b_l)
    t_sla = h.measure(name, f"sla_bf16_topk{topk}", "fwd", lambda: sla(q, k, v))
    bm = sla_block_map(q, k, topk, 128, 64)
    t_sla_sparse = h.measure(name, "sla_bf16_sparse_branch", "fwd", lambda: sparse_attention(q, k, v, bm))
    best, best_cfg = float("inf"), None
    qq = LB.quantize_qkv(q, k, v, pv="fp8", block_q=128, block_k=64)
    out = torch.empty_like(q)
    # run 1 (i2f=1): g2 w8 s3 1.489 ms; g1 w8 s3 1.602; g2 w4 s3 2.543; g2 w8 s2 1.480 (SLA bf16 2.156)
    # run 2 (i2f=2): g1 w4 s3 1.129; g2 w8 s2 1.497; g2 w8 s3 1.508; g1 w8 s3 1.555; bm64 g2 w4 s3 1.541;
    # g2 w8 s2 i2f=1 1.553 (SLA bf16 2.135)
    # run 3 (H100, 2026-12-06, i2f=2, pointers unless tma): g1 w4 s3 1.122; s4 1.128; s2 1.128; tau 2 1.268; tau 4
    # 1.223; tma g1 w4 s3 0.951 (now the default), s4 0.956, w8 s3 1.313
    ptr = dict(tma=False)
    sweep = (LS.SparseLowbitConfig(128, 1, 4, 3, **ptr), LS.SparseLowbitConfig(128, 1, 4, 4, **ptr),
             LS.SparseLowbitConfig(128, 1, 4, 2, **ptr), LS.SparseLowbitConfig(128, 1, 4, 3, rescale_tau=2.0, **ptr),
             LS.SparseLowbitConfig(128, 1, 4, 3, rescale_tau=4.0, **ptr), LS.SparseLowbitConfig(128, 1, 4, 3, tma=True),
             LS.SparseLowbitConfig(128, 1, 4, 4, tma=True), LS.SparseLowbitConfig(128, 1, 8, 3, tma=True))
    for cfg in (LS.DEFAULT_SPARSE_CONFIG,) if quick else sweep:
        tag = f"bm{cfg.block_m}g{cfg.group}w{cfg.num_warps}s{cfg.num_stages}i{cfg.i2f}" + \
            (f"t{cfg.rescale_tau:g}" if cfg.rescale_tau else "") + ("tma" if cfg.tma else "")
        t = guarded(tag, lambda: h.measure(name, f"ours_sparse_kernel_{tag}", "fwd",
                                           lambda: LS.sagesla_sparse_quantized(qq, bm, out, cfg)))
        if t is not None and t < best:
            best, best_cfg = t, cfg
    if best_cfg is None:
        return
    LS.DEFAULT_SPARSE_CONFIG = best_cfg  # the module below uses the measured best
    sage = SageSparseLinearAttention(D, topk=topk, pv="fp8").to(DEV)
    sage.proj_l.load_state_dict(sla.proj_l.state_dict())
    t_ours = h.measure(name, f"sagesla_fp8_topk{topk}", "fwd", lambda: sage(q, k, v))
    # the linear branch in the sparse kernel's epilogue (SparseLowbitConfig.fuse_linear, the default since session 33)
    # against SLA's epilogue kernel after it, whichever the default is not: same module, same inputs
    with torch.no_grad():
        out_default = sage(q, k, v).float()
    LS.DEFAULT_SPARSE_CONFIG = replace(best_cfg, fuse_linear=not best_cfg.fuse_linear)
    other = "unfused_linear" if best_cfg.fuse_linear else "fused_linear"
    try:
        t_other = guarded(other, lambda: h.measure(name, f"sagesla_fp8_{other}_topk{topk}", "fwd",
                                                   lambda: sage(q, k, v)))
        if t_other is not None:
            with torch.no_grad():
                diff = (sage(q, k, v).float() - out_default).abs().max().item()
            h.figure(f"sagesla_{other}_speedup_vs_sla_{name}_topk{topk}", t_sla / t_other)
            h.figure(f"sagesla_{other}_vs_default_{name}_topk{topk}", t_other / t_ours)
            h.figure(f"sagesla_{other}_max_abs_diff_{name}_topk{topk}", diff)
    finally:
        LS.DEFAULT_SPARSE_CONFIG = best_cfg
    t_ours_sparse = h.measure(name, "sagesla_sparse_branch_e2e", "fwd",
                              lambda: LS.sagesla_sparse(q, k, v, bm, pv="fp8", config=best_cfg))
    h.figure(f"sagesla_speedup_vs_sla_{name}_topk{topk}", t_sla / t_ours)
    h.figure(f"sagesla_sparse_branch_speedup_{name}_topk{topk}", t_sla_sparse / t_ours_sparse)
    h.figure(f"sagesla_sparse_kernel_only_speedup_{name}_topk{topk}", t_sla_sparse / best)
    # accuracy of the sparse branch vs fp32 masked softmax, on the first 4 query blocks (all heads)
    nqb = 4
    blocks = torch.zeros(H, nqb, bm.num_k_blocks, dtype=torch.bool, device=DEV)
    blocks.scatter_(2, bm.lut[0, :, :nqb].long(), True)  # (H, 4, Nk) critical key blocks
    mask = blocks.repeat_interleave(128, 1).repeat_interleave(64, 2)[:, :, :L]  # (H, 512, L)
    s = (q[0, :, :nqb * 128].float() @ k[0].float().transpose(-1, -2)) / math.sqrt(D)
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v[0].float()  # (H, 512, D)
    o = LS.sagesla_sparse(q, k, v, bm, pv="fp8")[0, :, :nqb * 128]
    h.figure(f"sagesla_sparse_cossim_{name}_topk{topk}", cos(o, ref))
    o_bf16 = sparse_attention(q, k, v, bm)[0, :, :nqb * 128]
    h.figure(f"sla_bf16_sparse_cossim_{name}_topk{topk}", cos(o_bf16, ref))


# ------------------------------------------------------------------------------------------
# 4. W8A8
# ------------------------------------------------------------------------------------------
# H100, M=32760 (ms). run 2, fp8 1536→8960: 128x256x128 w8 s3 0.910; 128x128x128 w4 s4 1.082; 256x128x128 w8 s3
# 0.950; 128x256x64 w8 s4 0.978 (scaled_mm 0.915). fp8 8960→1536: 0.708 / 0.805 / 0.765 / 0.761 (scaled_mm
# 0.908). int8 up: 1.034 / 1.229 / 1.018 / 1.170 (_int_mm 1.464); int8 down: 0.817 / 0.933 / 0.837 / 0.980.
GEMM_CONFIGS = [
    W.GemmConfig(128, 256, 128, 8, 8, 3, tma=False),
    W.GemmConfig(256, 128, 128, 8, 8, 3, tma=False),
    # A/B tiles through tensor descriptors (TMA), one program per tile or a persistent grid (one per SM), its tile and
    # K loops flattened into one (the default since session 30) or not
    W.GemmConfig(128, 256, 128, 8, 8, 3, tma=True, persistent=False, flatten=False),
    W.GemmConfig(128, 256, 128, 8, 8, 4, tma=True, persistent=False, flatten=False),
    W.GemmConfig(128, 256, 128, 8, 8, 3, tma=True, persistent=True, flatten=False),
    W.GemmConfig(128, 256, 128, 8, 8, 4, tma=True, persistent=True, flatten=True),
    W.GemmConfig(128, 256, 128, 8, 8, 3, tma=True, persistent=True, flatten=True),
    W.GemmConfig(256, 128, 128, 8, 8, 3, tma=True, persistent=False, flatten=False),
    W.GemmConfig(128, 128, 128, 8, 8, 4, tma=True, persistent=True, flatten=False),
    # Triton's automatic warp specialization of the K loop (producer / consumer warps)
    W.GemmConfig(128, 256, 128, 8, 8, 3, tma=True, persistent=False, flatten=False, warp_spec=True),
    W.GemmConfig(128, 256, 128, 8, 8, 4, tma=True, persistent=False, flatten=False, warp_spec=True),
    W.GemmConfig(128, 256, 128, 8, 8, 3, tma=True, persistent=True, flatten=False, warp_spec=True),
]
# the GEMM with the activation quantized in its K loop reads A in 16 bits: twice the shared memory per A
# stage (128x128 bf16 = 32 KiB), so fewer stages or a shorter K step; tiles that do not fit are skipped
STATIC_FUSED_CONFIGS = [  # the pointer kernel (its launcher ignores tma / persistent)
    W.GemmConfig(128, 256, 128, 8, 8, 3),
    W.GemmConfig(128, 256, 128, 8, 8, 2),
    W.GemmConfig(128, 256, 64, 8, 8, 4),
    W.GemmConfig(128, 128, 128, 8, 8, 4),
]


def bench_w8a8(h: Harness, M=32760, dim=1536, ffn=8960):
    print("== W8A8 at the Wan-1.3B FFN shapes", flush=True)
    g = torch.Generator(device=DEV).manual_seed(5)
    shift = torch.randn(1, dim, device=DEV, generator=g) * 0.1
    scale = torch.randn(1, dim, device=DEV, generator=g) * 0.1
    xin = torch.randn(1, M, dim, device=DEV, generator=g, dtype=BF16)  # block input (before the norm)
    up = torch.nn.Linear(dim, ffn, device=DEV, dtype=BF16)
    down = torch.nn.Linear(ffn, dim, device=DEV, dtype=BF16)
    with torch.no_grad():
        h_up = NQ.norm_modulate_quant(xin, shift, scale, quant=None)[0]  # (M, dim) FFN input
        h_down = F.gelu(up(h_up), approximate="tanh")  # (M, ffn) down-projection input
    best = {}
    for case, lin, x in (("ffn_up", up, h_up), ("ffn_down", down, h_down)):
        K = x.shape[1]
        t_bf16 = h.measure(case, "bf16_nn.Linear", "fwd", lambda: lin(x))
        f = lin(x).float()
        for mode in ("fp8", "int8"):
            wq, ws = Q.quantize_weight(lin.weight, mode)
            xq, xs = Q.quantize_rows(x, mode)
            # activation quantization alone: default and variants: the row in one tile (one read), chunked rows
            # (two passes, the second from L2), more warps per row
            qvars = {"default": {}}
            chunks = ((4096, 8), (16384, 8), (2048, 4), (None, 16)) if K > 4096 else ((1024, 4),)
            for bk, nw in chunks:
                qvars[f"bk{bk}w{nw}"] = dict(block_k=bk, num_warps=nw)
            qtimes = {tag: h.measure(case, f"act_quant_{mode}" + ("" if tag == "default" else f"_{tag}"), "fwd",
                                     lambda kw=kw: Q.quantize_rows(x, mode, **kw))
                      for tag, kw in qvars.items()}
            qbest = min(qtimes, key=qtimes.get)
            qkw = qvars[qbest]
            h.note(case, f"act_quant_{mode}_best", "fwd", ms=qtimes[qbest], variant=qbest)
            for tag, t in qtimes.items():
                h.figure(f"act_quant_{mode}_ms_{case}_{tag}", t)
            tb, cb = float("inf"), None
            for cfg in GEMM_CONFIGS:
                tag = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}" + \
                    ("tma" if cfg.tma else "") + ("p" if cfg.tma and cfg.persistent else "") + \
                    ("f" if cfg.tma and cfg.persistent and cfg.flatten else "") + ("ws" if cfg.warp_spec else "")
                t = guarded(tag, lambda: h.measure(case, f"triton_{mode}_{tag}", "fwd",
                                                   lambda: W.w8a8_matmul(xq, xs, wq, ws, lin.bias, backend="triton",
                                                                         config=cfg)))
                if t is not None and t < tb:
                    tb, cb = t, cfg
            y = W.w8a8_matmul(xq, xs, wq, ws, lin.bias, backend="triton", config=cb)
            h.note(case, f"triton_{mode}_best", "fwd", ms=tb, rel_vs_bf16=rel(y, f), cfg=str(cb))
            h.figure(f"w8a8_{mode}_relerr_vs_bf16_{case}", rel(y, f))
            gemm = {"triton": tb}
            if mode == "fp8":
                gemm["scaled_mm"] = guarded("scaled_mm", lambda: h.measure(
                    case, "bare_torch._scaled_mm_rowwise", "fwd",
                    lambda: W.w8a8_matmul(xq, xs, wq, ws, lin.bias, backend="scaled_mm"))) or float("inf")
                h.figure(f"w8a8_fp8_triton_vs_scaled_mm_{case}", gemm["scaled_mm"] / tb)
            else:
                wt = wq.t()  # (K, N) column-major
                t_im = guarded("int_mm", lambda: h.measure(case, "bare_torch._int_mm", "fwd",
                                                            lambda: torch._int_mm(xq, wt)))
                if t_im:
                    h.figure(f"w8a8_int8_triton_vs_int_mm_{case}", t_im / tb)
            be = min(gemm, key=gemm.get)
            cfg = cb if be == "triton" else None

            def run(mode=mode, be=be, cfg=cfg, wq=wq, ws=ws, lin=lin, x=x, qkw=qkw):
                aq, a_s = Q.quantize_rows(x, mode, **qkw)
                return W.w8a8_matmul(aq, a_s, wq, ws, lin.bias, backend=be, config=cfg)
            t_all = h.measure(case, f"w8a8_{mode}_{be}+act_quant", "fwd", run)
            h.figure(f"w8a8_{mode}_speedup_{case}_standalone", t_bf16 / t_all)
            h.figure(f"w8a8_{mode}_gemm_only_speedup_{case}", t_bf16 / gemm[be])
            best[(case, mode)] = (be, cfg, wq, ws)
            # static per-tensor activation scale (calibration: amax / qmax of this input): the quantization
            # pass + GEMM, against the same quantization done on the A tiles inside the GEMM's K loop
            static = (x.float().abs().amax() / Q.QMAX[mode]).item()
            t_st = h.measure(case, f"w8a8_{mode}_{be}+static_act_quant", "fwd", lambda: W.w8a8_matmul(
                *Q.quantize_rows(x, mode, static), wq, ws, lin.bias, backend=be, config=cfg))
            h.figure(f"w8a8_{mode}_static_speedup_{case}", t_bf16 / t_st)
            tf, cf = float("inf"), None
            for c in STATIC_FUSED_CONFIGS:
                tag = f"{c.block_m}x{c.block_n}x{c.block_k}w{c.num_warps}s{c.num_stages}"
                t = guarded(tag, lambda: h.measure(case, f"triton_{mode}_static_fused_{tag}", "fwd",
                                                   lambda: W.w8a8_matmul_static_input(x, static, wq, ws, lin.bias,
                                                                                      config=c)))
                if t is not None and t < tf:
                    tf, cf = t, c
            if cf is not None:
                y = W.w8a8_matmul_static_input(x, static, wq, ws, lin.bias, config=cf)
                h.note(case, f"triton_{mode}_static_fused_best", "fwd", ms=tf, rel_vs_bf16=rel(y, f), cfg=str(cf),
                       vs_two_kernels=t_st / tf)
                h.figure(f"w8a8_{mode}_static_fused_speedup_{case}", t_bf16 / tf)
                h.figure(f"w8a8_{mode}_static_fused_relerr_vs_bf16_{case}", rel(y, f))
                # values beyond the static range must saturate as the quantizer kernel's do (the fp8 path
                # relies on the cast's satfinite instead of a clamp): against the two-kernel path
                xs_ = x[:256].clone()
                xs_[:, :64] *= 8.0
                two = W.w8a8_matmul(*Q.quantize_rows(xs_, mode, static), wq, ws, lin.bias, backend="triton", config=cb)
                one = W.w8a8_matmul_static_input(xs_, static, wq, ws, lin.bias, config=cf)
                h.figure(f"w8a8_{mode}_static_fused_saturated_vs_two_kernels_{case}",
                         rel(one, two) if torch.isfinite(one).all() else float("inf"))
    h.figure("w8a8_fp8_speedup_ffn_down", h.figures["w8a8_fp8_speedup_ffn_down_standalone"])

    # self-attention's q, k, v projections (dim -> dim each) on one quantized input (the runtime quantizes it once):
    # three GEMMs, as the DiT runs them, against one GEMM over the concatenated weight (dim -> 3 dim), the fusion a
    # bundle could make at load time. GEMM only, default config; bf16 three nn.Linear vs one for scale.
    case = "attn_qkv"
    lins = [torch.nn.Linear(dim, dim, device=DEV, dtype=BF16) for _ in range(3)]
    cat = torch.nn.Linear(dim, 3 * dim, device=DEV, dtype=BF16)
    t3 = h.measure(case, "bf16_three_linears", "fwd", lambda: [m(h_up) for m in lins])
    t1 = h.measure(case, "bf16_one_qkv_linear", "fwd", lambda: cat(h_up))
    h.figure("bf16_qkv_one_vs_three", t3 / t1)
    for mode in ("fp8", "int8"):
        xq, xs = Q.quantize_rows(h_up, mode)
        parts = [Q.quantize_weight(m.weight, mode) for m in lins]
        wcat, scat = torch.cat([w for w, _ in parts]), torch.cat([sc for _, sc in parts])
        bcat = torch.cat([m.bias for m in lins])
        t3 = h.measure(case, f"w8a8_{mode}_three_gemms", "fwd", lambda: [
            W.w8a8_matmul(xq, xs, w, sc, m.bias) for (w, sc), m in zip(parts, lins)])
        t1 = h.measure(case, f"w8a8_{mode}_one_qkv_gemm", "fwd", lambda: W.w8a8_matmul(xq, xs, wcat, scat, bcat))
        h.figure(f"w8a8_{mode}_qkv_one_vs_three", t3 / t1)
    h.figure("w8a8_int8_speedup_ffn_down", h.figures["w8a8_int8_speedup_ffn_down_standalone"])


    # ffn_up with the producer fused: LayerNorm + modulation (+ quantization) → GEMM
    case = "ffn_up"
    t_eager = h.measure(case, "eager_norm_mod+bf16_linear", "fwd", lambda: up(
        (F.layer_norm(xin.float(), (dim,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]).to(BF16)))
    t_fused_bf16 = h.measure(case, "fused_norm_mod_bf16+bf16_linear", "fwd", lambda: up(
        NQ.norm_modulate_quant(xin, shift, scale, quant=None)))
    for nw in (4, 8):
        h.measure(case, f"norm_mod_quant_fp8_w{nw}", "fwd",
                  lambda: NQ.norm_modulate_quant(xin, shift, scale, quant="fp8", num_warps=nw))
    for mode in ("fp8", "int8"):
        be, cfg, wq, ws = best[(case, mode)]

        def run_fused(mode=mode, be=be, cfg=cfg, wq=wq, ws=ws):
            aq, a_s = NQ.norm_modulate_quant(xin, shift, scale, quant=mode)
            return W.w8a8_matmul(aq, a_s, wq, ws, up.bias, backend=be, config=cfg)
        t_f = h.measure(case, f"fused_norm_mod_quant_{mode}+{be}", "fwd", run_fused)
        h.figure(f"w8a8_{mode}_speedup_ffn_up", t_fused_bf16 / t_f)
        h.figure(f"w8a8_{mode}_speedup_ffn_up_vs_eager_norm", t_eager / t_f)

    # whole FFN: norm+mod → up → GELU → down. W8A8: quantization fused into the norm (dynamic per
    # token) and into the up-projection's epilogue (GELU + static per-tensor scale from a calibration
    # pass, here the amax of this input); bf16: fused norm kernel, cuBLAS GEMMs, eager GELU.
    case = "ffn_block"

    def ffn_bf16():
        return down(F.gelu(up(NQ.norm_modulate_quant(xin, shift, scale, quant=None)), approximate="tanh"))
    t_b = h.measure(case, "bf16_norm+up+gelu+down", "fwd", ffn_bf16)
    ref = ffn_bf16().float()
    for mode in ("fp8", "int8"):
        _, cu, wq_u, ws_u = best[("ffn_up", mode)]
        be_d, cd, wq_d, ws_d = best[("ffn_down", mode)]
        static = (h_down.float().abs().amax() / Q.QMAX[mode]).item()  # calibration: amax / qmax

        def ffn_q(mode=mode, cu=cu, cd=cd, wq_u=wq_u, ws_u=ws_u, wq_d=wq_d, ws_d=ws_d, be_d=be_d, static=static):
            aq, a_s = NQ.norm_modulate_quant(xin, shift, scale, quant=mode)
            hq, h_s = W.w8a8_matmul(aq, a_s, wq_u, ws_u, up.bias, backend="triton", config=cu,
                                    activation="gelu_tanh", out_quant=mode, out_scale=static)
            return W.w8a8_matmul(hq, h_s, wq_d, ws_d, down.bias, backend=be_d, config=cd)
        t_q = h.measure(case, f"w8a8_{mode}_fused_quant", "fwd", ffn_q)
        h.figure(f"w8a8_{mode}_speedup_ffn_block", t_b / t_q)
        h.figure(f"w8a8_{mode}_relerr_vs_bf16_ffn_block", rel(ffn_q(), ref))


def bench_residual(h: Harness, M=32760, dim=1536, ffn=8960):
    """A DiT block's gated residual x + gate·y after its output projections (attention o: dim -> dim; FFN down):
    the fp8 GEMM then the block's formula in torch (what eager runs) against the sum in the GEMM's epilogue
    (residual read in the epilogue, one output instead of the product and then the sum). GEMM on a quantized
    input, default config."""
    print("== gated residual in the W8A8 epilogue", flush=True)
    g = torch.Generator(device=DEV).manual_seed(6)
    o_lin = torch.nn.Linear(dim, dim, device=DEV, dtype=BF16)
    down = torch.nn.Linear(ffn, dim, device=DEV, dtype=BF16)
    gate = torch.randn(1, dim, device=DEV, generator=g)
    resid = torch.randn(M, dim, device=DEV, generator=g, dtype=BF16)
    for case, lin in (("attn_o", o_lin), ("ffn_down", down)):
        x = torch.randn(M, lin.in_features, device=DEV, generator=g, dtype=BF16)
        wq, ws = Q.quantize_weight(lin.weight, "fp8")
        xq, xs = Q.quantize_rows(x, "fp8")
        t_gemm = h.measure(case, "w8a8_fp8_gemm", "fwd", lambda: W.w8a8_matmul(xq, xs, wq, ws, lin.bias))
        t_formula = h.measure(case, "w8a8_fp8_gemm+torch_residual", "fwd", lambda: (
            resid.float() + W.w8a8_matmul(xq, xs, wq, ws, lin.bias).float() * gate).to(BF16))
        add = torch.compile(lambda y: (resid.float() + y.float() * gate).to(BF16))  # what Inductor makes of it
        t_ind = h.measure(case, "w8a8_fp8_gemm+inductor_residual", "fwd",
                          lambda: add(W.w8a8_matmul(xq, xs, wq, ws, lin.bias)))
        t_epi = h.measure(case, "w8a8_fp8_gemm_residual_epilogue", "fwd",
                          lambda: W.w8a8_matmul(xq, xs, wq, ws, lin.bias, residual=resid, gate=gate))
        h.measure(case, "w8a8_fp8_gemm_residual_epilogue_no_gate", "fwd",
                  lambda: W.w8a8_matmul(xq, xs, wq, ws, lin.bias, residual=resid))
        h.figure(f"w8a8_fp8_residual_epilogue_vs_inductor_{case}", t_ind / t_epi)
        fused = W.w8a8_matmul(xq, xs, wq, ws, lin.bias, residual=resid, gate=gate).float()
        formula = resid.float() + W.w8a8_matmul(xq, xs, wq, ws, lin.bias).float() * gate
        h.figure(f"w8a8_fp8_residual_epilogue_vs_torch_{case}", t_formula / t_epi)
        h.figure(f"w8a8_fp8_residual_epilogue_cost_{case}", t_epi / t_gemm)
        h.figure(f"w8a8_fp8_residual_epilogue_relerr_{case}", rel(fused, formula))


def bench_group(h: Harness, M=32760, dim=1536, ffn=8960, group=128):
    """A dynamic (uncalibrated) FFN's hidden state, two ways, fp8 and int8: per token (the up GEMM writes bf16 with
    GELU, a quantization pass, the down GEMM) against scales per token and group of `group` channels (the up GEMM's
    epilogue quantizes, the down GEMM's K loop applies them: `compile_ops.FFN_HIDDEN_GROUP`); the down GEMMs alone
    too (what the per-step scaling costs), and the errors against the bf16 FFN."""
    print(f"== dynamic FFN hidden state: per-token vs groups of {group}", flush=True)
    g = torch.Generator(device=DEV).manual_seed(8)
    up = torch.nn.Linear(dim, ffn, device=DEV, dtype=BF16)
    down = torch.nn.Linear(ffn, dim, device=DEV, dtype=BF16)
    x = torch.randn(M, dim, device=DEV, generator=g, dtype=BF16)
    ref = down(F.gelu(up(x), approximate="tanh")).float()
    t_b = h.measure("ffn_dyn", "bf16_up+gelu+down", "fwd", lambda: down(F.gelu(up(x), approximate="tanh")))
    for mode in ("fp8", "int8"):
        wu, su = Q.quantize_weight(up.weight, mode)
        wd, sd = Q.quantize_weight(down.weight, mode)
        xq, xs = Q.quantize_rows(x, mode)

        def per_token(mode=mode, wu=wu, su=su, wd=wd, sd=sd, xq=xq, xs=xs):
            hb = W.w8a8_matmul(xq, xs, wu, su, up.bias, activation="gelu_tanh")
            hq, hs = Q.quantize_rows(hb, mode)
            return W.w8a8_matmul(hq, hs, wd, sd, down.bias)

        def grouped(mode=mode, wu=wu, su=su, wd=wd, sd=sd, xq=xq, xs=xs):
            hq, hs = W.w8a8_matmul(xq, xs, wu, su, up.bias, activation="gelu_tanh", out_quant=mode, out_group=group)
            return W.w8a8_matmul(hq, hs, wd, sd, down.bias)
        t_tok = h.measure("ffn_dyn", f"w8a8_{mode}_per_token", "fwd", per_token)
        t_grp = h.measure("ffn_dyn", f"w8a8_{mode}_groups{group}", "fwd", grouped)
        h.figure(f"w8a8_{mode}_ffn_dynamic_per_token_ms", t_tok)
        h.figure(f"w8a8_{mode}_ffn_dynamic_groups_ms", t_grp)
        h.figure(f"w8a8_{mode}_ffn_dynamic_groups_vs_per_token", t_tok / t_grp)
        h.figure(f"w8a8_{mode}_ffn_dynamic_groups_speedup_vs_bf16", t_b / t_grp)
        h.figure(f"w8a8_{mode}_ffn_dynamic_per_token_relerr", rel(per_token(), ref))
        h.figure(f"w8a8_{mode}_ffn_dynamic_groups_relerr", rel(grouped(), ref))
        hb = W.w8a8_matmul(xq, xs, wu, su, up.bias, activation="gelu_tanh")
        tq, ts = Q.quantize_rows(hb, mode)
        gq, gs = W.w8a8_matmul(xq, xs, wu, su, up.bias, activation="gelu_tanh", out_quant=mode, out_group=group)
        h.figure(f"w8a8_{mode}_down_gemm_per_row_ms", h.measure("ffn_down", f"w8a8_{mode}_per_row", "fwd",
                                                                 lambda: W.w8a8_matmul(tq, ts, wd, sd, down.bias)))
        h.figure(f"w8a8_{mode}_down_gemm_groups_ms", h.measure("ffn_down", f"w8a8_{mode}_groups{group}", "fwd",
                                                                lambda: W.w8a8_matmul(gq, gs, wd, sd, down.bias)))


def bench_rows(h: Harness, M=32760, dim=1536, heads=12):
    """The row kernels around the DiT's GEMMs, one token row per program, at the 1.3B shape: the fused LayerNorm +
    modulation + fp8 quantization (q/k/v and FFN inputs), the fused q/k RMSNorm + RoPE (stride-2 channel pairs or
    contiguous tiles split in registers) and the per-token fp8 quantization of a 1536-wide input (the output
    projections'), each at several warp counts; prints GB/s of compulsory traffic (read once, written once)."""
    from turbo_kernels.attention import qk_norm_rope as QR
    print("== row kernels (norm + modulation + quantization, q/k norm + RoPE, per-token quantization)", flush=True)
    g = torch.Generator(device=DEV).manual_seed(7)
    x = torch.randn(1, M, dim, device=DEV, generator=g, dtype=BF16)
    shift = 0.1 * torch.randn(1, dim, device=DEV, generator=g)
    scale = 0.1 * torch.randn(1, dim, device=DEV, generator=g)
    gbps = lambda nbytes, ms: nbytes / ms / 1e6  # noqa: E731

    def sweep(case, nbytes, make, check):
        times, ref = {}, check(make(None))
        for w in (1, 2, 4, 8, 16):
            try:
                times[w] = h.measure(case, f"warps{w}", "fwd", lambda w=w: make(w))
                h.figure(f"rows_{case}_rel_diff_warps{w}", rel(check(make(w)), ref))
            except Exception as e:  # noqa: BLE001  (a count may not fit the tile)
                print(f"  {case} warps {w} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        t_def = h.measure(case, "default", "fwd", lambda: make(None))  # the launcher's own choice of warps
        best = min(times, key=times.get)
        h.figure(f"rows_{case}_default_ms", t_def)
        h.figure(f"rows_{case}_best_ms", times[best])
        h.figure(f"rows_{case}_best_warps", best)
        print(f"  {case}: default {t_def:.4f} ms ({gbps(nbytes, t_def):.0f} GB/s), best warps {best} "
              f"{times[best]:.4f} ms ({gbps(nbytes, times[best]):.0f} GB/s)", flush=True)

    sweep("norm_modulate_quant_fp8", M * dim * 3 + M * 4,
          lambda w: NQ.norm_modulate_quant(x, shift, scale, quant="fp8", num_warps=w),
          lambda r: Q.dequantize(*r).float())
    wq = 1 + 0.1 * torch.randn(dim, device=DEV, generator=g, dtype=BF16)
    ang = torch.rand(M, dim // heads // 2, device=DEV, generator=g) * 6.3
    cos, sin = ang.cos(), ang.sin()
    for split in (False, True):
        sweep(f"qk_norm_rope_{'split' if split else 'stride2'}", M * dim * 4,
              lambda w, split=split: QR.qk_norm_rope(x, wq, cos, sin, heads, num_warps=w, split=split),
              lambda r: r.float())
    sweep("quantize_rows_fp8_1536", M * dim * 3 + M * 4, lambda w: Q.quantize_rows(x, "fp8", num_warps=w),
          lambda r: Q.dequantize(*r).float())


def bench_gelu_flatten(h: Harness, M=32760, dim=1536, ffn=8960):
    """fp8 FFN GEMMs as the DiT runs them (up: GELU in the epilogue, bf16 or group-quantized fp8 out; down: bf16 out),
    with the epilogue's GELU from the hardware tanh (`w8a8.GELU_APPROX`, default) or exp + division, and with the
    descriptor kernel's tile loop as the default config has it, one program per tile, persistent, or persistent with
    the tile and K loops flattened into one pipelined loop (`GemmConfig.flatten`; the default since session 30).
    Figures `gemm_*_ms`, the approximation's error against the exact GELU's output, and the best variant against
    the default."""
    from dataclasses import replace

    print("== fp8 FFN GEMMs: GELU approximation, flattened persistent loops", flush=True)
    g = torch.Generator(device=DEV).manual_seed(9)
    up = torch.nn.Linear(dim, ffn, device=DEV, dtype=BF16)
    down = torch.nn.Linear(ffn, dim, device=DEV, dtype=BF16)
    x = torch.randn(M, dim, device=DEV, generator=g, dtype=BF16)
    wu, su = Q.quantize_weight(up.weight, "fp8")
    wd, sd = Q.quantize_weight(down.weight, "fp8")
    xq, xs = Q.quantize_rows(x, "fp8")
    hq, hs = Q.quantize_rows(F.gelu(up(x), approximate="tanh"), "fp8")
    base = W.DEFAULT_GEMM_CONFIG
    configs = {"default": base, "one_tile": replace(base, persistent=False, flatten=False),
               "persistent": replace(base, persistent=True, flatten=False),
               "flat_s4": replace(base, persistent=True, flatten=True, num_stages=4),
               "flat_s3": replace(base, persistent=True, flatten=True, num_stages=3)}
    saved = W.GELU_APPROX
    try:
        outs = {}
        for approx in (False, True):
            W.GELU_APPROX = approx
            gel = "approx" if approx else "exact"
            outs[gel] = W.w8a8_matmul(xq, xs, wu, su, up.bias, activation="gelu_tanh").float()
            for tag, cfg in configs.items():
                for out, kw in (("bf16", {}), ("group128", dict(out_quant="fp8", out_group=128))):
                    t = guarded(f"up {gel} {tag} {out}", lambda cfg=cfg, kw=kw: h.measure(
                        "ffn_up_gelu", f"fp8_{gel}_{tag}_{out}", "fwd",
                        lambda: W.w8a8_matmul(xq, xs, wu, su, up.bias, activation="gelu_tanh", config=cfg, **kw)))
                    if t is not None:
                        h.figure(f"gemm_fp8_ffn_up_gelu_{gel}_{tag}_{out}_ms", t)
        h.figure("gelu_approx_relerr_vs_exact_ffn_up", rel(outs["approx"], outs["exact"]))
        ref = F.gelu(up(x).float(), approximate="tanh")
        for gel, o in outs.items():
            h.figure(f"gelu_{gel}_relerr_vs_bf16_ffn_up", rel(o, ref))
    finally:
        W.GELU_APPROX = saved
    for tag, cfg in configs.items():
        t = guarded(f"down {tag}", lambda cfg=cfg: h.measure("ffn_down", f"fp8_{tag}", "fwd", lambda: W.w8a8_matmul(
            hq, hs, wd, sd, down.bias, config=cfg)))
        if t is not None:
            h.figure(f"gemm_fp8_ffn_down_{tag}_ms", t)
    f = h.figures
    for case in ("ffn_up_gelu_approx", "ffn_up_gelu_exact"):
        for out in ("bf16", "group128"):
            times = {t: f.get(f"gemm_fp8_{case}_{t}_{out}_ms") for t in configs}
            times = {t: v for t, v in times.items() if v}
            if times.get("default"):
                best = min(times, key=times.get)
                print(f"  {case} {out}: best {best} {times[best]:.3f} ms vs default {times['default']:.3f}")
    if f.get("gemm_fp8_ffn_up_gelu_exact_default_bf16_ms") and f.get("gemm_fp8_ffn_up_gelu_approx_default_bf16_ms"):
        h.figure("gelu_approx_speedup_ffn_up", f["gemm_fp8_ffn_up_gelu_exact_default_bf16_ms"]
                 / f["gemm_fp8_ffn_up_gelu_approx_default_bf16_ms"])


def bench_store(h: Harness, M=32760, dim=1536, ffn=8960):
    """fp8 GEMMs of the DiT whose output is a plain tile, stored per thread (the default) or through a tensor
    descriptor (`GemmConfig.store_desc`: TMA stores, whole tiles or two half-width subtiles, 4 or 3 stages): the FFN
    up with GELU, bf16 out and fp8 out with a static scale (a calibrated bundle's path); the FFN down and the fused
    q/k/v projection (1536 -> 4608), bf16 out. Figures `gemm_store_*_ms`, each variant's output against the
    default's (bit for bit: `*_equal`), and the best variant per GEMM against the default."""
    from dataclasses import replace

    print("== fp8 GEMMs: output tiles through tensor descriptors", flush=True)
    g = torch.Generator(device=DEV).manual_seed(11)
    x = torch.randn(M, dim, device=DEV, generator=g, dtype=BF16)
    xq, xs = Q.quantize_rows(x, "fp8")
    wu, su = Q.quantize_weight(torch.randn(ffn, dim, device=DEV, generator=g, dtype=BF16) / dim ** 0.5, "fp8")
    wd, sd = Q.quantize_weight(torch.randn(dim, ffn, device=DEV, generator=g, dtype=BF16) / ffn ** 0.5, "fp8")
    wqkv, sqkv = Q.quantize_weight(torch.randn(3 * dim, dim, device=DEV, generator=g, dtype=BF16) / dim ** 0.5, "fp8")
    bu = torch.randn(ffn, device=DEV, dtype=BF16)
    hq, hs = Q.quantize_rows(F.gelu(x.float() @ (wu.float() * su[:, None]).t(), approximate="tanh").to(BF16), "fp8")
    base = W.DEFAULT_GEMM_CONFIG
    configs = {"default": base, "store_sub_s4": replace(base, store_desc=True, store_subtile=True),
               "store_whole_s4": replace(base, store_desc=True, store_subtile=False),
               "store_sub_s3": replace(base, store_desc=True, store_subtile=True, num_stages=3)}
    cases = {"ffn_up_gelu_bf16": lambda cfg: W.w8a8_matmul(xq, xs, wu, su, bu, activation="gelu_tanh", config=cfg),
             "ffn_up_gelu_fp8_static": lambda cfg: W.w8a8_matmul(xq, xs, wu, su, bu, activation="gelu_tanh",
                                                                  out_quant="fp8", out_scale=0.01, config=cfg)[0],
             "ffn_down_bf16": lambda cfg: W.w8a8_matmul(hq, hs, wd, sd, None, config=cfg),
             "qkv_bf16": lambda cfg: W.w8a8_matmul(xq, xs, wqkv, sqkv, None, config=cfg)}
    for case, fn in cases.items():
        ref = fn(base)
        times = {}
        for tag, cfg in configs.items():
            t = guarded(f"{case} {tag}", lambda cfg=cfg: h.measure(case, f"fp8_{tag}", "fwd", lambda: fn(cfg)))
            if t is None:
                continue
            times[tag] = t
            h.figure(f"gemm_store_{case}_{tag}_ms", t)
            if tag != "default":
                h.figure(f"gemm_store_{case}_{tag}_equal", float(torch.equal(fn(cfg).float(), ref.float())))
        if times.get("default"):
            best = min(times, key=times.get)
            h.figure(f"gemm_store_{case}_best_vs_default", times["default"] / times[best])
            print(f"  {case}: best {best} {times[best]:.3f} ms vs default {times['default']:.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="no tile sweeps, no 14B shape")
    ap.add_argument("--only", default="check,dense,sparse,w8a8,residual,rows,group,gelu,store")
    args = ap.parse_args()
    print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), flush=True)
    import triton
    print("triton", triton.__version__, flush=True)
    h = Harness("lowbit")
    only = set(args.only.split(","))
    if "check" in only:
        guarded("correctness", lambda: check_correctness(h))
        h.print_table()
    if "dense" in only:
        best = guarded("dense 1.3b", lambda: bench_dense(h, "1.3b", 1, 12, 32760, 128,
                                                         [LB.DEFAULT_CONFIG] if args.quick else ATTN_CONFIGS))
        if not args.quick:
            guarded("dense 14b", lambda: bench_dense(h, "14b", 1, 40, 75600, 128, [best or LB.DEFAULT_CONFIG]))
        h.write()  # partial results survive a later failure or timeout
    if "sparse" in only:
        guarded("sparse", lambda: bench_sparse(h, 1, 12, 32760, 128, quick=args.quick))
        h.write()
    if "w8a8" in only:
        guarded("w8a8", lambda: bench_w8a8(h))
    if "residual" in only:
        guarded("residual", lambda: bench_residual(h))
    if "rows" in only:
        guarded("rows", lambda: bench_rows(h))
    if "group" in only:
        guarded("group", lambda: bench_group(h))
    if "gelu" in only:
        guarded("gelu", lambda: bench_gelu_flatten(h))
    if "store" in only:
        guarded("store", lambda: bench_store(h))
    h.print_table()
    h.write()


if __name__ == "__main__":
    main()
