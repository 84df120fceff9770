"""Turn a `tools/toy_gpu_suite.py` run into the toy figures of the rCM, SLA and bundle issues.

    python tools/toy_figures.py SUMMARY_JSON [--cpu-bundle-report REPORT] [--report NAME=REPORT] [--pipeline-minutes M]
                                [--device NAME] [--write]

Every ratio divides by the teacher's 50-step CFG figure from the same run (same prompts, same seeds):
    benchmarks/rcm.json           toy_rcm{4,2,1}_adherence_ratio, toy_rcm4_frechet_ratio,
                                  toy_rcm4_diversity_ratio, toy_scm4_adherence_ratio,
                                  toy_dmd4_adherence_ratio, toy_dmd4_diversity_ratio,
                                  toy_teacher_rcm4_nocfg_adherence_ratio (the undistilled teacher at 4 steps)
    benchmarks/sla_finetune.json  toy_sla{0.1,0.2}_untrained_adherence_ratio, and with K the fine-tune's topk
                                  as the suite names it: toy_slaK_finetuned_{adherence,frechet}_ratio,
                                  toy_rcm4_slaK_{adherence,frechet,diversity}_ratio (merged),
                                  toy_rcm4_slaK_direct_* (--sla-on-student: SLA tuned into the student);
                                  an --sla-variant NAME adds toy_slaK_finetuned_NAME_* and toy_rcm4_slaK_NAME_*
    benchmarks/toy_bundles.json   toy_bundle_h100_adherence_ratio, toy_bundle_cpu_adherence_ratio
                                  (the suite's cpu bundle, evaluated on the host's CPU; or a report of
                                  `turbo-eval --bundle <cpu bundle>` given as --cpu-bundle-report),
                                  toy_bundle_student_{h100,cpu}_adherence_ratio (--student-bundles),
                                  toy_pipeline_cpu_minutes (--pipeline-minutes: the README main job, timed)
Existing figures in those files that this run does not produce are kept (e.g. the 1.3B step figures
in rcm.json). Without --write it only prints.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_harness import benchmark_doc  # noqa: E402
from turbo_infer.files import write_json  # noqa: E402
from turbo_train.toyworld.metrics import paired_ratio_stderr  # noqa: E402


# (file, figure, report, key): each figure = reports[report][key] / the teacher's
RATIOS = [
    ("rcm", "toy_rcm4_adherence_ratio", "rcm4", "adherence"), ("rcm", "toy_rcm2_adherence_ratio", "rcm2", "adherence"),
    ("rcm", "toy_rcm1_adherence_ratio", "rcm1", "adherence"), ("rcm", "toy_rcm4_frechet_ratio", "rcm4", "frechet"),
    ("rcm", "toy_rcm4_diversity_ratio", "rcm4", "diversity"), ("rcm", "toy_scm4_adherence_ratio", "scm4", "adherence"),
    ("rcm", "toy_scm4_diversity_ratio", "scm4", "diversity"), ("rcm", "toy_dmd4_adherence_ratio", "dmd4", "adherence"),
    ("rcm", "toy_dmd4_diversity_ratio", "dmd4", "diversity"),
    ("rcm", "toy_teacher_rcm4_nocfg_adherence_ratio", "teacher_rcm4", "adherence"),
    ("sla_finetune", "toy_sla0.1_untrained_adherence_ratio", "teacher_sla0.1_untrained", "adherence"),
    ("sla_finetune", "toy_sla0.2_untrained_adherence_ratio", "teacher_sla0.2_untrained", "adherence"),
    ("toy_bundles", "toy_bundle_h100_adherence_ratio", "bundle_h100", "adherence"),
    ("toy_bundles", "toy_bundle_cpu_adherence_ratio", "bundle_cpu", "adherence"),
    # --student-bundles: the bundles of the student's own SLA fine-tune (no merge)
    ("toy_bundles", "toy_bundle_student_h100_adherence_ratio", "bundle_student_h100", "adherence"),
    ("toy_bundles", "toy_bundle_student_cpu_adherence_ratio", "bundle_student_cpu", "adherence"),
    # --dynamic-bundles: the merged model calibrated with per-token activation scales, its h100 bundle
    ("toy_bundles", "toy_bundle_dynamic_h100_adherence_ratio", "bundle_dynamic_h100", "adherence"),
    # --sagesla-bundle: the merged model's h100 bundle with low-bit sparse attention, same calibration plan
    ("toy_bundles", "toy_bundle_sagesla_h100_adherence_ratio", "bundle_sagesla_h100", "adherence"),
    # the opposite option of session 32's suite (the recipe's scales were dynamic then): static scales
    ("toy_bundles", "toy_bundle_static_h100_adherence_ratio", "bundle_static_h100", "adherence"),
]


# the SLA fine-tune's evaluations, named by the suite with the fine-tune's topk K (and a variant's _NAME):
# (report name pattern, figure stem, keys)
SLA_REPORTS = [
    (re.compile(r"teacher_sla(?P<k>[0-9.]+)_finetuned(?P<v>_\w+)?"), "toy_sla{k}_finetuned{v}", ("adherence", "frechet")),
    (re.compile(r"merged_rcm4_sla(?P<k>[0-9.]+)(?P<v>_\w+)?"), "toy_rcm4_sla{k}{v}", ("adherence", "frechet", "diversity")),
    (re.compile(r"direct_rcm4_sla(?P<k>[0-9.]+)"), "toy_rcm4_sla{k}_direct", ("adherence", "frechet", "diversity")),
]


def variant_ratios(reports: dict) -> list[tuple[str, str, str, str]]:
    """RATIOS rows for the evaluations whose names the suite builds: the SLA fine-tune's (SLA_REPORTS: the
    main one and every --sla-variant NAME) and the rCM variants' (--rcm-variant NAME: rcm4_NAME)."""
    rows = []
    for name in reports:
        for pattern, stem, keys in SLA_REPORTS:
            if m := pattern.fullmatch(name):
                fig = stem.format(k=m["k"], v=m.groupdict().get("v") or "")
                rows += [("sla_finetune", f"{fig}_{key}_ratio", name, key) for key in keys]
        if name.startswith("rcm4_"):
            rows += [("rcm", f"toy_{name}_{key}_ratio", name, key) for key in ("adherence", "frechet", "diversity")]
    return rows


