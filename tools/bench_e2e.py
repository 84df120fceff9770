"""End-to-end speed at the Wan2.1-1.3B shape (480p, 81 frames): 50-step CFG baseline vs the 4-step h100 bundle.

    python tools/bench_e2e.py                      # one H100 run, ~4-5 min; figures -> benchmarks/e2e.json
    python tools/bench_e2e.py --tiny               # the same code path on a CPU at tiny configs (a temp dir)
    python tools/bench_e2e.py --skip-baseline --skip-text --skip-vae --skip-turbo --with-14b --merge
                                                   # 14B 720p alone, merged into the existing e2e.json

All weights are RANDOM at the real configs (tools/e2e_setup.py): speed only. Stages, each timed and
logged with a timestamp:
  1. baseline   WanModel wan2.1-1.3b, sdpa attention, bf16, eager; the median of --reps timed
                forwards at batch 2 (cond + uncond in one batch, as turbo_infer.samplers does CFG).
                baseline DiT seconds = 50 x that forward: EXTRAPOLATED, 100 real forwards are not
                run (time budget). A profiled forward gives its attention / linear / other split.
  2. bundle     a random SLA-layout checkpoint (topk 0.1) written with save_wan_checkpoint, exported
                by turbo_train.export.export_bundle for target h100 (sagesla attention, every
                quantizable linear fp8), loaded with TurboPipeline.from_bundle on cuda (sha256
                verified). --activations static (the default, as recipes/toy/calibrate.yaml): that
                bundle (dynamic per-token scales, no plan) runs the sampler once to record each W8A8
                layer's input amax, and the bundle is exported again with a stand-in plan carrying
                those static scales (e2e_setup.standin_plan: random weights, nothing calibrated);
                the headline runs that one. --activations dynamic: the first bundle is the headline.
  3. text       umT5-XXL encoder (UMT5EncoderModel at the real config, random, bf16, built on the
                GPU) behind the project's UMT5TextEncoder code path with a synthetic 256 384-piece
                tokenizer; encode of one prompt padded to 512 tokens (tokenization included).
  4. VAE        a random AutoencoderKLWan (Wan2.1 config) written to disk and loaded with the
                project's WanVAE (fp32, as the Wan pipeline); decode of a 1x16x21x60x104 latent;
                once more with the other Conv3d weight layout (the runtime's default is
                channels_last_3d on CUDA: vae_decode_contiguous_s; on the CPU the reverse), (GPU) with
                torch.backends.cudnn.benchmark on (vae_decode_cudnn_benchmark_s), and once in bf16
                (vae_decode_bf16_s, with the PSNR of its video against the fp32 one).
  5. turbo DiT  the bundle's 4-step rcm sampler over its DiT, wall time per video (4 forwards, no
                CFG), eager and with torch.compile of each block (regional; compile time printed);
                the faster is the headline. The other sparse backend (sla vs sagesla, same proj_l)
                is timed eager for comparison. Breakdown: tools/e2e_breakdown.py (profiler scopes
                around attention backends and linears, CUDA kernel time per class); attention and
                linear are kernel seconds of a profiled eager run, other = headline - both (all
                three scaled down to the wall time where the kernels add up to more).
  6. full       pipe.generate() of one video: text encode + 4-step DiT + VAE decode + uint8.
  7. first video  a fresh `python` process that loads the umT5 encoder, the VAE and the bundle
                from the files written above (page cache warmed first; Triton / Inductor caches
                warm from this process; --ttfv-background: the encoder and VAE in background
                threads while the DiT loads), compiles if the headline did, runs the DiT once on
                zeros, generates one video and writes the mp4; the figure is the time from the
                launch to the mp4 written and closed (ttfv_process_wall_s: until the process exited),
                launched --ttfv-runs times one after another (the figure is the last launch, the
                first is ttfv_first_launch_s).
  8. 14B 720p   (--with-14b) the 14B DiT built in memory with the export's choices (sagesla, fp8),
                4-step rcm at 720p x 81 frames; not written as a bundle.
Figures: benchmarks/e2e.json (and $OUT/e2e.json) with e2e_1.3b_480p_speedup, e2e_1.3b_480p_turbo_s,
e2e_1.3b_480p_full_s, time_to_first_video_1.3b_s, e2e_14b_720p_turbo_s (--with-14b),
e2e_1.3b_480p_turbo_{attention,linear,other}_s, text_encode_s, vae_decode_s, baseline_forward_ms
and more; "notes" in the JSON say how each was measured. Chart: benchmarks/e2e_breakdown.png.
--tiny writes both into WORKDIR/results (never benchmarks/, never $OUT).
"""
from __future__ import annotations

import time

STARTED = time.time()  # the interpreter reached this file: imports from here on (the ttfv child's startup split)

import argparse
import gc
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path

import turbo_infer  # noqa: F401,E402  (before torch: reads turbo-infer --prepare's bytecode cache when there is one)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_harness import REPO, Harness  # noqa: E402
from e2e_breakdown import breakdown_chart, format_top, profile_breakdown, split_wall  # noqa: E402
from e2e_setup import (PROMPT, SHAPES, FirstKernelCalls, LatentOnlyVAE, RandomContext, dir_bytes, in_memory_umt5_encoder,  # noqa: E402
                       apply_scales, random_dit, random_umt5, random_wan_vae, restore_scales, set_static_scales,
                       standin_plan, static_scales, synthetic_umt5_tokenizer, video_sink, warm_page_cache)

