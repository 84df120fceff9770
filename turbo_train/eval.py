"""`turbo-eval`: judge a toy-world generator (a checkpoint and sampler settings) with the toy judge.

For N prompts (fixed seed; even-indexed prompts use training caption templates, odd-indexed ones
the held-out paraphrase templates never seen in training) it generates one video each and reports:
  adherence           mean fraction of the prompt's attributes the judge recognises (all prompts,
                      and separately for seen / held-out templates)
  per-attribute acc.  background, number of objects, shape/color/motion per object
  frechet             Fréchet distance between judge features of the generated videos and of as
                      many real toy videos (other seeds)
  diversity           mean pairwise judge-feature distance among videos of one prompt over several
                      seeds (few-step students tend to collapse modes), with the same statistic for
                      real videos of the same attributes as a reference; per prompt and its standard
                      error over prompts too (prompt j always gets the same seeds: two models' values pair)
  s_per_video         generation wall time per video (text encoding + sampling + decoding)
  fidelity            with --reference: PSNR (dB) and judge-feature distance of each video against
                      the video a reference model made from the same prompt and the same noise (the
                      reference run's --save-videos), averaged: how closely an approximation (SLA,
                      a quantized bundle, a student) follows the reference model's sampling
It writes `report.json` and a contact sheet `contact_sheet.png` (one row per video, its 8 frames,
caption and adherence underneath) into --out-dir; with --save-videos also `videos.npz` (the
generated videos, uint8, with their captions and seed: a later run's --reference).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from turbo_infer.models.token_order import token_tile_arg
from turbo_infer.samplers import SAMPLERS, mid_times_arg
from turbo_train.toyworld.generator import generate_sample
from turbo_train.toyworld.metrics import (adherence_per_video, diversity, diversity_per_prompt, frechet_bootstrap_stderr,
                                          frechet_distance, mean_stderr,
                                          paired_feature_distance, paired_psnr, per_attribute_accuracy)

EVAL_SEED_OFFSET = 10_000_000  # prompt seeds live far from the training stream's small seeds
DIVERSITY_PROMPTS = 8  # default: the first 8 evaluation prompts get the diversity seeds


# ----------------------------------------------------------------------------- prompts and videos


def eval_prompts(n: int, seed: int = 0) -> list[tuple[str, dict[str, Any], str]]:
    """n (caption, attributes, template split) triples; deterministic in seed."""
    out = []
    for i in range(n):
        split = "train" if i % 2 == 0 else "eval"
        s = generate_sample(EVAL_SEED_OFFSET + seed * 100_003 + i, split=split)
        out.append((s.caption, s.attributes, split))
    return out


def real_videos(attributes: list[dict[str, Any]] | None, n: int, seed: int) -> np.ndarray:
    """(n, F, H, W, 3) uint8 real toy videos: rendered for the given attributes (fresh pixel seeds),
    or random scenes when attributes is None."""
    from turbo_train.toyworld.generator import render

    vids = []
    for i in range(n):
        if attributes is None:
            vids.append(np.asarray(generate_sample(2 * EVAL_SEED_OFFSET + seed * 7919 + i).video))
        else:
            vids.append(np.asarray(render(attributes[i % len(attributes)], np.random.default_rng(3 * EVAL_SEED_OFFSET + seed * 7919 + i))))
    return np.stack(vids)


def generate_batched(pipe, prompts: list[str], *, batch_size: int, seed: int, progress: bool, **sample_kw) -> tuple[np.ndarray, float]:
    """Videos for prompts (prompt i with seed + i) -> ((N, F, H, W, 3) uint8, seconds per video)."""
    from tqdm.auto import tqdm

    videos, t0 = [], time.perf_counter()
    bar = tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", disable=not progress)
    for start in bar:
        chunk = prompts[start:start + batch_size]
        v = pipe.generate(chunk, seed=seed + start, progress=False, **sample_kw)
        videos.append(np.asarray(v))
    seconds = time.perf_counter() - t0
    return np.concatenate(videos), seconds / max(1, len(prompts))


# ----------------------------------------------------------------------------- saved videos (--save-videos / --reference)

VIDEOS_FILE = "videos.npz"
FEATURES_FILE = "features.npz"  # judge features of the generated and the real videos (Fréchet's two sets)


def save_videos(path: Path, videos: np.ndarray, captions: list[str], seed: int) -> None:
    """videos (N, F, H, W, 3) uint8 with their captions and seed, written atomically (compressed npz)."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, videos=np.asarray(videos, dtype=np.uint8), captions=np.asarray(captions), seed=np.int64(seed))
    os.replace(tmp, path)


