"""Benchmark the Wan DiT forward on a GPU: eager vs torch.compile, random weights, bf16.

    python tools/bench_dit.py [--config wan2.1-1.3b] [--frames 81] [--height 480] [--width 832] [--no-compile]

480p 81 frames -> latent 21 x 60 x 104 -> 32 760 tokens with the (1, 2, 2) patch; 512 text tokens.
Figures (benchmarks/dit.json):
  dit_1.3b_480p_forward_ms_eager      one forward, eager PyTorch (SDPA picks its fastest backend)
  dit_1.3b_480p_forward_ms_compiled   one forward after torch.compile (compile time excluded, printed)
  dit_1.3b_480p_cfg50_s               100 eager forwards (50 steps x CFG cond + uncond), from the
                                      measured per-forward median (not a timed 100-forward loop)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_harness import Harness  # noqa: E402

from turbo_infer.models.wan import WAN_CONFIGS, WanModel  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan2.1-1.3b", choices=sorted(WAN_CONFIGS))
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")

    torch.manual_seed(0)
    cfg = WAN_CONFIGS[args.config]
    with torch.device("cuda"):
        model = WanModel(cfg).to(torch.bfloat16).eval()
        for prm in model.parameters():  # random weights everywhere (the head is zero-initialised)
            prm.data.normal_(std=0.02)
    f, h, w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8  # Wan VAE: 4x time, 8x space
    x = torch.randn(1, cfg.in_channels, f, h, w, device="cuda")
    t = torch.tensor([500.0], device="cuda")
    ctx = torch.randn(1, args.text_len, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    tokens = f * h * w // 4
    tag = f"{args.config.removeprefix('wan2.1-')}_{args.height}p"
    print(f"{args.config}: latent {f}x{h}x{w} -> {tokens} tokens, {args.text_len} text tokens", flush=True)

    bench = Harness("dit")
    with torch.no_grad():
        eager = bench.measure(tag, "eager", "fwd", lambda: model(x, t, ctx), memory=True)
        bench.figure(f"dit_{tag}_forward_ms_eager", eager)
        bench.figure(f"dit_{tag}_cfg50_s", eager * 100 / 1000)
        if not args.no_compile:
            compiled = torch.compile(model)
            t0 = time.perf_counter()
            compiled(x, t, ctx)
            torch.cuda.synchronize()
            print(f"first compiled call: {time.perf_counter() - t0:.1f} s", flush=True)
            ms = bench.measure(tag, "torch.compile", "fwd", lambda: compiled(x, t, ctx))
            bench.figure(f"dit_{tag}_forward_ms_compiled", ms)
            out_e, out_c = model(x, t, ctx), compiled(x, t, ctx)
            rel = ((out_e - out_c).float().norm() / out_e.float().norm()).item()
            print(f"compiled vs eager relative error: {rel:.3g}")
    bench.print_table()
    bench.write()


if __name__ == "__main__":
    main()