def ratios(reports: dict) -> dict[str, dict[str, float]]:
    """{file: {figure: value}} from the suite's reports (missing evaluations are skipped). An adherence
    ratio whose two reports carry per-video adherence (same prompts and noise) also gets
    `<figure>_stderr`, its paired standard error (turbo_train.toyworld.metrics.paired_ratio_stderr), and so
    does a diversity ratio whose reports carry `diversity_per_prompt` (paired over the diversity prompts); a
    Fréchet ratio whose two reports carry `frechet_stderr` (turbo-eval's bootstrap) gets one too, and
    `<figure>_stderr_paired` where the suite bootstrapped the ratio itself (`frechet_ratio_paired_stderr`)."""
    t = reports["teacher"]
    out: dict[str, dict[str, float]] = {"rcm": {}, "sla_finetune": {}, "toy_bundles": {}}
    for file, fig, name, key in RATIOS + variant_ratios(reports):
        if name not in reports or reports[name].get(key) is None or t.get(key) is None:
            continue
        out[file][fig] = round(reports[name][key] / t[key], 4)
        if key == "adherence" and "adherence_per_video" in reports[name] and "adherence_per_video" in t:
            out[file][fig + "_stderr"] = round(paired_ratio_stderr(reports[name]["adherence_per_video"],
                                                                   t["adherence_per_video"]), 4)
        if key == "diversity" and len(reports[name].get("diversity_per_prompt") or ()) > 1 \
                and len(reports[name]["diversity_per_prompt"]) == len(t.get("diversity_per_prompt") or ()):
            # the same prompts and seeds in both (turbo-eval's diversity pass): a paired ratio over prompts
            out[file][fig + "_stderr"] = round(paired_ratio_stderr(reports[name]["diversity_per_prompt"],
                                                                   t["diversity_per_prompt"]), 4)
        if key == "frechet" and reports[name].get("frechet_stderr") is not None and t.get("frechet_stderr") is not None:
            # both distances' bootstrap errors, combined as if independent (they share the real videos, so
            # this overstates the ratio's noise a little)
            r, a, b = out[file][fig], reports[name], t
            out[file][fig + "_stderr"] = round(r * math.hypot(a["frechet_stderr"] / a["frechet"],
                                                              b["frechet_stderr"] / b["frechet"]), 4)
        if key == "frechet" and reports[name].get("frechet_ratio_paired_stderr") is not None:
            # the suite's paired bootstrap of the ratio itself (shared prompts and real videos move both)
            out[file][fig + "_stderr_paired"] = reports[name]["frechet_ratio_paired_stderr"]
    for name in reports:  # absolute values too, for BENCHMARKS.md
        file = ("toy_bundles" if name.startswith("bundle") else "sla_finetune"
                if name.startswith(("teacher_sla", "merged", "direct")) else "rcm")
        out[file][f"toy_{name}_adherence"] = round(reports[name]["adherence"], 4)
    return out