def load_reference_videos(path: Path, captions: list[str], seed: int) -> np.ndarray:
    """The videos of a reference run (its out-dir or its videos.npz) for exactly these prompts and seed;
    a clear error naming the file when it is missing, unreadable or made for other prompts."""
    path = Path(path)
    file = path / VIDEOS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"--reference: {file} not found (write it with turbo-eval --save-videos)")
    try:
        with np.load(file, allow_pickle=False) as z:
            videos, ref_captions, ref_seed = z["videos"], [str(c) for c in z["captions"]], int(z["seed"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--reference: {file} is not a turbo-eval videos file ({e})") from e
    if ref_seed != seed or ref_captions != list(captions):
        raise ValueError(f"--reference: {file} holds {len(ref_captions)} videos of seed {ref_seed}; this run samples "
                         f"{len(captions)} prompts with seed {seed}: use the same --num-prompts and --seed")
    if videos.dtype != np.uint8 or videos.ndim != 5 or len(videos) != len(captions):
        raise ValueError(f"--reference: {file}: videos must be (N, F, H, W, 3) uint8 for its N captions, "
                         f"got {videos.dtype} {videos.shape}")
    return videos


# ----------------------------------------------------------------------------- contact sheet


def contact_sheet(videos: np.ndarray, captions: list[str], scores: list[float], path: Path, max_rows: int = 16) -> None:
    """PNG grid: one row per video (its frames side by side, 2x upscaled), caption + score below."""
    from PIL import Image, ImageDraw

    rows = min(max_rows, len(videos))
    F, H, W, _ = videos.shape[1:]
    scale, text_h = 2, 14
    sheet = Image.new("RGB", (F * W * scale, rows * (H * scale + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r in range(rows):
        strip = np.concatenate(list(videos[r]), axis=1)  # (H, F*W, 3)
        img = Image.fromarray(strip).resize((F * W * scale, H * scale), Image.NEAREST)
        y = r * (H * scale + text_h)
        sheet.paste(img, (0, y))
        draw.text((2, y + H * scale + 1), f"{scores[r]:.2f}  {captions[r]}"[:150], fill=(0, 0, 0))
    tmp = path.with_name(path.name + ".tmp.png")
    sheet.save(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the evaluation


def evaluate(pipe, judge, *, num_prompts: int = 256, diversity_prompts: int = DIVERSITY_PROMPTS, diversity_seeds: int = 4,
             steps: int = 50, guidance: float = 5.0, sampler: str = "euler", shift: float | None = None,
             sampler_options: dict | None = None, seed: int = 0, batch_size: int = 8, progress: bool = True,
             reference: np.ndarray | None = None,
             frechet_bootstrap: int = 20) -> tuple[dict[str, Any], np.ndarray, list[str], list[float], dict]:
    """Run the whole evaluation; returns (report, videos, captions, per-video adherence, judge features
    {"generated": (N, D), "real": (N, D)} of the Fréchet distance's two sets). reference:
    videos of another model for the same prompts and seed (load_reference_videos) -> fidelity figures.
    frechet_bootstrap: resamples for the Fréchet distance's standard error (0 = not computed)."""
    if num_prompts < 2:
        raise ValueError(f"num_prompts must be >= 2 (Fréchet needs a covariance), got {num_prompts}")
    if diversity_prompts < 0:
        raise ValueError(f"diversity_prompts must be >= 0 (0 skips the diversity measurement), got {diversity_prompts}")
    if diversity_prompts and diversity_seeds < 2:
        raise ValueError(f"diversity_seeds must be >= 2 (a distance needs two videos of a prompt), got {diversity_seeds}")
    if diversity_prompts > num_prompts:
        raise ValueError(f"diversity_prompts ({diversity_prompts}) must be <= num_prompts ({num_prompts}): the diversity "
                         "prompts are the first evaluation prompts")
    prompts = eval_prompts(num_prompts, seed)
    captions = [c for c, _, _ in prompts]
    attrs = [a for _, a, _ in prompts]
    kw = dict(steps=steps, guidance=guidance, sampler=sampler, shift=shift)
    if sampler_options:  # e.g. rcm's mid_times (recorded in the report's settings)
        kw["sampler_options"] = dict(sampler_options)
    videos, s_per_video = generate_batched(pipe, captions, batch_size=batch_size, seed=seed, progress=progress, **kw)

    # adherence and per-attribute accuracy from the judge's predictions
    pred = judge.predict_attributes(videos)
    per_video = adherence_per_video(pred, attrs)
    splits = np.array([s for _, _, s in prompts])
    report: dict[str, Any] = {
        "adherence": float(per_video.mean()),
        "adherence_stderr": mean_stderr(per_video),  # over prompts: ±2 of these is the prompt-sampling noise
        "adherence_seen_templates": float(per_video[splits == "train"].mean()),
        "adherence_heldout_templates": float(per_video[splits == "eval"].mean()),
        "per_attribute_accuracy": per_attribute_accuracy(pred, attrs),
        # per prompt, in prompt order: paired comparisons of two runs (same prompts and seed) need them
        "adherence_per_video": [round(float(v), 6) for v in per_video],
    }

    # Fréchet distance to as many real videos (random scenes, other seeds)
    gen_feats = judge.features(videos).cpu().numpy()
    real_feats = judge.features(real_videos(None, num_prompts, seed)).cpu().numpy()
    features = {"generated": gen_feats, "real": real_feats}  # for paired comparisons of two runs (features.npz)
    report["frechet"] = frechet_distance(gen_feats, real_feats)
    if frechet_bootstrap:  # the evaluation's own noise on it (bootstrap over both video sets)
        report["frechet_stderr"] = frechet_bootstrap_stderr(gen_feats, real_feats, frechet_bootstrap, seed)
    if reference is not None:  # paired fidelity to the reference model's videos (same prompts, same noise)
        if reference.shape != videos.shape:
            raise ValueError(f"reference videos {reference.shape} and generated videos {videos.shape} differ in shape")
        report["fidelity_psnr_db"] = float(paired_psnr(videos, reference).mean())
        ref_feats = judge.features(reference).cpu().numpy()
        report["fidelity_feature_dist"] = float(paired_feature_distance(gen_feats, ref_feats).mean())

    # diversity: several seeds of the same prompt; real videos of the same attributes as reference
    div_prompts = captions[:diversity_prompts]
    by_prompt_gen, by_prompt_real = [], []
    for j, caption in enumerate(div_prompts):
        vids, _ = generate_batched(pipe, [caption] * diversity_seeds, batch_size=batch_size,
                                   seed=seed + 1_000 * (j + 1), progress=False, **kw)
        by_prompt_gen.append(judge.features(vids).cpu().numpy())
        by_prompt_real.append(judge.features(real_videos([attrs[j]], diversity_seeds, seed + j)).cpu().numpy())
    # diversity_prompts = 0: not measured (None in the report). Per prompt too: the same prompts and seeds for
    # every model, so two reports give a paired diversity ratio with its standard error (tools/toy_figures.py)
    per_prompt = diversity_per_prompt(by_prompt_gen) if by_prompt_gen else None
    report["diversity"] = float(per_prompt.mean()) if per_prompt is not None else None
    report["diversity_per_prompt"] = per_prompt.tolist() if per_prompt is not None else None
    report["diversity_stderr"] = mean_stderr(per_prompt) if per_prompt is not None else None
    report["diversity_real"] = diversity(by_prompt_real) if by_prompt_real else None
    report["s_per_video"] = s_per_video
    report["settings"] = dict(num_prompts=num_prompts, diversity_prompts=diversity_prompts, diversity_seeds=diversity_seeds,
                              seed=seed, **kw)
    return report, videos, captions, per_video.tolist(), features


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turbo-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="toy DiT safetensors (default: the shipped toy teacher)")
    p.add_argument("--bundle", type=Path, default=None,
                   help="a toy bundle directory written by turbo-export (instead of --checkpoint); its hashes "
                        "are verified and its sampler, steps and guidance are the defaults")
    p.add_argument("--high-noise-expert", type=Path, default=None, metavar="PATH",
                   help="a second toy DiT that samples the flow times s >= --expert-boundary, the checkpoint the "
                        "rest (turbo_infer.models.experts; e.g. tools/caption_layout_probe.py --flow-min-time)")
    p.add_argument("--expert-boundary", type=float, default=0.9, metavar="S",
                   help="flow time where --high-noise-expert hands over (default 0.9)")
    p.add_argument("--allow-reference", action="store_true",
                   help="with --bundle: evaluate a bundle whose GPU kernels this device lacks (an h100 bundle on the "
                        "CPU) through the torch references, which emulate its int8 / fp8 arithmetic (slow)")
    p.add_argument("--judge", type=Path, default=None, help="judge safetensors (default: the shipped judge)")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="default: euler (a bundle: its own)")
    p.add_argument("--steps", type=int, default=None, help="default: 50 (a bundle: its own)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG weight (1 = conditional only; ignored by rcm); default 5 (a bundle: its own)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift (default: the toy world's)")
    p.add_argument("--rcm-mid-times", default=None, type=mid_times_arg, metavar="T1,T2,T3 | shift=S",
                   help="the rcm sampler's intermediate TrigFlow times (default: the spec's 1.5,1.4,1.0, Wan's grid); "
                        "shift=S moves that grid to timestep shift S (the toy world samples with 3)")
    p.add_argument("--attention", default=None, help="self-attention backend override, e.g. sla")
    p.add_argument("--topk", type=float, default=None, help="SLA topk (with --attention sla)")
    p.add_argument("--block-q", type=int, default=None,
                   help="SLA query block (with --attention sla; default 128; the toy SLA recipes use 64)")
    p.add_argument("--block-k", type=int, default=None,
                   help="SLA key block (with --attention sla; default 64; the toy SLA recipes use 16: at 512 "
                        "tokens 64-token blocks leave 8 key blocks, so topk 0.1 and 0.2 both keep one)")
    p.add_argument("--token-tile", type=token_tile_arg, default=None, metavar="F,H,W",
                   help="with --attention sla: order the tokens by 3D tiles of F frames x H rows x W columns so that "
                        "a block holds a tile (turbo_infer.models.token_order), e.g. 4,2,2; default raster order")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--diversity-prompts", type=int, default=None,
                   help="the first N prompts, each sampled with several seeds for the diversity figure (0 skips it; "
                        "at most --num-prompts; default 8, or --num-prompts if fewer)")
    p.add_argument("--diversity-seeds", type=int, default=4, help="seeds per diversity prompt (>= 2)")
    p.add_argument("--frechet-bootstrap", type=int, default=20, metavar="N",
                   help="bootstrap resamples for the Fréchet distance's standard error (0 skips it; each costs "
                        "one distance: ~0.2 s at 256 videos on 2 CPU cores)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", type=Path, default=Path("runs/eval"))
    p.add_argument("--save-videos", action="store_true",
                   help=f"also write the generated videos to OUT_DIR/{VIDEOS_FILE} (a later run's --reference)")
    p.add_argument("--reference", type=Path, default=None,
                   help="out-dir (or videos.npz) of an earlier --save-videos run with the same --num-prompts and "
                        "--seed: report the paired fidelity (PSNR, judge-feature distance) to its videos")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.checkpoint is not None and not a.checkpoint.is_file():
        p.error(f"--checkpoint: file not found: {a.checkpoint}")
    if a.bundle is not None and (a.checkpoint is not None or a.attention):
        p.error("--bundle brings its own weights and attention: drop --checkpoint / --attention")
    if a.bundle is not None and not (a.bundle / "manifest.json").is_file():
        p.error(f"--bundle: no manifest.json in {a.bundle}")
    if a.allow_reference and a.bundle is None:
        p.error("--allow-reference: only with --bundle")
    if a.high_noise_expert is not None and a.bundle is not None:
        p.error("--high-noise-expert: not with --bundle (a bundle is one few-step model)")
    if a.high_noise_expert is not None and not a.high_noise_expert.is_file():
        p.error(f"--high-noise-expert: file not found: {a.high_noise_expert}")
    if not 0.0 < a.expert_boundary < 1.0:
        p.error(f"--expert-boundary must be in (0, 1), got {a.expert_boundary}")
    if a.judge is not None and not a.judge.is_file():
        p.error(f"--judge: file not found: {a.judge}")
    if a.num_prompts < 2:
        p.error("--num-prompts must be >= 2")
    if a.diversity_prompts is None:
        a.diversity_prompts = min(DIVERSITY_PROMPTS, a.num_prompts)
    if a.diversity_prompts < 0:
        p.error("--diversity-prompts must be >= 0 (0 skips the diversity figure)")
    if a.diversity_prompts and a.diversity_seeds < 2:
        p.error("--diversity-seeds must be >= 2")
    if a.diversity_prompts > a.num_prompts:
        p.error(f"--diversity-prompts ({a.diversity_prompts}) must be <= --num-prompts ({a.num_prompts}): the diversity "
                "prompts are the first evaluation prompts")
    if a.frechet_bootstrap < 0 or a.frechet_bootstrap == 1:
        p.error("--frechet-bootstrap must be 0 (skip) or >= 2")
    if a.steps is not None and a.steps < 1:
        p.error("--steps must be >= 1")
    if a.topk is not None and not 0 < a.topk <= 1:
        p.error("--topk must be in (0, 1]")

    reference = None
    if a.reference is not None:  # checked before any model loads
        try:
            reference = load_reference_videos(a.reference, [c for c, _, _ in eval_prompts(a.num_prompts, a.seed)], a.seed)
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))

    from turbo_infer.pipeline import TurboPipeline
    from turbo_train.toyworld.judge import load_judge

    if a.bundle is not None:
        from turbo_infer.bundle import BundleTargetError

        try:
            pipe = TurboPipeline.from_bundle(a.bundle, device=a.device, allow_reference=a.allow_reference)
        except BundleTargetError as e:  # this device cannot run the target: say which flag evaluates it anyway
            p.error(f"--bundle: {e} (here: turbo-eval --allow-reference)")
    else:
        overrides = {}
        if a.attention:
            overrides["attention"] = a.attention
            opts = {"topk": a.topk, "block_q": a.block_q, "block_k": a.block_k, "token_tile": a.token_tile}
            overrides["attention_options"] = {k: v for k, v in opts.items() if v is not None}
        pipe = TurboPipeline.toy(checkpoint=a.checkpoint, device=a.device, high_noise_expert=a.high_noise_expert,
                                 expert_boundary=a.expert_boundary, **overrides)
    d = pipe.sample_defaults  # euler / 50 / CFG 5 for a checkpoint, a bundle's own settings
    a.sampler = d["sampler"] if a.sampler is None else a.sampler
    a.steps = d["steps"] if a.steps is None else a.steps
    a.guidance = d["guidance"] if a.guidance is None else a.guidance
    if a.sampler == "rcm" and not 1 <= a.steps <= 4:
        p.error("--sampler rcm takes --steps 1..4")
    sampler_options = {}
    if a.rcm_mid_times is not None:
        if a.sampler != "rcm":
            p.error("--rcm-mid-times: only with the rcm sampler")
        if a.steps > 1 + len(a.rcm_mid_times):
            p.error(f"--steps {a.steps} needs {a.steps - 1} --rcm-mid-times, got {len(a.rcm_mid_times)}")
        sampler_options["mid_times"] = a.rcm_mid_times
    judge = load_judge(a.judge, device=a.device)
    report, videos, captions, scores, features = evaluate(
        pipe, judge, num_prompts=a.num_prompts, diversity_prompts=a.diversity_prompts, diversity_seeds=a.diversity_seeds,
        steps=a.steps, guidance=a.guidance, sampler=a.sampler, shift=a.shift, sampler_options=sampler_options,
        seed=a.seed, batch_size=a.batch_size,
        progress=not a.no_progress, reference=reference, frechet_bootstrap=a.frechet_bootstrap,
    )
    report["checkpoint"] = (f"bundle {a.bundle}" if a.bundle else str(a.checkpoint) if a.checkpoint
                            else "shipped toy teacher")
    if a.high_noise_expert is not None:
        report["high_noise_expert"] = {"path": str(a.high_noise_expert), "boundary": a.expert_boundary}
    if a.reference is not None:
        report["reference"] = str(a.reference)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    if a.save_videos:
        save_videos(a.out_dir / VIDEOS_FILE, videos, captions, a.seed)
    tmp = a.out_dir / "features.tmp.npz"  # judge features: paired comparisons of two runs (toy_gpu_suite)
    np.savez(tmp, **features)
    os.replace(tmp, a.out_dir / FEATURES_FILE)
    tmp = a.out_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, a.out_dir / "report.json")
    contact_sheet(videos, captions, scores, a.out_dir / "contact_sheet.png")
    print(f"adherence {report['adherence']:.4f} ± {report['adherence_stderr']:.4f} (standard error over prompts; "
          f"seen templates {report['adherence_seen_templates']:.4f}, held-out {report['adherence_heldout_templates']:.4f})")
    for k, v in report["per_attribute_accuracy"].items():
        print(f"  {k:<12} {v:.3f}")
    div = (f"diversity {report['diversity']:.3f} ± {report['diversity_stderr']:.3f} over {len(report['diversity_per_prompt'])} "
           f"prompts (real {report['diversity_real']:.3f})" if report["diversity"] is not None
           else "diversity not measured (--diversity-prompts 0)")
    fse = f" ± {report['frechet_stderr']:.2f}" if report.get("frechet_stderr") else ""
    print(f"frechet {report['frechet']:.3f}{fse}  {div}  {report['s_per_video']:.2f} s/video")
    if reference is not None:
        print(f"fidelity to {a.reference}: PSNR {report['fidelity_psnr_db']:.2f} dB, "
              f"judge-feature distance {report['fidelity_feature_dist']:.3f}")
    print(f"wrote {a.out_dir / 'report.json'} and {a.out_dir / 'contact_sheet.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