BASELINE_STEPS = 50  # Wan2.1 T2V default: 50 UniPC steps, CFG 5 (each step one batch-2 forward)
TAG = "1.3b_480p"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `reps` calls of fn() after `warmup` untimed ones, synchronised around each."""
    for _ in range(warmup):
        fn()
        sync(device)
    out = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def free() -> None:
    import torch._dynamo

    torch._dynamo.reset()  # compiled blocks keep references to their modules
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- model surgery


def set_attention(model, backend: str, options: dict) -> list:
    """Give every block's self-attention the backend `backend` (sharing the old module's SLA
    proj_l when both have one); returns the old modules for `restore_attention`."""
    from turbo_infer.layers.attention import make_attention
    from turbo_infer.models.wan import backend_options

    old = []
    for block in model.blocks:
        prev = block.self_attn.attn
        new = make_attention(backend, block.self_attn.head_dim, **backend_options(options))
        if hasattr(prev, "proj_l") and hasattr(new, "proj_l"):
            new.proj_l = prev.proj_l
        block.self_attn.attn = new.to(next(model.parameters()).device)
        old.append(prev)
    return old


def restore_attention(model, old: list) -> None:
    for block, prev in zip(model.blocks, old):
        block.self_attn.attn = prev


# ----------------------------------------------------------------------------- stages


@torch.no_grad()
def bench_baseline(args, shape, device, dtype, fig, notes):
    """50-step CFG baseline: median batch-2 eager forward x 50, plus its profiled breakdown."""
    from dataclasses import replace

    cfg = replace(shape.dit_config(), attention="sdpa", attention_options={})
    model = random_dit(cfg, device, dtype)
    f, h, w = (shape.frames - 1) // 4 + 1, shape.height // 8, shape.width // 8
    x = torch.randn(2, cfg.in_channels, f, h, w, device=device)
    t = torch.full((2,), 500.0, device=device)
    ctx = torch.randn(2, shape.text_len, cfg.text_dim, device=device, dtype=dtype)
    times = timed(lambda: model(x, t, ctx), device, args.reps)
    fwd = statistics.median(times)
    log(f"baseline forward (batch 2, eager {dtype}): {[round(s, 3) for s in times]} s, median {fwd:.3f} s "
        f"-> {BASELINE_STEPS} steps = {BASELINE_STEPS * fwd:.1f} s (extrapolated)")
    fig["baseline_forward_ms"] = fwd * 1e3
    fig[f"e2e_{TAG}_baseline_s"] = BASELINE_STEPS * fwd
    notes["baseline"] = (f"e2e_{TAG}_baseline_s = {BASELINE_STEPS} x baseline_forward_ms: the median of {args.reps} "
                         f"timed batch-2 (cond + uncond, CFG) eager {str(dtype).removeprefix('torch.')} forwards of "
                         f"WanModel wan2.1-1.3b with sdpa attention, EXTRAPOLATED to {BASELINE_STEPS} steps (100 "
                         f"real forwards were not run: time budget)")
    if not args.skip_profile:
        br = profile_breakdown(model, lambda: model(x, t, ctx), device.type)
        log(f"baseline forward breakdown (linked {br['linked_fraction']:.1%} of kernel time):\n{format_top(br)}")
        for c, v in split_wall(br["seconds"], fwd, eager=True).items():
            fig[f"e2e_{TAG}_baseline_{c}_s"] = BASELINE_STEPS * v


def write_checkpoint(args, shape, device, dtype, work: Path) -> Path:
    """A random checkpoint in the SLA-tuned layout (proj_l present, config attention=sla), the
    kind turbo-export gets after SLA fine-tuning."""
    from dataclasses import replace

    from turbo_infer.models.wan_keys import save_wan_checkpoint
    from turbo_train.export import SLA_DEFAULTS

    cfg = replace(shape.dit_config(), attention="sla", attention_options=dict(SLA_DEFAULTS, topk=args.topk))
    model = random_dit(cfg, device, dtype, seed=1)
    path = work / "dit" / "dit.safetensors"
    save_wan_checkpoint(model, path)
    del model
    free()
    log(f"wrote the random SLA-layout DiT checkpoint: {path} ({dir_bytes(path) / 2**30:.2f} GiB)")
    return path


@torch.no_grad()
def setup_text(args, shape, device, dtype, work: Path, write: bool, fig, notes):
    """umT5-XXL at the real config, random; written to disk (for the fresh process) when `write`;
    encode timed through the UMT5TextEncoder code path. Returns (encoder, directory)."""
    t = time.perf_counter()
    model = random_umt5(shape.umt5, device, dtype)
    tok = synthetic_umt5_tokenizer(shape.umt5["vocab_size"])
    n = sum(p.numel() for p in model.parameters())
    log(f"umT5 encoder built: {n / 1e9:.2f}B parameters, {dtype}, {time.perf_counter() - t:.1f} s")
    te_dir = work / "umt5"
    tok.save_pretrained(te_dir)
    if write:
        t = time.perf_counter()
        model.save_pretrained(te_dir)
        log(f"wrote umT5 to {te_dir}: {dir_bytes(te_dir) / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s")
    enc = in_memory_umt5_encoder(model, tok, device, dtype, shape.text_len)
    times = timed(lambda: enc.encode([PROMPT]), device, max(args.reps, 5))
    fig["text_encode_s"] = statistics.median(times)
    log(f"text encode ({shape.text_len} tokens): median {fig['text_encode_s'] * 1e3:.1f} ms")
    # the same weights through transformers' UMT5EncoderModel: the runtime module's speed and agreement
    batch = tok([PROMPT], padding="max_length", truncation=True, max_length=shape.text_len, return_tensors="pt")
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    ref = lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None].to(dtype)  # noqa: E731
    times = timed(ref, device, max(args.reps, 5))
    fig["text_encode_transformers_s"] = statistics.median(times)
    want, got = ref().float(), enc.encode([PROMPT]).float()
    fig["text_encode_native_vs_transformers_rel"] = float((got - want).norm() / want.norm().clamp_min(1e-12))
    log(f"the same through transformers' UMT5EncoderModel: median {fig['text_encode_transformers_s'] * 1e3:.1f} ms; "
        f"relative difference from the runtime's module {fig['text_encode_native_vs_transformers_rel']:.2e} ({dtype})")
    notes["text_encode"] = (f"UMT5TextEncoder code path (tokenize, encode with mask, zero padding; no cache) around "
                            f"the runtime's own umT5 module (turbo_infer.models.umt5) holding a random "
                            f"UMT5EncoderModel's weights at umT5-XXL's config ({n / 1e9:.2f}B params, "
                            f"{dtype}) and a synthetic {shape.umt5['vocab_size']}-piece unigram tokenizer; one "
                            f"prompt padded to {shape.text_len} tokens; median of {max(args.reps, 5)}")
    return enc, te_dir


@torch.no_grad()
def setup_vae(args, shape, device, work: Path, fig, notes):
    """Wan2.1 VAE, random, written to disk and loaded with turbo_infer.vae.WanVAE; decode timed."""
    from turbo_infer.vae import WanVAE, conv3d_memory_format

    model = random_wan_vae(shape.vae, device)
    vae_dir = work / "vae"
    model.save_pretrained(vae_dir)
    del model
    vae = WanVAE(vae_dir, device=device)
    z = torch.randn(1, *vae.latent_shape(shape.frames, shape.height, shape.width), device=device)
    times = timed(lambda: vae.decode(z), device, args.reps)
    fig["vae_decode_s"] = statistics.median(times)
    log(f"VAE decode of latent {tuple(z.shape)}: {[round(s, 3) for s in times]} s")
    notes["vae_decode"] = (f"turbo_infer.vae.WanVAE ({'the runtime decoder' if vae.native else 'diffusers'}, fp32, "
                           f"Conv3d weights "
                           f"{'channels_last_3d' if vae.channels_last else 'contiguous'}: the runtime's default on "
                           f"{device.type}) loaded from a random diffusers AutoencoderKLWan at the Wan2.1 config "
                           f"written to disk; decode of a {tuple(z.shape)} latent, median of {args.reps}; "
                           f"vae_decode_contiguous_s / vae_decode_channels_last_s: the other layout")
    if vae.native:  # the runtime's own decoder against diffusers' on the same weights: speed and agreement
        raw = z * vae.latents_std.to(device) + vae.latents_mean.to(device)
        full = vae.full_model
        conv3d_memory_format(full, torch.channels_last_3d if vae.channels_last else torch.contiguous_format)
        ref_dec = lambda: full.decode(raw, return_dict=False)[0].float().clamp(-1.0, 1.0)  # noqa: E731
        times = timed(ref_dec, device, args.reps)
        fig["vae_decode_diffusers_s"] = statistics.median(times)
        diff = float((vae.decode(z) - ref_dec()).abs().max())
        fig["vae_decode_native_vs_diffusers_max_abs"] = diff
        log(f"VAE decode through diffusers' AutoencoderKLWan (same weights): {[round(t, 3) for t in times]} s; "
            f"largest difference from the runtime's decoder {diff:.2e}")
        notes["vae_decode_diffusers"] = ("vae_decode_diffusers_s: the same latent through diffusers' "
                                         "AutoencoderKLWan.decode (the runtime decodes with its own "
                                         "turbo_infer.models.wan_vae); *_max_abs: largest |difference| of the two "
                                         "videos in [-1, 1]")
        vae._full = None
        del full
        free()
    if not args.skip_channels_last:  # the other Conv3d weight layout than the runtime's default here
        default = vae.channels_last
        other = "contiguous" if default else "channels_last"
        vae.set_channels_last(not default)
        times = timed(lambda: vae.decode(z), device, args.reps)
        vae.set_channels_last(default)
        fig[f"vae_decode_{other}_s"] = statistics.median(times)
        log(f"VAE decode, conv weights {other}: {[round(s, 3) for s in times]} s")
    if device.type == "cuda":  # cuDNN's measured algorithm choice for the causal 3D convs (default: heuristics)
        prev = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:  # timed's untimed warm-up call runs cuDNN's search for the new shapes
            times = timed(lambda: vae.decode(z), device, args.reps)
        finally:
            torch.backends.cudnn.benchmark = prev
        fig["vae_decode_cudnn_benchmark_s"] = statistics.median(times)
        log(f"VAE decode, torch.backends.cudnn.benchmark=True: {[round(s, 3) for s in times]} s")
    # bf16 decode: the speed, and how far its video is from the fp32 one (random weights: a check that
    # nothing overflows, not a quality figure for trained weights)
    ref = vae.decode(z)
    vae.to(dtype=torch.bfloat16)
    try:
        times = timed(lambda: vae.decode(z), device, args.reps)
        out = vae.decode(z)
    finally:
        vae.to(dtype=torch.float32)
    mse = float((out - ref).pow(2).mean())
    fig["vae_decode_bf16_s"] = statistics.median(times)
    fig["vae_decode_bf16_psnr_db"] = 10 * math.log10(4.0 / max(mse, 1e-20))  # video in [-1, 1]: peak-to-peak 2
    log(f"VAE decode in bf16: {[round(s, 3) for s in times]} s; PSNR vs the fp32 decode "
        f"{fig['vae_decode_bf16_psnr_db']:.1f} dB (random weights)")
    notes["vae_decode_bf16"] = ("the same WanVAE cast to bf16 (latents in bf16, video back to fp32): median decode "
                                "time, and PSNR of its video against the fp32 decode of the same latent (random "
                                "weights: not a quality figure for trained ones)")
    del ref, out
    return vae, vae_dir


def bundle_sampler(pipe, shape, device):
    """(sample, noise, context): sample(model) runs the bundle's sampler with its defaults over `model` (the DiT, or
    GraphedDiT around it) from fixed noise (seed 0) and PROMPT's context, as generate() would without text and VAE."""
    from turbo_infer.samplers import batch_randn, get_sampler

    d = pipe.sample_defaults
    sampler = get_sampler(d["sampler"])
    context = pipe.text_encoder.encode([PROMPT])  # (1, L, 4096)
    uncond = pipe.text_encoder.empty_embedding() if d["guidance"] != 1.0 else None
    noise = batch_randn(pipe.vae.latent_shape(shape.frames, shape.height, shape.width), pipe.generators(1, 0), device)

    def sample(model):
        return sampler.sample(model, noise, context, uncond=uncond, guidance=d["guidance"], steps=d["steps"],
                              dtype=pipe.dtype, generators=pipe.generators(1, 0))
    return sample, noise, context


