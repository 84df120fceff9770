"""`turbo-infer`: generate videos from prompts with a teacher checkpoint (toy world or Wan2.1).

    turbo-infer --prompt "a red circle moving left" --out video.mp4               # shipped toy teacher
    turbo-infer --config wan2.1-1.3b --checkpoint DIT --text-encoder UMT5_DIR --vae VAE_DIR \
        --prompt "..." --frames 81 --height 480 --width 832 --sampler unipc --out out.mp4
    turbo-infer --bundle runs/toy-bundles/cpu --prompt "a red circle moving left" --out video.mp4
    turbo-infer --config wan2.1-1.3b ... --num-gpus 2     # 2 worker processes, Ulysses over both GPUs
    turbo-infer --prepare [--bundle DIR]                  # once per installation: cache what every start redoes

A bundle (turbo-export) brings its model, W8A8 layers, attention backend, sampler, steps and video
size; --steps/--sampler/--guidance/--frames/... still override, --text-encoder/--vae replace the
directories its manifest references. A bundle for a GPU this device cannot run is refused with the
bundle to use instead, unless --allow-reference (torch reference kernels, slow).

--prepare compiles the runtime's Python bytecode into a cache of its own (turbo_infer.pycache: a
fresh process then reads it even where PYTHONDONTWRITEBYTECODE=1 and the installed packages ship none),
and with --bundle hashes the bundle into the verified-files record and, on a GPU, runs its kernels once
so that Triton's on-disk cache holds them. It generates nothing.

Several prompts write one file each: out.mp4 -> out_000.mp4, out_001.mp4, ... Every input is
checked before any model is loaded; a bad one stops with an error naming the option or path.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    from turbo_infer.models.wan import WAN_CONFIGS
    from turbo_infer.samplers import SAMPLERS, mid_times_arg

    p = argparse.ArgumentParser(prog="turbo-infer", description="Generate videos from text prompts.")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="DiT weights: safetensors file, sharded *.index.json or a directory "
                        "(default: the shipped toy teacher, toy config only)")
    p.add_argument("--config", default=None, choices=sorted(WAN_CONFIGS), help="DiT size preset (default: toy)")
    p.add_argument("--bundle", metavar="DIR", help="a bundle directory written by turbo-export (instead of "
                   "--checkpoint/--config): hashes verified, target checked against this device")
    p.add_argument("--verify", default="cached", choices=("cached", "full"),
                   help="bundle integrity check before loading: cached (default) hashes every file not recorded as "
                        "checked in its current state (same inode, size, mtime, ctime; turbo_infer.verified), full "
                        "hashes every file")
    p.add_argument("--allow-reference", action="store_true",
                   help="run a bundle whose GPU kernels this device lacks through the torch references (slow)")
    p.add_argument("--text-encoder", metavar="PATH",
                   help="text encoder directory: umT5 for Wan configs (required), MiniLM for toy (optional)")
    p.add_argument("--vae", metavar="PATH", help="Wan VAE directory (diffusers AutoencoderKLWan; Wan configs only)")
    p.add_argument("--vae-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the Wan VAE (default float32, as the Wan pipeline; bfloat16 decoded 1.58x faster "
                        "on an H200, BENCHMARKS.md)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    src.add_argument("--prompts-file", metavar="PATH", help="text file, one prompt per non-blank line")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: 50, or the bundle's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance weight; 1 = off (default: 5, or the bundle's)")
    p.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed + i (default: 0)")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                   help="sampler (default: euler, or the bundle's)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift (default: toy 3, Wan 5)")
    p.add_argument("--rcm-mid-times", default=None, type=mid_times_arg, metavar="T1,T2,T3 | shift=S",
                   help="rcm sampler: intermediate TrigFlow times (default: the spec's 1.5,1.4,1.0, Wan's grid); "
                        "shift=S moves that grid to timestep shift S")
    p.add_argument("--frames", type=int, default=None, help="frames (default: toy 8, Wan 81)")
    p.add_argument("--height", type=int, default=None, help="height in pixels (default: toy 64, Wan 480)")
    p.add_argument("--width", type=int, default=None, help="width in pixels (default: toy 64, Wan 832)")
    p.add_argument("--fps", type=float, default=None, help="frame rate of the written video (default: toy 8, Wan 16)")
    p.add_argument("--out", default="out.mp4", metavar="PATH", help="output .mp4 or .gif (default: out.mp4)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="DiT dtype (default: bfloat16 on GPU, float32 on CPU; a bundle's own dtype)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT block by block before generating: 2-7 s once; the eager runtime's fused "
                        "kernels already cover what it fuses (4-step Wan-1.3B DiT on an H100: 0.691 s compiled, "
                        "0.690 s eager), so it mainly helps models or devices without them")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the DiT's forwards from CUDA graphs (recorded during the first video of each size): "
                        "removes the host's kernel-launch time, which bounds the 4-step DiT on slower hosts; "
                        "one GPU only (not with --num-gpus); no effect off the GPU")
    p.add_argument("--num-gpus", type=int, default=1, metavar="N",
                   help="split every video's tokens over N GPUs (Ulysses sequence parallel): turbo-infer starts N "
                        "worker processes itself, rank 0 writes the videos; N must divide the DiT's heads "
                        "(with --device cpu: N gloo processes, for testing) (default: 1)")
    p.add_argument("--prepare", action="store_true",
                   help="cache what every fresh start would otherwise redo, then exit (no prompts): the runtime's Python "
                        "bytecode (turbo_infer.pycache; TURBO_PYCACHE=0 turns its use off), and with --bundle the "
                        "bundle's file hashes and, on a GPU, its kernels")
    return p


def prepare(parser, args) -> int:
    """`turbo-infer --prepare`: see the module docstring."""
    import time

    from turbo_infer import pycache

    t = time.perf_counter()
    try:
        summary = pycache.prepare()
    except RuntimeError as e:
        parser.error(f"--prepare: {e}")
    print(f"bytecode: {summary['files']} files from {len(summary['roots'])} packages in {summary['directory']} "
          f"({summary['seconds']:.0f} s)", file=sys.stderr)
    if args.bundle is None:
        return 0
    import torch

    from turbo_infer.bundle import BundleIntegrityError, check_device, read_manifest, verify_files

    bundle = _readable(parser, "--bundle", args.bundle)
    try:
        manifest = read_manifest(bundle)
        hashed = verify_files(bundle, manifest, progress=not args.no_progress, cached=True)
    except (OSError, ValueError, BundleIntegrityError) as e:
        parser.error(f"--bundle: {e}")
    print(f"hashes: {len(manifest['files'])} files checked ({hashed} hashed, the rest already recorded)", file=sys.stderr)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        from turbo_infer.prewarm import prewarm_dit

        try:
            check_device(manifest, device, allow_reference=args.allow_reference)
        except ValueError as e:
            parser.error(f"--bundle: {e}")
        print(f"kernels: one-block DiT run on {device} in {prewarm_dit(manifest, device):.1f} s", file=sys.stderr)
    print(f"prepared in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return 0


def _readable(parser, option: str, path: str | None) -> Path | None:
    """Error unless `path` (if given) exists and can be read."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        parser.error(f"{option}: path does not exist: {p}")
    if not os.access(p, os.R_OK) or (p.is_dir() and not os.access(p, os.X_OK)):
        parser.error(f"{option}: path is not readable: {p}")
    return p


