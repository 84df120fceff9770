"""`turbo-train synth`: latent shards for distillation without the original videos (RCM.md §7).

Two sources, one shard format (read by `turbo_train.latent_shards`, trained on with
`data.source: latent_shards`):

    teacher     samples of a teacher `TurboPipeline` (toy or Wan2.1): sampler, steps, CFG and shift from
                the arguments (the public rCM data: Euler, 100 steps, shift 3, CFG 5), latents only
                (`generate_latents`, no decode); prompts from a file, or for the toy world the toy
                generator's captions. Sample i uses prompt i (mod the prompt count) and noise seed
                seed + i, whatever the batch size or the number of processes.
    toy-videos  real toy videos (the toy generator's sample i of (seed, split), as `write_shards`
                makes them) encoded through the ToyCodec (exact: decode gives the pixels back).

Each sample stores latent.npy, context.npy (the prompt's text states; --no-context leaves them out
and the trainer encodes caption.txt instead), caption.txt and meta.json (see latent_shards.py).
Next to the shards: `<prefix>-synth.json` (the settings, written first), `<prefix>-shards.json` (the
shard list, written last) and, for teacher data, `uncond.safetensors`: the teacher's unconditional
(empty / negative-prompt) text states, the file rCM's `method.rcm.uncond_path` wants.

Shards are written to `*.tar.tmp` and renamed. A rerun resumes: a shard that exists and verifies
(every sample present and decodable, same settings digest, expected shape) is kept, any other is
made again; a directory made with other settings is refused. Under torchrun (RANK/WORLD_SIZE set),
process r makes shards r, r + world, ...; the last to finish writes the shard list.

    turbo-train synth teacher --out data/toy-teacher --num-samples 4096 --samples-per-shard 256
    turbo-train synth teacher --config wan2.1-14b --checkpoint W/ --text-encoder T/ --vae V/ \\
        --prompts-file prompts.txt --out data/wan-synth --frames 81 --height 480 --width 832
    torchrun --nproc-per-node 8 -m turbo_train.synth teacher ...      (same arguments)
    turbo-train synth toy-videos --out data/toy-latents --num-samples 4096 --samples-per-shard 256
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from turbo_infer.files import publish_file

log = logging.getLogger(__name__)
LATENT_DTYPES = ("float16", "float32")
PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # shard/key prefix: no dots (webdataset splits keys at the first dot)

# ----------------------------------------------------------------------------- prompts, settings


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file, one per non-blank line (stripped). Raises ValueError if there are none."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts_file: not a file: {p}")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts_file: no prompts in {p} (empty or blank)")
    return prompts


def toy_prompts(num: int, seed: int = 0, split: str = "train") -> list[str]:
    """Captions of the toy generator's samples 0..num-1 of (seed, split): the toy dataset's prompts."""
    from turbo_train.toyworld.generator import generate_sample, sample_seed

    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}")
    return [generate_sample(sample_seed(seed, i, split), split=split).caption for i in range(num)]


def settings_digest(settings: dict) -> str:
    """16 hex digits of the sha256 of the settings' canonical JSON (stored in every sample's meta)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def trim_context(context: np.ndarray) -> np.ndarray:
    """(L, D) -> (n, D): cut the all-zero rows after the last non-zero one (states past a prompt's end
    are zero; the reader pads them back to L from meta's context_length)."""
    nonzero = np.flatnonzero(np.any(context != 0, axis=1))
    return context[: int(nonzero[-1]) + 1 if nonzero.size else 0]


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    if rank is None or world is None:
        from turbo_train.toyworld.stream import worker_slot  # torch.distributed, else RANK / WORLD_SIZE

        r, w = worker_slot()
        rank, world = (r if rank is None else rank), (w if world is None else world)
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"rank/world must satisfy 0 <= rank < world, got rank={rank!r}, world={world!r}")
    return rank, world


# ----------------------------------------------------------------------------- verification


