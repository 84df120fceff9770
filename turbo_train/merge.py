"""Merge an SLA fine-tune into the rCM student: task arithmetic on the weights (TurboDiffusion, RCM.md §8).

SLA is fine-tuned on the ORIGINAL teacher (`turbo_train.methods.sla`), rCM distils the same teacher
into a few-step student; both are small moves from the shared teacher weights, so the SLA adaptation
is carried over as a weight difference ("task vector"):

    merged[k] = student[k] + w·(sla[k] - teacher[k])      for every key of the teacher (w = 1 default)
    merged[k] = sla[k]                                    for keys only the SLA model has (proj_l)

The second line matters: the SLA projections `blocks.N.self_attn.attn.proj_l.{weight,bias}` have no
teacher counterpart (TurboDiffusion's public merge once dropped them, leaving a model whose linear
branch is silently zero). The arithmetic runs in float32 and each merged tensor is stored in the
student's dtype (or --dtype); proj_l stays float32 as the SLA module keeps it. The merged file takes
the SLA model's WanConfig (attention sla + its options; --topk changes the inference topk), so
`WanModel.from_pretrained(merged)` builds the sparse few-step model with no arguments.

    python -m turbo_train.merge --student runs/toy-rcm/ema.safetensors --sla runs/toy-sla/ema.safetensors \
        --teacher turbo_infer/assets/toy_teacher.safetensors --out runs/toy-rcm-sla.safetensors
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from turbo_infer.models.wan import WanConfig, WanModel, get_config

# WanConfig fields that may differ between the three models (the backend); all others must agree
_BACKEND_FIELDS = ("attention", "attention_options")


def merge_state_dicts(student: dict, sla: dict, teacher: dict, weight: float = 1.0,
                      dtype: torch.dtype | None = None) -> tuple[dict, list[str]]:
    """merged = student + weight·(sla - teacher) on the shared keys, plus the SLA-only keys copied.

    student, sla, teacher: state dicts (official key layout). weight: w, a finite float (0 = the
    student plus the SLA-only tensors). dtype: storage dtype of the merged shared tensors; None = each
    student tensor's dtype. Returns (merged state dict, sorted list of keys copied from sla alone).
    Raises ValueError naming the offending keys when the key sets or shapes disagree: student and
    teacher must have the same keys, the SLA model must hold every teacher key, shapes must match."""
    weight = float(weight)
    if not torch.isfinite(torch.tensor(weight)):
        raise ValueError(f"weight must be a finite number, got {weight}")
    s_keys, q_keys, t_keys = set(student), set(sla), set(teacher)
    if s_keys != t_keys:
        only_s, only_t = sorted(s_keys - t_keys), sorted(t_keys - s_keys)
        raise ValueError(f"student and teacher keys differ: only in student {only_s[:5]}{' ...' if len(only_s) > 5 else ''}, "
                         f"only in teacher {only_t[:5]}{' ...' if len(only_t) > 5 else ''} (not the same architecture?)")
    missing = sorted(t_keys - q_keys)
    if missing:
        raise ValueError(f"the SLA model lacks teacher keys {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         "(was it fine-tuned from this teacher?)")
    bad = [f"{k}: student {tuple(student[k].shape)}, sla {tuple(sla[k].shape)}, teacher {tuple(teacher[k].shape)}"
           for k in sorted(t_keys) if not (student[k].shape == sla[k].shape == teacher[k].shape)]
    if bad:
        raise ValueError(f"shapes disagree for {len(bad)} key(s): " + "; ".join(bad[:3]))
    merged = {}
    for k in sorted(t_keys):
        delta = sla[k].float() - teacher[k].float()  # the SLA fine-tune's move from the teacher
        merged[k] = (student[k].float() + weight * delta).to(dtype or student[k].dtype)
    copied = sorted(q_keys - t_keys)
    for k in copied:
        merged[k] = sla[k].clone()  # proj_l: no teacher counterpart, taken as tuned
    return merged, copied


def _sha256(path: Path) -> str:
    """sha256 of a file, or of each file of a directory / index in name order (streamed)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def _config_of(name: str, path: Path, state: dict, file_config: dict | None) -> WanConfig:
    from turbo_infer.models.wan_keys import infer_config

    try:
        return get_config(file_config if file_config is not None else infer_config(state, path))
    except ValueError as e:
        raise ValueError(f"--{name} {path}: {e}") from None


