"""Benchmark SLA (turbo_kernels.attention.sla) against cuDNN SDPA on the Wan attention shapes.

    python tools/bench_attention.py [--shapes 1.3b,14b_720p] [--topks 0.05,0.1,0.2] [--check] [--sweep]

Per shape: cuDNN SDPA forward and backward (dense, bf16), then for each topk the whole SLA
forward (block map + sparse branch + linear branch + projection) and backward, the ratio vs
cuDNN, the parts of the forward, and the error of our output against `sla_reference` (fp32
math, same block map) on a slice of one head (the dense reference does not fit at full size).
--check first runs small GPU correctness checks in bf16/fp16 (output and every gradient vs the
reference, topk = 1 vs SDPA, a non-contiguous (B, L, H, D) layout); --sweep times kernel
tile/warp/stage variants at the 1.3B shape. Writes benchmarks/attention.json (and $OUT/).
"""
from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_harness import Harness, backward_fn, make_proj, time_ms  # noqa: E402

from turbo_kernels.attention.blockmap import BlockMap, sla_block_map  # noqa: E402
from turbo_kernels.attention.sla import SLAKernelConfig  # noqa: E402
from turbo_kernels.attention.sla import (DEFAULT_CONFIG, _linear_state, _sparse_backward, _sparse_forward,  # noqa: E402
                                         sla_attention, sla_reference)

SHAPES = {"1.3b": (1, 12, 32760, 128), "14b_720p": (1, 40, 75600, 128)}  # (B, H, L, D)
BLOCK_Q, BLOCK_K = 128, 64


def cudnn(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def slice_map(bm: BlockMap, heads: slice, q_blocks: int) -> BlockMap:
    lut = bm.lut[:, heads, :q_blocks].contiguous()
    return BlockMap(lut=lut, n=bm.n, num_q_blocks=q_blocks, num_k_blocks=bm.num_k_blocks, block_q=bm.block_q,
                    block_k=bm.block_k, q_len=min(bm.q_len, q_blocks * bm.block_q), k_len=bm.k_len)


def make_qkv(B, H, L, D, dtype=torch.bfloat16, requires_grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g).requires_grad_(requires_grad)
            for _ in range(3)]


# ---------------------------------------------------------------------------- correctness
def check(h: Harness) -> None:
    print("== GPU correctness (vs sla_reference in fp32 math, same block map)", flush=True)
    for dtype in (torch.bfloat16,):
        for (B, H, L, D, topk, layout) in [(1, 2, 3000, 128, 0.1, "bhld"), (2, 3, 1000, 64, 0.3, "blhd"),
                                          (1, 2, 777, 128, 1.0, "bhld")]:
            g = torch.Generator(device="cuda").manual_seed(123)
            if layout == "blhd":  # (B, L, H, D) storage viewed as (B, H, L, D), as the Wan model calls it
                base = [torch.randn(B, L, H, D, device="cuda", dtype=dtype, generator=g) for _ in range(3)]
                q, k, v = [t.transpose(1, 2) for t in base]
            else:
                q, k, v = make_qkv(B, H, L, D, dtype)
            W, b = make_proj(D)
            bm = sla_block_map(q, k, topk, BLOCK_Q, BLOCK_K)
            ours = [t.detach().clone().requires_grad_() for t in (q, k, v, W, b)]
            ref = [t.detach().clone().float().requires_grad_() for t in (q, k, v, W, b)]
            o = sla_attention(*ours, topk, BLOCK_Q, BLOCK_K, block_map=bm)
            o_ref = sla_reference(*ref[:3], topk, BLOCK_Q, BLOCK_K, proj_l=(ref[3], ref[4]), block_map=bm)
            gout = torch.randn_like(o_ref)
            o.backward(gout.to(dtype))
            o_ref.backward(gout)
            errs = {"O": rel_err(o, o_ref)}
            for name, a, r in zip(("dq", "dk", "dv", "dW", "db"), ours, ref):
                # topk = 1 leaves no marginal block: proj_l.weight is unused and gets no .grad
                errs[name] = rel_err(a.grad if a.grad is not None else torch.zeros_like(a), r.grad)
            case = f"{str(dtype)[6:]}-L{L}-{layout}-k{topk}"
            h.note(case, "ours vs ref", "chk", **{k: round(v, 6) for k, v in errs.items()})
            print(f"  {case}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
            if topk == 1.0:
                with torch.no_grad():
                    o0 = sla_attention(q, k, v, torch.zeros_like(W), torch.zeros_like(b), 1.0, BLOCK_Q, BLOCK_K)
                    dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
                mx = (o0.float() - dense).abs().max().item()
                h.note(case, "topk1 vs sdpa", "chk", max_abs=mx, rel=rel_err(o0, dense))
                print(f"  {case}: topk=1 vs fp32 SDPA max abs {mx:.2e} rel {rel_err(o0, dense):.2e}", flush=True)


# ---------------------------------------------------------------------------- tuning sweep
FWD_VARIANTS = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (128, 128, 8, 2),
                (64, 64, 4, 2)]