def verify_shard(path: str | os.PathLike, indices: range, *, prefix: str, digest: str,
                 latent_shape: tuple[int, ...], latent_dtype: str, with_context: bool) -> str | None:
    """None if the shard holds exactly samples `indices`, each complete, decodable, of the expected
    latent shape/dtype and made with settings `digest`; otherwise the reason it does not."""
    import tarfile

    from turbo_train.latent_shards import decode_latent_sample

    members: dict[str, dict] = {}
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if m.isfile():
                    key, _, ext = Path(m.name).name.partition(".")
                    members.setdefault(key, {})[ext] = tf.extractfile(m).read()
    except (OSError, EOFError, tarfile.TarError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    expected = [f"{prefix}-{i:08d}" for i in indices]
    if sorted(members) != expected:
        return f"holds {len(members)} sample key(s), expected {len(expected)} ({expected[0]}..{expected[-1]})"
    for key, i in zip(expected, indices):
        try:
            s = decode_latent_sample({**members[key], "__key__": key, "__url__": str(path)})
        except Exception as e:  # noqa: BLE001  (any decode failure makes the shard invalid)
            return f"sample {key} does not decode ({type(e).__name__}: {e})"
        meta = s["meta"]
        if meta.get("settings_sha") != digest:
            return f"sample {key} was made with other settings (digest {meta.get('settings_sha')} != {digest})"
        if meta.get("index") != i or meta.get("shard_size") != len(indices):
            return f"sample {key} has index/shard_size {meta.get('index')}/{meta.get('shard_size')}"
        if tuple(s["latent"].shape) != tuple(latent_shape) or s["latent"].dtype != getattr(torch, latent_dtype):
            return f"sample {key} latent is {tuple(s['latent'].shape)} {s['latent'].dtype}, expected {tuple(latent_shape)} {latent_dtype}"
        if ("context" in s) != with_context:
            return f"sample {key} {'lacks' if with_context else 'has'} context.npy"
    return None


# ----------------------------------------------------------------------------- the shard writer


def write_latent_shards(
    out_dir: str | os.PathLike,
    num_samples: int,
    samples_per_shard: int,
    make_samples: Callable[[range], list[dict]],
    *,
    settings: dict,
    latent_shape: tuple[int, ...],
    latent_dtype: str = "float16",
    with_context: bool = True,
    prefix: str = "train",
    progress: bool = True,
    rank: int | None = None,
    world: int | None = None,
) -> dict:
    """Write samples 0..num_samples-1 into `<out_dir>/<prefix>-NNNNNN.tar` shards of samples_per_shard
    (the last one shorter), resuming: existing shards that verify are kept.

    make_samples(indices) -> one dict per index: "latent" (C, F, H, W) array/tensor, "context" (L, D)
    or None, "caption" str, "meta" dict of extra meta fields. settings: what makes the data (its
    digest marks every sample; samples_per_shard is added). rank/world: this process's share (shards
    rank, rank + world, ...); None = from torch.distributed or RANK/WORLD_SIZE (else 0 of 1).
    Returns {"shards": all shard paths, "written": paths made now, "kept": paths kept, "manifest":
    the shard list's path or None (not every shard exists yet: other processes still writing)}.
    """
    import webdataset as wds

    for name, v in (("num_samples", num_samples), ("samples_per_shard", samples_per_shard)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be one of {LATENT_DTYPES}, got {latent_dtype!r}")
    if not isinstance(prefix, str) or not PREFIX_RE.match(prefix):
        raise ValueError(f"prefix must match {PREFIX_RE.pattern} (letters, digits, _ and -), got {prefix!r}")
    rank, world = _rank_world(rank, world)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**settings, "samples_per_shard": samples_per_shard, "latent_dtype": latent_dtype,
                "context": bool(with_context), "latent_shape": list(latent_shape)}
    digest = settings_digest(settings)

    # 1. settings first: a directory made with other settings is refused, never mixed or overwritten
    settings_file = out / f"{prefix}-synth.json"
    if settings_file.exists():
        old = json.loads(settings_file.read_text())
        if old.get("settings_sha") != digest:
            prev = old.get("settings", {})
            diff = sorted(k for k in set(prev) | set(settings) if prev.get(k) != settings.get(k))
            raise ValueError(f"out_dir: {out} holds {prefix}-* shards made with other settings (differing: "
                             f"{', '.join(diff) or 'digest'}); use another directory or prefix")
    else:
        _write_json_atomic(settings_file, {"settings": settings, "settings_sha": digest})

    # 2. this process's shards: keep those that verify, make the others (tmp + rename)
    firsts = range(0, num_samples, samples_per_shard)
    paths = [out / f"{prefix}-{s:06d}.tar" for s in range(len(firsts))]
    mine = [s for s in range(len(firsts)) if s % world == rank]
    total = sum(min(samples_per_shard, num_samples - firsts[s]) for s in mine)
    written, kept = [], []
    bar = tqdm(total=total, desc=f"latent shards ({prefix}, rank {rank}/{world})", unit="sample", disable=not progress)
    for s in mine:
        indices = range(firsts[s], min(firsts[s] + samples_per_shard, num_samples))
        path = paths[s]
        if path.exists():
            reason = verify_shard(path, indices, prefix=prefix, digest=digest, latent_shape=latent_shape,
                                  latent_dtype=latent_dtype, with_context=with_context)
            if reason is None:
                kept.append(path)
                bar.update(len(indices))
                continue
            log.warning("synth: remaking shard %s: %s", path, reason)
        tmp = path.with_name(path.name + ".tmp")
        with wds.TarWriter(str(tmp)) as sink:
            samples = make_samples(indices)
            if len(samples) != len(indices):
                raise RuntimeError(f"make_samples returned {len(samples)} samples for {len(indices)} indices")
            for i, smp in zip(indices, samples):
                latent = torch.as_tensor(smp["latent"]).detach().float().cpu().numpy().astype(latent_dtype)
                if tuple(latent.shape) != tuple(latent_shape):
                    raise RuntimeError(f"sample {i}: latent shape {latent.shape} != expected {tuple(latent_shape)}")
                if not np.isfinite(latent).all():
                    raise RuntimeError(f"sample {i}: the latent has non-finite values (after the cast to {latent_dtype})")
                meta = {"index": i, "shard_size": len(indices), "settings_sha": digest, **smp.get("meta", {})}
                sample = {"__key__": f"{prefix}-{i:08d}", "latent.npy": latent, "caption.txt": smp["caption"]}
                if with_context:
                    ctx = torch.as_tensor(smp["context"]).detach().float().cpu().numpy()
                    if ctx.ndim != 2:
                        raise RuntimeError(f"sample {i}: context must be (L, D), got {ctx.shape}")
                    meta["context_length"] = int(ctx.shape[0])
                    sample["context.npy"] = trim_context(ctx).astype(latent_dtype)
                sample["meta.json"] = meta
                sink.write(sample)
                bar.update(1)
        os.replace(tmp, path)
        written.append(path)
    bar.close()

    # 3. the shard list, once every shard exists (under torchrun: whichever process finishes last)
    manifest = None
    if all(p.exists() for p in paths):
        manifest = out / f"{prefix}-shards.json"
        _write_json_atomic(manifest, {"settings_sha": digest, "num_samples": num_samples,
                                      "samples_per_shard": samples_per_shard, "shards": [p.name for p in paths]})
    return {"shards": paths, "written": written, "kept": kept, "manifest": manifest}


# ----------------------------------------------------------------------------- the two sources


def synthesize_teacher(
    pipe,
    out_dir: str | os.PathLike,
    prompts: list[str],
    *,
    num_samples: int | None = None,
    samples_per_shard: int = 64,
    steps: int = 100,
    guidance: float = 5.0,
    shift: float = 3.0,
    sampler: str = "euler",
    seed: int = 0,
    num_frames: int = 8,
    height: int = 64,
    width: int = 64,
    batch_size: int = 1,
    latent_dtype: str = "float16",
    store_context: bool = True,
    prefix: str = "train",
    progress: bool = True,
    rank: int | None = None,
    world: int | None = None,
    prompts_id: str | None = None,
    settings_extra: dict | None = None,
) -> dict:
    """Teacher samples of `pipe` (a TurboPipeline) into latent shards; see `write_latent_shards`.

    prompts: sample i uses prompts[i % len(prompts)]; num_samples: None = len(prompts).
    steps, guidance (CFG weight, 1 = off), shift (timestep shift), sampler (a SAMPLERS key): the
    teacher's sampler; seed: sample i's noise comes from seed + i. num_frames/height/width: pixel size
    of the videos the latents decode to. batch_size: samples per teacher call. store_context: also
    store the text states (else the trainer encodes the caption). prompts_id: names the prompt list
    in the settings (e.g. "toy captions ...", so that more samples extend a run); None = the sha256 of
    the list. settings_extra: more identifying fields (e.g. the checkpoint path). Also writes
    <out_dir>/uncond.safetensors.
    """
    from safetensors.torch import save_file

    from turbo_infer.samplers import SAMPLERS
    from turbo_infer.text_encoders import check_prompts

    prompts = check_prompts(prompts)
    if num_samples is None:
        num_samples = len(prompts)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not (float(guidance) >= 0 and np.isfinite(guidance)):
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
    if not (float(shift) > 0 and np.isfinite(shift)):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    pipe.check_size(num_frames, height, width)
    latent_shape = tuple(pipe.vae.latent_shape(num_frames, height, width))
    settings = {"source": "teacher", "steps": steps, "guidance": float(guidance), "shift": float(shift),
                "sampler": sampler, "seed": seed, "num_frames": num_frames, "height": height, "width": width,
                "prompts": prompts_id or "sha256:" + hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
                **(settings_extra or {})}

    def make_samples(indices: range) -> list[dict]:
        out = []
        for first in range(indices.start, indices.stop, batch_size):  # consecutive: item j gets seed + first + j
            idx = range(first, min(first + batch_size, indices.stop))
            texts = [prompts[i % len(prompts)] for i in idx]
            latents = pipe.generate_latents(texts, steps=steps, guidance=guidance, seed=seed + first,
                                            num_frames=num_frames, height=height, width=width, sampler=sampler,
                                            shift=shift, progress=False)  # (b, C, F', H', W') float32
            context = pipe.text_encoder.encode(texts) if store_context else [None] * len(texts)  # (b, L, D), cached
            for i, text, lat, ctx in zip(idx, texts, latents, context):
                out.append({"latent": lat, "context": ctx, "caption": text, "meta": {"source": "teacher", "seed": seed + i}})
        return out

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        uncond = pipe.text_encoder.empty_embedding().float().cpu().contiguous()  # (1, L, D)
    tmp = out / f".uncond.safetensors.{os.getpid()}.tmp"
    save_file({"embedding": uncond}, str(tmp))
    publish_file(tmp, out / "uncond.safetensors")
    return write_latent_shards(out, num_samples, samples_per_shard, make_samples, settings=settings,
                               latent_shape=latent_shape, latent_dtype=latent_dtype, with_context=store_context,
                               prefix=prefix, progress=progress, rank=rank, world=world)


def encode_toy_videos(
    out_dir: str | os.PathLike,
    num_samples: int,
    samples_per_shard: int = 256,
    *,
    seed: int = 0,
    split: str = "train",
    text_encoder=None,
    batch_size: int = 64,
    latent_dtype: str = "float16",
    prefix: str | None = None,
    progress: bool = True,
    rank: int | None = None,
    world: int | None = None,
) -> dict:
    """Real toy videos (generator sample i of (seed, split)) through the ToyCodec into latent shards.

    text_encoder: `encode(list[str]) -> (B, L, D)` to store the captions' text states; None = no
    context (the trainer encodes the captions). prefix: None = the split's name. float16 latents are
    exact enough to round back to the same uint8 pixels (|error| <= 2^-11 < half a pixel step 1/127.5).
    meta.json also keeps the sample's seed and ground-truth attributes.
    """
    from turbo_infer.vae import ToyCodec
    from turbo_train.toyworld.generator import HEIGHT, NUM_FRAMES, SPLITS, WIDTH, generate_sample, sample_seed, video_to_float

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    codec = ToyCodec()
    latent_shape = codec.latent_shape(NUM_FRAMES, HEIGHT, WIDTH)  # (48, 8, 16, 16)
    settings = {"source": "toy_codec", "seed": seed, "split": split,
                "text_encoder": type(text_encoder).__name__ if text_encoder is not None else None}

    def make_samples(indices: range) -> list[dict]:
        out = []
        for first in range(indices.start, indices.stop, batch_size):
            idx = range(first, min(first + batch_size, indices.stop))
            seeds = [sample_seed(seed, i, split) for i in idx]
            toys = [generate_sample(s, split=split) for s in seeds]
            video = video_to_float(np.stack([t.video for t in toys]))  # (b, 3, F, H, W) in [-1, 1]
            latents = codec.encode(video)  # (b, 48, F, H/4, W/4)
            captions = [t.caption for t in toys]
            context = text_encoder.encode(captions) if text_encoder is not None else [None] * len(toys)
            for s, t, lat, ctx in zip(seeds, toys, latents, context):
                out.append({"latent": lat, "context": ctx, "caption": t.caption,
                            "meta": {"source": "toy_codec", "seed": s, "split": split, "attributes": t.attributes}})
        return out

    return write_latent_shards(out_dir, num_samples, samples_per_shard, make_samples, settings=settings,
                               latent_shape=latent_shape, latent_dtype=latent_dtype,
                               with_context=text_encoder is not None, prefix=prefix or split, progress=progress,
                               rank=rank, world=world)


# ----------------------------------------------------------------------------- CLI


def build_parser(prog: str = "turbo-train synth") -> argparse.ArgumentParser:
    from turbo_infer.models.wan import WAN_CONFIGS
    from turbo_infer.samplers import SAMPLERS

    p = argparse.ArgumentParser(prog=prog, description="Write latent shards (latent.npy, context.npy, caption.txt, "
                                "meta.json) for training without the original videos (data.source: latent_shards).")
    sub = p.add_subparsers(dest="mode", required=True, metavar="{teacher,toy-videos}")

    def common(q, default_spp):
        q.add_argument("--out", required=True, metavar="DIR", help="output directory of the shards")
        q.add_argument("--num-samples", type=int, default=None, metavar="N",
                       help="samples to write (teacher: default = the number of prompts in --prompts-file)")
        q.add_argument("--samples-per-shard", type=int, default=default_spp, metavar="K",
                       help=f"samples per tar shard, the last one shorter (default: {default_spp})")
        q.add_argument("--latent-dtype", default="float16", choices=LATENT_DTYPES,
                       help="stored dtype of latents and text states (default: float16)")
        q.add_argument("--no-context", action="store_true",
                       help="do not store text states (context.npy); training then encodes caption.txt")
        q.add_argument("--batch-size", type=int, default=None, help="samples per model call")
        q.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
        q.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    t = sub.add_parser("teacher", help="sample a teacher pipeline (toy or Wan2.1) into latent shards")
    t.add_argument("--config", default="toy", choices=sorted(WAN_CONFIGS), help="DiT preset of the teacher (default: toy)")
    t.add_argument("--checkpoint", metavar="PATH", help="teacher weights (default for toy: the shipped toy teacher)")
    t.add_argument("--text-encoder", metavar="PATH", help="text encoder directory (umT5 for Wan: required; MiniLM for toy)")
    t.add_argument("--vae", metavar="PATH", help="Wan VAE directory (Wan configs only)")
    t.add_argument("--prompts-file", metavar="PATH", help="one prompt per non-blank line (Wan: required; toy: default "
                   "= the toy generator's captions of --toy-split / --toy-seed)")
    t.add_argument("--toy-split", default="train", choices=("train", "eval"), help="toy captions' split (default: train)")
    t.add_argument("--toy-seed", type=int, default=0, help="toy captions' dataset seed (default: 0)")
    t.add_argument("--steps", type=int, default=100, help="sampler steps (default: 100, RCM.md §7)")
    t.add_argument("--guidance", type=float, default=5.0, help="CFG weight; 1 = off (default: 5)")
    t.add_argument("--shift", type=float, default=3.0, help="timestep shift (default: 3, RCM.md §7)")
    t.add_argument("--sampler", default="euler", choices=sorted(SAMPLERS), help="sampler (default: euler)")
    t.add_argument("--seed", type=int, default=0, help="noise seed: sample i uses seed + i (default: 0)")
    t.add_argument("--frames", type=int, default=None, help="video frames (default: toy 8, Wan 81)")
    t.add_argument("--height", type=int, default=None, help="video height in pixels (default: toy 64, Wan 480)")
    t.add_argument("--width", type=int, default=None, help="video width in pixels (default: toy 64, Wan 832)")
    t.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="teacher compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    t.add_argument("--prefix", default="train", help="shard and key prefix (default: train)")
    common(t, 64)

    v = sub.add_parser("toy-videos", help="encode real toy videos through the ToyCodec into latent shards")
    v.add_argument("--seed", type=int, default=0, help="toy dataset seed (default: 0)")
    v.add_argument("--split", default="train", choices=("train", "eval"), help="toy split (default: train)")
    v.add_argument("--text-encoder", metavar="PATH", help="MiniLM directory for the text states (default: the shipped one)")
    v.add_argument("--prefix", default=None, help="shard and key prefix (default: the split)")
    common(v, 256)
    return p


def _device(parser, name: str | None) -> torch.device:
    if name is None:
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {dev} requested but CUDA is not available")
    return dev


def main(argv: list[str] | None = None, prog: str = "turbo-train synth") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for opt, val, low in (("--num-samples", args.num_samples, 1), ("--samples-per-shard", args.samples_per_shard, 1),
                          ("--batch-size", args.batch_size, 1)):
        if val is not None and val < low:
            parser.error(f"{opt}: must be >= {low}, got {val}")
    device = _device(parser, args.device)
    progress = not args.no_progress
    try:
        if args.mode == "toy-videos":
            if args.num_samples is None:
                parser.error("--num-samples: required for toy-videos")
            text = None
            if not args.no_context:
                from turbo_infer.text_encoders import MiniLMTextEncoder

                text = MiniLMTextEncoder(device=device, path=args.text_encoder)
            res = encode_toy_videos(args.out, args.num_samples, args.samples_per_shard, seed=args.seed,
                                    split=args.split, text_encoder=text, batch_size=args.batch_size or 64,
                                    latent_dtype=args.latent_dtype, prefix=args.prefix, progress=progress)
        else:
            res = _teacher(parser, args, device, progress)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(f"{prog}: {len(res['written'])} shard(s) written, {len(res['kept'])} kept (verified) in {args.out}"
          + (f"; shard list {res['manifest']}" if res["manifest"] else "; other processes still writing"))
    return 0


def _teacher(parser, args, device, progress) -> dict:
    from turbo_infer.pipeline import TOY_TEACHER_PATH, TurboPipeline

    toy = args.config == "toy"
    if toy and args.vae is not None:
        parser.error("--vae: only for Wan configs; the toy world uses the fixed ToyCodec")
    if not toy:
        for opt, val in (("--checkpoint", args.checkpoint), ("--text-encoder", args.text_encoder), ("--vae", args.vae),
                         ("--prompts-file", args.prompts_file)):
            if val is None:
                parser.error(f"{opt}: required for --config {args.config}")
    if args.prompts_file is not None:
        prompts = read_prompts_file(args.prompts_file)
    else:
        if args.num_samples is None:
            parser.error("--num-samples: required when the prompts are the toy captions (no --prompts-file)")
        prompts = toy_prompts(args.num_samples, seed=args.toy_seed, split=args.toy_split)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if toy:
        checkpoint = Path(args.checkpoint) if args.checkpoint else TOY_TEACHER_PATH
        pipe = TurboPipeline.toy(checkpoint, device=device, dtype=dtype, text_encoder_path=args.text_encoder)
    else:
        checkpoint = Path(args.checkpoint)
        pipe = TurboPipeline.wan(checkpoint, args.text_encoder, args.vae, config=args.config, device=device, dtype=dtype)
    extra = {"config": args.config, "checkpoint": str(checkpoint.resolve()), "dtype": str(dtype).removeprefix("torch.")}
    prompts_id = None if args.prompts_file else f"toy captions split={args.toy_split} seed={args.toy_seed}"
    return synthesize_teacher(
        pipe, args.out, prompts, num_samples=args.num_samples, samples_per_shard=args.samples_per_shard,
        steps=args.steps, guidance=args.guidance, shift=args.shift, sampler=args.sampler, seed=args.seed,
        num_frames=args.frames or (8 if toy else 81), height=args.height or (64 if toy else 480),
        width=args.width or (64 if toy else 832), batch_size=args.batch_size or (8 if toy else 1),
        latent_dtype=args.latent_dtype, store_context=not args.no_context, prefix=args.prefix, progress=progress,
        prompts_id=prompts_id, settings_extra=extra)


if __name__ == "__main__":
    sys.exit(main(prog="python -m turbo_train.synth"))