def _prompts(parser, args) -> list[str]:
    if args.prompts_file is not None:
        f = _readable(parser, "--prompts-file", args.prompts_file)
        if not f.is_file():
            parser.error(f"--prompts-file: not a file: {f}")
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"--prompts-file: cannot read {f}: {e}")
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            parser.error(f"--prompts-file: no prompts in {f} (the file is empty or blank)")
        return prompts
    for i, prompt in enumerate(args.prompt):
        if not prompt.strip():
            parser.error(f"--prompt: prompt {i + 1} is empty")
    return [p.strip() for p in args.prompt]


def _out_paths(parser, out: str, n: int) -> list[Path]:
    path = Path(out)
    if path.suffix.lower() not in (".mp4", ".gif"):
        parser.error(f"--out: {out!r} must end in .mp4 or .gif")
    if path.is_dir():
        parser.error(f"--out: {out!r} is a directory; give a file name ending in .mp4 or .gif")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out: cannot create directory {path.parent}: {e}")
    if not os.access(path.parent, os.W_OK):
        parser.error(f"--out: directory is not writable: {path.parent}")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i:03d}{path.suffix}") for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prepare:
        if args.prompt is not None or args.prompts_file is not None:
            parser.error("--prepare: generates nothing; leave out --prompt/--prompts-file")
        return prepare(parser, args)
    if args.prompt is None and args.prompts_file is None:
        parser.error("one of the arguments --prompt --prompts-file is required")

    import torch

    from turbo_infer.models.wan import WAN_CONFIGS
    from turbo_infer.pipeline import TOY_TEACHER_PATH, check_video_size

    manifest = None
    if args.bundle is not None:
        from turbo_infer.bundle import read_manifest

        for opt in ("checkpoint", "config"):
            if getattr(args, opt) is not None:
                parser.error(f"--{opt}: not with --bundle (the bundle brings its model)")
        _readable(parser, "--bundle", args.bundle)
        try:
            manifest = read_manifest(args.bundle)  # schema only; hashes are checked when loading
        except (OSError, ValueError) as e:
            parser.error(f"--bundle: {e}")
    elif args.allow_reference:
        parser.error("--allow-reference: only with --bundle")
    args.config = args.config or "toy"
    toy = manifest["world"] == "toy" if manifest else args.config == "toy"
    # ---- inputs: files, prompts, numbers, sizes (all before loading anything heavy)
    if manifest is not None:
        checkpoint = None
    elif args.checkpoint is None:
        if not toy:
            parser.error(f"--checkpoint: required for --config {args.config}")
        if not TOY_TEACHER_PATH.exists():
            parser.error(f"--checkpoint: the shipped toy teacher is missing ({TOY_TEACHER_PATH}); "
                         f"pass --checkpoint PATH")
        checkpoint = TOY_TEACHER_PATH
    else:
        checkpoint = _readable(parser, "--checkpoint", args.checkpoint)
    text_encoder = _readable(parser, "--text-encoder", args.text_encoder)
    vae = _readable(parser, "--vae", args.vae)
    if toy and vae is not None:
        parser.error("--vae: only for Wan configs; the toy world uses the fixed ToyCodec")
    if toy and args.vae_dtype != "float32":
        parser.error("--vae-dtype: only for Wan configs; the toy world uses the fixed ToyCodec")
    if not toy and manifest is not None:
        if text_encoder is None and manifest["text_encoder"]["path"] is None:
            parser.error("--text-encoder: required: the bundle references no umT5 directory")
        if vae is None and manifest["vae"]["path"] is None:
            parser.error("--vae: required: the bundle references no Wan VAE directory")
    elif not toy:
        if text_encoder is None:
            parser.error(f"--text-encoder: required for --config {args.config} (a local umT5 directory)")
        if vae is None:
            parser.error(f"--vae: required for --config {args.config} (a local Wan VAE directory)")
    prompts = _prompts(parser, args)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps: must be >= 1, got {args.steps}")
    if args.seed < 0:
        parser.error(f"--seed: must be >= 0, got {args.seed}")
    if args.guidance is not None and not (args.guidance >= 0 and args.guidance < float("inf")):
        parser.error(f"--guidance: must be a finite number >= 0, got {args.guidance}")
    if args.shift is not None and not (0 < args.shift < float("inf")):
        parser.error(f"--shift: must be a finite number > 0, got {args.shift}")
    sampler_options = {}
    if args.rcm_mid_times is not None:
        if args.sampler != "rcm" and not (args.sampler is None and args.bundle):
            parser.error("--rcm-mid-times: only with --sampler rcm (or a bundle that samples with rcm)")
        sampler_options["mid_times"] = args.rcm_mid_times
    if args.fps is not None and not (0 < args.fps < float("inf")):
        parser.error(f"--fps: must be a finite number > 0, got {args.fps}")
    video = manifest["video"] if manifest else {"num_frames": 8 if toy else 81, "height": 64 if toy else 480,
                                                 "width": 64 if toy else 832}
    frames = args.frames if args.frames is not None else video["num_frames"]
    height = args.height if args.height is not None else video["height"]
    width = args.width if args.width is not None else video["width"]
    patch = tuple(manifest["model"]["config"].get("patch_size", (1, 2, 2))) if manifest else \
        WAN_CONFIGS[args.config].patch_size
    # ToyCodec: x4 spatial, no temporal compression; Wan VAE: x8 spatial, x4 temporal
    factors = dict(spatial_factor=4, temporal_factor=1) if toy else dict(spatial_factor=8, temporal_factor=4)
    try:
        check_video_size(frames, height, width, patch_size=patch, **factors)
    except ValueError as e:
        first = re.match(r"\w+", str(e)).group(0)  # the messages start with the argument's name
        opt = {"num_frames": "--frames", "height": "--height", "width": "--width"}.get(first, "--frames/--height/--width")
        parser.error(f"{opt}: {e}")
    outs = _out_paths(parser, args.out, len(prompts))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {device} requested but CUDA is not available")
    dtype_name = args.dtype or (None if manifest else ("bfloat16" if device.type == "cuda" else "float32"))
    dtype = getattr(torch, dtype_name) if dtype_name else None
    if args.num_gpus != 1 and args.cuda_graphs:
        parser.error("--cuda-graphs runs on one GPU; drop it or --num-gpus")
    if args.num_gpus != 1:
        from turbo_infer.multigpu import check_num_procs, generate_videos

        from turbo_infer.models.wan import WanConfig

        heads = (WanConfig.from_dict(manifest["model"]["config"]) if manifest else WAN_CONFIGS[args.config]).num_heads
        try:
            check_num_procs(args.num_gpus, heads, device)
        except ValueError as e:
            parser.error(str(e))
        spec = {"kind": "bundle" if manifest is not None else ("toy" if toy else "wan"), "bundle": args.bundle,
                "allow_reference": args.allow_reference, "verify": args.verify, "checkpoint": checkpoint, "config": args.config,
                "text_encoder": text_encoder, "vae": vae, "dtype": dtype_name, "vae_dtype": args.vae_dtype,
                "compile": args.compile, "progress": not args.no_progress}
        generate_videos(spec, prompts, outs, dict(steps=args.steps, guidance=args.guidance, seed=args.seed,
                                                  num_frames=frames, height=height, width=width, sampler=args.sampler,
                                                  sampler_options=sampler_options or None,
                                                  shift=args.shift, progress=not args.no_progress),
                        args.num_gpus, device=device.type, fps=args.fps)
        return 0

    # ---- build the pipeline and generate
    from turbo_infer.pipeline import TurboPipeline
    from turbo_infer.video_io import write_video

    try:
        if manifest is not None:
            pipe = TurboPipeline.from_bundle(args.bundle, device, text_encoder_path=text_encoder, vae_path=vae,
                                             allow_reference=args.allow_reference, verify=args.verify, dtype=dtype,
                                             progress=not args.no_progress, vae_dtype=getattr(torch, args.vae_dtype))
        elif toy:
            pipe = TurboPipeline.toy(checkpoint, device=device, dtype=dtype, text_encoder_path=text_encoder)
        else:
            pipe = TurboPipeline.wan(checkpoint, text_encoder, vae, config=args.config, device=device, dtype=dtype,
                                     vae_dtype=getattr(torch, args.vae_dtype))
    except (FileNotFoundError, ValueError, OSError) as e:
        parser.error(f"could not load the models: {e}")
    if pipe.load_times and not args.no_progress:
        parts = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in pipe.load_times.items()
                          if k.endswith("_s"))
        print(f"loaded {args.bundle}: {parts}", file=sys.stderr)
    if args.compile:
        pipe.compile()
    if args.cuda_graphs:
        pipe.use_cuda_graphs()
    fps = args.fps or pipe.fps
    settings = dict(steps=args.steps, guidance=args.guidance, seed=args.seed, num_frames=frames, height=height,
                    width=width, sampler=args.sampler, shift=args.shift, progress=not args.no_progress,
                    sampler_options=sampler_options or None)
    if len(prompts) == 1 and str(outs[0]).lower().endswith(".mp4"):  # encoded while the VAE decodes
        pipe.generate_mp4(prompts[0], outs[0], fps=fps, **settings)
        print(f"{outs[0]}\t{prompts[0]}")
        return 0
    video = pipe.generate(prompts, **settings)  # (B, F, H, W, 3) uint8
    for path, clip, prompt in zip(outs, video, prompts):
        write_video(path, clip, fps=fps)
        print(f"{path}\t{prompt}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