def suite_command(s: dict) -> str:
    """The toy_gpu_suite.py command line that the digest's settings describe."""
    cmd = f"python tools/toy_gpu_suite.py --out {s.get('out')} --minutes {s.get('minutes')} --prompts {s.get('prompts')}"
    if s.get("sla_minutes") is not None:
        cmd += f" --sla-minutes {s['sla_minutes']}"
    if s.get("lean"):
        cmd += " --lean"
    if s.get("skip_ablations"):
        cmd += " --skip-ablations"
    if s.get("rcm_only"):
        cmd += " --rcm-only"
    if s.get("snapshots"):
        cmd += f" --snapshots {s['snapshots']}"
    if s.get("ema_widths"):
        cmd += " --ema-widths " + ",".join(f"{w:g}" for w in s["ema_widths"])
    teacher = s.get("teacher")
    if teacher and Path(teacher).resolve() != (REPO / "turbo_infer/assets/toy_teacher.safetensors").resolve():
        cmd += f" --teacher {teacher}"
    for flag in ("sla_variant", "rcm_variant"):
        for name, sets in s.get(flag) or []:
            cmd += f" --{flag.replace('_', '-')} {name}:{','.join(sets)}"
    for name, spec in s.get("rcm_times") or []:
        cmd += f" --rcm-times {name}:{spec}"
    if s.get("bundle_sla"):
        cmd += f" --bundle-sla {s['bundle_sla']}"
    if s.get("sla_on_student"):
        cmd += f" --sla-on-student --student-sla-steps {s.get('student_sla_steps')}"
    if s.get("student_bundles"):
        cmd += " --student-bundles"
    return cmd


def write(tool: str, figures: dict, device: str, command: str) -> Path:
    path = REPO / "benchmarks" / f"{tool}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    merged = {**old.get("figures", {}), **figures}
    return write_json(path, benchmark_doc(merged, device=device, command=command))


def named_report(text: str) -> tuple[str, Path]:
    """--report NAME=PATH -> (NAME, PATH)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH, e.g. bundle_cpu=eval/report.json")
    return name, Path(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summary", type=Path, help="summary.json written by tools/toy_gpu_suite.py")
    p.add_argument("--cpu-bundle-report", type=Path, help="report.json of `turbo-eval --bundle <cpu bundle> --device cpu`"
                   " (the same as --report bundle_cpu=REPORT)")
    p.add_argument("--report", action="append", default=[], type=named_report, metavar="NAME=REPORT",
                   help="add (or replace) the suite's evaluation NAME with this turbo-eval report.json, e.g. "
                        "bundle_student_cpu=runs/host/eval/report.json from tools/device/host_cpu_bundle.sh (repeatable)")
    p.add_argument("--pipeline-minutes", type=float, help="measured minutes of the README main job on 2 CPU cores")
    p.add_argument("--device", default="NVIDIA H100 80GB HBM3", help="where the suite ran")
    p.add_argument("--write", action="store_true", help="write benchmarks/*.json (else print only)")
    a = p.parse_args(argv)
    if not a.summary.is_file():
        p.error(f"summary not found: {a.summary}")
    summary = json.loads(a.summary.read_text())
    reports = summary.get("reports", {})
    if summary.get("complete") is False:
        print(f"warning: {a.summary} is the digest of a suite run that did not finish: figures only for the "
              f"evaluations it reached", file=sys.stderr)
    if "teacher" not in reports:
        p.error(f"{a.summary}: no teacher evaluation in the suite's reports: ratios need it")
    if a.cpu_bundle_report:
        a.report.append(named_report(f"bundle_cpu={a.cpu_bundle_report}"))
    for name, path in a.report:  # evaluated elsewhere (e.g. on this machine's CPU): paired like the suite's own
        if not path.is_file():
            p.error(f"--report {name}: no file {path}")
        reports[name] = json.loads(path.read_text())
        if "adherence" not in reports[name]:
            p.error(f"--report {name}: {path} has no 'adherence' (not a turbo-eval report.json?)")
    figs = ratios(reports)
    if a.pipeline_minutes is not None:
        figs["toy_bundles"]["toy_pipeline_cpu_minutes"] = a.pipeline_minutes
    s = summary.get("settings", {})
    command = suite_command(s) + f"; python tools/toy_figures.py {a.summary.name} --write"
    for tool, f in figs.items():
        for k, v in f.items():
            print(f"{tool:<13} {k:<42} {v}")
        if a.write and f:
            print(f"wrote {write(tool, f, a.device, command)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
