"""How far SLA models' velocities are from the dense toy teacher's, on held-out toy videos.

SLA fine-tuning (recipes/toy/sla.yaml) trains the SLA model to reproduce the dense teacher's velocity
v_T(x_s, s, c) on noised videos x_s = (1 - s)·x0 + s·eps. This tool measures that objective on videos
neither model trained on (the toy world's held-out caption templates, seeds far from training), at a
fixed grid of flow times along the 50-step sampler's schedule and fixed noise, for several models in one
run:

    relative velocity error = sum ||v_model - v_T||^2 / sum ||v_T||^2   (per flow time, and over all)

Models: `untrained` (the teacher with its self-attention swapped for SLA at --topk/--block-q/--block-k and
a zero proj_l: what fine-tuning starts from; `untrained:0.2` at topk 0.2), `dense` (the teacher itself: 0, a check of the tool), or a
safetensors path (an SLA model exported by turbo-train, with its SLA settings in the file). Name each
with NAME=SPEC; figures are written as `<NAME>_velocity_rel_err` to benchmarks/sla_gap.json
(or --out).

    python tools/sla_gap.py --model toy_sla0.1_untrained=untrained \\
        --model toy_sla0.1_finetuned=runs/toy-sla/ema.safetensors --num-videos 64

Runs on the CPU (about a minute per model for 64 videos on 2 cores) or on a GPU (--device cuda).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench_harness import benchmark_doc, device_label
from turbo_infer.files import write_json
from turbo_infer.models.token_order import token_tile_arg

REPO = Path(__file__).resolve().parents[1]
SEED_OFFSET = 40_000_000  # video seeds far from the training stream and from turbo-eval's prompts
DEFAULT_U = (0.95, 0.8, 0.6, 0.4, 0.2, 0.05)  # sampler positions (1 = pure noise) before the shift


def parse_model(spec: str) -> tuple[str, str]:
    name, sep, what = spec.partition("=")
    if not sep or not name or not what:
        raise argparse.ArgumentTypeError(f"--model takes NAME=SPEC (SPEC: untrained, dense or a .safetensors path), got {spec!r}")
    if what.startswith("untrained:"):
        try:
            topk = float(what.split(":", 1)[1])
        except ValueError:
            topk = -1.0
        if not 0 < topk <= 1:
            raise argparse.ArgumentTypeError(f"--model {name}: untrained:TOPK takes a topk in (0, 1], got {what!r}")
    elif what not in ("untrained", "dense") and not Path(what).is_file():
        raise argparse.ArgumentTypeError(f"--model {name}: file not found: {what}")
    return name, what


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=parse_model, action="append", required=True, metavar="NAME=SPEC",
                   help="a model to measure (repeatable): untrained[:TOPK], dense or a safetensors path")
    p.add_argument("--teacher", type=Path, default=None, help="dense teacher (default: the shipped toy teacher)")
    p.add_argument("--topk", type=float, default=0.1, help="SLA topk of `untrained` (default 0.1)")
    p.add_argument("--block-q", type=int, default=16, help="SLA query block of `untrained` (default 16, the toy recipe's)")
    p.add_argument("--block-k", type=int, default=16, help="SLA key block of `untrained` (default 16, the toy recipe's)")
    p.add_argument("--token-tile", type=token_tile_arg, default=None, metavar="F,H,W",
                   help="token order of `untrained`: 3D tiles of F frames x H rows x W columns (default raster)")
    p.add_argument("--num-videos", type=int, default=64, help="held-out toy videos (default 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shift", type=float, default=3.0, help="the toy sampler's timestep shift (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "sla_gap.json")
    return p


def held_out_batches(n: int, batch_size: int, seed: int):
    """(videos uint8 (B, F, H, W, 3), captions) of held-out toy videos, deterministic in seed."""
    import numpy as np

    from turbo_train.toyworld.generator import generate_sample

    for start in range(0, n, batch_size):
        samples = [generate_sample(SEED_OFFSET + seed * 100_003 + i, split="eval") for i in range(start, min(n, start + batch_size))]
        yield torch.from_numpy(np.stack([s.video for s in samples])), [s.caption for s in samples]


def load_models(args, teacher):
    from turbo_infer.models.wan import WanModel
    from turbo_train.sla_convert import convert_to_sla

    models = {}
    for name, spec in args.model:
        if spec == "dense":
            models[name] = teacher
        elif spec.startswith("untrained"):
            topk = float(spec.split(":", 1)[1]) if ":" in spec else args.topk
            models[name] = convert_to_sla(teacher, topk=topk, block_q=args.block_q, block_k=args.block_k,
                                          token_tile=args.token_tile)
        else:
            models[name] = WanModel.from_pretrained(spec, device=args.device, dtype=torch.float32)
        models[name].eval().requires_grad_(False)
    return models


@torch.no_grad()
def measure(args) -> tuple[dict[str, dict[float, float]], list[float]]:
    """{model: {s: relative error}} (key -1.0: over all times) and the flow times."""
    from tqdm.auto import tqdm

    from turbo_infer.models.wan import WanModel
    from turbo_infer.pipeline import TOY_TEACHER_PATH
    from turbo_infer.samplers import shift_time
    from turbo_infer.text_encoders import MiniLMTextEncoder
    from turbo_infer.vae import ToyCodec
    from turbo_train.methods.batching import encode_batch

    device = torch.device(args.device)
    teacher = WanModel.from_pretrained(args.teacher or TOY_TEACHER_PATH, device=device, dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    models = load_models(args, teacher)
    text, codec = MiniLMTextEncoder(device=device), ToyCodec()
    times = [float(shift_time(u, args.shift)) for u in DEFAULT_U]
    err = {m: {s: 0.0 for s in times} for m in models}
    ref = {s: 0.0 for s in times}
    batches = list(held_out_batches(args.num_videos, args.batch_size, args.seed))
    bar = tqdm(total=len(batches) * len(times), desc="velocity gap", unit="batch-time")
    for b, (video, captions) in enumerate(batches):
        x0, context = (t.to(device) for t in encode_batch({"video": video, "caption": captions}, codec, text.encode))
        for j, s in enumerate(times):
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + b * 101 + j)
            eps = torch.randn(x0.shape, generator=g).to(device)
            x_s = (1.0 - s) * x0 + s * eps
            t = torch.full((x0.shape[0],), 1000.0 * s, device=device)
            v_t = teacher(x_s, timestep=t, context=context).float()
            ref[s] += float(v_t.pow(2).sum())
            for name, net in models.items():
                v = v_t if net is teacher else net(x_s, timestep=t, context=context).float()
                err[name][s] += float((v - v_t).pow(2).sum())
            bar.update()
    bar.close()
    out = {}
    for name in models:
        out[name] = {s: err[name][s] / ref[s] for s in times}
        out[name][-1.0] = sum(err[name].values()) / sum(ref.values())
    return out, times


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.num_videos < 1 or args.batch_size < 1:
        p.error("--num-videos and --batch-size must be >= 1")
    if not 0 < args.topk <= 1:
        p.error("--topk must be in (0, 1]")
    names = [n for n, _ in args.model]
    if len(set(names)) != len(names):
        p.error(f"--model names must differ, got {names}")
    torch.manual_seed(args.seed)
    result, times = measure(args)
    print(f"relative velocity error vs the dense teacher, {args.num_videos} held-out videos")
    print(f"{'model':<32}" + "".join(f"  s={s:.3f}" for s in times) + "       all")
    for name, r in result.items():
        print(f"{name:<32}" + "".join(f"  {r[s]:7.4f}" for s in times) + f"   {r[-1.0]:7.4f}")
    doc = benchmark_doc(
        {f"{name}_velocity_rel_err": round(r[-1.0], 5) for name, r in result.items()},
        device=device_label(args.device),
        command="python tools/sla_gap.py " + " ".join(sys.argv[1:] if argv is None else argv),
        per_time={name: {f"{s:.4f}": round(r[s], 5) for s in times} for name, r in result.items()},
    )
    write_json(args.out, doc)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
