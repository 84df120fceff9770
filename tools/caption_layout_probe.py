"""Can a toy DiT make its layout depend on the caption? A regression probe for the toy teacher's direction
problem (recipes/toy/README.md, "Where the direction is lost").

    python tools/caption_layout_probe.py [--targets direction,global,same] [--steps 400] [--init scratch|teacher]

At flow time s = 1 the best clean-video prediction is the caption's mean video. This tool renders the
direction probe's scene (one red square moving left or right, tools/direction_probe_train.py) --videos times
per direction, takes the exact mean latent per caption, and trains a DiT to output it from the caption
alone: no sampling noise in the target, so what it cannot learn it cannot represent or cannot reach. Three
target pairs of the same size separate what is hard:
    direction  the two captions' own means: the difference is a layout (the square's mean path, signed
               along x, changing with the frame), so the prediction must depend on caption x position
    global     caption 0's mean, and caption 1's = the same + a constant per latent channel, as large as
               the direction difference: a caption effect the same everywhere
    same       the rightward mean for both captions: a moving layout that does not depend on the caption
    toy        the toy world's own captions: --scenes scenes drawn as training draws them (any objects,
               motions, backgrounds, paraphrases), each caption's target the mean of --renders renders
               (its conditional mean, up to 1/--renders of its variance); logged on the first scene's
               caption. Read the result with `tools/toy_motion_probe.py --only-prior --checkpoint` on
               the model --save writes (held-out captions: does the first prediction now move with the
               direction word?). --mix-flow N adds ordinary flow matching on N single renders per step
               (one per scene; the teacher recipe's times, 10 % caption dropout): trained at s = 1 alone
               the teacher learns the direction but forgets the rest (recipes/toy/README.md)
Per target, every --log-every steps: `err` (relative distance of the prediction under caption 0 to its
target), `floor` (what ignoring the caption can reach: the targets' average), `gain` (the prediction's
caption difference over the targets', 1 = learned, 0 = the caption has no effect) and `cos` (their cosine).

--init scratch (default): the small probe DiT (2 blocks, width 128) with absolute frame/row/column tables,
input zero (--input noise: pure noise, as sampling starts). --init teacher: the shipped toy teacher with
zero-initialised tables added (trained at --table-lr-scale times the rate), input noise.
Results: --out (JSON) and a line per log step.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from direction_probe_train import DIRECTIONS, VARIANTS, caption, prerender, small_config  # noqa: E402

TARGETS = ("direction", "global", "same", "toy")


def caption_means(videos: int, seed: int, codec) -> torch.Tensor:
    """(2, C, F, H, W): the mean toy-codec latent of `videos` rendered videos per direction (left, right)."""
    latents, dirs = prerender(2 * videos, seed, codec, "cpu")
    return torch.stack([latents[dirs == d].mean(0) for d in range(len(DIRECTIONS))])


def _render_mean(job: tuple[int, int]) -> tuple[str, np.ndarray, np.ndarray]:
    """(caption, mean float video (F, H, W, 3) in [0, 255] over `renders` seeds, the first render) of one
    toy scene."""
    from turbo_train.toyworld.attributes import sample_attributes
    from turbo_train.toyworld.captions import caption_for
    from turbo_train.toyworld.generator import render

    seed, renders = job
    attrs = sample_attributes(seed)
    videos = [render(attrs, seed * 1000 + k) for k in range(renders)]
    return caption_for(attrs, seed), np.mean(videos, axis=0, dtype=np.float32), videos[0]


def toy_caption_means(scenes: int, renders: int, seed: int, codec,
                      singles: bool = False) -> tuple[list[str], torch.Tensor] | tuple[list[str], torch.Tensor, torch.Tensor]:
    """`scenes` toy captions and their mean latents (scenes, C, F, H, W) over `renders` renders each (the
    codec is linear: the latent of the mean video is the mean latent), rendered by a process pool; with
    `singles` also each scene's first render's latent (scenes, C, F, H, W): ordinary training videos."""
    import multiprocessing
    import os

    jobs = [(seed * 1_000_003 + i, renders) for i in range(scenes)]
    t = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        out = pool.map(_render_mean, jobs, chunksize=max(1, scenes // 16))
    def encode(videos) -> torch.Tensor:
        video = torch.from_numpy(np.stack(videos)).float().div(127.5).sub(1).permute(0, 4, 1, 2, 3)
        return torch.cat([codec.encode(video[i:i + 256]) for i in range(0, scenes, 256)])

    latents = encode([v for _, v, _ in out])
    print(f"  {scenes} toy scenes x {renders} renders in {time.perf_counter() - t:.1f} s", flush=True)
    if singles:
        return [c for c, _, _ in out], latents, encode([r for _, _, r in out])
    return [c for c, _, _ in out], latents


def targets_for(kind: str, means: torch.Tensor) -> torch.Tensor:
    """The (2, C, F, H, W) target pair of `kind` (module docstring), each pair's difference as large as the
    direction difference (`same`: no difference)."""
    if kind == "direction":
        return means
    if kind == "same":
        return torch.stack([means[1], means[1]])
    if kind == "global":
        size = (means[1] - means[0]).norm()
        off = torch.randn(means.shape[1], 1, 1, 1, generator=torch.Generator().manual_seed(3)).expand_as(means[0])
        return torch.stack([means[0], means[0] + off * size / off.norm()])
    raise ValueError(f"unknown target {kind!r}; choose from {TARGETS}")


def build_model(init: str, teacher: Path | None):
    """A DiT with absolute frame/row/column tables: the small probe model from scratch, or the toy teacher
    (its own tables when it has them, as teacher v9 does; else zero tables of 8 added to it)."""
    from turbo_infer.models.wan import WAN_CONFIGS, WanModel

    torch.manual_seed(0)
    if init == "scratch":
        return WanModel(small_config(**VARIANTS["position"]))
    from turbo_infer.pipeline import TOY_TEACHER_PATH

    path = teacher or TOY_TEACHER_PATH
    model = WanModel.from_pretrained(str(path), dtype=torch.float32)
    cfg, toy = model.config, WAN_CONFIGS["toy"]
    if cfg.prediction != "x0" or (cfg.dim, cfg.num_layers, cfg.in_channels) != (toy.dim, toy.num_layers, toy.in_channels):
        raise ValueError(f"{path}: not a toy-preset x0 teacher (dim {cfg.dim}, {cfg.num_layers} blocks, "
                         f"{cfg.in_channels} channels, prediction {cfg.prediction})")
    if not (cfg.frame_embed_len and cfg.space_embed_len):
        model = WanModel.from_pretrained(str(path), dtype=torch.float32, frame_embed_len=cfg.frame_embed_len or 8,
                                         space_embed_len=cfg.space_embed_len or 8)
    return model


@torch.no_grad()
def measure(model, text: torch.Tensor, target: torch.Tensor, zero_input: bool, draws: int = 8) -> dict:
    """err / floor / gain / cos of the mean prediction over `draws` inputs (module docstring)."""
    shape = (draws,) + tuple(target.shape[1:])
    x = torch.zeros(shape) if zero_input else torch.randn(shape, generator=torch.Generator().manual_seed(1))
    x = x.to(target.device)
    pred = [(x - model(x, torch.full((draws,), 1000.0, device=x.device), text[d][None].expand(draws, -1, -1))).mean(0) for d in range(2)]
    want = target[1] - target[0]
    got = pred[1] - pred[0]
    floor = (target.mean(0) - target[0]).norm() / target[0].norm()
    out = {"err": float((pred[0] - target[0]).norm() / target[0].norm()), "floor": float(floor)}
    if want.norm() > 0:
        out["gain"] = float(got.norm() / want.norm())
        out["cos"] = float(F.cosine_similarity(got.flatten(), want.flatten(), 0))
    return out


def fit(model, text: torch.Tensor, target: torch.Tensor, *, steps: int, lr: float, batch_size: int,
        zero_input: bool, table_lr_scale: float, log_every: int, label: str,
        flow: tuple[torch.Tensor, torch.Tensor] | None = None, flow_batch: int = 0,
        flow_weight: float = 1.0, flow_min_time: float | None = None) -> list[dict]:
    """Train `model` to output target[i] under caption i (text[i]) from s = 1; returns the log rows.

    flow = (videos (N, C, F, H, W), empty-caption states (1, L, D)): every step also adds the teacher's own
    flow-matching loss (its recipe's logit-normal times, 10 % caption dropout) on `flow_batch` of those
    videos, video i under caption i, times `flow_weight`, so that the s = 1 targets are mixed into ordinary
    training instead of replacing it."""
    from turbo_train.methods.flow_matching import adamw, drop_captions, rectified_flow_loss, sample_time
    from turbo_train.recipe import FlowMatchingConfig, OptimConfig

    times = (FlowMatchingConfig(time_distribution="logit_normal", logit_mean=0.8, logit_std=1.0) if flow_min_time is None
             else FlowMatchingConfig(time_distribution="shifted_uniform", shift=1.0, min_time=flow_min_time))
    dev = target.device

    opt = adamw(model, OptimConfig(lr=lr, position_table_lr_scale=table_lr_scale))
    g = torch.Generator().manual_seed(0)
    rows, t0 = [{"step": 0, **measure(model, text, target, zero_input)}], time.perf_counter()
    for step in range(1, steps + 1):
        dirs = torch.randint(0, len(target), (batch_size,), generator=g)
        shape = (batch_size,) + tuple(target.shape[1:])
        x = (torch.zeros(shape) if zero_input else torch.randn(shape, generator=g)).to(dev)
        x0 = x - model(x, torch.full((batch_size,), 1000.0, device=dev), text[dirs])  # at s = 1, x0 = x - v
        loss = F.mse_loss(x0, target[dirs])
        if flow is not None:
            videos, empty = flow
            pick = torch.randint(0, len(videos), (flow_batch,), generator=g)
            ctx, _ = drop_captions(text[pick], empty, 0.1, generator=g)
            eps = torch.randn((flow_batch,) + tuple(videos.shape[1:]), generator=g).to(dev)
            s = sample_time(flow_batch, times, generator=g).to(dev)
            loss = loss + flow_weight * rectified_flow_loss(model, videos[pick], ctx, s, eps).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps:
            row = {"step": step, "loss": round(loss.item(), 6), **measure(model, text, target, zero_input)}
            rows.append(row)
            print(f"  {label} step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step")
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="direction,global,same", help=f"comma-separated, from {list(TARGETS)}")
    p.add_argument("--init", choices=("scratch", "teacher"), default="scratch")
    p.add_argument("--teacher", type=Path, default=None, help="toy teacher safetensors (default: the shipped one)")
    p.add_argument("--input", choices=("zero", "noise"), default=None,
                   help="the network's input at s = 1 (default: zero from scratch, noise for the teacher)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 from scratch, 1e-4 for the teacher")
    p.add_argument("--table-lr-scale", type=float, default=10.0, help="optim.position_table_lr_scale")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--videos", type=int, default=1500, help="rendered videos per direction for the means")
    p.add_argument("--scenes", type=int, default=2048, help="toy target: captions drawn")
    p.add_argument("--renders", type=int, default=16, help="toy target: renders averaged per caption")
    p.add_argument("--mix-flow", type=int, default=0, metavar="N",
                   help="toy target: also train ordinary flow matching on N single renders per step (one per scene), "
                        "the s = 1 targets mixed into training instead of replacing it (0 = off)")
    p.add_argument("--flow-weight", type=float, default=1.0,
                   help="weight of the --mix-flow term against the s = 1 term (its gradients are larger and noisier: "
                        "under one clip norm and one Adam they can drown the clean signal)")
    p.add_argument("--flow-min-time", type=float, default=None, metavar="S",
                   help="draw the --mix-flow times uniformly in [S, 1] instead of the recipe's logit-normal: a "
                        "high-noise expert for the steps above S (tools/high_noise_oracle.py --modes expert@S)")
    p.add_argument("--device", default="cpu", help="where the model trains (cpu, cuda)")
    p.add_argument("--save", type=Path, default=None,
                   help="write the last target's trained model here (safetensors with its config), for the probes")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/caption_layout/results.json"))
    a = p.parse_args(argv)
    kinds = [k for k in a.targets.split(",") if k]
    bad = [k for k in kinds if k not in TARGETS]
    if bad or not kinds:
        p.error(f"--targets: unknown {bad}; choose from {list(TARGETS)}")
    if min(a.steps, a.batch_size, a.videos, a.log_every, a.scenes) < 1 or a.renders < 1:
        p.error("--steps, --batch-size, --videos, --scenes, --renders and --log-every must be >= 1")
    if not a.flow_weight > 0:
        p.error("--flow-weight must be > 0")
    if a.flow_min_time is not None and not (0.0 <= a.flow_min_time < 1.0 and a.mix_flow):
        p.error("--flow-min-time must be in [0, 1) and needs --mix-flow")
    if a.mix_flow < 0 or (a.mix_flow and kinds != ["toy"]):
        p.error("--mix-flow must be >= 0 and needs --targets toy alone")
    if "toy" in kinds and a.scenes < 2:
        p.error("--scenes must be >= 2 (the log compares the first two captions)")
    if a.teacher is not None and not a.teacher.is_file():
        p.error(f"--teacher: file not found: {a.teacher}")
    zero_input = (a.input or ("zero" if a.init == "scratch" else "noise")) == "zero"
    lr = a.lr or (1e-3 if a.init == "scratch" else 1e-4)
    from turbo_infer.text_encoders import MiniLMTextEncoder
    from turbo_infer.vae import ToyCodec

    encoder = MiniLMTextEncoder(max_length=32)
    if any(k != "toy" for k in kinds):
        means = caption_means(a.videos, a.seed, ToyCodec())
        text = encoder.encode([caption(d) for d in DIRECTIONS])
    results = {}
    for kind in kinds:
        print(f"== {kind}: {a.init}, input {'zero' if zero_input else 'noise'}, lr {lr:g}, {a.steps} steps", flush=True)
        flow = None
        if kind == "toy":
            captions, target, *singles = toy_caption_means(a.scenes, a.renders, a.seed, ToyCodec(),
                                                           singles=a.mix_flow > 0)
            kind_text = torch.cat([encoder.encode(captions[i:i + 256]) for i in range(0, len(captions), 256)])
            if singles:
                flow = (singles[0].to(a.device), encoder.encode([""]).to(a.device))
        else:
            target, kind_text = targets_for(kind, means), text
        model = build_model(a.init, a.teacher).to(a.device)
        results[kind] = fit(model, kind_text.to(a.device), target.to(a.device), steps=a.steps, lr=lr,
                            batch_size=a.batch_size, zero_input=zero_input, table_lr_scale=a.table_lr_scale,
                            log_every=a.log_every, label=kind, flow=flow, flow_batch=a.mix_flow,
                            flow_weight=a.flow_weight, flow_min_time=a.flow_min_time)
    if a.save is not None:
        from turbo_infer.models.wan_keys import save_wan_checkpoint

        save_wan_checkpoint(model.eval().cpu(), a.save)
        print(f"wrote {a.save}")
    settings = vars(a) | {"out": str(a.out), "teacher": str(a.teacher) if a.teacher else None, "lr": lr,
                          "save": str(a.save) if a.save else None,
                          "input": "zero" if zero_input else "noise"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
