"""Multi-GPU inference: `turbo-infer --num-gpus N` starts N worker processes itself (no torchrun).

Each worker joins one process group (NCCL, one GPU per rank; gloo on the CPU, for testing), builds the
same pipeline, and turns on Ulysses sequence parallelism over all N ranks
(`turbo_infer.sequence_parallel.enable_sequence_parallel`): every DiT forward splits the video tokens
N ways, with two all-to-alls around each self-attention. The prompts, text states and initial noise
are identical on every rank (the noise comes from per-prompt CPU generators seeded with seed + i), so
the ranks run the same sampler in lockstep and end with the same latents; rank 0 alone decodes them
and writes the videos.

Requirements: the DiT's head count divisible by N (Wan2.1-1.3B: 12 heads -> N in 1, 2, 3, 4, 6, 12;
14B: 40 -> 1, 2, 4, 5, 8, 10, ...; the toy teacher: 3 -> 1 or 3), and N visible GPUs when running
on CUDA. Memory: every rank holds the whole model; activations shrink N-fold.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- building the pipeline


def build_pipeline(spec: dict, device):
    """The TurboPipeline a spec describes (the CLI's choice of model, made picklable for the workers).

    spec keys: kind ("bundle" | "toy" | "wan"); bundle (dir) and allow_reference for bundles;
    checkpoint, config, text_encoder, vae (paths or None); dtype (torch dtype name or None = the
    default / the bundle's); vae_dtype (torch dtype name of a Wan VAE, default float32); compile (bool:
    the worker calls TurboPipeline.compile before generating; not used here); progress (bool: bar over
    the bundle hashing); model_overrides (WanConfig fields for toy/wan, e.g. {"num_heads": 4}; {} = none)."""
    from turbo_infer.pipeline import TurboPipeline

    dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else None
    overrides = dict(spec.get("model_overrides") or {})
    vae_dtype = getattr(torch, spec.get("vae_dtype") or "float32")
    kind = spec["kind"]
    if kind == "bundle":
        return TurboPipeline.from_bundle(spec["bundle"], device, text_encoder_path=spec.get("text_encoder"),
                                         vae_path=spec.get("vae"), allow_reference=spec.get("allow_reference", False),
                                         verify=spec.get("verify", True), dtype=dtype, progress=spec.get("progress", False), vae_dtype=vae_dtype)
    if kind == "toy":
        return TurboPipeline.toy(spec.get("checkpoint"), device=device, dtype=dtype,
                                 text_encoder_path=spec.get("text_encoder"), **overrides)
    if kind == "wan":
        return TurboPipeline.wan(spec["checkpoint"], spec["text_encoder"], spec["vae"], config=spec["config"],
                                 device=device, dtype=dtype, vae_dtype=vae_dtype, **overrides)
    raise ValueError(f"spec kind must be 'bundle', 'toy' or 'wan', got {kind!r}")


def check_num_procs(num_procs: int, num_heads: int, device) -> None:
    """ValueError naming --num-gpus when N processes cannot run this model on this device."""
    if not isinstance(num_procs, int) or num_procs < 1:
        raise ValueError(f"--num-gpus: must be an int >= 1, got {num_procs!r}")
    if num_procs == 1:
        return
    if num_heads % num_procs:
        ok = [n for n in range(1, num_heads + 1) if num_heads % n == 0]
        raise ValueError(f"--num-gpus: Ulysses splits the DiT's {num_heads} attention heads over the processes; "
                         f"{num_procs} does not divide {num_heads} (use one of {ok})")
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device: give 'cuda' (not {device}) with --num-gpus {num_procs}: rank r uses cuda:r")
        if torch.cuda.device_count() < num_procs:
            raise ValueError(f"--num-gpus: {num_procs} GPUs requested, {torch.cuda.device_count()} visible")


# ----------------------------------------------------------------------------- the workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_videos(spec: dict, prompts: list[str], outs: list[str | Path], gen_kwargs: dict, num_procs: int,
                    device="cpu", fps: float | None = None) -> list[Path]:
    """Generate one video per prompt with `num_procs` sequence-parallel processes and write them to
    `outs` (rank 0 writes). spec: `build_pipeline`'s; gen_kwargs: TurboPipeline.generate_latents
    keyword arguments (steps, guidance, seed, num_frames, height, width, sampler, shift, progress);
    device: "cuda" (rank r on cuda:r, NCCL) or "cpu" (gloo); fps: None = the pipeline's.
    num_procs = 1 runs in this process. Returns the written paths."""
    if len(prompts) != len(outs):
        raise ValueError(f"{len(prompts)} prompts but {len(outs)} output paths")
    outs = [str(p) for p in outs]
    if num_procs == 1:
        _run(0, 1, None, spec, prompts, outs, gen_kwargs, str(device), fps)
    else:
        import torch.multiprocessing as mp

        # spawn: fresh interpreters (CUDA cannot be forked); each builds its own pipeline
        mp.spawn(_run, args=(num_procs, _free_port(), spec, prompts, outs, gen_kwargs, str(device), fps),
                 nprocs=num_procs, join=True)
    return [Path(p) for p in outs]


def _run(rank: int, world: int, port: int | None, spec: dict, prompts: list[str], outs: list[str],
         gen_kwargs: dict, device: str, fps: float | None) -> None:
    import torch.distributed as dist

    from turbo_infer.pipeline import video_to_uint8
    from turbo_infer.video_io import write_video

    distributed = world > 1
    dev = torch.device(device)
    if distributed:
        if dev.type == "cuda":
            dev = torch.device("cuda", rank)
            torch.cuda.set_device(dev)
        else:  # share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, device_id=dev if dev.type == "cuda" else None)
    try:
        pipe = build_pipeline({**spec, "progress": spec.get("progress", False) and rank == 0}, dev)
        if distributed:
            from turbo_infer.sequence_parallel import enable_sequence_parallel

            enable_sequence_parallel(pipe.transformer)  # over the whole group
        if spec.get("compile"):
            pipe.compile()
        kwargs = dict(gen_kwargs)
        kwargs["progress"] = kwargs.get("progress", True) and rank == 0
        latents = pipe.generate_latents(prompts, **kwargs)  # (B, C, F', H', W'), the same on every rank
        if rank == 0:
            with torch.no_grad():
                video = video_to_uint8(pipe.vae.decode(latents)).cpu()  # (B, F, H, W, 3)
            for path, clip, prompt in zip(outs, video, prompts):
                write_video(path, clip, fps=fps or pipe.fps)
                print(f"{path}\t{prompt}", flush=True)
        if distributed:
            dist.barrier()
    finally:
        if distributed:
            dist.destroy_process_group()
