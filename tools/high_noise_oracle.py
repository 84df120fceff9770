"""Would a direction-aware high-noise stage fix the toy teacher's motion? An oracle probe for issue 4
(recipes/toy/README.md, "Where the direction is lost").

    python tools/high_noise_oracle.py [--prompts 64] [--modes teacher,mean@0.95,single@0.9] [--renders 16]

The teacher's first predictions ignore the direction word (its prior at s = 1 does not drift), so the
direction of every sample is decided by the noise. Before training a high-noise expert (Wan 2.2 splits its
denoiser the same way) this asks whether a perfect one would help: each mode samples the same turbo-eval
prompts from the same noise with the teacher's 50-step CFG Euler sampler, except that the steps above a
flow time s_b are replaced by an oracle, and the judge reads the videos:

    teacher        the teacher alone (what turbo-eval measures)
    mean@S         above S the clean-video prediction is the prompt's exact s = 1 optimum, the mean latent of
                   --renders renders of its scene (what an expert trained on clean s = 1 targets learns);
                   Euler with a constant prediction is exact on the straight path, so the state at the
                   first step at or below S is x = s·noise + (1 - s)·mean, and the teacher samples from there
    single@S       the same with one rendered video of the scene instead of the mean (SDEdit from a real
                   video at S: whether the teacher keeps a direction that the state at S already carries)
    expert@S       no oracle: the steps above S run the --expert network (with the same CFG), the rest the
                   teacher: a trained high-noise expert (e.g. `tools/caption_layout_probe.py --mix-flow N
                   --flow-min-time S --save ...`), as Wan 2.2 splits its denoiser at a boundary time
    cfg@S:W        no oracle: the teacher alone, with CFG weight W (instead of --guidance) on the steps above S:
                   whether stronger guidance while the layout is decided commits the sample to the caption's
                   direction (a sampler setting, no training)

Per mode: adherence (± standard error over prompts), per-attribute accuracy, and the paired adherence
difference to `teacher` (same prompts and noise). Results: --out (JSON) and a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

MODES = ("teacher", "mean", "single", "expert", "cfg")


def parse_mode(text: str) -> tuple[str, float | None, float | None]:
    """'teacher' -> ('teacher', None, None); 'mean@0.95' -> ('mean', 0.95, None); 'cfg@0.9:8' ->
    ('cfg', 0.9, 8.0) (the CFG weight above S); clear errors otherwise."""
    name, _, at = text.partition("@")
    if name not in MODES:
        raise ValueError(f"mode {text!r}: unknown kind {name!r}; choose from {MODES}")
    if name == "teacher":
        if at:
            raise ValueError(f"mode {text!r}: 'teacher' takes no @S")
        return name, None, None
    at, colon, w = at.partition(":")
    if (name == "cfg") != bool(colon):
        form = "cfg@S:W with a CFG weight W" if name == "cfg" else f"{name}@S (no :W)"
        raise ValueError(f"mode {text!r}: write {form}")
    try:
        s = float(at)
    except ValueError:
        raise ValueError(f"mode {text!r}: write {name}@S with a flow time S in (0, 1)") from None
    if not 0.0 < s < 1.0:
        raise ValueError(f"mode {text!r}: S must be in (0, 1), got {s}")
    if name != "cfg":
        return name, s, None
    try:
        weight = float(w)
    except ValueError:
        raise ValueError(f"mode {text!r}: the CFG weight after ':' must be a number, got {w!r}") from None
    if not 0.0 <= weight <= 50.0:
        raise ValueError(f"mode {text!r}: the CFG weight must be in [0, 50], got {weight}")
    return name, s, weight


def scene_latents(attributes: list[dict], renders: int, seed: int, codec) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean latent over `renders` renders, the first render's latent) per scene, each (N, C, F, H, W); the
    codec is linear, so the mean video's latent is the mean latent."""
    from turbo_train.toyworld.generator import render

    means, singles = [], []
    for i, attrs in enumerate(attributes):
        videos = np.stack([render(attrs, np.random.default_rng([seed, i, k])) for k in range(renders)])
        x = torch.from_numpy(videos).float().div(127.5).sub(1).permute(0, 4, 1, 2, 3)  # (K, 3, F, H, W)
        z = codec.encode(x)
        means.append(z.mean(0))
        singles.append(z[0])
    return torch.stack(means), torch.stack(singles)


@torch.no_grad()
def sample_from(net, noise: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor, *, steps: int,
                guidance: float, shift: float, dtype: torch.dtype | None = None, start: float | None = None,
                target: torch.Tensor | None = None, high_guidance: tuple[float, float] | None = None
                ) -> torch.Tensor:
    """Euler CFG sampling of `net` (the teacher, or `BoundaryExperts` of teacher and expert); with `start`
    the steps above it use `target` as the clean-video prediction, so sampling begins at the first step at
    or below it from s·noise + (1 - s)·target; `high_guidance=(S, W)` samples the steps at s >= S with CFG
    weight W instead of `guidance`."""
    from turbo_infer.samplers import flow_schedule, guided_velocity

    sig = flow_schedule(steps, shift).tolist()
    first = 0 if start is None else next(i for i, s in enumerate(sig) if s <= start)
    x = noise.float()
    if start is not None:
        x = sig[first] * x + (1.0 - sig[first]) * target.to(x)
    for i in range(first, steps):
        w = high_guidance[1] if high_guidance is not None and sig[i] >= high_guidance[0] else guidance
        v = guided_velocity(net, x, sig[i], context, uncond, w, dtype)
        x = x + (sig[i + 1] - sig[i]) * v
    return x