def merge_checkpoints(student_path, sla_path, teacher_path, out_path, *, weight: float = 1.0,
                      dtype: str = "same", topk: float | None = None) -> tuple[Path, list[str]]:
    """Load the three checkpoints (any layout `WanModel.from_pretrained` reads), merge them and write
    `out_path` atomically as one safetensors (`save_wan_checkpoint`, official layout) with the SLA
    model's WanConfig and the sources' paths and sha256 in the metadata.

    dtype: same (each student tensor's dtype) | float32 | bfloat16. topk: inference topk written into
    the merged config (None = the SLA model's). Returns (out path, keys copied from the SLA model)."""
    from turbo_infer.models.wan_keys import load_wan_state_dict, save_wan_checkpoint

    if dtype not in ("same", "float32", "bfloat16"):
        raise ValueError(f"dtype must be same, float32 or bfloat16, got {dtype!r}")
    if topk is not None and not 0.0 < float(topk) <= 1.0:
        raise ValueError(f"--topk must be in (0, 1], got {topk}")
    paths = {"student": Path(student_path), "sla": Path(sla_path), "teacher": Path(teacher_path)}
    states, configs = {}, {}
    for name, p in paths.items():
        if not p.exists():
            raise FileNotFoundError(f"--{name}: checkpoint not found: {p}")
        states[name], file_config = load_wan_state_dict(p)
        configs[name] = _config_of(name, p, states[name], file_config)
    arch = {n: {k: v for k, v in c.to_dict().items() if k not in _BACKEND_FIELDS} for n, c in configs.items()}
    for name in ("student", "sla"):
        if arch[name] != arch["teacher"]:
            diff = {k: (arch[name][k], arch["teacher"][k]) for k in arch[name] if arch[name][k] != arch["teacher"][k]}
            raise ValueError(f"--{name} {paths[name]}: architecture differs from the teacher's ({name}, teacher): {diff}")
    sla_cfg = configs["sla"]
    if sla_cfg.attention not in ("sla", "sagesla"):
        raise ValueError(f"--sla {paths['sla']}: its config has attention {sla_cfg.attention!r}, not an SLA backend "
                         "(expected the export of method sla)")
    if topk is not None:
        sla_cfg = replace(sla_cfg, attention_options={**sla_cfg.attention_options, "topk": float(topk)})

    merged, copied = merge_state_dicts(states["student"], states["sla"], states["teacher"], weight,
                                       None if dtype == "same" else getattr(torch, dtype))
    with torch.device("meta"):
        model = WanModel(sla_cfg)  # validates the topk / block options
    model.load_state_dict(merged, strict=True, assign=True)  # every SLA-model key present, nothing extra
    meta = {
        "turbo_method": "sla_merge",
        "turbo_merge_weight": repr(float(weight)),
        "turbo_merge_copied_keys": str(len(copied)),
        "turbo_merge_sources": json.dumps({n: {"path": str(p), "sha256": _sha256(p)} for n, p in paths.items()}),
    }
    out_path = Path(out_path)
    save_wan_checkpoint(model, out_path, extra_metadata=meta)
    return out_path, copied


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m turbo_train.merge",
        description="Merge an SLA fine-tune into an rCM student: merged = student + w·(sla - teacher), plus the "
                    "SLA-only tensors (proj_l) copied. Writes one safetensors with the SLA model's config.",
        epilog="example: python -m turbo_train.merge --student runs/toy-rcm/ema.safetensors --sla "
               "runs/toy-sla/ema.safetensors --teacher turbo_infer/assets/toy_teacher.safetensors --out merged.safetensors",
    )
    p.add_argument("--student", required=True, help="the rCM student (or any model distilled from the teacher)")
    p.add_argument("--sla", required=True, help="the SLA fine-tune of the teacher (export of method sla, with proj_l)")
    p.add_argument("--teacher", required=True, help="the original dense model both were trained from")
    p.add_argument("--out", required=True, help="merged .safetensors to write (atomically: temp file, then rename)")
    p.add_argument("--weight", type=float, default=1.0, help="w, the scale of the SLA task vector (default 1)")
    p.add_argument("--dtype", choices=("same", "float32", "bfloat16"), default="same",
                   help="storage dtype of the merged tensors (same = the student's; proj_l stays float32)")
    p.add_argument("--topk", type=float, default=None,
                   help="inference topk written into the merged config (default: the SLA model's)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out, copied = merge_checkpoints(args.student, args.sla, args.teacher, args.out, weight=args.weight,
                                        dtype=args.dtype, topk=args.topk)
    except (FileNotFoundError, ValueError, TypeError) as e:
        parser.error(str(e))  # exits 2 with "python -m turbo_train.merge: error: ..."
    print(f"wrote {out}: student + {args.weight:g}·(sla - teacher), {len(copied)} SLA-only tensors copied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
