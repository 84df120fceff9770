"""Where the in-model sparse-linear attention time goes, at the Wan-1.3B shape, in one GPU process.

    python tools/bench_sla_layer.py [--backend sla|sagesla] [--topk 0.1] [--profile]
    python tools/bench_sla_layer.py --tiny      # CPU: the same cases at a tiny shape, outputs compared, no timing

Why: the end-to-end run (tools/bench_e2e.py, H100, 2026-11-23) charged 10-12 ms per layer and forward
to the self-attention backend, while tools/bench_attention.py times the same SLA kernels at 2.8 ms.
The cases below separate the suspects, each timed on the same random inputs (batch 1, 32 760 tokens
= the (21, 30, 52) token grid of 480p x 81 frames, 12 heads of 128, bf16, no grad):

  kernel_contiguous    turbo_kernels sla_attention on contiguous (B, H, L, D) q, k, v (bench_attention's case)
  kernel_strided       the same on (B, L, H, D) tensors viewed as (B, H, L, D): the layout the model passes
  module               the attention module of --backend (SparseLinearAttention / SageSparseLinearAttention)
                       on the strided views, through its runtime dispatch (torch.library op, proj_l)
  rope_norm            RMSNorm of q and k plus 3D RoPE of both, eager (what precedes the backend)
  rope_norm_fused      the same through the fused kernel (turbo::norm_rope, turbo_kernels qk_norm_rope)
  self_attention       the whole WanSelfAttention with --backend: q/k/v/o linears, norms + RoPE (fused: CUDA
                       inference takes the kernel), module
  self_attention_sdpa  the same block with dense SDPA attention (cuDNN / flash), for scale

Figures (benchmarks/sla_layer.json): sla_layer_<case>_ms for every case (suffix _sagesla with
--backend sagesla), sla_layer_module_over_kernel (module ÷ kernel_contiguous), sla_layer_norm_rope_fusion
(rope_norm ÷ rope_norm_fused) and
sla_layer_block_speedup (self_attention_sdpa ÷ self_attention). --profile prints the ten CUDA kernels
that take the most time in `module` (torch.profiler).
--tiny runs every case once on the CPU (torch reference kernels, or the Triton interpreter under
TRITON_INTERPRET=1) and checks that the strided and module outputs equal the contiguous kernel's;
it writes no JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_harness import Harness  # noqa: E402

from turbo_infer.models.wan import RoPE3D, WanSelfAttention, get_config  # noqa: E402
from turbo_kernels.attention.sla import sla_attention  # noqa: E402

FULL = dict(preset="wan2.1-1.3b", grid=(21, 30, 52), block_q=128, block_k=64)
TINY = dict(preset=None, grid=(2, 4, 8), block_q=16, block_k=16,
            config=dict(dim=64, ffn_dim=128, num_heads=2, num_layers=1, text_dim=16, in_channels=4,
                        out_channels=4, freq_dim=32))


def build(shape: dict, backend: str, topk: float, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Inputs and modules of every case: x (B, L, dim), q/k/v in both layouts, rope, the two blocks."""
    import turbo_infer.layers.lowbit_attention  # noqa: F401  (registers sage / sagesla)
    import turbo_infer.layers.sla  # noqa: F401  (registers sla)

    options = dict(topk=topk, block_q=shape["block_q"], block_k=shape["block_k"])
    base = shape["preset"] or shape["config"]
    cfg = get_config(base, attention=backend, attention_options=options)
    g = torch.Generator().manual_seed(seed)
    L = shape["grid"][0] * shape["grid"][1] * shape["grid"][2]
    H, D = cfg.num_heads, cfg.head_dim
    block = WanSelfAttention(cfg)
    with torch.no_grad():  # a trained-looking proj_l: zero would let a kernel skip the linear branch's use
        for m in block.modules():
            if hasattr(m, "proj_l"):
                m.proj_l.weight.normal_(std=D ** -0.5, generator=g)
    block = block.to(device, dtype).eval()
    dense = WanSelfAttention(get_config(base, attention="sdpa")).to(device, dtype).eval()
    dense.load_state_dict({k: v for k, v in block.state_dict().items() if "proj_l" not in k})
    blh = [torch.randn(1, L, H, D, generator=g).to(device, dtype) for _ in range(3)]  # (B, L, H, D)
    strided = [t.transpose(1, 2) for t in blh]  # (B, H, L, D) views, the model's layout
    contiguous = [t.contiguous() for t in strided]
    x = torch.randn(1, L, cfg.dim, generator=g).to(device, dtype)
    rope = RoPE3D(D, cfg.rope_theta).freqs(tuple(shape["grid"]), torch.device(device))
    attn = block.attn
    w, b = attn.proj_l.weight, attn.proj_l.bias
    return dict(cfg=cfg, block=block, dense=dense, strided=strided, contiguous=contiguous, x=x, rope=rope,
                attn=attn, kernel=lambda q, k, v: sla_attention(q, k, v, w, b, topk, shape["block_q"], shape["block_k"]))


