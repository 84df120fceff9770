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

Writes benchmarks/toy_motion_probe.json (or --out): toy_motion_time_reversal_gap, toy_motion_hflip_gap,
toy_motion_word_flip_unchanged, toy_motion_direction_acc, toy_motion_axis_acc, toy_motion_sign_acc.
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="toy DiT safetensors (default: the shipped toy teacher)")
    p.add_argument("--pairs", type=int, default=8, help="caption pairs for the direction-word test (>= 1)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's, 50)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's, 5)")
    p.add_argument("--real-videos", type=int, default=8, help="real videos for the symmetry gaps (>= 1)")
    p.add_argument("--flow-times", default="0.9,0.7,0.5", help="flow times s of the symmetry gaps, in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "toy_motion_probe.json")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.pairs < 1 or a.real_videos < 1:
        p.error("--pairs and --real-videos must be >= 1")
    try:
        flow_times = [float(s) for s in a.flow_times.split(",") if s.strip()]
    except ValueError:
        p.error(f"--flow-times must be comma-separated numbers, got {a.flow_times!r}")
    if not flow_times or not all(0 < s <= 1 for s in flow_times):
        p.error(f"--flow-times must be in (0, 1], got {a.flow_times!r}")
    if a.checkpoint is not None and not a.checkpoint.is_file():
        p.error(f"checkpoint not found: {a.checkpoint}")
    from turbo_infer.pipeline import TurboPipeline

    pipe = TurboPipeline.toy(a.checkpoint, device=a.device)
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
    figures = {"toy_motion_time_reversal_gap": round(gaps["time_reversal"], 5), "toy_motion_hflip_gap": round(gaps["hflip"], 5),
               "toy_motion_word_flip_unchanged": round(word["word_flip_unchanged"], 4),
               "toy_motion_direction_acc": round(word["direction_acc"], 4), "toy_motion_axis_acc": round(word["axis_acc"], 4),
               "toy_motion_sign_acc": round(word["sign_acc"], 4)}
    doc = benchmark_doc(figures, device=device_label(a.device),
                        command="python tools/toy_motion_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                        checkpoint=str(a.checkpoint or "shipped toy teacher"), confusion=word["confusion"],
                        examples=word["examples"])
    write_json(a.out, doc)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