@torch.no_grad()
def bench_turbo(args, shape, device, pipe, fig, notes, clock_ok) -> bool:
    """The bundle's sampler over its DiT: eager, the other sparse backend, profile, compiled.
    Returns True when the compiled blocks are kept (they were faster)."""
    d = pipe.sample_defaults
    steps = d["steps"]
    sample, noise, context = bundle_sampler(pipe, shape, device)

    def dit():
        return sample(pipe.transformer)

    model = pipe.transformer
    att = pipe.manifest["attention"]
    t = time.perf_counter()
    dit()
    sync(device)
    log(f"turbo DiT first call (kernel JIT / autotune): {time.perf_counter() - t:.1f} s")
    eager = statistics.median(timed(dit, device, args.reps, warmup=0))
    fig[f"e2e_{TAG}_turbo_eager_s"] = eager
    log(f"turbo DiT, {d['sampler']} {steps} steps, {att['backend']} attention, eager: {eager:.3f} s")

    other = {"sagesla": "sla", "sla": "sagesla"}.get(att["backend"])
    if other and not args.skip_attention_compare and clock_ok("attention comparison"):
        old = set_attention(model, other, {k: v for k, v in att.items() if k != "backend"})
        try:
            alt = statistics.median(timed(dit, device, args.reps))
            fig[f"e2e_{TAG}_turbo_eager_{other}_s"] = alt
            log(f"turbo DiT with {other} attention instead (same proj_l), eager: {alt:.3f} s")
        finally:
            restore_attention(model, old)

    if not args.skip_gemm_compare and device.type == "cuda" and clock_ok("GEMM comparison"):
        # the W8A8 GEMMs' other tile paths (pointer loads; descriptor tiles with one program per tile; the default:
        # descriptors on a persistent grid with flattened loops): the DiT eager with each, the module default
        # swapped for the call and restored (--ab times such variants interleaved, which a drifting host needs)
        import dataclasses

        import turbo_kernels.gemm.w8a8 as w8a8_mod
        default = w8a8_mod.DEFAULT_GEMM_CONFIG
        for tag, change in (("gemm_pointers", dict(tma=False)),
                            ("gemm_tma_one_tile", dict(tma=True, persistent=False, flatten=False)),
                            ("gemm_tma_flat", dict(tma=True, persistent=True, flatten=True))):
            if dataclasses.replace(default, **change) == default:
                continue  # that is the default, timed above
            w8a8_mod.DEFAULT_GEMM_CONFIG = dataclasses.replace(default, **change)
            try:
                alt = statistics.median(timed(dit, device, args.reps))
                fig[f"e2e_{TAG}_turbo_eager_{tag}_s"] = alt
                log(f"turbo DiT with W8A8 GEMM config {w8a8_mod.DEFAULT_GEMM_CONFIG}, eager: {alt:.3f} s")
            finally:
                w8a8_mod.DEFAULT_GEMM_CONFIG = default

    if not args.skip_profile:
        br = profile_breakdown(model, dit, device.type)
        parts = br["seconds"]
        log(f"turbo DiT breakdown (eager, linked {br['linked_fraction']:.1%} of kernel time): attention "
            f"{parts['attention']:.3f} s, linear {parts['linear']:.3f} s, other kernels {parts['other']:.3f} s\n"
            f"{format_top(br)}")

    compiled = None
    if not args.skip_compile and clock_ok("torch.compile"):
        x = noise.to(pipe.dtype)
        ts = torch.full((1,), 900.0, device=device)
        ref = model(x, ts, context)
        model.compile_blocks(args.compile_backend, args.compile_mode)
        try:
            t = time.perf_counter()
            dit()
            sync(device)
            warm = time.perf_counter() - t
            compiled = statistics.median(timed(dit, device, args.reps, warmup=0))
            rel = ((model(x, ts, context) - ref).float().norm() / ref.float().norm()).item()
            import torch._dynamo.utils as dyn_utils
            counters = {k: dict(v) for k, v in dyn_utils.counters.items() if k in ("stats", "graph_break", "unimplemented")}
            log(f"dynamo counters after compiling: {json.dumps(counters, default=str)[:1500]}")
            fig[f"e2e_{TAG}_turbo_compiled_s"] = compiled
            fig[f"e2e_{TAG}_turbo_compile_warmup_s"] = warm
            log(f"turbo DiT, torch.compile per block ({args.compile_backend}): first call {warm:.1f} s, then "
                f"{compiled:.3f} s (vs eager {eager:.3f} s); compiled vs eager forward relative error {rel:.2e}")
            fused = model.blocks[0].fused_norm_quant
            if fused and clock_ok("compiled without the fused norm inputs"):
                # the fused norm + quantization ops are opaque to Inductor, which otherwise fuses the
                # LayerNorm and modulation with the residual and gate arithmetic around them: which wins?
                model.fuse_norm_quant(False)
                dit()  # recompiles for the other branch
                plain = statistics.median(timed(dit, device, args.reps, warmup=0))
                fig[f"e2e_{TAG}_turbo_compiled_plain_norm_s"] = plain
                log(f"turbo DiT compiled, LayerNorm + modulation left to Inductor (no fused norm + quantization "
                    f"op): {plain:.3f} s (vs {compiled:.3f} s with it)")
                if plain < compiled:
                    compiled = plain
                    notes["compiled_norm"] = "headline compiled run without the fused norm inputs (faster)"
                else:
                    model.fuse_norm_quant(True)
            if not args.skip_residual_compare and clock_ok("compiled, the other residual placement"):
                # the blocks' residual adds after the W8A8 output projections: in the GEMMs' epilogues ("always",
                # the default since session 29) or as the block's formula, which Inductor fuses ("eager": the
                # epilogue only in eager runs); same run, both compiled
                from turbo_infer.models import wan as wan_mod
                default = wan_mod.EPILOGUE_RESIDUALS
                other = "eager" if default == "always" else "always"
                wan_mod.EPILOGUE_RESIDUALS = other
                try:
                    dit()  # recompiles (the setting is guarded)
                    alt = statistics.median(timed(dit, device, args.reps, warmup=0))
                finally:
                    wan_mod.EPILOGUE_RESIDUALS = default
                where = {"always": "added in the GEMM epilogues", "eager": "added by Inductor's fused formula"}
                name = "residual_epilogue" if other == "always" else "residual_formula"
                fig[f"e2e_{TAG}_turbo_compiled_{name}_s"] = alt
                log(f"turbo DiT compiled, residuals {where[other]}: {alt:.3f} s (vs {compiled:.3f} s "
                    f"{where.get(default, default)}, the default)")
                dit()  # back to the default's graphs
        except Exception as e:  # a compile failure must not lose the eager figures
            log(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); keeping eager")
            notes["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            compiled = None
        if compiled is None or compiled >= eager:
            model.uncompile_blocks()
    use_compiled = compiled is not None and compiled < eager
    turbo = compiled if use_compiled else eager
    how = f"torch.compile per block ({args.compile_backend})" if use_compiled else "eager"
    if args.ab and clock_ok("A/B variants"):
        bench_ab(args, dit, device, fig, notes, "compiled" if use_compiled else "eager", model, use_compiled)
    if not args.skip_cuda_graph and device.type == "cuda" and clock_ok("CUDA graph"):
        graphed = bench_cuda_graph(args, model, sample, noise.to(pipe.dtype), context, device, fig,
                                   "compiled" if use_compiled else "eager")
        if graphed is not None and graphed < turbo:
            turbo, how = graphed, how + ", replayed from one CUDA graph per forward (GraphedDiT)"
    fig[f"e2e_{TAG}_turbo_s"] = turbo
    if not args.skip_other_scales and clock_ok("the other activation scales"):
        bench_other_scales(args, model, dit, device, use_compiled, fig, notes)
    if not args.skip_profile:
        for c, v in split_wall(parts, turbo, eager=not use_compiled).items():
            fig[f"e2e_{TAG}_turbo_{c}_s"] = v
    prec = {}
    for e in pipe.manifest["linears"].values():
        prec[e["precision"]] = prec.get(e["precision"], 0) + 1
    notes["turbo"] = (f"h100 bundle (attention {att}, linears {prec}, {pipe.manifest['dtype']}) loaded with "
                      f"TurboPipeline.from_bundle; wall time of the bundle's {d['sampler']} sampler, {steps} DiT "
                      f"forwards at batch 1 (no CFG) incl. its noise draws, median of {args.reps}; headline "
                      f"e2e_{TAG}_turbo_s = {how} (the faster of those measured)")
    notes["breakdown"] = ("torch.profiler, one eager run; CUDA kernel time charged by the launching op's scope: "
                          "attention = kernels inside the self-attention backend modules (incl. their block map, "
                          "linear branch and proj_l) and inside aten::scaled_dot_product_attention (cross-attention); "
                          "linear = kernels inside nn.Linear / W8A8Linear (GEMMs, bias, W8A8 per-token quantization); "
                          "unlinked kernels by name; the scopes' own GPU-timeline spans are not kernels and are "
                          "left out. *_attention_s and *_linear_s are those kernel seconds of the eager run; "
                          "*_other_s = the headline wall time (compiled if that was faster) - attention - linear "
                          "(norms, modulation, RoPE, elementwise, launch gaps); where the profiled kernels add up "
                          "to more than the wall time, all three are scaled down to it (tools/e2e_breakdown.py "
                          "split_wall). Baseline: the same on one forward, x50.")
    return use_compiled


@torch.no_grad()
def bench_cuda_graph(args, model, sample, x, context, device, fig, how: str):
    """`sample` (the bundle's sampler, given the model to run) over `GraphedDiT(model)` (each forward one CUDA graph
    replay): recording time (first call), wall time (median of --reps) and the relative difference of one forward on
    x from the model's own. Returns the wall time, or None when recording failed (the forwards then ran eagerly)."""
    from turbo_infer.cuda_graph import GraphedDiT

    graphed = GraphedDiT(model)

    def dit_graph():
        return sample(graphed)
    t = time.perf_counter()
    dit_graph()
    sync(device)
    first = time.perf_counter() - t
    if graphed.num_graphs == 0:
        log("CUDA graph: recording failed, see the warning above; no figure")
        return None
    wall = statistics.median(timed(dit_graph, device, args.reps, warmup=0))
    ts = torch.full((1,), 900.0, device=device)
    ref = model(x, ts, context)
    rel = ((graphed(x, ts, context) - ref).float().norm() / ref.float().norm()).item()
    fig[f"e2e_{TAG}_turbo_cuda_graph_s"] = wall
    fig[f"e2e_{TAG}_turbo_cuda_graph_record_s"] = first
    log(f"turbo DiT ({how}) replayed from CUDA graphs ({graphed.num_graphs} recorded): first call {first:.1f} s, "
        f"then {wall:.3f} s; graph vs direct forward relative difference {rel:.2e}")
    graphed.reset()
    return wall


# --ab settings that change the model instead of a module constant: "@static" gives every W8A8 layer the static
# per-tensor activation scale of a calibrated bundle (`static_scales`, recorded once before the rounds), "@dynamic"
# per-token scales (a bundle exported without a plan)
MODEL_SETTINGS = ("@static", "@dynamic")


def parse_ab(spec: str) -> tuple[str, list[str]]:
    """--ab NAME=SETTING[;SETTING...] -> (NAME, [SETTING, ...]), each SETTING as --set takes it or one of
    MODEL_SETTINGS."""
    name, sep, rest = spec.partition("=")
    settings = [x for x in rest.split(";") if x]
    if not sep or not name or not settings or not all(x in MODEL_SETTINGS or (":" in x and "=" in x)
                                                      for x in settings):
        raise SystemExit(f"--ab {spec!r}: expected NAME=MODULE:NAME[.FIELD]=VALUE[;MODULE:...=VALUE] or "
                         f"NAME={'|'.join(MODEL_SETTINGS)}")
    return name, settings


def record_static_scales(args, model, dit, use_compiled: bool) -> dict:
    """{W8A8 layer name: static activation scale} from one forward's input amax (`static_scales`); the model
    keeps its own scales (the blocks eager while recording when they were compiled)."""
    if use_compiled:
        model.uncompile_blocks()  # record the amax eagerly (hooks, no graph breaks)
    try:
        return static_scales(model, dit)
    finally:
        if use_compiled:
            model.compile_blocks(args.compile_backend, args.compile_mode)


def current_scales(model) -> dict:
    """{W8A8 layer name: its static activation scale, or None for per-token scales}."""
    from turbo_infer.quant import W8A8Linear

    return {n: m.act_scale for n, m in model.named_modules() if isinstance(m, W8A8Linear)}


def dynamic_scales(model) -> dict:
    """{W8A8 layer name: None}: every layer with dynamic per-token scales (`apply_scales`)."""
    return dict.fromkeys(current_scales(model))


def _apply_ab(spec: str, model, static: dict | None):
    """Apply one --ab setting; returns the function that undoes it."""
    import importlib

    if spec in MODEL_SETTINGS:
        old = apply_scales(model, static if spec == "@static" else dynamic_scales(model))
        return lambda: restore_scales(model, old)
    module_name, attr, before = apply_setting(spec, quiet=True)
    return lambda: setattr(importlib.import_module(module_name), attr, before)


def _rel_diff(a, b) -> float | None:
    """Relative L2 difference of two sampler outputs (None where they are not tensors)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def bench_ab(args, dit, device, fig, notes, how: str, model=None, use_compiled: bool = False) -> None:
    """The DiT with each --ab variant's settings against the code's own, interleaved round by round (default, then
    each variant, --ab-rounds times; the settings are module constants the kernels' launchers read at call time, so
    compiled graphs need no recompile; "@static" swaps in static activation scales, whose compiled branch the
    untimed round compiles), so that a machine whose speed drifts over the run (seen on some lent hosts: ±15 %
    between runs of one process) charges the drift to all of them alike. Figures: per variant the minimum and the
    median of its rounds, min(variant) / min(default), and the relative difference of its untimed round's output
    from the default's (the same noise: 0 for pure tuning knobs). A first, untimed round runs every variant once."""
    variants = [("default", [])] + [parse_ab(spec) for spec in args.ab]
    static = None
    if any(s in MODEL_SETTINGS for _, settings in variants for s in settings) and model is None:
        raise SystemExit("--ab @static / @dynamic need the model")
    if any(s == "@static" for _, settings in variants for s in settings):
        static = record_static_scales(args, model, dit, use_compiled)
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    failed: dict[str, str] = {}
    first: dict[str, object] = {}
    for r in range(args.ab_rounds + 1):  # round 0 untimed: a variant's first run may compile its kernels
        for name, settings in variants:
            if name in failed:
                continue
            undo = []
            try:
                for spec in settings:
                    undo.append(_apply_ab(spec, model, static))
                if r:
                    times[name] += timed(dit, device, 1, warmup=0)
                else:
                    first[name] = dit()
                    sync(device)
            except Exception as e:  # noqa: BLE001  (a variant's kernels may not fit the device): drop it
                if name == "default":
                    raise
                failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
                log(f"A/B variant {name} failed, dropped: {failed[name]}")
            finally:
                for restore in reversed(undo):
                    restore()
    times = {name: ts for name, ts in times.items() if name not in failed}
    base = min(times["default"])
    for name, ts in times.items():
        fig[f"e2e_{TAG}_ab_{name}_min_s"] = min(ts)
        fig[f"e2e_{TAG}_ab_{name}_median_s"] = statistics.median(ts)
        diff = None if name == "default" else _rel_diff(first.get(name), first.get("default"))
        if name != "default":
            fig[f"e2e_{TAG}_ab_{name}_vs_default"] = min(ts) / base
            if diff is not None:
                fig[f"e2e_{TAG}_ab_{name}_rel_diff"] = diff
        log(f"A/B ({how}) {name}: min {min(ts):.3f} s, median {statistics.median(ts):.3f} s over {len(ts)} rounds "
            f"[{', '.join(f'{t:.3f}' for t in ts)}]" + ("" if name == "default" else f"; min vs default "
                                                          f"{min(ts) / base:.3f}")
            + ("" if diff is None else f"; output vs default rel. diff {diff:.2e}"))
    notes["ab"] = (f"A/B of the DiT ({how}), interleaved over {args.ab_rounds} rounds, one timed 4-step run per "
                   f"variant and round: " + "; ".join(f"{n}: {', '.join(s) or 'the code as committed'}"
                                                       for n, s in variants)
                   + "".join(f"; {n} failed: {err}" for n, err in failed.items())
                   + ("; @static = every W8A8 layer with the static activation scale amax / QMAX of its input over "
                      "one forward (a stand-in for calibration on random weights)" if static is not None else "")
                   + ("; @dynamic = every W8A8 layer with per-token scales"
                      if any("@dynamic" in s for _, s in variants) else ""))


def bench_other_scales(args, model, dit, device, use_compiled: bool, fig, notes) -> None:
    """The turbo DiT with the activation scales the headline bundle does not carry, timed in the headline's mode
    (compiled once more for that branch; the scale values are graph inputs), then the bundle's come back.
    Static per-tensor scales (a calibrated bundle's; here from one run's input amax, `record_static_scales`) let the
    up GEMM of every feed-forward block write the down layer's fp8 input in its epilogue, and no per-token amax pass
    runs anywhere; dynamic ones are what a bundle exported without a plan runs."""
    static = all(s is not None for s in current_scales(model).values())
    other = "dynamic" if static else "static"
    restore = _apply_ab(f"@{other}", model, None if static else record_static_scales(args, model, dit, use_compiled))
    how = "compiled" if use_compiled else "eager"
    try:
        dit()  # compile / JIT the other branch
        sync(device)
        wall = statistics.median(timed(dit, device, args.reps, warmup=0))
        fig[f"e2e_{TAG}_turbo_{other}_scales_s"] = wall
        log(f"turbo DiT with {other} activation scales ({how}): {wall:.3f} s")
        notes[f"{other}_scales"] = (
            f"e2e_1.3b_480p_turbo_{other}_scales_s: the same DiT with every W8A8 layer's activation scale made "
            + ("static (amax / QMAX of its input over one forward: a stand-in for calibration on random weights), as "
               "a calibrated bundle runs" if other == "static" else "dynamic (per token), as a bundle exported "
               "without a calibration plan runs") + f"; {how}, median of {args.reps}")
    finally:
        restore()  # the compiled blocks' branch for the bundle's scales is still cached


@torch.no_grad()
def bench_full(args, shape, device, pipe, fig, notes) -> None:
    """pipe.generate() of one video, end to end (everything warm)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(lambda: pipe.generate([PROMPT], num_frames=shape.frames, height=shape.height, width=shape.width,
                                        seed=0, progress=False), device, args.reps, warmup=0)
    fig[f"e2e_{TAG}_full_s"] = statistics.median(times)
    fig[f"e2e_{TAG}_full_sum_s"] = fig["text_encode_s"] + fig[f"e2e_{TAG}_turbo_s"] + fig["vae_decode_s"]
    if device.type == "cuda":
        fig[f"e2e_{TAG}_full_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    log(f"full pipeline (text + DiT + VAE + uint8): {[round(s, 3) for s in times]} s; "
        f"sum of the parts {fig[f'e2e_{TAG}_full_sum_s']:.3f} s")
    notes["full"] = (f"TurboPipeline.generate of one {shape.frames}x{shape.height}x{shape.width} video (text encode, "
                     f"DiT, VAE decode, uint8 to the CPU), median of {args.reps}, caches and kernels warm")


def bench_first_video(args, shape, bundle: Path, te_dir: Path, vae_dir: Path, work: Path, compiled: bool,
                      fig, notes) -> None:
    """Wall time of a fresh process: load umT5, VAE and DiT bundle from files, generate, write mp4."""
    t = time.perf_counter()
    n = warm_page_cache([te_dir, vae_dir, bundle])
    log(f"page cache warmed: read {n / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s")
    video, result = work / "first_video.mp4", work / "first_video.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ttfv-child", str(bundle), "--video", str(video),
           "--result", str(result), "--launched", repr(time.time())]
    cmd += ["--compile", "--compile-backend", args.compile_backend] if compiled else []
    cmd += ["--compile-mode", args.compile_mode] if compiled and args.compile_mode else []
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--ttfv-random-text"] if args.ttfv_random_text else []
    cmd += ["--ttfv-background"] if args.ttfv_background else []
    cmd += ["--ttfv-vae-dtype", args.ttfv_vae_dtype, "--ttfv-verify", args.ttfv_verify, "--ttfv-warmup", args.ttfv_warmup]
    cmd += ["--ttfv-prewarm"] if args.ttfv_prewarm else []
    if args.ttfv_prepare == "on":  # once, as a user does after installing: `turbo-infer --prepare --bundle DIR`
        prep = [sys.executable, "-m", "turbo_infer.cli", "--prepare", "--bundle", str(bundle), "--no-progress"]
        prep += ["--device", "cpu", "--allow-reference"] if args.tiny else []
        log(f"prepare: {' '.join(prep)}")
        t = time.perf_counter()
        proc = subprocess.run(prep, env=child_env(args, work))
        if proc.returncode != 0:
            log(f"turbo-infer --prepare failed (exit {proc.returncode}); no time_to_first_video figure")
            notes["time_to_first_video"] = f"turbo-infer --prepare failed with exit code {proc.returncode}"
            return
        fig["ttfv_prepare_s"] = time.perf_counter() - t
        log(f"prepared in {fig['ttfv_prepare_s']:.1f} s")
    walls = []
    for i in range(args.ttfv_runs):  # launch 1 fills the on-disk compile caches if the parent left gaps
        result.unlink(missing_ok=True)
        cmd[cmd.index("--launched") + 1] = repr(time.time())
        log(f"fresh process {i + 1}/{args.ttfv_runs}: {' '.join(cmd)}")
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=child_env(args, work))
        walls.append(time.perf_counter() - t)
        if proc.returncode != 0 or not result.is_file():
            log(f"first-video process failed (exit {proc.returncode}); no time_to_first_video figure")
            notes["time_to_first_video"] = f"fresh process {i + 1} failed with exit code {proc.returncode}"
            return
        log(f"launch {i + 1}: {walls[-1]:.2f} s")
    wall = walls[-1]
    child = json.loads(result.read_text())  # the last launch's phases
    # the figure: launch -> the mp4 written and closed, as the child measures it against the launch time;
    # the process's exit after that (freeing the GPU, interpreter teardown) delays no video: reported apart
    fig["time_to_first_video_1.3b_s"] = child["phases"]["total_s"]
    fig["ttfv_process_wall_s"] = wall
    fig["ttfv_first_launch_s"] = walls[0]
    for k, v in child["phases"].items():
        fig[f"ttfv_{k}"] = v
    if child.get("triton_first_calls"):  # the slowest first launches of the warm-up, for the log and notes
        top = list(child["triton_first_calls"].items())[:6]
        notes["ttfv_triton_first_calls"] = {k: round(v, 4) for k, v in top}
        log("warm-up: Triton first launches " + ", ".join(f"{k} {v:.3f} s" for k, v in top))
    log(f"time to first video: {child['phases']['total_s']:.2f} s to the mp4 ({wall:.2f} s until the process exited; "
        f"in-process phases {child['phases']}); {child['writer']}; "
        f"{video.stat().st_size / 2**20:.1f} MiB mp4")
    text = ("random weights built on the GPU by the child (--ttfv-random-text; NOT loaded from disk), tokenizer and "
            "config from disk" if args.ttfv_random_text else f"umT5 weights from {te_dir.name}/ on disk "
            f"({dir_bytes(te_dir) / 2**30:.1f} GiB)")
    warm = warmup_wanted(args.ttfv_warmup, compiled)
    notes["time_to_first_video"] = (f"from the launch of the last of {args.ttfv_runs} subprocesses `python "
                                    f"tools/bench_e2e.py --ttfv-child` until its mp4 is written and closed (the child's "
                                    f"clock against the launch time; ttfv_process_wall_s: until the process exited; launch "
                                    f"walls {[round(w, 2) for w in walls]} s, ttfv_first_launch_s is the first; interpreter "
                                    f"start and imports included): text encoder: {text}; VAE and the h100 bundle "
                                    f"from disk (bundle checked before loading, --ttfv-verify {args.ttfv_verify}: "
                                    f"{'sha256 of every file at every launch' if args.ttfv_verify == 'full' else 'sha256 hashed by launch 1 and recorded (turbo_infer.verified), later launches hash only files changed since'}"
                                    f"; this launch hashed {child['phases'].get('load_part_verify_files_hashed', '?')} "
                                    f"file(s)); page cache warmed by one read; Triton and "
                                    f"Inductor on-disk caches warm from the parent; "
                                    + ("TurboPipeline.from_bundle(background=True) (--ttfv-background): text encoder "
                                       "and VAE load in background threads while the DiT loads"
                                       if args.ttfv_background else
                                       "TurboPipeline.from_bundle loads text encoder, VAE and DiT one after the other")
                                    + (", then the DiT runs once on zeros " if warm else
                                       ", no warm-up forward (generate()'s first step pays the kernels' first launches) ")
                                    + f"({'torch.compile per block, cached artifacts' if compiled else 'eager'}; "
                                    f"VAE in {args.ttfv_vae_dtype}); "
                                    + ("after one `turbo-infer --prepare --bundle` (ttfv_prepare_s: Python bytecode of the "
                                       "runtime's imports cached by turbo_infer.pycache, bundle hashes recorded, kernels "
                                       "run once); " if args.ttfv_prepare == "on" else
                                       "without turbo-infer --prepare (TURBO_PYCACHE=0); ")
                                    + ("kernels prewarmed beside the loads (--ttfv-prewarm); " if args.ttfv_prewarm else "")
                                    + f"then one generate(), the mp4 ({child['writer']}) encoded in a thread while the "
                                    f"VAE decodes (TurboPipeline.decode_uint8 + video_io.write_mp4_stream)")


def warmup_wanted(mode: str, compiled: bool) -> bool:
    """--ttfv-warmup: whether the fresh process runs the DiT once on zeros (auto: only when compiling)."""
    return mode == "on" or (mode == "auto" and compiled)


def child_env(args, work: Path) -> dict:
    """The fresh processes' environment: this one's, with turbo-infer --prepare's bytecode cache under
    WORKDIR/pycache (--ttfv-prepare on) or its use turned off (off). Python's own bytecode settings
    (PYTHONDONTWRITEBYTECODE on the GPU image) are left as they are."""
    env = dict(os.environ, TURBO_PYCACHE_DIR=str(work / "pycache"))
    env.pop("PYTHONPYCACHEPREFIX", None)
    if args.ttfv_prepare == "off":
        env["TURBO_PYCACHE"] = "0"
    return env


def ttfv_child(args) -> int:
    """The fresh process of stage 7 (see bench_first_video); writes its phase times to --result.

    `TurboPipeline.from_bundle` loads text encoder, VAE and DiT (with --ttfv-background the first two in
    background threads, still loading when it returns); the DiT is compiled (if asked) and, with a warm-up
    (--ttfv-warmup; by default only when compiled), run once on zeros (compile caches, kernel JIT; meanwhile
    the background loads go on); then generate() and the streamed mp4."""
    from turbo_infer.background import Background
    from turbo_infer.bundle import read_manifest
    from turbo_infer.pipeline import TurboPipeline

    phases = {"startup_s": time.time() - args.launched,  # interpreter start + imports
              "startup_interpreter_s": STARTED - args.launched, "startup_imports_s": time.time() - STARTED}
    # the staged reads' throughput lines (turbo_infer.fastload) into the parent's log
    logging.basicConfig(level=logging.WARNING, format="  child %(name)s: %(message)s")
    logging.getLogger("turbo_infer.fastload").setLevel(logging.INFO)
    shape = SHAPES["tiny" if args.tiny else "real"]
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        torch.set_num_threads(1)
    manifest = read_manifest(args.ttfv_child)
    dtype = getattr(torch, manifest["dtype"])
    t = time.perf_counter()
    text = None
    if args.ttfv_random_text:
        from transformers import AutoTokenizer

        te_dir = Path(manifest["text_encoder"]["path"])

        def random_text():
            return in_memory_umt5_encoder(random_umt5(shape.umt5, device, dtype),
                                          AutoTokenizer.from_pretrained(str(te_dir)), device, dtype, shape.text_len)

        text = (Background("text encoder", random_text, dim=manifest["model"]["config"]["text_dim"])
                if args.ttfv_background else random_text())
    pipe = TurboPipeline.from_bundle(args.ttfv_child, device, text_encoder=text, allow_reference=args.tiny,
                                     background=args.ttfv_background, vae_dtype=getattr(torch, args.ttfv_vae_dtype),
                                     verify=args.ttfv_verify, prewarm=args.ttfv_prewarm)
    sync(device)
    # from_bundle: the DiT, then (sequential loads) the text encoder and VAE; with --ttfv-background
    # those two are still loading here
    phases["load_dit_s"] = time.perf_counter() - t
    phases.update({f"load_part_{k}": v for k, v in pipe.load_times.items()})  # verify_s, dit_s, (text_encoder_s, vae_s)
    t = time.perf_counter()
    if args.compile:
        pipe.transformer.compile_blocks(args.compile_backend, args.compile_mode)
    cfg = pipe.transformer.config
    kernels = FirstKernelCalls()  # Triton's first launches: in the warm-up, or in generate() without one
    warmup = warmup_wanted(args.ttfv_warmup, args.compile)
    if warmup:
        with torch.no_grad(), kernels:  # one DiT forward on zeros: compiles (or loads the compiled artifacts), JITs
            # Wan's latent geometry (the VAE may still be loading; generate() checks the real one)
            _, f, h, w = LatentOnlyVAE().latent_shape(shape.frames, shape.height, shape.width)
            x = torch.zeros(1, cfg.in_channels, f, h, w, device=device, dtype=pipe.dtype)
            ctx = torch.zeros(1, shape.text_len, cfg.text_dim, device=device, dtype=pipe.dtype)
            pipe.transformer(x, torch.full((1,), 999.0, device=device), ctx)
        sync(device)
    phases["warmup_dit_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for component in (pipe.text_encoder, pipe.vae):
        if isinstance(component, Background):
            component.result()
    phases["wait_text_vae_s"] = time.perf_counter() - t  # what the loads took beyond the DiT's load + warm-up
    for name, component in (("text_encoder", pipe.text_encoder), ("vae", pipe.vae)):
        if isinstance(component, Background):
            phases[f"load_part_{name}_background_s"] = component.seconds
    # generate() in its two parts (text encode + DiT steps, VAE decode)
    t = time.perf_counter()
    with (nullcontext() if warmup else kernels):
        latents = pipe.generate_latents([PROMPT], num_frames=shape.frames, height=shape.height, width=shape.width,
                                        seed=0, progress=False)
    sync(device)
    phases["generate_text_dit_s"] = time.perf_counter() - t
    phases["triton_first_calls_s"] = kernels.seconds  # Triton's cache lookups + module loads (warm-up or generate)
    # VAE decode with the mp4 encoded alongside (write_mp4_stream: each latent frame's block of frames goes to
    # the writer thread as soon as it is decoded); write_s is what the file took after the last block
    from turbo_infer.video_io import write_mp4_stream

    t1, decoded = time.perf_counter(), []

    def blocks():
        for block in pipe.decode_uint8(latents):
            yield block[0]
        decoded.append(time.perf_counter())

    sink, writer = video_sink()
    write_mp4_stream(args.video, blocks(), pipe.fps, sink=sink)
    phases["generate_vae_s"] = decoded[0] - t1
    phases["generate_s"] = decoded[0] - t
    phases["write_s"] = time.perf_counter() - decoded[0]
    phases["total_s"] = time.time() - args.launched
    Path(args.result).write_text(json.dumps({"phases": phases, "writer": writer,
                                             "triton_first_calls": dict(sorted(kernels.first.items(),
                                                                               key=lambda kv: -kv[1]))}))
    print(f"first video: {args.video} ({phases})", flush=True)
    return 0


@torch.no_grad()
def bench_14b(args, shape, device, dtype, fig, notes) -> None:
    """14B 720p: built in memory with the export's attention (or --attention) and precision choices for h100, fused
    as a loaded bundle is (`bundle.build_transformer`: W8A8 feed-forward blocks as one op, normalized inputs quantized
    once); --activations static: the scales of one sampler run applied, as the 1.3B headline bundle carries them."""
    from dataclasses import replace

    from turbo_infer.bundle import TARGETS
    from turbo_infer.quant import fuse_gelu_ffns, quantize_model
    from turbo_infer.samplers import get_sampler
    from turbo_train.export import SLA_DEFAULTS, choose_attention, linear_precisions

    cfg = replace(shape.dit_config(big=True), attention="sla", attention_options=dict(SLA_DEFAULTS, topk=args.topk))
    t = time.perf_counter()
    model = random_dit(cfg, device, dtype, seed=3)
    target = TARGETS["h100"]
    backend, opts = choose_attention(cfg, {}, target, args.attention)
    set_attention(model, backend, opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no calibration plan": every candidate fp8, as the 1.3B bundle
        prec = linear_precisions(model, target, None)
    quantize_model(model, {n: p for n, (p, _) in prec.items() if p != "bf16"})
    fuse_gelu_ffns(model)
    model.fuse_norm_quant()
    free()
    log(f"14B DiT built and quantized in memory: {time.perf_counter() - t:.1f} s")
    f, h, w = (shape.big_frames - 1) // 4 + 1, shape.big_height // 8, shape.big_width // 8
    noise = torch.randn(1, cfg.in_channels, f, h, w, device=device)
    ctx = torch.randn(1, shape.text_len, cfg.text_dim, device=device, dtype=dtype)
    sampler = get_sampler("rcm")

    def dit():
        return sampler.sample(model, noise, ctx, steps=4, dtype=dtype)

    t = time.perf_counter()
    if args.activations == "static":  # the first run records the inputs' amax (and JITs the kernels)
        with torch.no_grad():
            set_static_scales(model, dit)
    else:
        model(noise.to(dtype), torch.full((1,), 900.0, device=device), ctx)
    sync(device)
    log(f"14B first {'run, recording static scales' if args.activations == 'static' else 'forward'} (JIT): "
        f"{time.perf_counter() - t:.1f} s")
    times = timed(dit, device, args.reps_14b, warmup=1 if args.activations == "static" else 0)
    fig["e2e_14b_720p_turbo_s"] = statistics.median(times)
    log(f"14B 720p turbo DiT, 4 steps ({backend}, fp8, {args.activations} scales): {[round(s, 2) for s in times]} s")
    if args.activations == "static" and not args.skip_other_scales:
        apply_scales(model, dynamic_scales(model))
        dyn = timed(dit, device, args.reps_14b)  # the untimed run JITs the per-token branch
        fig["e2e_14b_720p_turbo_dynamic_scales_s"] = statistics.median(dyn)
        log(f"14B 720p turbo DiT with per-token activation scales: {[round(s, 2) for s in dyn]} s")
    notes["14b"] = (f"14B DiT built in memory (random) with turbo_train.export's h100 choices ({backend} {opts}, "
                    f"fp8 linears with {args.activations} activation scales"
                    + (" from one sampler run's input amax" if args.activations == "static" else "")
                    + f"; fused as from_bundle does), not written or loaded as a bundle; rcm 4 steps at "
                    f"{shape.big_frames}x{shape.big_height}x{shape.big_width}, eager, median of {args.reps_14b}")


# ----------------------------------------------------------------------------- driver


def export_h100(args, ckpt, work, te_dir, vae_dir, fig, plan_path=None) -> Path:
    """turbo-export's h100 bundle of the checkpoint into WORK/bundles/h100 (replacing one there); plan_path None:
    every candidate linear fp8 with dynamic scales. Sets bundle_export_s."""
    from turbo_train.export import export_bundle, summary_line

    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without a plan, "no calibration plan": intended (every linear fp8)
        bundle = export_bundle(ckpt, "h100", work / "bundles", plan_path=plan_path, text_encoder=te_dir, vae=vae_dir,
                               attention=args.attention, overwrite=True, progress=False)
    fig["bundle_export_s"] = time.perf_counter() - t
    log(f"exported {bundle} in {fig['bundle_export_s']:.1f} s: {summary_line(bundle)}")
    return bundle


def load_bundle(args, bundle, device, text, vae, fig):
    """TurboPipeline.from_bundle (hashes verified) with the given text encoder and VAE. Sets bundle_load_s."""
    from turbo_infer.pipeline import TurboPipeline

    t = time.perf_counter()
    pipe = TurboPipeline.from_bundle(bundle, device, text_encoder=text, vae=vae, allow_reference=args.tiny)
    sync(device)
    fig["bundle_load_s"] = time.perf_counter() - t
    log(f"TurboPipeline.from_bundle (sha256 verified): {fig['bundle_load_s']:.1f} s")
    return pipe


@torch.no_grad()
def standin_plan_file(pipe, shape, device, work) -> Path:
    """WORK/standin_plan.json: static scales from one run of the bundle's sampler (`static_scales`) as a plan for
    turbo-export (`standin_plan`)."""
    from turbo_train.methods.calibrate import write_plan

    sample, _, _ = bundle_sampler(pipe, shape, device)
    scales = static_scales(pipe.transformer, lambda: sample(pipe.transformer))
    return write_plan(standin_plan(pipe.transformer, scales), work / "standin_plan.json")


def turbo_stages(args, shape, device, dtype, work, held: dict, te_dir, vae_dir, fig, notes, clock_ok) -> None:
    """Stages 2 and 5-7: checkpoint -> h100 bundle -> TurboPipeline.from_bundle -> turbo DiT,
    full pipeline -> time to first video. held: {"te": encoder or None, "vae": WanVAE or None}
    (None: stand-ins, no full pipeline, no first video); emptied before the fresh process starts,
    so that this process holds no model while it runs."""
    te, vae = held.get("te"), held.get("vae")
    log("stage 2: random SLA-layout checkpoint")
    ckpt = write_checkpoint(args, shape, device, dtype, work)
    log("stage 5: export the h100 bundle")
    text = te if te is not None else RandomContext(shape.dit_config().text_dim, shape.text_len, device, dtype)
    stand_in = vae or LatentOnlyVAE()
    bundle = export_h100(args, ckpt, work, te_dir, vae_dir, fig)
    pipe = load_bundle(args, bundle, device, text, stand_in, fig)
    if args.activations == "static":
        log("stage 5b: stand-in static activation scales from one sampler run, the bundle exported again with them")
        plan_path = standin_plan_file(pipe, shape, device, work)
        del pipe
        free()
        bundle = export_h100(args, ckpt, work, te_dir, vae_dir, fig, plan_path)
        pipe = load_bundle(args, bundle, device, text, stand_in, fig)
        notes["activations"] = ("the headline bundle carries static activation scales (fp8 amax / 448 of each W8A8 "
                                "layer's input over one 4-step sampler run of the bundle exported without a plan, "
                                "written as a stand-in calibration plan: e2e_setup.standin_plan), as bundles "
                                "calibrated with recipes/toy/calibrate.yaml's activations: static run")
    log("stage 6: turbo DiT from the bundle")
    compiled = bench_turbo(args, shape, device, pipe, fig, notes, clock_ok)
    if f"e2e_{TAG}_baseline_s" in fig:
        fig[f"e2e_{TAG}_speedup"] = fig[f"e2e_{TAG}_baseline_s"] / fig[f"e2e_{TAG}_turbo_s"]
        log(f"speedup {fig[f'e2e_{TAG}_speedup']:.1f}x ({fig[f'e2e_{TAG}_baseline_s']:.1f} s -> "
            f"{fig[f'e2e_{TAG}_turbo_s']:.3f} s)")
    if te is not None and vae is not None:
        bench_full(args, shape, device, pipe, fig, notes)
    del pipe, text, stand_in, te, vae
    held.clear()
    free()

    if args.skip_ttfv or te_dir is None or vae_dir is None:
        log("time to first video: skipped (--skip-ttfv, --skip-text or --skip-vae)")
        return
    log("stage 7: time to first video from a fresh process")
    ttfv_compiled = {"auto": compiled, "on": True, "off": False}[args.ttfv_compile]
    bench_first_video(args, shape, bundle, te_dir, vae_dir, work, ttfv_compiled, fig, notes)


def run(args) -> dict:
    shape = SHAPES["tiny" if args.tiny else "real"]
    if args.tiny:
        torch.set_num_threads(1)
        os.environ.pop("OUT", None)  # the smoke run never writes into the device tool's return folder
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_e2e.py needs a CUDA GPU (or --tiny for the CPU smoke run)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / "results" if args.tiny else REPO / "benchmarks"
    fig, notes = {}, {"weights": "all weights random at the real configs (speed only)"}
    if args.set:
        notes["settings"] = "tuning constants set for this run (--set): " + ", ".join(args.set)
    log(f"{'tiny CPU smoke run' if args.tiny else torch.cuda.get_device_name()}: work dir {work}")

    def clock_ok(what: str) -> bool:
        if time.perf_counter() - T0 <= args.budget_s:
            return True
        log(f"skipping {what}: past the {args.budget_s:.0f} s budget")
        notes.setdefault("skipped_for_time", []).append(what)
        return False

    if not args.skip_baseline:
        log("stage 1: 50-step CFG baseline")
        bench_baseline(args, shape, device, dtype, fig, notes)
        free()  # the baseline model is gone with the stage's frame
    te = te_dir = vae = vae_dir = None
    if not args.skip_text:
        log("stage 3: umT5-XXL text encoder")
        write = not (args.skip_turbo or args.skip_ttfv or args.ttfv_random_text)  # only the fresh process reads it
        te, te_dir = setup_text(args, shape, device, dtype, work, write, fig, notes)
    if not args.skip_vae:
        log("stage 4: Wan VAE")
        vae, vae_dir = setup_vae(args, shape, device, work, fig, notes)
        free()
    held = {"te": te, "vae": vae}
    del te, vae
    if not args.skip_turbo:
        turbo_stages(args, shape, device, dtype, work, held, te_dir, vae_dir, fig, notes, clock_ok)
    held.clear()
    free()
    if args.with_14b and clock_ok("14B 720p"):
        log("stage 8: 14B 720p turbo DiT")
        try:
            bench_14b(args, shape, device, dtype, fig, notes)
            free()
        except torch.cuda.OutOfMemoryError as e:
            log(f"14B: out of memory ({str(e)[:200]}); no figure")
            notes["14b"] = "out of GPU memory"
            free()

    write_results(args, fig, notes, out_dir)
    if not args.keep_workdir and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    log("done")
    return fig


def write_results(args, fig: dict, notes: dict, out_dir: Path) -> None:
    """e2e.json (figures + notes) and the breakdown chart, into out_dir and $OUT."""
    bench = Harness("e2e")
    old = out_dir / "e2e.json"
    if args.merge and old.is_file():
        prev = json.loads(old.read_text())
        fig = {**prev.get("figures", {}), **fig}
        notes = {**prev.get("notes", {}), **notes, "merged": f"figures not measured by this command are from: "
                 f"{prev.get('command')} ({prev.get('date')})"}
    for k, v in fig.items():
        bench.figure(k, v)
    bench.print_table()
    bench.write(out_dir, notes=notes)
    dit = {}
    if f"e2e_{TAG}_baseline_attention_s" in fig:
        dit[f"baseline: {BASELINE_STEPS} steps x CFG, eager {'fp32' if args.tiny else 'bf16'} (extrapolated)"] = {
            c: fig[f"e2e_{TAG}_baseline_{c}_s"] for c in ("attention", "linear", "other")} | {
            "total": fig[f"e2e_{TAG}_baseline_s"]}
    if f"e2e_{TAG}_turbo_attention_s" in fig:
        dit["turbo: h100 bundle, 4 steps"] = {c: fig[f"e2e_{TAG}_turbo_{c}_s"] for c in ("attention", "linear", "other")
                                              } | {"total": fig[f"e2e_{TAG}_turbo_s"]}
    stages = {"text encode": fig.get("text_encode_s")}
    stages.update({f"DiT {c}": fig.get(f"e2e_{TAG}_turbo_{c}_s") for c in ("attention", "linear", "other")})
    stages["VAE decode"] = fig.get("vae_decode_s")
    stages = {k: v for k, v in stages.items() if v is not None}
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the figures are written: a missing plotting package must not fail the run
        log("matplotlib is not installed: no breakdown chart (the figures are in e2e.json)")
        return
    if dit or stages:
        speed = fig.get(f"e2e_{TAG}_speedup")
        title = ("Wan2.1-1.3B shape, 480p x 81 frames, random weights"
                 + (f"; DiT speedup {speed:.0f}x" if speed else "") + (" (tiny CPU smoke run)" if args.tiny else ""))
        targets = [out_dir] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
        for d in targets:
            d.mkdir(parents=True, exist_ok=True)
            breakdown_chart(d / "e2e_breakdown.png", dit, stages, title)
        log(f"wrote the chart: {', '.join(str(d / 'e2e_breakdown.png') for d in targets)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny configs; results in WORKDIR/results")
    p.add_argument("--workdir", help="where the random weights, bundle and video go (default: a temp dir, removed)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the default temp dir")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median; default 3)")
    p.add_argument("--topk", type=float, default=0.1, help="SLA topk of the checkpoint (default 0.1)")
    p.add_argument("--attention", choices=("sdpa", "sla", "sage", "sagesla"), default=None,
                   help="bundle attention backend (default: the h100 target's, sla for an SLA checkpoint)")
    p.add_argument("--set", action="append", default=[], metavar="MODULE:NAME=VALUE",
                   help="set a tuning constant before the run, e.g. turbo_kernels.gemm.norm_quant:NUM_WARPS=2 "
                        "(VALUE a Python literal; the module must already define NAME); repeatable, logged")
    p.add_argument("--ab", action="append", default=[], metavar="NAME=MODULE:NAME[.FIELD]=VALUE[;...]",
                   help="a tuning variant of the DiT timed interleaved with the code's defaults after the headline "
                        "run (repeatable; settings as --set, ';'-separated; read by the kernels at call time)")
    p.add_argument("--ab-rounds", type=int, default=5, help="interleaved rounds of --ab (default 5)")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="past this many seconds, optional parts (attention comparison, compile, 14B) are skipped")
    for name, what in (("baseline", "the 50-step CFG baseline"), ("text", "the umT5 text encoder (random context)"),
                       ("vae", "the VAE (no full pipeline, no first video)"), ("compile", "torch.compile"),
                       ("profile", "the profiler breakdown"), ("ttfv", "the fresh-process time to first video"),
                       ("attention-compare", "timing the other sparse backend"),
                       ("gemm-compare", "timing the DiT with the W8A8 GEMMs' tensor-descriptor variants"),
                       ("channels-last", "the VAE decode with the other Conv3d weight layout"),
                       ("cuda-graph", "timing the DiT replayed from CUDA graphs (turbo_infer.cuda_graph)")):
        p.add_argument(f"--skip-{name}", action="store_true", help=f"skip {what}")
    p.add_argument("--skip-turbo", action="store_true",
                   help="skip the checkpoint, bundle, turbo DiT, full pipeline and first video (e.g. a 14B-only run)")
    p.add_argument("--merge", action="store_true",
                   help="keep the figures and notes of an existing e2e.json that this run does not measure")
    p.add_argument("--ttfv-background", action="store_true",
                   help="the fresh process loads the text encoder and VAE in background threads while the DiT "
                        "loads and warms up (TurboPipeline.from_bundle(background=True)) instead of one after "
                        "the other")
    p.add_argument("--ttfv-random-text", action="store_true",
                   help="the fresh process builds umT5 with random weights instead of loading 11 GB from disk")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; --tiny: eager, i.e. dynamo only)")
    p.add_argument("--skip-residual-compare", action="store_true",
                   help="do not time the compiled DiT with the blocks' residuals placed the other way (GEMM "
                        "epilogue or Inductor's formula, whichever is not turbo_infer.models.wan.EPILOGUE_RESIDUALS)")
    p.add_argument("--activations", choices=("static", "dynamic"), default="static",
                   help="the headline bundle's activation scales: static (default; the toy calibration recipe's "
                        "setting: stand-in scales from one sampler run, exported through a plan) or dynamic "
                        "(per-token, the bundle turbo-export writes without a plan)")
    p.add_argument("--skip-other-scales", "--skip-static-scales", dest="skip_other_scales", action="store_true",
                   help="do not time the DiT with the other activation scales (dynamic ones when the headline is "
                        "static, and the reverse)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode, e.g. max-autotune-no-cudagraphs or reduce-overhead (default: none)")
    p.add_argument("--ttfv-runs", type=int, default=2,
                   help="fresh processes launched one after another (default 2): the figure is the last, a launch "
                        "that finds the Triton/Inductor on-disk caches as an earlier launch left them; "
                        "ttfv_first_launch_s is the first")
    p.add_argument("--ttfv-compile", choices=("auto", "on", "off"), default="off",
                   help="torch.compile in the fresh process (auto: if it made the turbo DiT faster here). Default "
                        "off: for one video the compile warm-up costs more than it saves (H200: warm-up 4.1 s "
                        "from Inductor's cache vs 1.6 s eager, for 0.2 s less DiT time)")
    p.add_argument("--ttfv-vae-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the fresh process's Wan VAE dtype (turbo-infer --vae-dtype; default float32)")
    p.add_argument("--ttfv-prepare", choices=("on", "off"), default="on",
                   help="run `turbo-infer --prepare --bundle` once before the fresh processes, as a user does once after "
                        "installing (default on; its time is ttfv_prepare_s): caches the runtime's Python bytecode "
                        "(turbo_infer.pycache; the GPU image sets PYTHONDONTWRITEBYTECODE and ships torch without "
                        "bytecode: import torch 4.4-5.1 s there vs 1.9-2.4 s with it), records the bundle's hashes and "
                        "runs its kernels once. off: the children compile every source (TURBO_PYCACHE=0)")
    p.add_argument("--ttfv-warmup", choices=("auto", "on", "off"), default="auto",
                   help="run the DiT once on zeros before generating (auto: only when compiling, whose warm-up is "
                        "the compile; eager, generate()'s first step pays the kernels' first launches itself, as in "
                        "turbo-infer, and the extra forward is saved)")
    p.add_argument("--ttfv-prewarm", action="store_true",
                   help="the fresh process loads with TurboPipeline.from_bundle(prewarm=True): the kernels' first "
                        "launches on a throwaway one-block DiT in a thread beside the weight reads")
    p.add_argument("--ttfv-verify", choices=("cached", "full"), default="cached",
                   help="the fresh process's bundle check (turbo-infer --verify): cached (default, as turbo-infer: "
                        "launch 1 hashes and records, later launches hash only changed files) or full")
    p.add_argument("--with-14b", action="store_true", help="also the 14B 720p turbo DiT (built in memory)")
    p.add_argument("--reps-14b", type=int, default=1, help="timed 4-step runs of the 14B (default 1)")
    # the fresh process of stage 7 (internal)
    p.add_argument("--ttfv-child", metavar="BUNDLE", help=argparse.SUPPRESS)
    p.add_argument("--video", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--launched", type=float, default=None, help=argparse.SUPPRESS)
    return p


def apply_setting(spec: str, quiet: bool = False) -> tuple[str, str, object]:
    """--set MODULE:NAME=VALUE: assign a literal to an existing module-level constant (kernel tuning knobs);
    MODULE:NAME.FIELD=VALUE replaces one field of a module-level dataclass instance (a kernel config default).
    Returns (MODULE, NAME, the value NAME had before), for undoing it."""
    import ast
    import dataclasses
    import importlib

    try:
        target, value = spec.split("=", 1)
        module_name, name = target.split(":", 1)
        value = ast.literal_eval(value)
    except ValueError as e:
        raise SystemExit(f"--set {spec!r}: expected MODULE:NAME=VALUE with a Python literal VALUE ({e})")
    module = importlib.import_module(module_name)
    name, _, field = name.partition(".")
    if not hasattr(module, name):
        raise SystemExit(f"--set {spec!r}: {module_name} has no {name}")
    before = getattr(module, name)
    if field:
        if not dataclasses.is_dataclass(before) or field not in {f.name for f in dataclasses.fields(before)}:
            raise SystemExit(f"--set {spec!r}: {module_name}.{name} is not a dataclass with a field {field!r}")
        setattr(module, name, dataclasses.replace(before, **{field: value}))
    else:
        setattr(module, name, value)
    if not quiet:
        log(f"--set {module_name}.{name}{'.' + field if field else ''} = {value!r}")
    return module_name, name, before


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    args.compile_backend = args.compile_backend or ("eager" if args.tiny else "inductor")
    if args.ttfv_child:
        return ttfv_child(args)
    if args.reps < 1 or args.reps_14b < 1 or args.ttfv_runs < 1:
        raise SystemExit("--reps, --reps-14b and --ttfv-runs must be >= 1")
    for spec in args.set:
        apply_setting(spec)
    for spec in args.ab:
        parse_ab(spec)  # a malformed variant fails before the run, not after the baseline
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
