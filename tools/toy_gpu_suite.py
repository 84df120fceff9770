"""The toy-world measurements of the rCM, SLA fine-tuning and bundle issues, in one GPU call.

    python tools/toy_gpu_suite.py --out runs/toy-suite [--minutes 4] [--prompts 256] [--device cuda]

The toy model is small: one GPU has room for several trainings at once, and the runs are bound by
the CPU workers that render the videos. So the suite runs, at the same time,
    rcm   recipes/toy/rcm.yaml                    rCM: sCM + DMD fake score (the method)
    scm   the same with method.rcm.loss_mode=scm  pure sCM ablation (no fake score)
    dmd   the same with method.rcm.loss_mode=dmd  DMD2-alone ablation (no consistency term)
    sla   recipes/toy/sla.yaml                    SLA fine-tune of the teacher (the recipe's topk K)
each capped at --minutes of training, while the teacher is evaluated dense, with untrained SLA
(topk 0.1, 0.2) and under the students' 4-step rcm sampler without CFG (what distillation adds).
The SLA evaluations carry the fine-tune's topk in their names: teacher_slaK_finetuned (the fine-tuned
teacher, 50-step CFG), merged_rcm4_slaK (rCM student + SLA delta, 4 steps), e.g. K = 0.2.
Then: merge (rCM student + SLA delta), calibration of the merged model (fp32, on
the evaluation device), export of the h100 and cpu bundles, and `turbo-eval` of every model (a few evaluations at a time; the
cpu bundle on the host's CPU). Every
report lands in OUT/eval/<name>/report.json and a digest in OUT/summary.json; a stage that fails
is logged, recorded and skipped (the others go on). `tools/toy_figures.py` turns the digest into
benchmarks/{rcm,sla_finetune,toy_bundles}.json.

--sla-variant NAME:KEY=VALUE[,KEY=VALUE...] adds another SLA fine-tune (recipe sla.yaml with those
method/optim settings) that is trained alongside, merged into the same rCM student and evaluated as
teacher_slaK_finetuned_NAME and merged_rcm4_slaK_NAME, K that variant's topk (calibration and bundles stay
with the main one unless --bundle-sla NAME); --rcm-variant NAME:KEY=VALUE[,...] adds another rCM training (recipe rcm.yaml with those settings,
e.g. seed:trainer.seed=1 for a replicate) evaluated as rcm4_NAME; --skip-ablations leaves out the
pure-sCM and DMD2-only trainings; --rcm-only runs just the rCM trainings (and variants) and the teacher's
evaluation, for comparing rCM settings in one call.
--teacher PATH replaces the shipped toy teacher everywhere (trainings' start, merge, the ratios' teacher).
--sla-on-student also fine-tunes SLA into the rCM student itself (no merge: distilled from the dense student,
no caption dropout), right after the rCM training and for --student-sla-steps steps, evaluated as
direct_rcm4_slaK; --student-bundles then calibrates and exports bundles from that model too (bundles_student/),
evaluated as bundle_student_h100 and bundle_student_cpu beside the merge's bundles.
--snapshots N makes every rCM training keep its EMA every N iterations and evaluates each snapshot at 4
steps (rcm4_step000250, ...): where a distillation peaks and whether it decays, from one training.
--dynamic-bundles calibrates the merged model a second time with dynamic (per-token) activation scales
(calibrate_dynamic/; the recipe's calibration writes static ones) and evaluates that h100 bundle (bundles_dynamic/) as
bundle_dynamic_h100, paired with bundle_h100. (Session 32's run of the opposite option, when the recipe was dynamic,
named its bundle bundle_static_h100.)
--sagesla-bundle exports the merged model's h100 bundle a second time, from the same plan, with sagesla attention
(bundles_sagesla/) and evaluates it as bundle_sagesla_h100, paired with bundle_h100 (bf16 SLA, the target's default).

--smoke runs the same path with a few steps and prompts (CPU, minutes): a check of the plumbing.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from turbo_infer.files import write_json

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "turbo_infer/assets/toy_teacher.safetensors"


def set_args(assignments) -> list[str]:
    """["KEY=VALUE", ...] -> ["--set", "KEY=VALUE", ...] for turbo-train."""
    return [x for kv in assignments for x in ("--set", kv)]


def module_cmd(module: str) -> list[str]:
    """`python -m module` with this interpreter."""
    return [sys.executable, "-m", module]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(name: str, cmd: list[str], out: Path, needs: list[Path] = ()) -> dict:
    """Run one stage as a subprocess, its output in OUT/logs/<name>.log; never raises. A stage whose inputs
    (`needs`: files an earlier stage writes) are missing is skipped, not run: the log then names the one
    failure instead of every stage downstream of it failing in turn."""
    missing = [str(p) for p in needs if not Path(p).exists()]
    if missing:
        log(f"skip {name}: missing {', '.join(missing)} (an earlier stage failed)")
        return {"stage": name, "rc": None, "seconds": 0.0, "skipped": "missing " + ", ".join(missing)}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"start {name}")
    with open(out / "logs" / f"{name}.log", "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    dt = round(time.perf_counter() - t0, 1)
    log(f"{'done' if rc == 0 else f'FAILED (exit {rc})'} {name} in {dt} s")
    return {"stage": name, "rc": rc, "seconds": dt}


def paired_frechet(out: Path, eval_dir: Path) -> dict:
    """{frechet_ratio_paired, frechet_ratio_paired_stderr}: this evaluation's Fréchet distance over the
    teacher's, bootstrapped over the prompts (same for both: same prompts and noise) and the shared real
    videos (turbo_train.toyworld.metrics.frechet_ratio_paired_bootstrap), from both runs' judge features;
    {} where either is missing. Computed once per evaluation (cached next to its report)."""
    cache, mine, ref = (eval_dir / "frechet_vs_teacher.json", eval_dir / "features.npz",
                        out / "eval" / "teacher" / "features.npz")
    if cache.is_file():
        return json.loads(cache.read_text())
    if not (mine.is_file() and ref.is_file()):
        return {}
    import numpy as np

    from turbo_train.toyworld.metrics import frechet_ratio_paired_bootstrap

    a, b = np.load(mine), np.load(ref)
    if a["generated"].shape != b["generated"].shape or not np.array_equal(a["real"], b["real"]):
        return {}  # not the same prompts / real videos: no pairing
    ratio, se = frechet_ratio_paired_bootstrap(a["generated"], b["generated"], a["real"], reps=100)
    res = {"frechet_ratio_paired": round(ratio, 4), "frechet_ratio_paired_stderr": round(se, 4)}
    write_json(cache, res)  # atomic: a run stopped mid-write leaves no half cache to read back
    return res


REPORT_KEYS = ("adherence", "adherence_stderr", "adherence_per_video", "adherence_seen_templates",
               "adherence_heldout_templates", "frechet", "frechet_stderr", "diversity", "diversity_per_prompt",
               "diversity_stderr", "diversity_real", "s_per_video", "per_attribute_accuracy", "settings")


def collect_reports(out: Path) -> dict:
    """{evaluation: its report's digest keys + the paired Fréchet ratio} for every OUT/eval/*/report.json."""
    reports = {}
    for rep in sorted((out / "eval").glob("*/report.json")):
        r = json.loads(rep.read_text())
        reports[rep.parent.name] = {k: r[k] for k in REPORT_KEYS if k in r}
        reports[rep.parent.name].update(paired_frechet(out, rep.parent))
    return reports


def refresh_summary(out: Path) -> dict:
    """Re-read every report under OUT/eval into OUT/summary.json, keeping the digest's settings and stages: for a
    run stopped by a time limit, whose last digest predates the evaluations that finished after it."""
    path = out / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no digest to refresh (the suite never reached its first phase's end)")
    summary = json.loads(path.read_text())
    summary["reports"] = collect_reports(out)
    write_json(path, summary)
    return summary


class Suite:
    def __init__(self, a):
        self.a, self.out = a, a.out.resolve()
        self.stages: list[dict] = []

    # ------------------------------------------------------------------ pieces
    def train(self, name: str, recipe: str, extra: list[str] = ()) -> dict:
        a = self.a
        minutes = a.sla_minutes if name.startswith("sla") and a.sla_minutes is not None else a.minutes
        sets = {"logging.run_dir": str(self.out / name), "logging.wandb": "false", "model.checkpoint": str(a.teacher),
                "data.num_workers": str(a.workers), "trainer.max_time_minutes": str(minutes),
                "checkpoint.every_n_steps": "1000000"}
        if a.smoke:
            sets.update({"trainer.max_steps": "2", "data.batch_size": "2", "data.num_workers": "0",
                         "trainer.val_every_n_steps": "0", "trainer.accelerator": "cpu"})
        cmd = module_cmd("turbo_train.cli") + [recipe] + set_args(f"{k}={v}" for k, v in sets.items()) + list(extra)
        needs = [Path(a.teacher)] + [Path(x.split("=", 1)[1]) for x in extra if x.startswith("model.checkpoint=")]
        return run(f"train-{name}", cmd, self.out, needs)

    def evaluate(self, name: str, args: list[str], device: str | None = None) -> dict:
        a = self.a
        n = "4" if a.smoke else str(a.prompts)
        # diversity over 32 prompts x 4 seeds (was 8 until session 22: the first 8 prompts' teacher diversity is 12 %
        # above its 32-prompt mean, and an 8-prompt ratio's paired standard error is ~0.11; recipes/toy/logs/
        # diversity_noise_cpu32.json)
        div = ["--diversity-prompts", "1", "--diversity-seeds", "2"] if a.smoke else \
              ["--diversity-prompts", str(min(32, a.prompts)), "--diversity-seeds", "4"]
        cmd = module_cmd("turbo_train.eval") + args + ["--num-prompts", n, *div, "--batch-size", str(a.eval_batch),
                                      "--device", device or a.device, "--out-dir", str(self.out / "eval" / name),
                                      "--no-progress"]
        if a.smoke and "--steps" not in args and "--bundle" not in args:
            cmd += ["--steps", "2"]
        needs = [Path(args[i + 1]) for i, x in enumerate(args[:-1]) if x in ("--checkpoint", "--bundle")]
        return run(f"eval-{name}", cmd, self.out, needs)

    def exported(self, name: str) -> Path:
        for f in ("ema.safetensors", "sla.safetensors"):
            if (self.out / name / f).is_file():
                return self.out / name / f
        return self.out / name / "ema.safetensors"  # absent: the evaluation then fails with a clear message

    def parallel(self, jobs: list, width: int) -> None:
        """Run jobs (callable, *args) width at a time; a job returns one stage or a list of stages (self.chain)."""
        with ThreadPoolExecutor(max_workers=width) as pool:
            for r in pool.map(lambda j: j[0](*j[1:]), jobs):
                self.stages += r if isinstance(r, list) else [r]

    @staticmethod
    def chain(jobs: list) -> list[dict]:
        """Run jobs one after another (one slot of self.parallel): a training that starts from another's export."""
        return [j[0](*j[1:]) for j in jobs]

    def write_summary(self, t0: float, complete: bool) -> dict:
        """Write OUT/summary.json (atomically) from the stages so far and every report on disk; called after
        each phase too, so that a run stopped by a time limit still leaves a digest (complete: false)."""
        summary = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.a).items()},
                   "complete": complete, "total_s": round(time.perf_counter() - t0, 1), "stages": self.stages,
                   "reports": collect_reports(self.out),
                   "trainings": {name: trained for name in sorted(p.name for p in self.out.iterdir() if p.is_dir())
                                 if (trained := training_progress(self.out / name)) is not None}}
        write_json(self.out / "summary.json", summary)
        return summary

    # ------------------------------------------------------------------ the run
    def main(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        rcm, sla = "recipes/toy/rcm.yaml", "recipes/toy/sla.yaml"
        teacher_eval = ["--checkpoint", str(self.a.teacher)]
        # untrained SLA with the fine-tune's own blocks (turbo-eval's 128x64 default leaves 8 key blocks
        # of a 512-token toy video, where topk 0.1 and 0.2 both keep one)
        from turbo_train.ema import extra_ema_name
        from turbo_train.recipe import load_recipe

        sc = load_recipe(REPO / sla).method.sla
        lab = sla_label()  # e.g. "sla0.2": the fine-tune's topk, in the names of its evaluations
        untrained = lambda k: teacher_eval + ["--attention", "sla", "--topk", str(k), "--block-q", str(sc.block_q),  # noqa: E731
                                              "--block-k", str(sc.block_k)]
        student = lambda steps: ["--sampler", "rcm", "--steps", str(steps), "--guidance", "1"]  # noqa: E731
        sla_variants = dict(self.a.sla_variant)
        vlab = {v: sla_label(sets) for v, sets in sla_variants.items()}  # a variant may set its own topk
        rcm_variants = dict(self.a.rcm_variant)
        ablations = () if self.a.skip_ablations else ("scm", "dmd")
        # --snapshots N: the rCM trainings keep their EMA every N iterations (evaluated in phase 2)
        snap = set_args([f"checkpoint.every_n_steps={self.a.snapshots}", "checkpoint.export_snapshots=true"]) \
            if self.a.snapshots else []
        # --ema-widths: every rCM training also keeps power EMAs of these widths (ema.extra_sigma_rels)
        if self.a.ema_widths:
            snap = snap + set_args([ema_widths_setting(self.a.ema_widths)])
        # phase 1: the trainings and the teacher's evaluations, all at once. --sla-on-student: SLA fine-tuned into
        # the rCM student itself (distilled from the dense student, no caption dropout: the student samples without
        # CFG), chained after the rCM training while the teacher's longer fine-tune still runs
        student_sla = ["--set", f"model.checkpoint={self.exported('rcm')}", "--set", "method.sla.caption_dropout=0.0",
                       "--set", f"trainer.max_steps={self.a.student_sla_steps}"]
        phase1 = [(self.chain, [(self.train, "rcm", rcm, snap)]
                   + ([(self.train, "sla_student", sla, student_sla)] if self.a.sla_on_student else []))]
        phase1 += [(self.train, m, rcm, ["--set", f"method.rcm.loss_mode={m}"] + snap) for m in ablations]
        phase1 += [(self.train, f"rcm_{v}", rcm, set_args(sets) + snap) for v, sets in rcm_variants.items()]
        phase1 += [(self.evaluate, "teacher", teacher_eval)]
        # what distillation adds: the teacher itself under the students' 4-step sampler, no CFG
        phase1 += [(self.evaluate, "teacher_rcm4", teacher_eval + student(4))]
        if not self.a.rcm_only:  # the SLA fine-tunes and the untrained-SLA references
            phase1 += [(self.train, "sla", sla)]
            phase1 += [(self.train, f"sla_{v}", sla, set_args(sets)) for v, sets in sla_variants.items()]
            if not self.a.lean:
                phase1 += [(self.evaluate, "teacher_sla0.1_untrained", untrained(0.1)),
                           (self.evaluate, "teacher_sla0.2_untrained", untrained(0.2))]
        self.parallel(phase1, width=len(phase1))
        self.write_summary(t0, complete=False)
        # phase 2: merge, calibrate, export (sequential), with the students' evaluations alongside
        bundles = self.out / "bundles"
        merged_of = lambda v: self.out / ("merged.safetensors" if v is None else f"merged_{v}.safetensors")  # noqa: E731
        merged = merged_of(self.a.bundle_sla)  # what calibration and the bundles are made from

        def merge(sla_run: str, out: Path) -> dict:
            return run(f"merge-{sla_run}", module_cmd("turbo_train.merge") + [
                "--student", str(self.exported("rcm")), "--sla", str(self.exported(sla_run)),
                "--teacher", str(self.a.teacher),
                "--out", str(out)], self.out, [self.exported("rcm"), self.exported(sla_run)])

        def export(model: Path, cal_plan: Path, tag: str, targets, extra=()) -> dict:
            # turbo-export of model with cal_plan into bundles{tag}/
            return run(f"export{tag}", module_cmd("turbo_train.export") + [
                "--checkpoint", str(model), "--plan", str(cal_plan), *(x for t in targets for x in ("--target", t)),
                *extra, "--out", str(self.out / f"bundles{tag}"), "--steps", "4", "--overwrite", "--no-progress"],
                self.out, [model, cal_plan])

        def calibrate_export(model: Path, tag: str = "", targets=("h100", "cpu"), sets=()) -> list[dict]:
            # tag "": calibrate/, bundles/ (the merge); "_student": calibrate_student/, bundles_student/; "_dynamic":
            # calibrate_dynamic/, bundles_dynamic/ (--dynamic-bundles: per-token activation scales)
            cal_plan = self.out / f"calibrate{tag}/calibration_plan.json"
            return [self.train(f"calibrate{tag}", "recipes/toy/calibrate.yaml",
                               ["--set", f"model.checkpoint={model}", "--set", f"method.calibrate.plan_path={cal_plan}",
                                "--set", f"trainer.accelerator={'cpu' if self.a.device == 'cpu' else 'gpu'}",
                                "--set", "trainer.precision=32-true", *(x for kv in sets for x in ("--set", kv))]),
                    export(model, cal_plan, tag, targets)]

        def merge_calibrate_export():
            r = [merge("sla", merged_of(None))] + [merge(f"sla_{v}", merged_of(v)) for v in sla_variants]
            r += calibrate_export(merged)
            if self.a.dynamic_bundles:  # the same model calibrated with per-token activation scales: its h100 bundle
                r += calibrate_export(merged, "_dynamic", ("h100",), ("method.calibrate.activations=dynamic",))
            if self.a.sagesla_bundle:  # the same model and plan, exported with low-bit sparse attention
                r.append(export(merged, self.out / "calibrate/calibration_plan.json", "_sagesla", ("h100",),
                                ("--attention", "sagesla")))
            if self.a.student_bundles:  # the student's own SLA fine-tune, bundled the same way
                r += calibrate_export(self.exported("sla_student"), "_student")
            return r

        steps = (4,) if self.a.lean else (4, 2, 1)
        jobs = [(self.evaluate, f"rcm{k}", ["--checkpoint", str(self.exported("rcm"))] + student(k)) for k in steps]
        jobs += [(self.evaluate, f"{m}4", ["--checkpoint", str(self.exported(m))] + student(4)) for m in ablations]
        jobs += [(self.evaluate, f"rcm4_{v}", ["--checkpoint", str(self.exported(f"rcm_{v}"))] + student(4)) for v in rcm_variants]
        # --rcm-times: every rCM student (main and variants) sampled on other 4-step grids (no training: the
        # sampler's mid times), e.g. rcm4_times_toy and rcm4_seed1_times_toy: a paired comparison per training
        students = [("rcm", "rcm4"), *((f"rcm_{v}", f"rcm4_{v}") for v in rcm_variants)]
        jobs += [(self.evaluate, f"{ev}_times_{t}", ["--checkpoint", str(self.exported(run_name))] + student(4)
                  + ["--rcm-mid-times", spec]) for run_name, ev in students for t, spec in self.a.rcm_times]
        # the snapshots (--snapshots): each training's course, e.g. rcm4_step000250
        trained = [students[0], *((m, f"{m}4") for m in ablations), *students[1:]]
        jobs += [(self.evaluate, f"{ev}_{f.stem.removeprefix('ema_')}", ["--checkpoint", str(f)] + student(4))
                 for run_name, ev in trained for f in sorted((self.out / run_name).glob("ema_step*.safetensors"))]
        # --ema-widths: each training's extra EMA widths at 4 steps (and on the --rcm-times grids), e.g.
        # rcm4_sr0.2 and rcm4_seed1_sr0.2_times_hi: paired with the recipe's width on the same training
        for run_name, ev in students:
            for w in self.a.ema_widths:
                f = self.out / run_name / extra_ema_name(w)
                tag = f"{ev}_{f.stem.removeprefix('ema_')}"
                jobs.append((self.evaluate, tag, ["--checkpoint", str(f)] + student(4)))
                jobs += [(self.evaluate, f"{tag}_times_{t}", ["--checkpoint", str(f)] + student(4)
                          + ["--rcm-mid-times", spec]) for t, spec in self.a.rcm_times]
        # --sla-on-student: the student's own SLA fine-tune (trained in phase 1) at 4 steps
        if self.a.sla_on_student:
            jobs.append((self.evaluate, f"direct_rcm4_{lab}",
                         ["--checkpoint", str(self.exported("sla_student"))] + student(4)))
        if self.a.rcm_only:  # the students' evaluations only: no SLA, merge, calibration or bundles
            self.parallel(jobs, width=self.a.eval_width)
            return self.finish(t0)
        jobs += [(self.evaluate, f"teacher_{lab}_finetuned", ["--checkpoint", str(self.exported("sla"))])]
        jobs += [(self.evaluate, f"teacher_{vlab[v]}_finetuned_{v}", ["--checkpoint", str(self.exported(f"sla_{v}"))])
                 for v in sla_variants]
        with ThreadPoolExecutor(max_workers=1) as side:
            mce = side.submit(merge_calibrate_export)
            self.parallel(jobs, width=self.a.eval_width)
            self.stages += mce.result()
        self.write_summary(t0, complete=False)
        final = [(self.evaluate, f"merged_rcm4_{lab}", ["--checkpoint", str(merged_of(None))] + student(4))]
        final += [(self.evaluate, f"merged_rcm4_{vlab[v]}_{v}", ["--checkpoint", str(merged_of(v))] + student(4))
                  for v in sla_variants]
        if self.a.device != "cpu":
            final.append((self.evaluate, "bundle_h100", ["--bundle", str(bundles / "h100")]))
            if self.a.dynamic_bundles:
                final.append((self.evaluate, "bundle_dynamic_h100", ["--bundle", str(self.out / "bundles_dynamic/h100")]))
            if self.a.sagesla_bundle:
                final.append((self.evaluate, "bundle_sagesla_h100", ["--bundle", str(self.out / "bundles_sagesla/h100")]))
        # the cpu bundle where it is meant to run: the host's cores, torch reference kernels
        final.append((self.evaluate, "bundle_cpu", ["--bundle", str(bundles / "cpu")], "cpu"))
        if self.a.student_bundles:
            sb = self.out / "bundles_student"
            if self.a.device != "cpu":
                final.append((self.evaluate, "bundle_student_h100", ["--bundle", str(sb / "h100")]))
            final.append((self.evaluate, "bundle_student_cpu", ["--bundle", str(sb / "cpu")], "cpu"))
        self.parallel(final, width=self.a.eval_width)
        return self.finish(t0)

    def finish(self, t0: float) -> int:
        summary = self.write_summary(t0, complete=True)
        for name, r in summary["reports"].items():
            fse = f" ± {r['frechet_stderr']:5.1f}" if r.get("frechet_stderr") is not None else ""
            log(f"{name:<28} adherence {r['adherence']:.4f}  frechet {r['frechet']:9.2f}{fse}  diversity {r['diversity']:.3f}")
        failed = [s["stage"] for s in self.stages if s["rc"] not in (0, None)]
        skipped = [s["stage"] for s in self.stages if s["rc"] is None]
        log(f"total {summary['total_s']} s; failed stages: {failed or 'none'}"
            + (f"; skipped (inputs missing): {skipped}" if skipped else "") + f"; wrote {self.out / 'summary.json'}")
        return 1 if failed or skipped else 0


def variant(text: str, recipe: str) -> tuple[str, list[str]]:
    """NAME:KEY=VALUE[,KEY=VALUE...] -> (NAME, ["KEY=VALUE", ...]); the keys are checked against `recipe`."""
    from turbo_train.recipe import load_recipe

    name, sep, rest = text.partition(":")
    sets = [kv for kv in rest.split(",") if kv]
    if not sep or not name.isidentifier() or not sets or any("=" not in kv for kv in sets):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...] with NAME a word, "
                                    "e.g. x0:method.sla.weighting=x0")
    try:
        load_recipe(REPO / recipe, overrides=sets)
    except (ValueError, KeyError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return name, sets


def training_progress(run_dir: Path) -> dict | None:
    """{"steps", "last": {metric: value}} from a training's CSV log (the last logged row of each metric),
    or None when run_dir holds no metrics.csv: how far each time-capped run got."""
    import csv

    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    if not files:
        return None
    last: dict[str, float] = {}
    steps = 0
    with open(files[-1], newline="") as f:
        for row in csv.DictReader(f):
            steps = max(steps, int(float(row.get("step") or 0)))
            for k, v in row.items():
                if k not in ("epoch", "step") and v not in (None, ""):
                    last[k] = float(v)
    return {"steps": steps, "last": last}


def sla_label(sets=()) -> str:
    """"sla0.2": the topk of recipes/toy/sla.yaml with these settings, as the SLA evaluations' names carry it
    (tools/toy_figures.py reads it back into figure names such as toy_rcm4_sla0.2_adherence_ratio)."""
    from turbo_train.recipe import load_recipe

    return f"sla{load_recipe(REPO / 'recipes/toy/sla.yaml', overrides=list(sets)).method.sla.topk:g}"


def sla_variant(text: str) -> tuple[str, list[str]]:
    """--sla-variant: settings of recipes/toy/sla.yaml."""
    return variant(text, "recipes/toy/sla.yaml")


def rcm_variant(text: str) -> tuple[str, list[str]]:
    """--rcm-variant: settings of recipes/toy/rcm.yaml."""
    return variant(text, "recipes/toy/rcm.yaml")


def ema_widths(text: str) -> list[float]:
    """--ema-widths "0.2,0.15" -> [0.2, 0.15], each in (0, 0.28) as the recipe's ema.extra_sigma_rels wants."""
    try:
        widths = [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0.2,0.15") from None
    if not widths or any(not 0.0 < w < 0.28 for w in widths) or len(set(widths)) != len(widths):
        raise argparse.ArgumentTypeError(f"{text!r}: each width must be in (0, 0.28), and distinct")
    return widths


def ema_widths_setting(widths: list[float]) -> str:
    """[0.1, 0.15] -> "ema.extra_sigma_rels=[0.1,0.15]", the recipe override every rCM training gets."""
    return f"ema.extra_sigma_rels=[{','.join(f'{w:g}' for w in widths)}]"


def rcm_times(text: str) -> tuple[str, str]:
    """--rcm-times NAME:SPEC -> (NAME, SPEC), SPEC checked as turbo-eval --rcm-mid-times would."""
    from turbo_infer.samplers import parse_mid_times

    name, sep, spec = text.partition(":")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:T1,T2,T3 or NAME:shift=S with NAME a word")
    try:
        if len(parse_mid_times(spec)) < 3:
            raise ValueError("4 steps need 3 mid times")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return name, spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run directory (trainings, bundles, eval reports)")
    p.add_argument("--minutes", type=float, default=4.0, help="training time cap of each of the four trainings")
    p.add_argument("--sla-minutes", type=float, default=None,
                   help="training time cap of the SLA fine-tune (default: --minutes); the merge waits for it")
    p.add_argument("--prompts", type=int, default=256, help="prompts per evaluation")
    p.add_argument("--workers", type=int, default=3, help="DataLoader workers per training (four run at once)")
    p.add_argument("--eval-batch", type=int, default=64, help="videos per sampling batch in the evaluations")
    p.add_argument("--eval-width", type=int, default=4, help="evaluations run at once")
    p.add_argument("--device", default="cuda", help="where the evaluations run (trainings: accelerator auto)")
    p.add_argument("--sla-variant", action="append", default=[], type=sla_variant, metavar="NAME:KEY=VALUE[,...]",
                   help="another SLA fine-tune with these recipe settings, merged and evaluated too (repeatable)")
    p.add_argument("--rcm-variant", action="append", default=[], type=rcm_variant, metavar="NAME:KEY=VALUE[,...]",
                   help="another rCM training with these recipe settings, evaluated at 4 steps (repeatable)")
    p.add_argument("--bundle-sla", default=None, metavar="NAME",
                   help="calibrate and export the bundles from the merge of this --sla-variant instead of the main "
                        "SLA fine-tune (recipes/toy/sla.yaml as it is)")
    p.add_argument("--lean", action="store_true",
                   help="leave out the reference evaluations that do not depend on this run's settings beyond "
                        "the recipe (the teacher under untrained SLA, the main student at 2 and 1 steps)")
    p.add_argument("--skip-ablations", action="store_true", help="leave out the pure-sCM and DMD2-only runs")
    p.add_argument("--snapshots", type=int, default=0, metavar="N",
                   help="the rCM trainings also keep their EMA every N iterations (checkpoint.export_snapshots) "
                        "and each snapshot is evaluated at 4 steps as <name>_step<N>: a run's course from one "
                        "training (0 = off)")
    p.add_argument("--ema-widths", default=[], type=ema_widths, metavar="W1[,W2...]",
                   help="every rCM training also keeps power EMAs of these widths (ema.extra_sigma_rels, beside the "
                        "recipe's sigma_rel), each evaluated at 4 steps as <name>_sr<W>: the EMA length compared on "
                        "the same trainings, e.g. 0.1")
    p.add_argument("--rcm-times", action="append", default=[], type=rcm_times, metavar="NAME:T1,T2,T3|NAME:shift=S",
                   help="also evaluate every rCM student at 4 steps with these sampler mid times (turbo-eval "
                        "--rcm-mid-times) as rcm4_times_NAME, rcm4_VARIANT_times_NAME (repeatable), e.g. toy:shift=3")
    p.add_argument("--sla-on-student", action="store_true",
                   help="also fine-tune SLA into the rCM student itself once it is trained (recipes/toy/sla.yaml from "
                        "the student, distilled from the dense student, no caption dropout; --sla-minutes) and "
                        "evaluate it at 4 steps as direct_rcm4_slaK (K the recipe's topk), beside the merge of the teacher's fine-tune")
    p.add_argument("--student-sla-steps", type=int, default=300, metavar="N",
                   help="--sla-on-student: optimizer steps of the student's SLA fine-tune (trainer.max_steps; "
                        "--sla-minutes still caps it). On the CPU (README job, teacher v9) 120 steps of 4 videos beat "
                        "200: a longer tune drifts from the dense student")
    p.add_argument("--student-bundles", action="store_true",
                   help="--sla-on-student: also calibrate and export h100 and cpu bundles from the student's own SLA "
                        "fine-tune (bundles_student/) and evaluate them as bundle_student_h100 and bundle_student_cpu. "
                        "Two more evaluations at the end: on one H100 (session 26, --minutes 3.5 --sla-minutes 4 --lean) "
                        "the final five did not finish inside a 548-second limit (the device tool's calls stop at 600)")
    p.add_argument("--dynamic-bundles", action="store_true",
                   help="also calibrate the merged model with per-token activation scales (method.calibrate."
                        "activations=dynamic; the recipe's are static, which the fp8 W8A8 path runs ~6 %% faster on an "
                        "H100) and evaluate its h100 bundle as bundle_dynamic_h100, paired with bundle_h100")
    p.add_argument("--sagesla-bundle", action="store_true",
                   help="also export the merged model's h100 bundle with sagesla attention (int8 Q K^T, fp8 P V inside "
                        "the sparse branch; the h100 target's default is bf16 SLA) from the same calibration plan and "
                        "evaluate it on the GPU as bundle_sagesla_h100, paired with bundle_h100")
    p.add_argument("--rcm-only", action="store_true",
                   help="only the rCM trainings (main, ablations, variants) and the teacher: no SLA, merge or bundles")
    p.add_argument("--teacher", type=Path, default=TEACHER,
                   help="teacher weights every training starts from and every ratio divides by (default: the shipped "
                        "toy teacher), e.g. a freshly trained EMA export")
    p.add_argument("--smoke", action="store_true", help="2 training steps, 4 prompts, CPU: checks the plumbing")
    p.add_argument("--refresh-digest", action="store_true",
                   help="only re-read every report under --out into its summary.json (settings and stages kept) and "
                        "exit: after a run stopped by a time limit, whose digest predates its last evaluations")
    a = p.parse_args(argv)
    if a.refresh_digest:
        try:
            n = len(refresh_summary(a.out)["reports"])
        except FileNotFoundError as e:
            p.error(f"--refresh-digest: {e}")
        log(f"refreshed {a.out / 'summary.json'}: {n} reports")
        return 0
    if not a.teacher.is_file():
        p.error(f"--teacher: no file {a.teacher}")
    a.teacher = a.teacher.resolve()
    if a.minutes <= 0 or a.prompts < 2 or a.workers < 0 or (a.sla_minutes is not None and a.sla_minutes <= 0):
        p.error("--minutes and --sla-minutes must be > 0, --prompts >= 2, --workers >= 0")
    if a.bundle_sla is not None and a.bundle_sla not in dict(a.sla_variant):
        p.error(f"--bundle-sla {a.bundle_sla!r}: no --sla-variant of that name (have: "
                f"{', '.join(dict(a.sla_variant)) or 'none'})")
    if a.student_bundles and (not a.sla_on_student or a.rcm_only):
        p.error("--student-bundles needs --sla-on-student (the model it bundles) and makes bundles, which "
                "--rcm-only does not")
    if a.dynamic_bundles and a.rcm_only:
        p.error("--dynamic-bundles makes bundles, which --rcm-only does not")
    if a.sagesla_bundle and (a.rcm_only or a.device == "cpu"):
        p.error("--sagesla-bundle makes an h100 bundle evaluated on the GPU: not with --rcm-only or --device cpu")
    if a.student_sla_steps < 1:
        p.error("--student-sla-steps must be >= 1")
    if a.bundle_sla is not None and a.rcm_only:
        p.error("--bundle-sla: --rcm-only makes no bundles")
    if a.ema_widths:  # the rCM recipe's own check (e.g. a width equal to its sigma_rel), here rather than on the GPU
        from turbo_train.recipe import load_recipe

        try:
            load_recipe(REPO / "recipes/toy/rcm.yaml", overrides=[ema_widths_setting(a.ema_widths)])
        except ValueError as e:
            p.error(f"--ema-widths: {e}")
    if a.smoke:
        a.device, a.eval_batch, a.eval_width = "cpu", 4, 2
    return Suite(a).main()


if __name__ == "__main__":
    raise SystemExit(main())