def cases(s: dict) -> dict:
    """{case: zero-argument callable}."""
    blk = s["block"]

    def rope_norm():
        B, L, _ = s["x"].shape
        q = blk.norm_q(s["x"]).view(B, L, blk.num_heads, blk.head_dim)
        k = blk.norm_k(s["x"]).view(B, L, blk.num_heads, blk.head_dim)
        return RoPE3D.rotate(q, *s["rope"]), RoPE3D.rotate(k, *s["rope"])

    def rope_norm_fused():
        from turbo_infer.layers.compile_ops import norm_rope

        return (norm_rope(s["x"], blk.norm_q.weight, *s["rope"], blk.num_heads, blk.norm_q.eps),
                norm_rope(s["x"], blk.norm_k.weight, *s["rope"], blk.num_heads, blk.norm_k.eps))

    return {
        "kernel_contiguous": lambda: s["kernel"](*s["contiguous"]),
        "kernel_strided": lambda: s["kernel"](*s["strided"]),
        "module": lambda: s["attn"](*s["strided"]),
        "rope_norm": rope_norm,
        "rope_norm_fused": rope_norm_fused,
        "self_attention": lambda: blk(s["x"], s["rope"]),
        "self_attention_sdpa": lambda: s["dense"](s["x"], s["rope"]),
    }


def check_tiny(topk: float, backend: str) -> int:
    """CPU: every case runs; strided and module outputs equal the contiguous kernel's."""
    s = build(TINY, backend, topk, "cpu", torch.float32)
    fns = cases(s)
    with torch.no_grad():
        out = {name: fn() for name, fn in fns.items()}
    ref = out["kernel_contiguous"]
    torch.testing.assert_close(out["kernel_strided"], ref, rtol=1e-5, atol=1e-5)
    if backend == "sla":  # sagesla quantizes: its module output is the low-bit approximation
        torch.testing.assert_close(out["module"], ref, rtol=1e-4, atol=1e-4)
    for fused, eager in zip(out["rope_norm_fused"], out["rope_norm"]):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    for name, o in out.items():
        shapes = [tuple(t.shape) for t in (o if isinstance(o, tuple) else (o,))]
        print(f"  {name:>20} ok {shapes}")
    return 0


def profile_top(fn, n: int = 10) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=n))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("sla", "sagesla"), default="sla", help="the sparse backend (default sla)")
    p.add_argument("--topk", type=float, default=0.1, help="fraction of key blocks kept (default 0.1)")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of the module case")
    p.add_argument("--tiny", action="store_true", help="CPU check of the cases at a tiny shape (no timing, no JSON)")
    a = p.parse_args(argv)
    if not 0.0 < a.topk <= 1.0:
        p.error(f"--topk must be in (0, 1], got {a.topk}")
    if a.tiny:
        return check_tiny(a.topk, a.backend)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (use --tiny on the CPU)")
    s = build(FULL, a.backend, a.topk, "cuda", torch.bfloat16)
    h = Harness("sla_layer")
    tag = "" if a.backend == "sla" else "_sagesla"
    ms = {}
    with torch.no_grad():
        for name, fn in cases(s).items():
            ms[name] = h.measure(f"1.3b_topk{a.topk}", name, "fwd", fn)
            h.figure(f"sla_layer_{name}{tag}_ms", ms[name])
        h.figure(f"sla_layer_module_over_kernel{tag}", ms["module"] / ms["kernel_contiguous"])
        h.figure(f"sla_layer_norm_rope_fusion{tag}", ms["rope_norm"] / ms["rope_norm_fused"])
        h.figure(f"sla_layer_block_speedup{tag}", ms["self_attention_sdpa"] / ms["self_attention"])
        if a.profile:
            profile_top(cases(s)["module"])
    h.print_table()
    h.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
