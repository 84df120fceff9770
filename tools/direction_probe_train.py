"""Can a small toy DiT learn which way an object moves from its caption? A CPU experiment for the toy
teacher's open problem (recipes/toy/README.md, "Why motion fails": teacher v6 gets the axis right and the
sign of the motion at chance).

    python tools/direction_probe_train.py [--minutes 6] [--variants rope,frame_embed] [--device cuda] [--out DIR]

One red square on the dark background moves left or right; the caption says which. For each variant a
small Wan DiT (2 blocks, width 128, 2 heads of 64: the toy's RoPE split) is trained from scratch by
rectified flow (x0 prediction, logit-normal times, 10 % caption dropout, AdamW) for --minutes, then 16
videos per direction are sampled (Euler, CFG 4) and the square is tracked by colour
(turbo_train.toyworld.motion): sign accuracy among the videos that move horizontally. Variants:
    rope         the toy architecture as is: time enters only through RoPE's relative offsets
    frame_embed  plus a learned embedding of the latent frame index (WanConfig.frame_embed_len = 8)
    position     plus learned embeddings of the frame, row and column index (frame_embed_len 8,
                 space_embed_len 16): absolute positions, which a prediction from pure noise needs to put
                 the object's average path anywhere (recipes/toy/README.md, "Where the direction is lost")
Besides the samples, each variant's prior drift: its clean-video prediction from pure noise at s = 1 and
0.98 under "right" minus under "left" (px/frame along x, 16 noises shared by both captions; the data's is
~7, tools/toy_motion_probe.py). --high-noise-fraction draws that share of the training times from a
logit-normal at --high-noise-logit-mean ± 0.5 (2.5: s ~ 0.92) instead of the default one at 0.8 ± 1.
A variant that gets the sign right while the other stays at chance says where the v6 teacher's trouble
comes from. Results: OUT/results.json, a contact sheet of samples per variant (OUT/samples_<variant>.png)
and a printed line per variant (seeded; the training's length decides a lot, so they give steps and losses). On 2 CPU cores 6 minutes are ~650 steps of 16 videos, too few for
either variant to draw a trackable moving square (recipes/toy/logs/direction_probe_cpu.json): run it on a GPU.
On an H200, rendering in this process bounds it (1.7 minutes: ~2000 steps of 32, still not coherent motion;
recipes/toy/logs/direction_probe_gpu_1.7min.json); --prerender N renders a bank of N videos once with a
process pool (~730 videos/s on 2 CPU cores) and trains from it on the GPU, e.g.
    python tools/direction_probe_train.py --device cuda --prerender 32768 --batch-size 64 --minutes 4
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from turbo_infer.models.wan import WAN_CONFIGS, WanModel
from turbo_infer.pipeline import TurboPipeline
from turbo_infer.text_encoders import MiniLMTextEncoder
from turbo_infer.vae import ToyCodec
from turbo_train.methods.flow_matching import sample_time
from turbo_train.recipe import FlowMatchingConfig
from turbo_train.toyworld.generator import render, video_to_float
from turbo_train.toyworld.motion import motion_from_track, object_track

DIRECTIONS = ("left", "right")
VARIANTS = {"rope": {}, "frame_embed": {"frame_embed_len": 8}, "position": {"frame_embed_len": 8, "space_embed_len": 16}}


def scene(direction: str) -> dict:
    return {"background": "dark", "num_objects": 1,
            "objects": [{"shape": "square", "color": "red", "motion": direction}]}


def caption(direction: str) -> str:
    return f"a red square moving {direction} on a dark background"


def small_config(**extra):
    from dataclasses import replace

    return replace(WAN_CONFIGS["toy"], dim=128, ffn_dim=256, num_heads=2, num_layers=2, prediction="x0", **extra)


def encode(videos, codec: ToyCodec, device) -> torch.Tensor:
    """Rendered videos (a list of (F, H, W, 3) uint8) -> toy-codec latents (B, C, F, H', W') on `device`."""
    return codec.encode(video_to_float(torch.from_numpy(np.stack(videos)))).to(device)


def batch(rng: np.random.Generator, size: int, codec: ToyCodec, device) -> tuple[torch.Tensor, list[int]]:
    dirs = [int(rng.integers(2)) for _ in range(size)]
    return encode([_render_one((d, int(rng.integers(2**31)))) for d in dirs], codec, device), dirs


def _render_one(job: tuple[int, int]) -> np.ndarray:
    d, seed = job
    return render(scene(DIRECTIONS[d]), seed)


def prerender(n: int, seed: int, codec: ToyCodec, device, workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A bank of n videos (random direction, scene seed) rendered once by a process pool and encoded to
    latents on `device` -> (latents (n, C, F, H, W) float32, directions (n,) long): training then draws
    batches from it instead of rendering each step in this process (the GPU's step is ~ms, rendering a
    batch of 32 ~50 ms). Call it before CUDA starts in this process (the pool forks)."""
    import multiprocessing

    rng = np.random.default_rng(seed + 7919)
    jobs = [(int(rng.integers(2)), int(rng.integers(2**31))) for _ in range(n)]
    workers = workers or os.cpu_count() or 1
    t = time.perf_counter()
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            videos = pool.map(_render_one, jobs, chunksize=max(1, n // (4 * workers)))
    else:
        videos = [_render_one(j) for j in jobs]
    latents = torch.cat([encode(videos[i:i + 256], codec, device) for i in range(0, n, 256)])
    print(f"  rendered and encoded {n} videos in {time.perf_counter() - t:.1f} s ({workers} processes)", flush=True)
    return latents, torch.tensor([d for d, _ in jobs], device=device)


def train(variant: str, minutes: float, seed: int, text: torch.Tensor, empty: torch.Tensor, codec: ToyCodec,
          batch_size: int = 16, lr: float = 3e-4, device="cpu", bank=None,
          high_noise_fraction: float = 0.0, high_noise_logit_mean: float = 2.5) -> tuple[WanModel, dict]:
    """bank: `prerender`'s (latents, directions) to draw batches from (None: render each batch here)."""
    torch.manual_seed(seed)
    model = WanModel(small_config(**VARIANTS[variant])).to(device)
    times = FlowMatchingConfig(logit_mean=0.8, high_noise_fraction=high_noise_fraction,
                               high_noise_logit_mean=high_noise_logit_mean)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    t0, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - t0 < 60 * minutes:
        if bank is None:
            x0, dirs = batch(rng, batch_size, codec, device)
        else:
            idx = torch.from_numpy(rng.integers(0, len(bank[0]), batch_size)).to(bank[0].device)
            x0, dirs = bank[0][idx], bank[1][idx].tolist()
        ctx = text[torch.tensor(dirs, device=text.device)]  # (B, L, 384)
        drop = torch.from_numpy(rng.random(batch_size) < 0.1).to(device)
        ctx = torch.where(drop[:, None, None], empty.expand_as(ctx), ctx)
        s = sample_time(batch_size, times, device=device)  # logit-normal at +0.8, plus the high-noise share
        eps = torch.randn_like(x0)
        xs = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * eps
        v = model(xs, 1000 * s, ctx)
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"  {variant}: step {step}, loss {np.mean(losses[-50:]):.4f}, {time.perf_counter() - t0:.0f} s",
                  flush=True)
    return model.eval(), {"steps": step, "final_loss": float(np.mean(losses[-50:])) if losses else math.nan,
                          "seconds": round(time.perf_counter() - t0, 1)}


class _Fixed:
    """The two captions' MiniLM states, for TurboPipeline (encode / empty_embedding / dim)."""

    def __init__(self, enc: MiniLMTextEncoder):
        self.enc, self.dim = enc, enc.dim

    def encode(self, prompts):
        return self.enc.encode(prompts)

    def empty_embedding(self):
        return self.enc.empty_embedding()


@torch.no_grad()
def prior_drift(model: WanModel, text: torch.Tensor, codec: ToyCodec, seed: int, draws: int = 16,
                times=(1.0, 0.98)) -> dict:
    """Mean x-slope (px/frame) of the red mass in the model's clean-video prediction from pure noise under
    "right" minus under "left" (the same noises for both), per flow time: {"s1": ..., "s0.98": ...}, with
    the standard error and the prediction's red mass over a rendered scene's ("mass_s1", ...: a slope read
    from a prediction without the colour says nothing)."""
    from toy_motion_probe import colour_mass, first_prediction, soft_centroid_slope

    device = text.device
    g = torch.Generator().manual_seed(seed)
    c, f, h, w = codec.latent_shape(8, 64, 64)
    out = {}
    rendered = colour_mass(render(scene("right"), seed), "red").sum()
    for s in times:
        noise = torch.randn((draws, c, f, h, w), generator=g).to(device)
        masses = []
        slopes = {}
        for d in DIRECTIONS:
            video = first_prediction(model, codec, noise, s, text[DIRECTIONS.index(d)][None].expand(draws, -1, -1))
            slopes[d] = np.array([soft_centroid_slope(v, "red", 0) for v in video])
            masses.extend(colour_mass(v, "red").sum() for v in video)
        diff = slopes["right"] - slopes["left"]
        out[f"mass_s{s:g}"] = round(float(np.mean(masses) / max(rendered, 1e-9)), 4)
        out[f"s{s:g}"] = round(float(diff.mean()), 4)
        out[f"s{s:g}_stderr"] = round(float(diff.std(ddof=1) / np.sqrt(draws)), 4)
    return out


@torch.no_grad()
def sign_accuracy(model: WanModel, text_encoder, per_direction: int, seed: int, device="cpu",
                  sheet: Path | None = None) -> dict:
    """Sample per_direction videos per caption and track the red square: counts per caption of left, right,
    still, vertical and unreadable (no red square found in enough frames); sheet: also a contact sheet
    PNG of the first four videos of each caption (what "unreadable" looked like)."""
    pipe = TurboPipeline(model, text_encoder, ToyCodec(), device=device, default_shift=3.0)
    prompts = [caption(d) for d in DIRECTIONS for _ in range(per_direction)]
    videos = pipe.generate(prompts, steps=20, guidance=4.0, sampler="euler", seed=seed, progress=False).cpu().numpy()
    counts = {d: {"left": 0, "right": 0, "still": 0, "vertical": 0, "unreadable": 0} for d in DIRECTIONS}
    for video, prompt in zip(videos, prompts):
        want = prompt.split("moving ")[1].split()[0]
        got = motion_from_track(object_track(video, "red"))
        counts[want]["unreadable" if got is None else "vertical" if got in ("up", "down") else got] += 1
    if sheet is not None:
        from turbo_train.eval import contact_sheet

        pick = [i for d in range(len(DIRECTIONS)) for i in range(d * per_direction, d * per_direction + min(4, per_direction))]
        contact_sheet(videos[pick], [prompts[i] for i in pick], [0.0] * len(pick), sheet)
    horizontal = sum(c["left"] + c["right"] for c in counts.values())
    right = counts["left"]["left"] + counts["right"]["right"]
    return {"counts": counts, "horizontal": horizontal,
            "sign_acc": right / horizontal if horizontal else math.nan}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=6.0, help="training time per variant")
    p.add_argument("--variants", default="rope,frame_embed")
    p.add_argument("--per-direction", type=int, default=16, help="sampled videos per direction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/direction"))
    p.add_argument("--device", default="cpu", help="where the small DiT trains and samples (cpu or cuda)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--high-noise-fraction", type=float, default=0.0,
                   help="share of training times from a logit-normal at --high-noise-logit-mean +- 0.5 (default 0: none)")
    p.add_argument("--high-noise-logit-mean", type=float, default=2.5,
                   help="centre of those times in logit units (2.5: s = 0.92; 4: s = 0.98, the sampler's first steps)")
    p.add_argument("--prerender", type=int, default=0, metavar="N",
                   help="render N videos once with a process pool and train from that bank (0: render each batch; "
                        "on a GPU, e.g. --prerender 32768 --batch-size 64: the step is then GPU-bound, ~10x the steps)")
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {sorted(VARIANTS)}")
    if a.prerender < 0:
        p.error("--prerender must be >= 0")
    if not 0 <= a.high_noise_fraction <= 1:
        p.error(f"--high-noise-fraction must be in [0, 1], got {a.high_noise_fraction}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    codec = ToyCodec()
    bank = prerender(a.prerender, a.seed, codec, a.device) if a.prerender else None  # before CUDA starts here
    enc = MiniLMTextEncoder(max_length=32, device=a.device)
    text = enc.encode([caption(d) for d in DIRECTIONS])  # (2, L, 384)
    empty = enc.empty_embedding()  # (1, L, 384)
    results = {}
    for v in variants:
        print(f"== {v}: training {a.minutes} min", flush=True)
        model, log = train(v, a.minutes, a.seed, text, empty, codec, a.batch_size, device=a.device, bank=bank,
                           high_noise_fraction=a.high_noise_fraction, high_noise_logit_mean=a.high_noise_logit_mean)
        log["prior_drift"] = prior_drift(model, text, codec, a.seed + 2)
        print(f"   {v}: prior drift right - left (px/frame; data ~7): {log['prior_drift']}", flush=True)
        a.out.mkdir(parents=True, exist_ok=True)
        acc = sign_accuracy(model, _Fixed(enc), a.per_direction, a.seed + 1, device=a.device,
                            sheet=a.out / f"samples_{v}.png")
        results[v] = {**log, **acc}
        print(f"   {v}: {log['steps']} steps, loss {log['final_loss']:.4f}; sign accuracy {acc['sign_acc']:.2f} "
              f"over {acc['horizontal']} horizontally moving videos; {acc['counts']}", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps({"settings": vars(a) | {"out": str(a.out)}, "results": results},
                                                   indent=2) + "\n")
    print(f"wrote {a.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
