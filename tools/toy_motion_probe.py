"""Why a toy DiT gets motion wrong: does it know which way time runs, and does it read the direction word?

    python tools/toy_motion_probe.py [--checkpoint CKPT] [--pairs 8] [--steps 50] [--device cpu]

Three measurements (the judge is not involved; motion is tracked by object colour, see
turbo_train/toyworld/motion.py):

  time reversal   on real toy videos noised to flow times s in --flow-times, the relative distance
                  ||f(R x_s) - R f(x_s)|| / ||f(x_s)|| between the model's output for the frames in
                  reverse order, reversed back, and its output for the video (same caption, same noise).
                  0 = the model commutes with reversing time, i.e. it cannot know which way time runs,
                  and so cannot tell "left" from "right" (a rightward path played backwards is a leftward
                  one). The same with a left-right mirror of the frames instead is printed beside it
                  (`hflip`): a network whose patch embedding spans two pixels along x is not mirror-
                  symmetric by construction, so a gap near 0 there too means the trained weights are.
  direction word  --pairs single-object captions with a moving object, each sampled twice from the same
                  noise: as written and with the direction word flipped (left <-> right, up <-> down).
                  word_flip_unchanged = the fraction of pairs whose tracked motion is the same both
                  times: 1 = the direction word has no effect on the video.
  tracked motion  of those 2 x --pairs videos against their captions: direction accuracy, axis accuracy
                  (either sign), sign accuracy (of those on the right axis) and the confusion table.
  prior drift     no sampling: the model's clean-video prediction x0 = x - s·v from pure noise at the
                  sampler's first flow times (--prior-times, default 1.0 and 0.98), for --prior-scenes
                  single-object captions and their direction-flipped twins, --prior-draws noises each
                  (shared by the twins). The object colour's soft centroid per frame gives a slope along
                  the caption's axis (px/frame, signed towards the caption's direction); prior_drift_gap =
                  mean slope under the caption minus under its twin. The data's own mean drifts apart by
                  twice the objects' speed (~7 px/frame, `*_data`, measured on rendered videos the same
                  way); a model whose first prediction does not move with the direction word has ~0, and
                  its samples get the direction from the noise alone (teacher v6: 0.0). mass_ratio: the
                  colour mass of the predictions over that of rendered videos of the same scenes (a slope
                  read from a prediction without the colour says nothing).

Writes benchmarks/toy_motion_probe.json (or --out): toy_motion_time_reversal_gap, toy_motion_hflip_gap,
toy_motion_word_flip_unchanged, toy_motion_direction_acc, toy_motion_axis_acc, toy_motion_sign_acc,
toy_motion_prior_drift_gap_s<time> (and its standard error, and *_data). --only-prior: the prior drift alone
(about a minute on 2 CPU cores).
On 2 CPU cores the default run takes about 3 minutes (16 videos of 50 CFG steps).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

from bench_harness import benchmark_doc, device_label
from turbo_infer.files import write_json

REPO = Path(__file__).resolve().parents[1]
SEED_OFFSET = 50_000_000  # scene seeds far from the training stream, turbo-eval and sla_gap
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    norm = a.float().norm()
    if norm == 0:
        raise ValueError("the model's output is all zeros: nothing to compare (an untrained zero-initialised head?)")
    return float((a.float() - b.float()).norm() / norm)


@torch.no_grad()
def symmetry_gaps(pipe, num_videos: int, flow_times: list[float], seed: int) -> dict[str, float]:
    """Mean relative gaps of the model under frame reversal and under a left-right mirror (module docstring)."""
    from turbo_train.toyworld.generator import generate_sample

    samples = [generate_sample(SEED_OFFSET + seed * 1_000 + i) for i in range(num_videos)]
    video = torch.as_tensor(np.stack([s.video for s in samples])).permute(0, 4, 1, 2, 3)  # (B, 3, F, H, W) uint8
    z = pipe.vae.encode(video.float().div(127.5).sub(1)).to(pipe.device, pipe.dtype)  # (B, C, F, H, W)
    context = pipe.text_encoder.encode([s.caption for s in samples]).to(pipe.device)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z)
    net = pipe.transformer
    gaps: dict[str, list[float]] = {"time_reversal": [], "hflip": []}
    for s in flow_times:
        x = (1 - s) * z + s * noise
        t = torch.full((len(x),), 1000.0 * s, device=pipe.device)
        y = net(x, timestep=t, context=context)
        for name, dim in (("time_reversal", 2), ("hflip", 4)):
            gaps[name].append(relative_gap(y, net(x.flip(dim), timestep=t, context=context).flip(dim)))
    return {name: float(np.mean(v)) for name, v in gaps.items()}


def caption_pairs(n: int, seed: int) -> tuple[list[str], list[str], list[dict], list[dict]]:
    """n single-object scenes with a moving object: (captions, flipped captions, attributes, flipped
    attributes); a pair shares its template and phrasing choices (same caption seed)."""
    from turbo_train.toyworld.attributes import sample_attributes
    from turbo_train.toyworld.captions import caption_for

    rng = np.random.default_rng(SEED_OFFSET + seed)
    caps, flipped, attrs, attrs_flipped = [], [], [], []
    for i in range(n):
        a = sample_attributes(int(rng.integers(2**31)), num_objects=1)
        a["objects"][0]["motion"] = list(OPPOSITE)[i % 4]  # all four directions, in turn
        b = copy.deepcopy(a)
        b["objects"][0]["motion"] = OPPOSITE[a["objects"][0]["motion"]]
        cseed = int(rng.integers(2**31))
        caps.append(caption_for(a, cseed))
        flipped.append(caption_for(b, cseed))
        attrs.append(a)
        attrs_flipped.append(b)
    return caps, flipped, attrs, attrs_flipped


def direction_word(pipe, pairs: int, steps: int | None, guidance: float | None, seed: int,
                   progress: bool) -> dict:
    """Sample each caption and its flipped twin from the same noise; track both (module docstring)."""
    from turbo_train.toyworld.motion import motion_confusion

    caps, flipped, attrs, attrs_flipped = caption_pairs(pairs, seed)
    kw = dict(steps=steps, guidance=guidance, seed=seed, progress=progress)
    videos = np.asarray(pipe.generate(caps, **kw))  # prompt i uses noise seed + i ...
    videos_flipped = np.asarray(pipe.generate(flipped, **kw))  # ... and so does its twin
    out = motion_confusion(np.concatenate([videos, videos_flipped]), attrs + attrs_flipped)
    motions = [objs[0] for objs in out.pop("tracked")]  # one object per scene: the twins are i and pairs + i
    unchanged = [m == mf for m, mf in zip(motions[:pairs], motions[pairs:]) if "unreadable" not in (m, mf)]
    out["word_flip_unchanged"] = float(np.mean(unchanged)) if unchanged else float("nan")
    out["readable_pairs"] = len(unchanged)
    out["examples"] = [[c, f] for c, f in zip(caps[:4], flipped[:4])]
    return out


AXIS = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}  # (0 = x / 1 = y, sign)


CHROMA_FLOOR = 8.0  # uint8 units: the backgrounds' blue hint projects to <= 5 on any object colour's chroma


def colour_mass(video: np.ndarray, color: str) -> np.ndarray:
    """(F, H, W) amount of `color` in each pixel, linear in how much of it a pixel holds: the pixel's chroma
    (RGB minus its grey mean) projected on the colour's chroma direction, less CHROMA_FLOOR, clipped at 0.
    The neutral backgrounds read ~0; an object pixel ~100-170; a pixel that is 20 % object and 80 %
    background (a blurred mean prediction) ~1/5 of that. A weight that falls off with the distance to the
    colour (as motion.py's tracker) would read such a blend as nothing."""
    from turbo_train.toyworld.generator import COLOR_RGB

    c = np.asarray(COLOR_RGB[color], dtype=np.float64)
    u = (c - c.mean()) / np.linalg.norm(c - c.mean())
    v = video.astype(np.float64)
    return np.clip((v - v.mean(-1, keepdims=True)) @ u - CHROMA_FLOOR, 0, None)


def soft_centroid_slope(video: np.ndarray, color: str, axis: int) -> float:
    """Least-squares slope (px/frame) of the per-frame centroid, along x (axis 0) or y (1), of `colour_mass`:
    a blurred prediction has no crisp object pixels for motion.py's tracker, but its colour mass still has a
    centre. video (F, H, W, 3); a frame without any of the colour counts as centred."""
    w = colour_mass(video, color)
    profile = w.sum(1 + axis)  # (F, W) for x, (F, H) for y
    centre = (profile.shape[1]) / 2
    pos = np.where(profile.sum(1) > 0, (profile * (np.arange(profile.shape[1]) + 0.5)).sum(1)
                   / np.maximum(profile.sum(1), 1e-9), centre)
    return float(np.polyfit(np.arange(len(pos)), pos, 1)[0])


@torch.no_grad()
def first_prediction(net, codec, noise: torch.Tensor, s: float, context: torch.Tensor) -> np.ndarray:
    """A model's clean-video prediction x0 = x - s·v from input `noise` at flow time s (the sampler's start
    when s = 1), decoded: float (B, F, H, W, 3) in [0, 255], not rounded (a faint blend keeps its mass)."""
    t = torch.full((len(noise),), 1000.0 * s, device=noise.device)
    x0 = noise.float() - s * net(noise, t, context).float()  # (B, C, F, H, W)
    return codec.decode(x0).clamp(-1, 1).add(1).mul(127.5).permute(0, 2, 3, 4, 1).cpu().numpy()


@torch.no_grad()
def prior_drift(pipe, scenes: int, draws: int, flow_times: list[float], seed: int) -> dict[str, float]:
    """The model's first clean-video predictions from pure noise, under each caption and its direction-
    flipped twin (module docstring, "prior drift"): {f"gap_s{s}": mean slope difference, f"gap_s{s}_stderr",
    "gap_data"} in px/frame."""
    from turbo_train.toyworld.generator import render

    caps, flipped, attrs, _ = caption_pairs(scenes, seed)
    net, g = pipe.transformer, torch.Generator().manual_seed(seed)
    c, f, h, w = pipe.vae.latent_shape(8, 64, 64)
    out: dict[str, float] = {}
    rendered_mass = np.mean([colour_mass(render(a, seed), a["objects"][0]["color"]).sum() for a in attrs])
    for s in flow_times:
        diffs, masses = [], []
        for cap, twin, a in zip(caps, flipped, attrs):
            obj = a["objects"][0]
            axis, sign = AXIS[obj["motion"]]
            noise = torch.randn((draws, c, f, h, w), generator=g).to(pipe.device, pipe.dtype)
            slopes = []
            for text in (cap, twin):
                ctx = pipe.text_encoder.encode([text] * draws).to(pipe.device)
                video = first_prediction(net, pipe.vae, noise, s, ctx)
                slopes.append(np.array([sign * soft_centroid_slope(v, obj["color"], axis) for v in video]))
                masses.extend(colour_mass(v, obj["color"]).sum() for v in video)
            diffs.extend(slopes[0] - slopes[1])  # paired: same noise under both captions
        out[f"gap_s{s:g}"] = float(np.mean(diffs))
        out[f"gap_s{s:g}_stderr"] = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
        # how much of the object's colour the prediction holds, against rendered videos of the same scenes
        # (a slope of 0 from a prediction without the colour would say nothing about direction)
        out[f"mass_ratio_s{s:g}"] = float(np.mean(masses) / max(rendered_mass, 1e-9))
    rng = np.random.default_rng(seed)
    data = []
    for a in attrs:  # the same measurement on rendered videos: each caption's drift minus its twin's
        obj = a["objects"][0]
        axis, sign = AXIS[obj["motion"]]
        twin = copy.deepcopy(a)
        twin["objects"][0]["motion"] = OPPOSITE[obj["motion"]]
        data.append(sign * (soft_centroid_slope(render(a, rng), obj["color"], axis)
                            - soft_centroid_slope(render(twin, rng), obj["color"], axis)))
    out["gap_data"] = float(np.mean(data))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="toy DiT safetensors (default: the shipped toy teacher)")
    p.add_argument("--pairs", type=int, default=8, help="caption pairs for the direction-word test (>= 1)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's, 50)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's, 5)")
    p.add_argument("--real-videos", type=int, default=8, help="real videos for the symmetry gaps (>= 1)")
    p.add_argument("--flow-times", default="0.9,0.7,0.5", help="flow times s of the symmetry gaps, in (0, 1]")
    p.add_argument("--prior-scenes", type=int, default=8, help="captions (and flipped twins) of the prior drift (>= 1)")
    p.add_argument("--prior-draws", type=int, default=8, help="noises per caption of the prior drift (>= 2)")
    p.add_argument("--prior-times", default="1.0,0.98", help="flow times of the prior drift, in (0, 1]")
    p.add_argument("--only-prior", action="store_true", help="measure the prior drift alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "toy_motion_probe.json")
    p.add_argument("--no-progress", action="store_true")
    return p


def flow_times_arg(p: argparse.ArgumentParser, option: str, value: str) -> list[float]:
    """A comma-separated list of flow times in (0, 1], or a parser error naming `option`."""
    try:
        times = [float(s) for s in value.split(",") if s.strip()]
    except ValueError:
        p.error(f"{option} must be comma-separated numbers, got {value!r}")
    if not times or not all(0 < s <= 1 for s in times):
        p.error(f"{option} must be in (0, 1], got {value!r}")
    return times


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.pairs < 1 or a.real_videos < 1:
        p.error("--pairs and --real-videos must be >= 1")
    flow_times = flow_times_arg(p, "--flow-times", a.flow_times)
    prior_times = flow_times_arg(p, "--prior-times", a.prior_times)
    if a.prior_scenes < 1 or a.prior_draws < 2:
        p.error("--prior-scenes must be >= 1 and --prior-draws 2 or more")
    if a.checkpoint is not None and not a.checkpoint.is_file():
        p.error(f"checkpoint not found: {a.checkpoint}")
    from turbo_infer.pipeline import TurboPipeline

    pipe = TurboPipeline.toy(a.checkpoint, device=a.device)
    figures, extra = {}, {}
    if not a.only_prior:
        gaps = symmetry_gaps(pipe, a.real_videos, flow_times, a.seed)
        print(f"time-reversal gap {gaps['time_reversal']:.4f}   left-right mirror gap {gaps['hflip']:.4f}"
              f"   (0 = the model commutes with the flip; s = {flow_times})")
        word = direction_word(pipe, a.pairs, a.steps, a.guidance, a.seed, not a.no_progress)
        print(f"direction word flipped, same noise: tracked motion unchanged in {word['word_flip_unchanged']:.2f} of "
              f"{word['readable_pairs']} pairs (1 = the word has no effect)")
        print(f"tracked motion of {word['n']} videos: direction {word['direction_acc']:.2f}, axis {word['axis_acc']:.2f}, "
              f"sign {word['sign_acc']:.2f}, unreadable {word['unreadable']}")
        for want, row in sorted(word["confusion"].items()):
            print(f"  prompt {want:<6} -> " + ", ".join(f"{k} {v}" for k, v in sorted(row.items())))
        figures.update({"toy_motion_time_reversal_gap": round(gaps["time_reversal"], 5),
                        "toy_motion_hflip_gap": round(gaps["hflip"], 5),
                        "toy_motion_word_flip_unchanged": round(word["word_flip_unchanged"], 4),
                        "toy_motion_direction_acc": round(word["direction_acc"], 4),
                        "toy_motion_axis_acc": round(word["axis_acc"], 4), "toy_motion_sign_acc": round(word["sign_acc"], 4)})
        extra = {"confusion": word["confusion"], "examples": word["examples"]}
    drift = prior_drift(pipe, a.prior_scenes, a.prior_draws, prior_times, a.seed)
    for k, v in drift.items():
        figures[f"toy_motion_prior_drift_{k}"] = round(v, 4)
    print("prior drift (first predictions from pure noise, caption minus flipped twin, px/frame): "
          + ", ".join(f"s={t:g} {drift[f'gap_s{t:g}']:+.3f} ± {drift[f'gap_s{t:g}_stderr']:.3f}" for t in prior_times)
          + f"; rendered videos {drift['gap_data']:+.2f}; colour mass of the predictions / rendered: "
          + ", ".join(f"{drift[f'mass_ratio_s{t:g}']:.2f}" for t in prior_times))
    doc = benchmark_doc(figures, device=device_label(a.device),
                        command="python tools/toy_motion_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                        checkpoint=str(a.checkpoint or "shipped toy teacher"), **extra)
    write_json(a.out, doc)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
