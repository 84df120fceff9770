"""Make a fresh process's first DiT call cheap: run the bundle's kernels once, on throwaway tensors, while
the weights are still being read.

A fresh process's first forward pays, besides the forward itself, every Triton kernel's first launch
(finding its specialization in Triton's on-disk cache, or compiling it, and loading the module) and the
first cuBLAS / cuDNN calls: 1.5 s of the Wan-1.3B h100 bundle's time to first video on an H200, where the
forward is ~0.25 s (BENCHMARKS.md "End to end"). None of that needs the weights: `prewarm_dit` builds a
one-block copy of the bundle's DiT (the same W8A8 layers, fused ops, attention backend and dtype), gives it
uninitialised tensors on the device (`to_empty`), and runs it once on zeros of the bundle's video size.
The kernels see the shapes, dtypes and alignments the real model will, so their specializations are
ready when it runs. `TurboPipeline.from_bundle(prewarm=True)` does this in a thread beside the weight
reads, which spend their time in file reads and copies on their own CUDA streams.

What it cannot cover: another video size than the manifest's `video` section (other sequence lengths may
specialize other kernels), and torch.compile (a compiled model traces its own graph).
"""
from __future__ import annotations

import copy
import time

import torch

# text states the prewarm's cross-attention sees: the text encoders' padded lengths
TEXT_LENGTHS = {"umt5": 512, "minilm": 32}


def one_block_manifest(manifest: dict) -> dict:
    """The manifest of a one-block copy of the bundle's DiT: num_layers 1 and the linears of block 0 plus the
    ones outside the blocks."""
    m = copy.deepcopy(manifest)
    m["model"]["config"]["num_layers"] = 1
    m["linears"] = {n: e for n, e in manifest["linears"].items()
                    if not n.startswith("blocks.") or n.startswith("blocks.0.")}
    return m


def latent_size(manifest: dict) -> tuple[int, int, int]:
    """(F', H', W') of the manifest's default video in the latent space of its VAE (Wan: 4x temporal and 8x
    spatial compression with the first frame apart; the toy codec: 4x spatial)."""
    v = manifest["video"]
    if manifest["vae"]["name"] == "toy_codec":
        from turbo_infer.vae import ToyCodec

        return ToyCodec().latent_shape(v["num_frames"], v["height"], v["width"])[1:]
    return (v["num_frames"] - 1) // 4 + 1, v["height"] // 8, v["width"] // 8  # the Wan VAE's (config not read here)


@torch.no_grad()
def prewarm_dit(manifest: dict, device, dtype: torch.dtype | None = None) -> float:
    """Run a one-block, uninitialised copy of the bundle's DiT once on zeros on `device` (see the module
    docstring); returns the seconds it took. Its outputs are garbage and are dropped: only the kernels'
    first launches matter."""
    from turbo_infer.bundle import build_transformer, cast_floats

    t = time.perf_counter()
    device = torch.device(device)
    m = one_block_manifest(manifest)
    dtype = dtype or getattr(torch, manifest["dtype"])
    model = build_transformer(m).to_empty(device=device)
    quantized = {n for n, e in m["linears"].items() if e["precision"] != "bf16"}
    model.load_state_dict(cast_floats(model.state_dict(), dtype, quantized), assign=True)
    model = model.eval().requires_grad_(False)
    cfg = model.config
    f, h, w = latent_size(manifest)
    x = torch.zeros(1, cfg.in_channels, f, h, w, device=device, dtype=dtype)
    ctx = torch.zeros(1, TEXT_LENGTHS.get(manifest["text_encoder"]["name"], 512), cfg.text_dim, device=device,
                      dtype=dtype)
    model(x, torch.full((1,), 999.0, device=device), ctx)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return time.perf_counter() - t


__all__ = ["TEXT_LENGTHS", "latent_size", "one_block_manifest", "prewarm_dit"]
