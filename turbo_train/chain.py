"""The whole turbo pipeline as one recipe: rCM → SLA fine-tune (→ merge) → calibrate → export → eval → mp4.

`turbo-train recipes/toy/turbo.yaml` lands here when the YAML has a top-level `chain:` section.
With `sla_base: teacher` (TurboDiffusion's order, RCM.md §8) the rCM student and the SLA fine-tune
both start from the teacher and the merge adds the SLA delta (and proj_l) to the student; with
`sla_base: student` the SLA stage fine-tunes the rCM student itself against its own dense outputs
(no merge). Calibration runs on the resulting sparse student with the rCM sampler's timesteps;
export writes the bundles; the evaluation scores the teacher (50-step CFG), the student, the sparse
student and the exported bundle with the toy judge, and the bundle renders one mp4. Every stage is an
ordinary turbo-train recipe or tool, so a failing stage can be rerun alone with the command printed
in its header. The run ends with a summary table (stage, seconds, adherence) written to
<run_dir>/summary.json.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from turbo_infer.files import write_json


SLA_BASES = ("teacher", "student")


@dataclass(kw_only=True)
class ChainConfig:
    """One end-to-end run. Paths are relative to the current directory."""

    run_dir: str = "runs/toy-turbo"  # every stage writes under this directory
    teacher: str = "turbo_infer/assets/toy_teacher.safetensors"  # the 50-step CFG teacher checkpoint
    rcm_recipe: str = "recipes/toy/rcm-cpu.yaml"  # rCM distillation stage (teacher → few-step student)
    sla_recipe: str = "recipes/toy/sla-cpu.yaml"  # SLA fine-tuning stage (see sla_base)
    # what the SLA stage fine-tunes: teacher = TurboDiffusion's order (the teacher's fine-tune, its weight
    # delta merged into the student); student = the rCM student itself, distilled from its own dense outputs
    # without caption dropout (it samples without CFG), so no merge
    sla_base: str = "teacher"
    calibrate_recipe: str = "recipes/toy/calibrate.yaml"  # W8A8 calibration stage (the sparse student → plan)
    targets: list = field(default_factory=lambda: ["cpu"])  # bundle targets to export (cpu, h100, a100, rtx4090, rtx5090)
    steps: int = 4  # student / bundle sampling steps (rcm sampler, 1..4)
    eval_prompts: int = 8  # prompts per evaluation (0 = skip the evaluations)
    teacher_steps: int = 50  # teacher reference: Euler steps with CFG
    teacher_guidance: float = 5.0  # teacher reference: CFG weight
    prompt: str = "a red circle moving left on a dark background"  # the prompt of the final mp4
    seed: int = 0  # evaluation and video seed

    def __post_init__(self):
        if not 1 <= int(self.steps) <= 4:
            raise ValueError(f"chain.steps must be in 1..4 (rcm sampler), got {self.steps}")
        if int(self.eval_prompts) < 0 or int(self.eval_prompts) == 1:
            raise ValueError(f"chain.eval_prompts must be 0 or >= 2, got {self.eval_prompts}")
        if not self.targets:
            raise ValueError("chain.targets must name at least one bundle target")
        if self.sla_base not in SLA_BASES:
            raise ValueError(f"chain.sla_base must be one of {list(SLA_BASES)}, got {self.sla_base!r}")


def load_chain(path, overrides: list[str] = ()) -> ChainConfig:
    """Read the `chain:` section of a YAML file, applying `--set chain.key=value` overrides."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    section = dict(doc.get("chain") or {})
    known = {f.name for f in fields(ChainConfig)}
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep:
            raise ValueError(f"{path}: override {o!r} must be KEY=VALUE")
        key = key.removeprefix("chain.")
        section[key] = yaml.safe_load(value)
    unknown = set(section) - known - {"__doc__"}
    if unknown or set(doc) - {"chain"}:
        bad = sorted(unknown) or sorted(set(doc) - {"chain"})
        raise ValueError(f"{path}: unknown key(s) {bad} (a chain recipe holds only chain.{{{', '.join(sorted(known))}}})")
    try:
        return ChainConfig(**section)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def is_chain_recipe(path) -> bool:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and "chain" in doc