def run(pipe, judge, modes: list[tuple[str, float | None, float | None]], *, prompts: int, renders: int, batch_size: int,
        steps: int, guidance: float, shift: float, seed: int, progress: bool = True, expert=None) -> dict:
    from tqdm.auto import tqdm

    from turbo_infer.models.experts import BoundaryExperts
    from turbo_infer.samplers import batch_randn
    from turbo_train.eval import eval_prompts
    from turbo_train.toyworld.metrics import adherence_per_video, mean_stderr, per_attribute_accuracy

    items = eval_prompts(prompts, seed)
    captions, attrs = [c for c, _, _ in items], [a for _, a, _ in items]
    t = time.perf_counter()
    means, singles = scene_latents(attrs, renders, seed, pipe.vae)
    print(f"  {prompts} scenes x {renders} renders encoded in {time.perf_counter() - t:.1f} s", flush=True)
    shape = pipe.vae.latent_shape(8, 64, 64)
    uncond = pipe.text_encoder.empty_embedding().to(pipe.device)
    out: dict = {"settings": dict(prompts=prompts, renders=renders, steps=steps, guidance=guidance, shift=shift,
                                  seed=seed), "modes": {}}
    scores: dict[str, np.ndarray] = {}
    for name, start, weight in modes:
        label = name if start is None else f"{name}@{start:g}" + (f":{weight:g}" if weight is not None else "")
        # expert@S: the expert samples s >= S, the teacher the rest (what turbo-eval --high-noise-expert runs)
        net = BoundaryExperts(pipe.transformer, expert, start) if name == "expert" else pipe.transformer
        oracle = name in ("mean", "single")  # the steps above S replaced by a target video's straight path
        t = time.perf_counter()
        videos = []
        for b in tqdm(range(0, prompts, batch_size), desc=label, disable=not progress):
            idx = list(range(b, min(prompts, b + batch_size)))
            gens = [torch.Generator().manual_seed(seed + i) for i in idx]  # turbo-eval's noise for prompt i
            noise = batch_randn(shape, gens, pipe.device)
            context = pipe.text_encoder.encode([captions[i] for i in idx]).to(pipe.device)
            target = (means if name == "mean" else singles)[idx].to(pipe.device) if oracle else None
            lat = sample_from(net, noise, context, uncond, steps=steps, guidance=guidance, shift=shift,
                              dtype=pipe.dtype, start=start if oracle else None, target=target,
                              high_guidance=(start, weight) if name == "cfg" else None)
            videos.append(torch.cat(list(pipe.decode_uint8(lat)), dim=1).numpy())
        videos = np.concatenate(videos)
        pred = judge.predict_attributes(videos)
        per_video = adherence_per_video(pred, attrs)
        scores[label] = per_video
        out["modes"][label] = {
            "adherence": float(per_video.mean()), "adherence_stderr": mean_stderr(per_video),
            "per_attribute_accuracy": per_attribute_accuracy(pred, attrs),
            "seconds": round(time.perf_counter() - t, 1),
            "adherence_per_video": [round(float(v), 6) for v in per_video],  # prompt order: paired comparisons
        }
        if "teacher" in scores and label != "teacher":
            diff = per_video - scores["teacher"]
            out["modes"][label]["minus_teacher"] = float(diff.mean())
            out["modes"][label]["minus_teacher_stderr"] = mean_stderr(diff)
        print(f"  {label:<14} adherence {per_video.mean():.3f} ± {mean_stderr(per_video):.3f}  "
              f"motions {[round(v, 2) for k, v in out['modes'][label]['per_attribute_accuracy'].items() if 'motion' in k]}",
              flush=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="toy DiT (default: the shipped teacher)")
    p.add_argument("--expert", type=Path, default=None, help="the high-noise network of the expert@S modes")
    p.add_argument("--modes", default="teacher,mean@0.95,single@0.9",
                   help="comma-separated: teacher, mean@S, single@S, expert@S, cfg@S:W (module docstring)")
    p.add_argument("--prompts", type=int, default=64, help="turbo-eval's first N prompts")
    p.add_argument("--renders", type=int, default=16, help="renders per scene for the mean target")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        modes = [parse_mode(m.strip()) for m in a.modes.split(",") if m.strip()]
    except ValueError as e:
        p.error(f"--modes: {e}")
    if not modes:
        p.error("--modes: give at least one mode")
    if a.prompts < 1 or a.renders < 1 or a.batch_size < 1 or a.steps < 1:
        p.error("--prompts, --renders, --batch-size and --steps must be >= 1")
    for flag, path in (("--checkpoint", a.checkpoint), ("--expert", a.expert)):
        if path is not None and not path.is_file():
            p.error(f"{flag}: file not found: {path}")
    if any(name == "expert" for name, _, _ in modes) != (a.expert is not None):
        p.error("--expert and the expert@S modes go together")
    from turbo_infer.files import write_json
    from turbo_infer.pipeline import TurboPipeline
    from turbo_train.toyworld.judge import load_judge

    pipe = TurboPipeline.toy(a.checkpoint, device=a.device)
    judge = load_judge(None, device=a.device)
    expert = None
    if a.expert is not None:
        from turbo_infer.models.wan import WanModel

        expert = WanModel.from_pretrained(a.expert, None, device=a.device, dtype=pipe.dtype).eval()
    out = run(pipe, judge, modes, prompts=a.prompts, renders=a.renders, batch_size=a.batch_size, steps=a.steps,
              guidance=a.guidance, shift=a.shift, seed=a.seed, progress=not a.no_progress, expert=expert)
    out["checkpoint"] = str(a.checkpoint) if a.checkpoint else "shipped toy teacher"
    out["expert"] = str(a.expert) if a.expert else None
    if a.out is not None:
        write_json(a.out, out)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
