"""Benchmark the JVP flash attention (turbo_kernels.attention.jvp_attention) against cuDNN SDPA.

    python tools/bench_jvp_attention.py [--check] [--sweep] [--shape 1.3b]

At the Wan-1.3B self-attention shape (B1 H12 L32760 D128, bf16): cuDNN SDPA forward (O only, the
floor's unit), our fused JVP forward (O and tO, six GEMMs), our flash forward with LSE, our
tangent-from-LSE kernel (five GEMMs), the sdpa_jvp module under torch.func.jvp without grad (what
it costs inside rCM's JVP pass) and the autograd.Function applied directly the same way. Errors of O and tO vs the fp32
closed-form reference on a slice of query rows (the full (L, L) reference does not fit), next to
the error of torch.func.jvp of bf16 math SDPA on the same slice (what plain PyTorch would give).
--check (after the default-tile figures): small GPU correctness checks (bf16/fp16, ragged
lengths, cross-attention, the module under torch.func.jvp, backward vs SDPA). --sweep (last):
tile/warp/stage variants per kernel mode; if one beats the default, the figures are re-measured
with the fastest. Writes benchmarks/jvp_attention.json (and $OUT/) after every stage.
"""
from __future__ import annotations

import argparse
import math
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_harness import Harness, time_ms  # noqa: E402

import turbo_infer.layers.jvp_attention  # noqa: E402,F401  (registers sdpa_jvp)
from turbo_infer.layers.attention import make_attention  # noqa: E402
from turbo_kernels.attention import jvp_attention as J  # noqa: E402