TAU_VARIANTS = [(0.0,), (8.0,)]
# K/V tiles through tensor descriptors (TMA): (fwd_tma, fwd_warp_spec, fwd_stages)
TMA_VARIANTS = [(False, False, 2), (True, False, 2), (True, False, 3), (True, False, 4), (True, True, 2),
                (True, True, 3)]
# the backward's dQ (K/V tiles) and dK/dV (Q/dO tiles) kernels through descriptors: (bwd_tma, dq_stages, dkdv_stages)
# the linear branch's state kernel: (state_blocks, state_warps), timed as the whole inference state (kernel + GEMMs)
STATE_VARIANTS = [(1, 8), (2, 8), (4, 8), (8, 8), (4, 4)]
BWD_TMA_VARIANTS = [(False, 2, 2), (True, 2, 2), (True, 3, 2), (True, 2, 3), (True, 3, 3)]
DQ_VARIANTS = [(64, 64, 4, 2), (128, 64, 8, 2)]
DKDV_VARIANTS = [(64, 64, 4, 2), (64, 64, 4, 3)]


def sweep(h: Harness, tag="1.3b", topk=0.1, fwd_only: bool = False) -> SLAKernelConfig:
    """Time kernel variants (sparse forward; whole backward with the linear branch) and return the
    fastest of each kernel as a config (fwd_only: the sparse forward's variants alone)."""
    print(f"== sweep at {tag} topk {topk}", flush=True)
    q, k, v = make_qkv(*SHAPES[tag])
    W, _ = make_proj(q.shape[-1])
    bm = sla_block_map(q, k, topk, BLOCK_Q, BLOCK_K)
    best = DEFAULT_CONFIG

    def run(kind, variants, fields, make_fn):
        nonlocal best
        times = {}
        for var in variants:
            cfg = replace(best, **dict(zip(fields, var)))
            try:
                times[var] = h.measure(tag, f"{kind} " + " ".join(f"{f.split('_')[-1][0]}{x}" for f, x in zip(fields, var)),
                                       "fwd" if kind in ("fwd", "state") else "bwd", make_fn(cfg))
            except Exception as e:  # noqa: BLE001  (a variant may not fit in shared memory)
                print(f"  {kind} variant {var} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        if times:
            best = replace(best, **dict(zip(fields, min(times, key=times.get))))

    run("fwd", FWD_VARIANTS, ("fwd_block_m", "fwd_block_n", "fwd_warps", "fwd_stages"),
        lambda cfg: (lambda: _sparse_forward(q, k, v, bm, cfg)))
    # lazy rescaling of the forward's accumulator (only in tiles where some row's max rose by > tau)
    run("fwd", TAU_VARIANTS, ("fwd_rescale_tau",), lambda cfg: (lambda: _sparse_forward(q, k, v, bm, cfg)))
    # the same kernel with K/V tiles fetched by tensor descriptors; checked against the pointer kernel first
    with torch.no_grad():
        ref_o = _sparse_forward(q, k, v, bm, replace(best, fwd_tma=False))[0].float()
        try:
            tma_o = _sparse_forward(q, k, v, bm, replace(best, fwd_tma=True))[0].float()
            print(f"  fwd_tma vs pointer kernel: relative difference "
                  f"{((tma_o - ref_o).norm() / ref_o.norm()).item():.2e}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  fwd_tma failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    run("fwd", TMA_VARIANTS, ("fwd_tma", "fwd_warp_spec", "fwd_stages"),
        lambda cfg: (lambda: _sparse_forward(q, k, v, bm, cfg)))
    with torch.no_grad():  # several key blocks per state program must give the same sums
        one = _linear_state(q, k, v, bm, "softmax", W, replace(best, state_blocks=1), fold=True)[0]
        many = _linear_state(q, k, v, bm, "softmax", W, replace(best, state_blocks=4), fold=True)[0]
        print(f"  state_blocks 4 vs 1: max abs difference {(many.float() - one.float()).abs().max().item():.2e}",
              flush=True)
        base = replace(best, state_blocks=1)
        t_one = h.measure(tag, "state b1 (reference)", "fwd", lambda: _linear_state(q, k, v, bm, "softmax", W, base,
                                                                                   fold=True))
        run("state", STATE_VARIANTS, ("state_blocks", "state_warps"),
            lambda cfg: (lambda: _linear_state(q, k, v, bm, "softmax", W, cfg, fold=True)))
        t_best = h.measure(tag, f"state b{best.state_blocks} w{best.state_warps} (best)", "fwd",
                           lambda: _linear_state(q, k, v, bm, "softmax", W, best, fold=True))
        h.figure(f"sla_state_best_blocks_{tag}_topk{topk}", best.state_blocks)
        h.figure(f"sla_state_best_warps_{tag}_topk{topk}", best.state_warps)
        h.figure(f"sla_state_ms_one_block_{tag}_topk{topk}", t_one)
        h.figure(f"sla_state_ms_best_{tag}_topk{topk}", t_best)
    if fwd_only:
        print(f"  tuned config (forward variants only): {best}", flush=True)
        return best
    hm, zm, _ = _linear_state(q, k, v, bm, "softmax", W, best)
    o, lse, o_s = _sparse_forward(q, k, v, bm, best, store_os=True)
    do = torch.randn_like(o)
    lin = (hm, zm, W.to(q.dtype).contiguous())
    run("dq", DQ_VARIANTS, ("dq_block_m", "dq_block_n", "dq_warps", "dq_stages"),
        lambda cfg: (lambda: _sparse_backward(do, q, k, v, o_s, lse, bm, cfg, lin)))
    run("dkdv", DKDV_VARIANTS, ("dkdv_block_m", "dkdv_block_n", "dkdv_warps", "dkdv_stages"),
        lambda cfg: (lambda: _sparse_backward(do, q, k, v, o_s, lse, bm, cfg, lin)))
    with torch.no_grad():  # descriptor-fed backward kernels must compute what the pointer ones do
        try:
            a = _sparse_backward(do, q, k, v, o_s, lse, bm, replace(best, bwd_tma=True), lin)
            r = _sparse_backward(do, q, k, v, o_s, lse, bm, replace(best, bwd_tma=False), lin)
            diffs = [((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in zip(a[:3], r[:3])]
            print("  bwd_tma vs pointer kernels: relative difference dq %.2e dk %.2e dv %.2e" % tuple(diffs), flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  bwd_tma failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    run("bwd", BWD_TMA_VARIANTS, ("bwd_tma", "dq_stages", "dkdv_stages"),
        lambda cfg: (lambda: _sparse_backward(do, q, k, v, o_s, lse, bm, cfg, lin)))
    # linear branch in the sparse kernels' epilogues or in separate kernels after them, chosen for the
    # forward (fuse_linear) and the backward (fuse_linear_bwd) independently
    fwd, bwd = {}, {}
    for fuse in (True, False):
        try:
            with torch.no_grad():
                fwd[fuse] = h.measure(tag, f"whole fwd fuse_linear={fuse}", "fwd",
                                      lambda: sla_attention(q, k, v, W, None, topk, BLOCK_Q, BLOCK_K, block_map=bm,
                                                            config=replace(best, fuse_linear=fuse)))
        except Exception as e:  # noqa: BLE001
            print(f"  fuse_linear={fuse} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        try:
            c = replace(best, fuse_linear_bwd=fuse)
            bwd[fuse] = h.measure(tag, f"kernels bwd fuse_linear_bwd={fuse}", "bwd",
                                  lambda: _sparse_backward(do, q, k, v, o_s, lse, bm, c, lin))
        except Exception as e:  # noqa: BLE001
            print(f"  fuse_linear_bwd={fuse} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    if fwd:
        best = replace(best, fuse_linear=min(fwd, key=fwd.get))
    def whole_fwd(field: str, values) -> dict:
        """The whole forward, block map built inside, for each value of one config field (ms by value)."""
        times = {}
        for val in values:
            try:
                with torch.no_grad():
                    c = replace(best, **{field: val})
                    times[val] = h.measure(tag, f"whole fwd with map, {field}={val}", "fwd",
                                           lambda: sla_attention(q, k, v, W, None, topk, BLOCK_Q, BLOCK_K, config=c))
            except Exception as e:  # noqa: BLE001
                print(f"  {field}={val} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return times

    # top-n by torch or by the fused Triton kernel
    whole = whole_fwd("map_select", ("torch", "triton"))
    if whole:
        best = replace(best, map_select=min(whole, key=whole.get))
    # the linear state and its marginal GEMMs on a second stream beside the map and the sparse kernel
    overlap = whole_fwd("overlap_state", (False, True)) if not best.fuse_linear else {}  # needs the separate epilogue
    if len(overlap) == 2:
        with torch.no_grad():  # the two-stream forward must compute what the one-stream one does
            a = sla_attention(q, k, v, W, None, topk, BLOCK_Q, BLOCK_K, config=replace(best, overlap_state=True))
            ref = sla_attention(q, k, v, W, None, topk, BLOCK_Q, BLOCK_K, config=replace(best, overlap_state=False))
        err = ((a.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"  overlap_state=True vs False: relative difference {err:.2e}", flush=True)
        if err < 1e-3:
            best = replace(best, overlap_state=min(overlap, key=overlap.get))
    if bwd:
        best = replace(best, fuse_linear_bwd=min(bwd, key=bwd.get))
    print(f"  tuned config: {best}", flush=True)
    return best


# ---------------------------------------------------------------------------- main benchmark
def bench_shape(h: Harness, tag: str, topks: list[float], cfg: SLAKernelConfig) -> None:
    B, H, L, D = SHAPES[tag]
    print(f"== {tag}: B{B} H{H} L{L} D{D} bf16, blocks {BLOCK_Q}x{BLOCK_K}", flush=True)
    q, k, v = make_qkv(B, H, L, D, requires_grad=True)
    W, b = make_proj(D)
    W.requires_grad_()
    b.requires_grad_()
    with torch.no_grad():
        dense_fwd = h.measure(tag, "cudnn", "fwd", lambda: cudnn(q, k, v))
    dense_bwd = h.measure(tag, "cudnn", "bwd", backward_fn(lambda: cudnn(q, k, v), [q, k, v]))
    h.figure(f"cudnn_fwd_ms_{tag}", dense_fwd)
    h.figure(f"cudnn_bwd_ms_{tag}", dense_bwd)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    for topk in topks:
        name = f"sla k={topk}"

        def sla(block_map=None):
            return sla_attention(q, k, v, W, b, topk, BLOCK_Q, BLOCK_K, block_map=block_map, config=cfg)

        with torch.no_grad():
            fwd = h.measure(tag, name, "fwd", sla)
            bm = sla_block_map(qd, kd, topk, BLOCK_Q, BLOCK_K)
            lin = _linear_state(qd, kd, vd, bm, "softmax", W.detach(), cfg)
            map_ms = h.measure(tag, f"  part: block map k={topk}", "fwd",
                               lambda: sla_block_map(qd, kd, topk, BLOCK_Q, BLOCK_K))
            fused = sla_block_map(qd, kd, topk, BLOCK_Q, BLOCK_K, select="triton")
            if not torch.equal(fused.lut, bm.lut):  # same set by construction, up to exact ties
                print(f"  note: the fused top-n selection differs from torch.topk in "
                      f"{(fused.lut != bm.lut).any(-1).sum().item()} rows (ties)")
            fused_ms = h.measure(tag, f"  part: block map, fused top-n k={topk}", "fwd",
                                 lambda: sla_block_map(qd, kd, topk, BLOCK_Q, BLOCK_K, select="triton"))
            h.figure(f"sla_block_map_ms_{tag}_topk{topk}", map_ms)
            h.figure(f"sla_block_map_fused_select_ms_{tag}_topk{topk}", fused_ms)
            h.measure(tag, f"  part: linear state k={topk}", "fwd",
                      lambda: _linear_state(qd, kd, vd, bm, "softmax", W.detach(), cfg))
            h.measure(tag, f"  part: fused kernel k={topk}", "fwd",
                      lambda: _sparse_forward(qd, kd, vd, bm, cfg, lin, b.detach(), store_lse=False))
            h.measure(tag, f"  part: sparse only k={topk}", "fwd",
                      lambda: _sparse_forward(qd, kd, vd, bm, cfg, store_lse=False))
        bwd = h.measure(tag, name, "bwd", backward_fn(sla, [q, k, v, W, b]))
        with torch.no_grad():
            _, lse, o_s = _sparse_forward(qd, kd, vd, bm, cfg, lin, b.detach(), store_os=True)
            do = torch.randn_like(o_s)
            h.measure(tag, f"  part: sparse bwd k={topk}", "bwd", lambda: _sparse_backward(do, qd, kd, vd, o_s, lse, bm, cfg))
            w_c = W.detach().to(qd.dtype).contiguous()
            h.measure(tag, f"  part: kernels bwd k={topk}", "bwd",
                      lambda: _sparse_backward(do, qd, kd, vd, o_s, lse, bm, cfg, (lin[0], lin[1], w_c)))
            # error vs the fp32 reference on head 0 and the first 16 query blocks
            out = sla(block_map=bm)
            sm = slice_map(bm, slice(0, 1), 16)
            rows = sm.q_len
            ref = sla_reference(qd[:, :1, :rows].float(), kd[:, :1].float(), vd[:, :1].float(), topk, BLOCK_Q,
                                BLOCK_K, proj_l=(W.detach(), b.detach()), block_map=sm)
            err = rel_err(out[:, :1, :rows], ref)
            ref_s, _ = sla_reference(qd[:, :1, :rows].float(), kd[:, :1].float(), vd[:, :1].float(), topk, BLOCK_Q,
                                     BLOCK_K, block_map=sm, return_branches=True)
            err_s = rel_err(o_s[:, :1, :rows], ref_s)
            del ref, ref_s, lin
        h.note(tag, name, "err", rel_err_O=err, rel_err_Os=err_s, fwd_x=dense_fwd / fwd, bwd_x=dense_bwd / bwd)
        print(f"  {tag} topk {topk}: fwd {fwd:.3f} ms ({dense_fwd / fwd:.2f}x cuDNN), bwd {bwd:.3f} ms "
              f"({dense_bwd / bwd:.2f}x), rel err O {err:.2e}, O_s {err_s:.2e}", flush=True)
        h.figure(f"sla_fwd_ms_{tag}_topk{topk}", fwd)
        h.figure(f"sla_bwd_ms_{tag}_topk{topk}", bwd)
        h.figure(f"sla_fwd_speedup_{tag}_topk{topk}", dense_fwd / fwd)
        h.figure(f"sla_bwd_speedup_{tag}_topk{topk}", dense_bwd / bwd)
        h.figure(f"sla_rel_err_{tag}_topk{topk}", err)
        torch.cuda.empty_cache()
    del q, k, v
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1.3b,14b_720p")
    p.add_argument("--topks", default="0.05,0.1,0.2")
    p.add_argument("--topks-14b", default=None, help="topks for the 14B shape (default: --topks)")
    p.add_argument("--check", action="store_true", help="small GPU correctness checks first")
    p.add_argument("--sweep", action="store_true",
                   help="time kernel variants at the 1.3B shape; the main runs use the fastest of each")
    p.add_argument("--sweep-fwd-only", action="store_true",
                   help="with --sweep: the sparse forward's variants only (no backward or whole-forward ones)")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    h = Harness("attention")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    cfg = DEFAULT_CONFIG
    steps = []
    def topks(tag):
        spec = args.topks_14b if (tag.startswith("14b") and args.topks_14b) else args.topks
        return [float(t) for t in spec.split(",")]

    steps += [(tag, lambda h, tag=tag: bench_shape(h, tag, topks(tag), cfg)) for tag in args.shapes.split(",") if tag]
    steps += [("check", check)] if args.check else []  # last: the figures are written first
    if args.sweep:
        try:  # the main runs then use the fastest variant of each kernel (printed)
            cfg = sweep(h, fwd_only=args.sweep_fwd_only)
        except Exception:  # noqa: BLE001
            print(f"!! sweep failed:\n{traceback.format_exc()}", flush=True)
    for name, step in steps:
        try:
            step(h)
        except Exception:  # noqa: BLE001  keep going: one failing step must not lose the others' numbers
            print(f"!! step {name} failed:\n{traceback.format_exc()}", flush=True)
            torch.cuda.empty_cache()
        h.write()  # after every step: a run cut short still leaves its figures
    h.print_table()
    h.write()


if __name__ == "__main__":
    main()