# ----------------------------------------------------------------------------- stages


def _train(recipe: str, run_dir: Path, start: str, extra: list[str] = ()) -> None:
    """turbo-train `recipe` from the weights `start`, writing under run_dir."""
    from turbo_train.cli import main as train_main

    train_main([recipe, "--set", f"logging.run_dir={run_dir}", "--set", f"model.checkpoint={start}", *extra])


def _exported(run_dir: Path) -> Path:
    for name in ("ema.safetensors", "sla.safetensors"):
        if (run_dir / name).is_file():
            return run_dir / name
    raise FileNotFoundError(f"{run_dir}: the stage exported no weights (ema.safetensors / sla.safetensors)")


def _evaluate(pipe, judge, cfg: ChainConfig, **sample_kw) -> dict:
    from turbo_train.eval import evaluate

    report, *_ = evaluate(pipe, judge, num_prompts=cfg.eval_prompts, diversity_prompts=2, diversity_seeds=2,
                          seed=cfg.seed, batch_size=8, progress=False, frechet_bootstrap=0, **sample_kw)
    return report


def run_chain(cfg: ChainConfig) -> list[dict]:
    """Run every stage; returns the summary rows (stage, seconds, adherence, artefact)."""
    from turbo_infer.pipeline import TurboPipeline
    from turbo_infer.video_io import write_mp4
    from turbo_train.export import main as export_main
    from turbo_train.merge import main as merge_main
    from turbo_train.toyworld.judge import load_judge

    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    judge = load_judge() if cfg.eval_prompts else None

    def stage(name, fn):
        print(f"\n=== turbo chain: {name} ===", flush=True)
        t0 = time.perf_counter()
        out = fn()
        row = {"stage": name, "seconds": round(time.perf_counter() - t0, 1), **(out or {})}
        rows.append(row)
        return row

    def scored(pipe, **kw):
        if not cfg.eval_prompts:
            return {}
        r = _evaluate(pipe, judge, cfg, **kw)
        return {"adherence": round(r["adherence"], 4), "adherence_stderr": round(r["adherence_stderr"], 4),
                "frechet": round(r["frechet"], 2), "s_per_video": round(r["s_per_video"], 2)}

    def train(recipe, out_dir, start=None, extra=()):
        _train(recipe, out_dir, start or cfg.teacher, extra)
        return {"artefact": str(_exported(out_dir))}

    def calibrate():
        _train(cfg.calibrate_recipe, run / "calibrate", str(sparse), ["--set", f"method.calibrate.plan_path={plan}"])
        return {"artefact": str(plan)}

    def merge():
        merge_main(["--student", str(_exported(run / "rcm")), "--sla", str(_exported(run / "sla")),
                    "--teacher", cfg.teacher, "--out", str(merged)])
        return {"artefact": str(merged)}

    def export():
        targets = [a for t in cfg.targets for a in ("--target", t)]
        export_main(["--checkpoint", str(sparse), "--plan", str(plan), *targets, "--out", str(bundles),
                     "--steps", str(cfg.steps), "--overwrite", "--no-progress"])
        return {"artefact": str(bundles)}

    merged = run / "merged.safetensors"  # sla_base teacher: the merge's output
    sparse = merged  # the few-step SLA model that is calibrated and exported (set by the SLA stages below)
    plan = run / "calibrate" / "calibration_plan.json"
    bundles = run / "bundles"
    student_kw = dict(sampler="rcm", steps=cfg.steps, guidance=1.0)
    stage(f"teacher eval ({cfg.teacher_steps}-step CFG)", lambda: scored(TurboPipeline.toy(cfg.teacher), sampler="euler",
                                                        steps=cfg.teacher_steps, guidance=cfg.teacher_guidance))
    stage("rCM distillation", lambda: train(cfg.rcm_recipe, run / "rcm"))
    stage(f"student eval ({cfg.steps}-step)", lambda: scored(TurboPipeline.toy(_exported(run / "rcm")), **student_kw))
    if cfg.sla_base == "student":  # the student itself gets SLA: its export is the model calibrated and bundled
        stage("SLA fine-tune (of the student)", lambda: train(cfg.sla_recipe, run / "sla", str(_exported(run / "rcm")),
                                                             ["--set", "method.sla.caption_dropout=0.0"]))
        sparse = _exported(run / "sla")
        stage(f"SLA student eval ({cfg.steps}-step)", lambda: scored(TurboPipeline.toy(sparse), **student_kw))
    else:
        stage("SLA fine-tune (of the teacher)", lambda: train(cfg.sla_recipe, run / "sla"))
        stage("merge (student + SLA delta)", merge)
        stage(f"merged eval ({cfg.steps}-step, SLA)", lambda: scored(TurboPipeline.toy(merged), **student_kw))
    stage("W8A8 calibration", calibrate)
    stage("export", export)
    bundle = bundles / ("cpu" if "cpu" in cfg.targets else cfg.targets[0])
    quantized = next((t for t in ("h100", "a100", "rtx4090", "rtx5090") if t in cfg.targets), None)
    if quantized and cfg.eval_prompts:
        # the W8A8 bundle too (the cpu bundle keeps float linears): natively where this device runs its target,
        # else through the torch references, which emulate its 8-bit arithmetic
        import torch

        from turbo_infer.bundle import BundleTargetError, check_device, read_manifest

        qdir = bundles / quantized
        manifest = read_manifest(qdir)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            check_device(manifest, device)
            native = True
        except BundleTargetError:
            native = False

        def quantized_eval():
            pipe = TurboPipeline.from_bundle(qdir, device=device, allow_reference=not native)
            precisions = [e["precision"] for e in manifest["linears"].values()]
            eight_bit = sum(p != "bf16" for p in precisions)
            return {**scored(pipe, **student_kw), "artefact": f"{eight_bit} of {len(precisions)} linears 8-bit"}

        stage(f"bundle eval ({quantized}{'' if native else ', reference kernels'})", quantized_eval)

    def video():
        pipe = TurboPipeline.from_bundle(bundle)
        out = scored(pipe, **student_kw)  # the bundle's own sampler: rcm, cfg.steps, no CFG
        v = pipe.generate([cfg.prompt], seed=cfg.seed, progress=False)
        path = run / "turbo.mp4"
        write_mp4(path, v[0])
        return {**out, "artefact": str(path)}

    stage(f"bundle eval + mp4 ({bundle.name})", video)

    write_json(run / "summary.json", {"config": asdict(cfg), "stages": rows})
    print_summary(rows)
    return rows


def print_summary(rows: list[dict]) -> None:
    # adherence ± its standard error over the evaluated prompts (few prompts on a CPU: a wide margin)
    w = max([34, *(len(r["stage"]) for r in rows)])  # the stage column fits the longest name
    print(f"\n{'stage':<{w}} {'seconds':>9} {'adherence':>15}  output")
    for r in rows:
        adh = "-"
        if "adherence" in r:
            adh = f"{r['adherence']:.3f}" + (f" ± {r['adherence_stderr']:.3f}" if "adherence_stderr" in r else "")
        print(f"{r['stage']:<{w}} {r['seconds']:>9.1f} {adh:>15}  {r.get('artefact', '')}")
    print(f"{'total':<{w}} {sum(r['seconds'] for r in rows):>9.1f}")


def main(recipe: str, overrides: list[str] = (), dry_run: bool = False) -> int:
    cfg = load_chain(recipe, overrides)
    print(yaml.safe_dump({"chain": asdict(cfg)}, sort_keys=False))
    if dry_run:
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_chain(cfg)
    return 0