SHAPES = {"1.3b": (1, 12, 32760, 128), "14b_720p": (1, 40, 75600, 128)}  # (B, H, L, D)
# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per mode beside the defaults, D = 128
SWEEP = {
    "fused": [(128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
    "tangent": [(128, 32, 8, 3), (64, 64, 4, 2)],
    "fwd": [(128, 128, 8, 2), (128, 64, 4, 3)],
}


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


DEVICE = "cuda"


def randn(*shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=g)


def cudnn(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def tiles_of(cfg):
    bm, bn, w, s = cfg
    return dict(block_m=bm, block_n=bn, num_warps=w, num_stages=s)


# ---------------------------------------------------------------------------- correctness
def check(h: Harness) -> None:
    print("== GPU correctness (rel. error vs the fp32 closed-form reference)", flush=True)
    worst = {}
    cases = [(1, 2, 1000, 1000, 128, "qkv", "bhld"), (2, 3, 777, 777, 64, "qkv", "blhd"),
             (1, 2, 1000, 512, 128, "q", "bhld"),  # cross-attention: tK = tV = None
             (1, 1, 45, 45, 128, "qkv", "bhld")]
    for dtype in (torch.bfloat16, torch.float16):
        for (B, H, Lq, Lk, D, tang, layout) in (cases if dtype == torch.bfloat16 else cases[:1]):
            seed = [B, H, Lq, Lk, D]
            if layout == "blhd":  # (B, L, H, D) storage viewed as (B, H, L, D), as the DiT calls it
                q, tq = (randn(B, Lq, H, D, dtype=dtype, seed=sum(seed) + i).transpose(1, 2) for i in range(2))
                k, v, tk, tv = (randn(B, Lk, H, D, dtype=dtype, seed=sum(seed) + i).transpose(1, 2)
                                for i in range(2, 6))
            else:
                q, tq = (randn(B, H, Lq, D, dtype=dtype, seed=sum(seed) + i) for i in range(2))
                k, v, tk, tv = (randn(B, H, Lk, D, dtype=dtype, seed=sum(seed) + i) for i in range(2, 6))
            tk = tk if "k" in tang else None
            tv = tv if "v" in tang else None
            ro, rto = J.jvp_attention_reference(q.float(), k.float(), v.float(), tq.float(),
                                                None if tk is None else tk.float(), None if tv is None else tv.float())
            o, to = J.jvp_attention(q, k, v, tq, tk, tv)
            o2, lse = J.flash_attention_lse(q, k, v)
            to2 = J.jvp_attention_tangent(q, k, v, o2, lse, tq, tk, tv)
            with torch.no_grad():
                _, to3 = torch.func.jvp(make_attention("sdpa_jvp", D), (q, k, v),
                                        (tq, torch.zeros_like(k) if tk is None else tk,
                                         torch.zeros_like(v) if tv is None else tv))
            errs = dict(o=rel_err(o, ro), to=rel_err(to, rto), o_fwd=rel_err(o2, ro), to_tangent=rel_err(to2, rto),
                        to_module=rel_err(to3, rto))
            finite = all(torch.isfinite(t).all().item() for t in (o, to, o2, lse, to2, to3))
            case = f"{str(dtype)[6:]} {B}x{H}x{Lq}x{Lk}x{D} {tang} {layout}"
            print(f"  {case:>36}: finite={finite} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
            h.note(case, "ours", "fwd", finite=finite, **errs)
            for k_, v_ in errs.items():
                worst[(str(dtype)[6:], k_)] = max(worst.get((str(dtype)[6:], k_), 0.0), v_ if finite else float("inf"))
        # backward through the Function (SDPA recompute) vs the fp32 reference
        q, k, v = (randn(2, 3, 777, 128, dtype=dtype, seed=40 + i).requires_grad_() for i in range(3))
        g = randn(2, 3, 777, 128, dtype=dtype, seed=44)
        J.jvp_flash_attention(q, k, v).backward(g)
        ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
        (torch.softmax(ref[0] @ ref[1].transpose(-1, -2) / math.sqrt(128), -1) @ ref[2]).backward(g.float())
        gerr = max(rel_err(a.grad, b.grad) for a, b in zip((q, k, v), ref))
        print(f"  {str(dtype)[6:]} backward max rel err dq/dk/dv = {gerr:.2e}", flush=True)
        worst[(str(dtype)[6:], "grad")] = gerr
    for (dt, what), e in worst.items():
        if math.isfinite(e):
            h.figure(f"jvp_attn_check_{what}_rel_err_{dt}", e)


# ---------------------------------------------------------------------------- tuning sweep
def sweep(h: Harness, tensors, tag, default_ms: dict) -> dict:
    """Time SWEEP's candidates per mode; return the fastest config per mode (None: the default)."""
    q, k, v, tq, tk, tv = tensors
    o, lse = J.flash_attention_lse(q, k, v)
    fns = {
        "fused": lambda t: J.jvp_attention(q, k, v, tq, tk, tv, **t),
        "tangent": lambda t: J.jvp_attention_tangent(q, k, v, o, lse, tq, tk, tv, **t),
        "fwd": lambda t: J.flash_attention_lse(q, k, v, **t),
    }
    best = {m: (None, ms) for m, ms in default_ms.items()}
    for mode, cfgs in SWEEP.items():
        for cfg in cfgs:
            try:
                fns[mode](tiles_of(cfg))
                ran = J.fitted_tiles(mode, cfg)
                if ran != {cfg}:  # stepped down at launch (did not fit): not the config asked for
                    print(f"  {mode} {cfg}: does not fit, launched as {ran}; skipped", flush=True)
                    continue
                ms = h.measure(tag, f"sweep_{mode}_{'x'.join(map(str, cfg))}", "fwd", lambda: fns[mode](tiles_of(cfg)))
            except Exception as e:
                print(f"  {mode} {cfg}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            if ms < best[mode][1]:
                best[mode] = (cfg, ms)
    for mode, (cfg, ms) in best.items():
        print(f"  best {mode}: {cfg or ('default', J._CUDA_TILES[mode])} {ms:.2f} ms", flush=True)
    return {m: c for m, (c, _) in best.items() if c is not None}


# ---------------------------------------------------------------------------- figures
def bench(h: Harness, tag: str, best: dict | None = None) -> dict:
    """Time and check everything at `tag`; best: mode -> config (others use the defaults).

    Returns the default-config ms per mode (the sweep's baseline)."""
    B, H, L, D = SHAPES[tag]
    best = best or {}
    print(f"== {tag}: B{B} H{H} L{L} D{D} bf16, configs {best or 'default'}", flush=True)
    q, k, v, tq, tk, tv = (randn(B, H, L, D, seed=i) for i in range(6))
    cfg = {m: tiles_of(best[m]) if m in best else {} for m in ("fused", "tangent", "fwd")}

    gemm_flop = 2.0 * B * H * L * L * D  # one (L x L x D) GEMM
    cudnn_ms = h.measure(tag, "cudnn_sdpa", "fwd", lambda: cudnn(q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash_ms = h.measure(tag, "torch_flash2_sdpa", "fwd", lambda: F.scaled_dot_product_attention(q, k, v))
    fused_ms = h.measure(tag, "ours_fused_O_tO", "fwd", lambda: J.jvp_attention(q, k, v, tq, tk, tv, **cfg["fused"]))
    fwd_ms = h.measure(tag, "ours_fwd_O_lse", "fwd", lambda: J.flash_attention_lse(q, k, v, **cfg["fwd"]))
    o, lse = J.flash_attention_lse(q, k, v, **cfg["fwd"])
    tan_ms = h.measure(tag, "ours_tangent_from_lse", "fwd",
                       lambda: J.jvp_attention_tangent(q, k, v, o, lse, tq, tk, tv, **cfg["tangent"]))
    attn = make_attention("sdpa_jvp", D)  # library default tiles: what rCM gets

    def module_jvp():
        with torch.no_grad():
            return torch.func.jvp(attn, (q, k, v), (tq, tk, tv))

    mod_ms = h.measure(tag, "sdpa_jvp_under_func_jvp", "fwd", module_jvp)
    scale = D ** -0.5

    def function_jvp():  # the autograd.Function applied directly: forward with LSE, then tangent kernel
        with torch.no_grad():
            return torch.func.jvp(lambda a, b, c: J.JVPAttentionFunction.apply(a, b, c, scale, {})[0],
                                  (q, k, v), (tq, tk, tv))

    fn_ms = h.measure(tag, "function_under_func_jvp", "fwd", function_jvp)

    # errors on a slice of query rows (all keys): rows are independent, so the slice is exact
    rows = slice(0, 1024)
    qs, tqs = q[:, :2, rows], tq[:, :2, rows]
    ks, vs, tks, tvs = (t[:, :2] for t in (k, v, tk, tv))
    ro, rto = J.jvp_attention_reference(qs.float(), ks.float(), vs.float(), tqs.float(), tks.float(), tvs.float())
    fo, fto = J.jvp_attention(q, k, v, tq, tk, tv, **cfg["fused"])
    tto = J.jvp_attention_tangent(q, k, v, o, lse, tq, tk, tv, **cfg["tangent"])
    _, mto = module_jvp()
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():  # plain PyTorch bf16 forward-mode, same slice
        bo, bto = torch.func.jvp(F.scaled_dot_product_attention, (qs, ks, vs), (tqs, tks, tvs))
    errs = {
        "o_rel_err": rel_err(fo[:, :2, rows], ro), "to_rel_err": rel_err(fto[:, :2, rows], rto),
        "fwd_o_rel_err": rel_err(o[:, :2, rows], ro), "tangent_to_rel_err": rel_err(tto[:, :2, rows], rto),
        "module_to_rel_err": rel_err(mto[:, :2, rows], rto),
        "torch_bf16_math_o_rel_err": rel_err(bo, ro), "torch_bf16_math_to_rel_err": rel_err(bto, rto),
    }
    finite = all(torch.isfinite(t).all().item() for t in (fo, fto, o, lse, tto, mto))
    h.note(tag, "errors", "fwd", finite=finite, **{k_: round(v_, 6) for k_, v_ in errs.items()})
    print("  errors: " + " ".join(f"{k_}={v_:.2e}" for k_, v_ in errs.items()) + f" finite={finite}", flush=True)

    h.figure(f"cudnn_fwd_ms_{tag}", cudnn_ms)
    h.figure(f"torch_flash2_fwd_ms_{tag}", flash_ms)
    h.figure(f"jvp_attn_fwd_ms_{tag}", fused_ms)
    h.figure(f"jvp_attn_vs_cudnn_fwd_ratio_{tag}", fused_ms / cudnn_ms)
    h.figure(f"jvp_attn_tflops_{tag}", 6 * gemm_flop / fused_ms / 1e9)
    h.figure(f"jvp_attn_flash_fwd_lse_ms_{tag}", fwd_ms)
    h.figure(f"jvp_attn_tangent_from_lse_ms_{tag}", tan_ms)
    h.figure(f"jvp_attn_module_func_jvp_ms_{tag}", mod_ms)
    h.figure(f"jvp_attn_module_func_jvp_vs_cudnn_ratio_{tag}", mod_ms / cudnn_ms)
    h.figure(f"jvp_attn_function_func_jvp_ms_{tag}", fn_ms)
    for k_, v_ in errs.items():
        if math.isfinite(v_):  # a non-finite error stays in the table (finite=False), not in figures
            h.figure(f"jvp_attn_{k_}_{tag}", v_)
    for mode in ("fused", "tangent", "fwd"):
        ran = J.fitted_tiles(mode, best.get(mode, J._CUDA_TILES[mode]))
        print(f"  {mode} launched with {ran}", flush=True)
        if len(ran) == 1:
            for name, val in zip(("block_m", "block_n", "num_warps", "num_stages"), ran.pop()):
                h.figure(f"jvp_attn_{mode}_{name}_{tag}", val)
    return dict(fused=fused_ms, tangent=tan_ms, fwd=fwd_ms), (q, k, v, tq, tk, tv)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.3b", choices=sorted(SHAPES))
    p.add_argument("--check", action="store_true", help="small GPU correctness checks first")
    p.add_argument("--sweep", action="store_true", help="time tile variants and use the fastest per mode")
    args = p.parse_args()
    h = Harness("jvp_attention")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    # figures with the default tiles first (written at once), then checks, then the sweep; a run cut
    # short by its time limit still leaves the figures measured so far (KeyboardInterrupt too)
    try:
        default_ms, tensors = bench(h, args.shape)
        h.write()
        if args.check:
            check(h)
            h.write()
        if args.sweep:
            best = sweep(h, tensors, args.shape, default_ms)
            if best:
                del tensors
                bench(h, args.shape, best)
    except BaseException:
        traceback.print_exc()
    h.print_table()
    h.write()


if __name__ == "__main__":
    main()
