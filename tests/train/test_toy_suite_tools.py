"""tools/toy_gpu_suite.py (how it builds its stages) and tools/toy_figures.py (the ratios it writes),
without running any training: the suite's stages are subprocesses, replaced here by a recorder."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import toy_figures  # noqa: E402
import toy_gpu_suite  # noqa: E402


def report(adherence, frechet=100.0, diversity=10.0):
    return {"adherence": adherence, "frechet": frechet, "diversity": diversity}


def test_ratios_divide_by_the_teacher_of_the_same_run():
    reports = {"teacher": report(0.8, 400.0, 20.0), "rcm4": report(0.76, 500.0, 10.0), "bundle_h100": report(0.72),
               "bundle_cpu": report(0.64), "teacher_sla0.1_finetuned": report(0.6)}
    f = toy_figures.ratios(reports)
    assert f["rcm"]["toy_rcm4_adherence_ratio"] == 0.95
    assert f["rcm"]["toy_rcm4_frechet_ratio"] == 1.25 and f["rcm"]["toy_rcm4_diversity_ratio"] == 0.5
    assert f["toy_bundles"]["toy_bundle_h100_adherence_ratio"] == 0.9
    assert f["toy_bundles"]["toy_bundle_cpu_adherence_ratio"] == 0.8
    assert f["sla_finetune"]["toy_sla0.1_finetuned_adherence_ratio"] == 0.75
    assert "toy_rcm2_adherence_ratio" not in f["rcm"]  # not evaluated: left out, not None


def test_adherence_ratios_get_a_paired_standard_error_when_the_reports_carry_per_video_scores():
    teacher = {**report(0.75), "adherence_per_video": [0.5, 1.0, 0.75, 0.75]}
    student = {**report(0.675), "adherence_per_video": [0.45, 0.9, 0.675, 0.675]}  # 0.9 x on every prompt
    f = toy_figures.ratios({"teacher": teacher, "rcm4": student, "rcm2": report(0.6)})["rcm"]
    assert f["toy_rcm4_adherence_ratio"] == 0.9 and f["toy_rcm4_adherence_ratio_stderr"] == 0.0
    assert "toy_rcm4_frechet_ratio_stderr" not in f  # the reports carry no Fréchet bootstrap
    assert "toy_rcm2_adherence_ratio_stderr" not in f  # a report without per-video scores (older digests)


def test_diversity_ratios_get_a_paired_standard_error_over_the_diversity_prompts():
    teacher = {**report(0.8, diversity=20.0), "diversity_per_prompt": [10.0, 20.0, 30.0]}
    student = {**report(0.8, diversity=18.0), "diversity_per_prompt": [9.0, 18.0, 27.0]}  # 0.9 x on every prompt
    f = toy_figures.ratios({"teacher": teacher, "rcm4": student, "rcm2": report(0.7, diversity=10.0)})["rcm"]
    assert f["toy_rcm4_diversity_ratio"] == 0.9 and f["toy_rcm4_diversity_ratio_stderr"] == 0.0
    noisy = {**report(0.8, diversity=20.0), "diversity_per_prompt": [12.0, 18.0, 30.0]}
    g = toy_figures.ratios({"teacher": teacher, "rcm4": noisy})["rcm"]
    assert g["toy_rcm4_diversity_ratio_stderr"] > 0.0
    # without per-prompt values (older reports), or over other prompts: no standard error
    assert "toy_rcm2_diversity_ratio_stderr" not in f
    other = {**report(0.8, diversity=20.0), "diversity_per_prompt": [20.0, 20.0]}
    assert "toy_rcm4_diversity_ratio_stderr" not in toy_figures.ratios({"teacher": teacher, "rcm4": other})["rcm"]


def test_frechet_ratios_get_a_standard_error_from_both_bootstraps():
    teacher = {**report(0.8, 100.0), "frechet_stderr": 3.0}
    student = {**report(0.8, 130.0), "frechet_stderr": 5.2}
    f = toy_figures.ratios({"teacher": teacher, "rcm4": student})["rcm"]
    assert f["toy_rcm4_frechet_ratio"] == 1.3
    assert f["toy_rcm4_frechet_ratio_stderr"] == pytest.approx(1.3 * (0.04 ** 2 + 0.03 ** 2) ** 0.5, abs=1e-4)


def test_toy_figures_refuses_a_summary_without_the_teacher(tmp_path, capsys):
    p = tmp_path / "summary.json"
    p.write_text(json.dumps({"reports": {"rcm4": report(0.5)}}))
    with pytest.raises(SystemExit):
        toy_figures.main([str(p)])
    assert "no teacher evaluation" in capsys.readouterr().err


def suite(tmp_path, monkeypatch, **kw):
    calls = []
    monkeypatch.setattr(toy_gpu_suite, "run", lambda name, cmd, out, needs=(): calls.append((name, cmd)) or
                        {"stage": name, "rc": 0, "seconds": 0.0})
    a = argparse.Namespace(out=tmp_path, minutes=3.0, sla_minutes=None, prompts=256, workers=3, eval_batch=64,
                           eval_width=4, device="cuda", smoke=False, sla_variant=[], rcm_variant=[],
                           skip_ablations=False, rcm_only=False, teacher=toy_gpu_suite.TEACHER, snapshots=0,
                           sla_on_student=False, rcm_times=[], bundle_sla=None, lean=False, ema_widths=[],
                           student_sla_steps=300, student_bundles=False, dynamic_bundles=False,
                           sagesla_bundle=False)
    vars(a).update(kw)
    return toy_gpu_suite.Suite(a), calls


def sets_of(cmd):
    return dict(cmd[i + 1].split("=", 1) for i, x in enumerate(cmd) if x == "--set")


def test_diversity_is_measured_on_up_to_32_prompts(tmp_path, monkeypatch):
    for prompts, expected in ((256, "32"), (16, "16")):
        s, calls = suite(tmp_path / str(prompts), monkeypatch, prompts=prompts)
        s.evaluate("teacher", ["--checkpoint", str(toy_gpu_suite.TEACHER)])
        cmd = calls[-1][1]
        assert cmd[cmd.index("--diversity-prompts") + 1] == expected and cmd[cmd.index("--diversity-seeds") + 1] == "4"


def test_sla_minutes_caps_only_the_sla_fine_tune(tmp_path, monkeypatch):
    s, calls = suite(tmp_path, monkeypatch, sla_minutes=7.5)
    s.train("sla", "recipes/toy/sla.yaml")
    s.train("rcm", "recipes/toy/rcm.yaml")
    assert sets_of(calls[0][1])["trainer.max_time_minutes"] == "7.5"
    assert sets_of(calls[1][1])["trainer.max_time_minutes"] == "3.0"


def test_the_cpu_bundle_is_evaluated_on_the_cpu(tmp_path, monkeypatch):
    s, calls = suite(tmp_path, monkeypatch)
    s.main()
    evals = {name: cmd for name, cmd in calls if name.startswith("eval-")}
    device = lambda cmd: cmd[cmd.index("--device") + 1]  # noqa: E731
    assert device(evals["eval-bundle_cpu"]) == "cpu" and device(evals["eval-bundle_h100"]) == "cuda"
    assert device(evals["eval-teacher"]) == "cuda"
    t4 = evals["eval-teacher_rcm4"]  # the undistilled teacher under the students' sampler
    assert t4[t4.index("--checkpoint") + 1] == str(toy_gpu_suite.TEACHER) and t4[t4.index("--sampler") + 1] == "rcm"
    assert t4[t4.index("--steps") + 1] == "4" and t4[t4.index("--guidance") + 1] == "1"


def test_dynamic_bundles_calibrate_again_with_per_token_scales(tmp_path, monkeypatch):
    """--dynamic-bundles: a second calibration of the merged model with per-token activation scales (the recipe's are
    static), its h100 bundle exported to bundles_dynamic/ and evaluated on the GPU as bundle_dynamic_h100 (a toy
    figure of its own)."""
    s, calls = suite(tmp_path, monkeypatch, dynamic_bundles=True)
    s.main()
    by_name = dict(calls)
    cal = by_name["train-calibrate_dynamic"]
    assert sets_of(cal)["method.calibrate.activations"] == "dynamic"
    assert sets_of(by_name["train-calibrate"]).get("method.calibrate.activations") is None
    exp = by_name["export_dynamic"]
    assert exp[exp.index("--plan") + 1] == str(tmp_path / "calibrate_dynamic/calibration_plan.json")
    assert [exp[i + 1] for i, x in enumerate(exp) if x == "--target"] == ["h100"]
    ev = by_name["eval-bundle_dynamic_h100"]
    assert ev[ev.index("--bundle") + 1] == str(tmp_path / "bundles_dynamic/h100") and ev[ev.index("--device") + 1] == "cuda"
    assert any(row[1] == "toy_bundle_dynamic_h100_adherence_ratio" for row in toy_figures.RATIOS)
    with pytest.raises(SystemExit):
        toy_gpu_suite.main(["--out", str(tmp_path / "x"), "--rcm-only", "--dynamic-bundles"])


def test_sagesla_bundle_exports_the_same_plan_with_low_bit_sparse_attention(tmp_path, monkeypatch):
    """--sagesla-bundle: the merged model's h100 bundle again, from the main calibration plan, with --attention sagesla,
    to bundles_sagesla/, evaluated on the GPU as bundle_sagesla_h100 (a toy figure of its own); refused where no GPU
    bundle can be evaluated."""
    s, calls = suite(tmp_path, monkeypatch, sagesla_bundle=True)
    s.main()
    by_name = dict(calls)
    exp = by_name["export_sagesla"]
    assert exp[exp.index("--plan") + 1] == str(tmp_path / "calibrate/calibration_plan.json")
    assert exp[exp.index("--checkpoint") + 1] == str(tmp_path / "merged.safetensors")
    assert exp[exp.index("--attention") + 1] == "sagesla"
    assert [exp[i + 1] for i, x in enumerate(exp) if x == "--target"] == ["h100"]
    ev = by_name["eval-bundle_sagesla_h100"]
    assert ev[ev.index("--bundle") + 1] == str(tmp_path / "bundles_sagesla/h100") and ev[ev.index("--device") + 1] == "cuda"
    plain, plain_calls = suite(tmp_path / "off", monkeypatch)
    plain.main()
    assert not any(name in ("export_sagesla", "eval-bundle_sagesla_h100") for name, _ in plain_calls)
    assert any(row[1] == "toy_bundle_sagesla_h100_adherence_ratio" for row in toy_figures.RATIOS)
    for extra in (["--rcm-only"], ["--device", "cpu"]):
        with pytest.raises(SystemExit):
            toy_gpu_suite.main(["--out", str(tmp_path / "x"), "--sagesla-bundle", *extra])


def test_suite_arguments_are_checked():
    with pytest.raises(SystemExit):
        toy_gpu_suite.main(["--out", "x", "--sla-minutes", "0"])


def test_sla_variants_are_trained_merged_and_evaluated(tmp_path, monkeypatch):
    variant = toy_gpu_suite.sla_variant("x0:method.sla.weighting=x0,optim.lr=3e-5")
    assert variant == ("x0", ["method.sla.weighting=x0", "optim.lr=3e-5"])
    s, calls = suite(tmp_path, monkeypatch, sla_variant=[variant], skip_ablations=True, sla_minutes=6.0)
    s.main()
    by = dict(calls)
    assert "train-scm" not in by and "train-dmd" not in by and "eval-scm4" not in by
    sets = sets_of(by["train-sla_x0"])
    assert sets["method.sla.weighting"] == "x0" and sets["optim.lr"] == "3e-5"
    assert sets["trainer.max_time_minutes"] == "6.0" and sets["logging.run_dir"] == str(tmp_path / "sla_x0")
    merge = by["merge-sla_x0"]
    assert merge[merge.index("--sla") + 1] == str(tmp_path / "sla_x0/ema.safetensors")
    assert merge[merge.index("--out") + 1] == str(tmp_path / "merged_x0.safetensors")
    lab = toy_gpu_suite.sla_label()  # the recipe's topk names the evaluations, e.g. sla0.2
    from turbo_train.recipe import load_recipe
    assert lab == f"sla{load_recipe(ROOT / 'recipes/toy/sla.yaml').method.sla.topk:g}"
    ev = by[f"eval-merged_rcm4_{lab}_x0"]
    assert ev[ev.index("--checkpoint") + 1] == str(tmp_path / "merged_x0.safetensors") and "rcm" in ev
    assert f"eval-teacher_{lab}_finetuned_x0" in by and f"eval-merged_rcm4_{lab}" in by


def test_an_sla_variant_with_its_own_topk_is_named_by_it(tmp_path, monkeypatch):
    k3 = toy_gpu_suite.sla_variant("k3:method.sla.topk=0.3")
    assert toy_gpu_suite.sla_label(k3[1]) == "sla0.3"
    s, calls = suite(tmp_path, monkeypatch, sla_variant=[k3], skip_ablations=True)
    s.main()
    by = dict(calls)
    assert sets_of(by["train-sla_k3"])["method.sla.topk"] == "0.3"
    assert "eval-teacher_sla0.3_finetuned_k3" in by and "eval-merged_rcm4_sla0.3_k3" in by
    main = toy_gpu_suite.sla_label()
    assert main != "sla0.3" and f"eval-merged_rcm4_{main}" in by
    # and toy_figures files them under that topk
    f = toy_figures.ratios({"teacher": report(0.8, 400.0, 20.0), "merged_rcm4_sla0.3_k3": report(0.76, 600.0, 22.0),
                            "teacher_sla0.3_finetuned_k3": report(0.8, 500.0)})["sla_finetune"]
    assert f["toy_rcm4_sla0.3_k3_adherence_ratio"] == 0.95 and f["toy_rcm4_sla0.3_k3_diversity_ratio"] == 1.1
    assert f["toy_sla0.3_finetuned_k3_adherence_ratio"] == 1.0 and f["toy_sla0.3_finetuned_k3_frechet_ratio"] == 1.25
    assert json.loads((tmp_path / "summary.json").read_text())["complete"] is True


def test_an_unfinished_suite_still_leaves_a_digest_and_toy_figures_says_so(tmp_path, monkeypatch, capsys):
    s, calls = suite(tmp_path, monkeypatch)
    (tmp_path / "eval" / "teacher").mkdir(parents=True)
    (tmp_path / "eval" / "teacher" / "report.json").write_text(json.dumps(
        {**report(0.7), "adherence_seen_templates": 0.7, "adherence_heldout_templates": 0.7, "diversity_real": 9.0,
         "s_per_video": 1.0, "per_attribute_accuracy": {}, "settings": {}}))
    s.write_summary(0.0, complete=False)
    d = json.loads((tmp_path / "summary.json").read_text())
    assert d["complete"] is False and set(d["reports"]) == {"teacher"}
    assert toy_figures.main([str(tmp_path / "summary.json")]) == 0
    assert "did not finish" in capsys.readouterr().err


def test_refresh_digest_adds_the_reports_that_finished_after_the_last_digest(tmp_path, monkeypatch, capsys):
    s, calls = suite(tmp_path, monkeypatch, sla_variant=[toy_gpu_suite.sla_variant("k2:method.sla.topk=0.2")])
    full = {**report(0.7), "adherence_seen_templates": 0.7, "adherence_heldout_templates": 0.7, "diversity_real": 9.0,
            "s_per_video": 1.0, "per_attribute_accuracy": {}, "settings": {}, "diversity_per_prompt": [9.0, 11.0]}
    (tmp_path / "eval" / "teacher").mkdir(parents=True)
    (tmp_path / "eval" / "teacher" / "report.json").write_text(json.dumps(full))
    s.write_summary(0.0, complete=False)  # the digest a time limit leaves: the teacher only
    (tmp_path / "eval" / "bundle_h100").mkdir(parents=True)  # ...then an evaluation finished
    (tmp_path / "eval" / "bundle_h100" / "report.json").write_text(json.dumps({**full, "adherence": 0.63}))
    assert toy_gpu_suite.main(["--out", str(tmp_path), "--refresh-digest"]) == 0
    d = json.loads((tmp_path / "summary.json").read_text())
    assert set(d["reports"]) == {"teacher", "bundle_h100"} and d["complete"] is False
    assert d["settings"]["sla_variant"] == [["k2", ["method.sla.topk=0.2"]]]  # the run's own settings, kept
    assert d["reports"]["bundle_h100"]["diversity_per_prompt"] == [9.0, 11.0]
    assert toy_figures.ratios(d["reports"])["toy_bundles"]["toy_bundle_h100_adherence_ratio"] == 0.9
    with pytest.raises(SystemExit):  # nothing to refresh: a clear refusal
        toy_gpu_suite.main(["--out", str(tmp_path / "none"), "--refresh-digest"])
    assert "no digest to refresh" in capsys.readouterr().err


def test_sla_variant_errors_name_the_problem():
    with pytest.raises(argparse.ArgumentTypeError, match="NAME:KEY=VALUE"):
        toy_gpu_suite.sla_variant("x0")
    with pytest.raises(argparse.ArgumentTypeError, match="weighting"):
        toy_gpu_suite.sla_variant("bad:method.sla.weighting=snr")


def test_variant_figures_divide_by_the_teacher():
    f = toy_figures.ratios({"teacher": report(0.8, 400.0), "merged_rcm4_sla0.1_x0": report(0.78, 600.0),
                            "teacher_sla0.1_finetuned_x0": report(0.7)})["sla_finetune"]
    assert f["toy_rcm4_sla0.1_x0_adherence_ratio"] == 0.975 and f["toy_rcm4_sla0.1_x0_frechet_ratio"] == 1.5
    assert f["toy_sla0.1_finetuned_x0_adherence_ratio"] == 0.875


def test_the_written_command_names_every_suite_setting():
    cmd = toy_figures.suite_command({"out": "runs/suite", "minutes": 4.5, "prompts": 256, "sla_minutes": 5.0,
                                     "skip_ablations": True, "sla_variant": [["x0", ["method.sla.weighting=x0"]]]})
    assert cmd == ("python tools/toy_gpu_suite.py --out runs/suite --minutes 4.5 --prompts 256 --sla-minutes 5.0 "
                   "--skip-ablations --sla-variant x0:method.sla.weighting=x0")


def test_rcm_variants_train_and_evaluate_at_four_steps(tmp_path, monkeypatch):
    seed = toy_gpu_suite.rcm_variant("seed1:trainer.seed=1")
    s, calls = suite(tmp_path, monkeypatch, rcm_variant=[seed], skip_ablations=True)
    s.main()
    by = dict(calls)
    assert sets_of(by["train-rcm_seed1"])["trainer.seed"] == "1"
    ev = by["eval-rcm4_seed1"]
    assert ev[ev.index("--checkpoint") + 1] == str(tmp_path / "rcm_seed1/ema.safetensors")
    assert ev[ev.index("--steps") + 1] == "4"
    with pytest.raises(argparse.ArgumentTypeError, match="trainer.seed|seed"):
        toy_gpu_suite.rcm_variant("bad:trainer.seed=minus")
    f = toy_figures.ratios({"teacher": report(0.8, 400.0, 20.0), "rcm4_seed1": report(0.72, 480.0, 24.0)})["rcm"]
    assert f["toy_rcm4_seed1_adherence_ratio"] == 0.9 and f["toy_rcm4_seed1_diversity_ratio"] == 1.2
    assert f["toy_rcm4_seed1_frechet_ratio"] == 1.2


def test_rcm_only_trains_and_evaluates_the_students_and_nothing_else(tmp_path, monkeypatch):
    s, calls = suite(tmp_path, monkeypatch, rcm_only=True, skip_ablations=True,
                     rcm_variant=[toy_gpu_suite.rcm_variant("flr:method.rcm.fake_score_lr=5e-5")])
    assert s.main() == 0
    names = {name for name, _ in calls}
    assert names == {"train-rcm", "train-rcm_flr", "eval-teacher", "eval-teacher_rcm4", "eval-rcm4", "eval-rcm2", "eval-rcm1",
                     "eval-rcm4_flr"}
    assert json.loads((tmp_path / "summary.json").read_text())["complete"] is True
    with pytest.raises(SystemExit):
        toy_gpu_suite.main(["--out", str(tmp_path), "--rcm-only", "--minutes", "-1"])


def test_sla_on_student_tunes_the_student_after_its_training_and_evaluates_it(tmp_path, monkeypatch):
    for rcm_only in (True, False):
        s, calls = suite(tmp_path / str(rcm_only), monkeypatch, rcm_only=rcm_only, skip_ablations=True,
                         sla_on_student=True, sla_minutes=5.0)
        assert s.main() == 0
        names = [name for name, _ in calls]
        lab = toy_gpu_suite.sla_label()
        assert names.index("train-rcm") < names.index("train-sla_student") < names.index(f"eval-direct_rcm4_{lab}")
        sets = sets_of(dict(calls)["train-sla_student"])
        assert sets["model.checkpoint"] == str(s.exported("rcm")) and sets["method.sla.caption_dropout"] == "0.0"
        assert sets["trainer.max_time_minutes"] == "5.0" and sets["trainer.max_steps"] == "300"
        ev = dict(calls)[f"eval-direct_rcm4_{lab}"]
        assert ev[ev.index("--checkpoint") + 1] == str(s.exported("sla_student")) and "rcm" in ev
    # its figures land in sla_finetune.json, divided by the teacher
    reports = {"teacher": {"adherence": 0.8, "frechet": 100.0, "diversity": 20.0},
               "direct_rcm4_sla0.1": {"adherence": 0.76, "frechet": 150.0, "diversity": 19.0}}
    figs = toy_figures.ratios(reports)["sla_finetune"]
    assert figs["toy_rcm4_sla0.1_direct_adherence_ratio"] == 0.95 and figs["toy_rcm4_sla0.1_direct_frechet_ratio"] == 1.5
    assert figs["toy_direct_rcm4_sla0.1_adherence"] == 0.76


def test_student_bundles_calibrate_export_and_evaluate_the_students_own_sla_tune(tmp_path, monkeypatch, capsys):
    s, calls = suite(tmp_path, monkeypatch, skip_ablations=True, sla_on_student=True, student_bundles=True,
                     student_sla_steps=150)
    assert s.main() == 0
    by, names = dict(calls), [name for name, _ in calls]
    student = str(s.exported("sla_student"))
    assert sets_of(by["train-sla_student"])["trainer.max_steps"] == "150"
    cal = sets_of(by["train-calibrate_student"])
    assert cal["model.checkpoint"] == student and cal["logging.run_dir"] == str(tmp_path / "calibrate_student")
    plan = cal["method.calibrate.plan_path"]
    assert plan == str(tmp_path / "calibrate_student/calibration_plan.json")
    ex = by["export_student"]
    assert ex[ex.index("--checkpoint") + 1] == student and ex[ex.index("--plan") + 1] == plan
    assert ex[ex.index("--out") + 1] == str(tmp_path / "bundles_student")
    # the merge's own calibration and bundles are untouched
    assert sets_of(by["train-calibrate"])["model.checkpoint"] == str(tmp_path / "merged.safetensors")
    assert names.index("export_student") < names.index("eval-bundle_student_h100")
    dev = lambda cmd: cmd[cmd.index("--device") + 1]  # noqa: E731
    assert dev(by["eval-bundle_student_cpu"]) == "cpu" and dev(by["eval-bundle_student_h100"]) == "cuda"
    b = by["eval-bundle_student_cpu"]
    assert b[b.index("--bundle") + 1] == str(tmp_path / "bundles_student/cpu")
    # the figures, and a report evaluated elsewhere (tools/device/host_cpu_bundle.sh ROUTE=student) added by name
    reports = {"teacher": report(0.8), "bundle_student_h100": report(0.76)}
    assert toy_figures.ratios(reports)["toy_bundles"]["toy_bundle_student_h100_adherence_ratio"] == 0.95
    (tmp_path / "summary.json").write_text(json.dumps({"settings": {"out": "o", "minutes": 3, "prompts": 256,
                                                                    "sla_on_student": True, "student_sla_steps": 150,
                                                                    "student_bundles": True}, "reports": reports}))
    (tmp_path / "host.json").write_text(json.dumps(report(0.72)))
    assert toy_figures.main([str(tmp_path / "summary.json"), "--report", f"bundle_student_cpu={tmp_path / 'host.json'}"]) == 0
    out = capsys.readouterr().out
    assert "toy_bundle_student_cpu_adherence_ratio" in out and "0.9" in out
    assert "--sla-on-student --student-sla-steps 150 --student-bundles" in toy_figures.suite_command(
        json.loads((tmp_path / "summary.json").read_text())["settings"])
    with pytest.raises(SystemExit):  # a report that is not there is named
        toy_figures.main([str(tmp_path / "summary.json"), "--report", f"bundle_student_cpu={tmp_path / 'nope.json'}"])
    assert "nope.json" in capsys.readouterr().err
    for argv in (["--student-bundles"], ["--student-bundles", "--sla-on-student", "--rcm-only"],
                 ["--sla-on-student", "--student-sla-steps", "0"]):
        with pytest.raises(SystemExit):  # refused before anything runs
            toy_gpu_suite.main(["--out", str(tmp_path / "x"), *argv])
    assert not (tmp_path / "x").exists()


def test_rcm_times_evaluate_every_student_on_other_grids(tmp_path, monkeypatch):
    s, calls = suite(tmp_path, monkeypatch, rcm_only=True, skip_ablations=True,
                     rcm_variant=[toy_gpu_suite.rcm_variant("seed1:trainer.seed=1")],
                     rcm_times=[toy_gpu_suite.rcm_times("toy:shift=3"), toy_gpu_suite.rcm_times("low:1.4,1.2,0.7")])
    assert s.main() == 0
    ev = dict(calls)
    for name, spec in (("toy", "shift=3"), ("low", "1.4,1.2,0.7")):
        for run_name, ev_name in (("rcm", f"rcm4_times_{name}"), ("rcm_seed1", f"rcm4_seed1_times_{name}")):
            cmd = ev[f"eval-{ev_name}"]
            assert cmd[cmd.index("--rcm-mid-times") + 1] == spec
            assert cmd[cmd.index("--checkpoint") + 1] == str(s.exported(run_name))
    assert "--rcm-times toy:shift=3" in toy_figures.suite_command(
        {"out": "o", "minutes": 4, "prompts": 256, "rcm_times": [["toy", "shift=3"]]})
    for bad in ("toy", "1x:shift=3", "a:1.0,1.4,1.5", "b:shift=zero", "c:1.5,1.4"):
        with pytest.raises(argparse.ArgumentTypeError):
            toy_gpu_suite.rcm_times(bad)


def test_snapshots_keep_each_rcm_trainings_course_and_evaluate_it(tmp_path, monkeypatch):
    s, calls = suite(tmp_path, monkeypatch, rcm_only=True, snapshots=250)
    for run_name in ("rcm", "scm"):  # what the (mocked) trainings would leave
        (tmp_path / run_name).mkdir()
        for step in (250, 500):
            (tmp_path / run_name / f"ema_step{step:06d}.safetensors").write_bytes(b"w")
    assert s.main() == 0
    by = dict(calls)
    for t in ("train-rcm", "train-scm", "train-dmd"):
        sets = sets_of(by[t])
        assert sets["checkpoint.every_n_steps"] == "250" and sets["checkpoint.export_snapshots"] == "true"
    ev = by["eval-rcm4_step000500"]
    assert ev[ev.index("--checkpoint") + 1] == str(tmp_path / "rcm" / "ema_step000500.safetensors")
    assert {"eval-rcm4_step000250", "eval-scm4_step000250", "eval-scm4_step000500"} <= set(by)
    assert "--snapshots 250" in toy_figures.suite_command({"out": "o", "minutes": 4, "prompts": 256, "snapshots": 250})
    # the 4-step figure of each rCM snapshot divides by the same teacher
    f = toy_figures.ratios({"teacher": report(0.8), "rcm4_step000250": report(0.76)})["rcm"]
    assert f["toy_rcm4_step000250_adherence_ratio"] == 0.95


def test_ema_widths_keep_extra_emas_in_every_rcm_training_and_evaluate_them(tmp_path, monkeypatch, capsys):
    s, calls = suite(tmp_path, monkeypatch, rcm_only=True, skip_ablations=True, ema_widths=[0.1, 0.15],
                     rcm_variant=[toy_gpu_suite.rcm_variant("seed1:trainer.seed=1")],
                     rcm_times=[toy_gpu_suite.rcm_times("hi:shift=8")])
    assert s.main() == 0
    by = dict(calls)
    for t in ("train-rcm", "train-rcm_seed1"):
        assert sets_of(by[t])["ema.extra_sigma_rels"] == "[0.1,0.15]"
    for ev_name, path in (("rcm4_sr0.1", "rcm/ema_sr0.1.safetensors"), ("rcm4_seed1_sr0.15", "rcm_seed1/ema_sr0.15.safetensors"),
                          ("rcm4_seed1_sr0.1_times_hi", "rcm_seed1/ema_sr0.1.safetensors")):
        cmd = by[f"eval-{ev_name}"]
        assert cmd[cmd.index("--checkpoint") + 1] == str(tmp_path / path)
    cmd = by["eval-rcm4_seed1_sr0.1_times_hi"]
    assert cmd[cmd.index("--rcm-mid-times") + 1] == "shift=8"
    # the recipe accepts what the suite sets (a YAML list through --set)
    from turbo_train.recipe import load_recipe

    r = load_recipe(toy_gpu_suite.REPO / "recipes/toy/rcm.yaml", overrides=["ema.extra_sigma_rels=[0.1,0.15]"])
    assert r.ema.extra_sigma_rels == [0.1, 0.15]
    assert "--ema-widths 0.2,0.15" in toy_figures.suite_command({"out": "o", "minutes": 4, "prompts": 256,
                                                                  "ema_widths": [0.2, 0.15]})
    for bad in ("0.3", "x", "0.2,0.2", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            toy_gpu_suite.ema_widths(bad)
    # a width equal to the recipe's own sigma_rel is refused before anything starts
    own = load_recipe(toy_gpu_suite.REPO / "recipes/toy/rcm.yaml").ema.sigma_rel
    with pytest.raises(SystemExit):
        toy_gpu_suite.main(["--out", str(tmp_path / "x"), "--rcm-only", "--ema-widths", f"0.15,{own:g}"])
    assert (f"--ema-widths: {toy_gpu_suite.REPO / 'recipes/toy/rcm.yaml'} (--set ema.extra_sigma_rels): "
            f"ema.extra_sigma_rels: must differ from each other and from sigma_rel {own}") in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_another_teacher_feeds_every_training_the_merge_and_the_ratios(tmp_path, monkeypatch):
    teacher = tmp_path / "v5.safetensors"
    teacher.write_bytes(b"weights")
    s, calls = suite(tmp_path, monkeypatch, teacher=teacher, skip_ablations=True)
    s.main()
    by = dict(calls)
    assert sets_of(by["train-rcm"])["model.checkpoint"] == str(teacher)
    assert sets_of(by["train-sla"])["model.checkpoint"] == str(teacher)
    ev = by["eval-teacher"]
    assert ev[ev.index("--checkpoint") + 1] == str(teacher)
    merge = by["merge-sla"]
    assert merge[merge.index("--teacher") + 1] == str(teacher)
    cmd = toy_figures.suite_command({"out": "o", "minutes": 4, "prompts": 256, "teacher": str(teacher),
                                     "rcm_only": True})
    assert cmd.endswith(f"--rcm-only --teacher {teacher}")
    with pytest.raises(SystemExit):  # a missing file is refused before anything runs
        toy_gpu_suite.main(["--out", str(tmp_path / "x"), "--teacher", str(tmp_path / "missing.safetensors")])
    assert not (tmp_path / "x").exists()


def test_training_progress_reads_the_last_logged_values(tmp_path):
    d = tmp_path / "rcm" / "csv" / "version_0"
    d.mkdir(parents=True)
    (d / "metrics.csv").write_text("epoch,step,train/loss,val/loss\n0,49,2.0,\n0,99,1.5,\n0,99,,0.7\n")
    assert toy_gpu_suite.training_progress(tmp_path / "rcm") == {"steps": 99, "last": {"train/loss": 1.5, "val/loss": 0.7}}
    assert toy_gpu_suite.training_progress(tmp_path / "eval") is None


def test_the_digest_pairs_each_frechet_with_the_teachers_from_their_features(tmp_path, monkeypatch):
    """Evaluations with judge features (turbo-eval's features.npz) get the paired bootstrap of their Fréchet
    ratio to the teacher's in the digest (once; cached), and toy_figures writes it as *_stderr_paired;
    evaluations without features, or of other real videos, get none."""
    import numpy as np

    s, _ = suite(tmp_path, monkeypatch)
    rng = np.random.default_rng(0)
    real = rng.normal(size=(64, 6))
    teacher = rng.normal(size=(64, 6))
    extra = {"adherence_seen_templates": 0.7, "adherence_heldout_templates": 0.7, "diversity_real": 9.0,
             "s_per_video": 1.0, "per_attribute_accuracy": {}, "settings": {}}
    for name, gen, ref in (("teacher", teacher, real), ("rcm4", teacher + 0.3 * rng.normal(size=(64, 6)), real),
                           ("rcm2", teacher, real + 1.0), ("rcm1", None, None)):
        d = tmp_path / "eval" / name
        d.mkdir(parents=True)
        (d / "report.json").write_text(json.dumps({**report(0.7), **extra}))
        if gen is not None:
            np.savez(d / "features.npz", generated=gen, real=ref)
    digest = s.write_summary(0.0, complete=True)["reports"]
    assert digest["teacher"]["frechet_ratio_paired"] == 1.0 and digest["teacher"]["frechet_ratio_paired_stderr"] == 0.0
    assert digest["rcm4"]["frechet_ratio_paired_stderr"] > 0
    assert "frechet_ratio_paired" not in digest["rcm2"] and "frechet_ratio_paired" not in digest["rcm1"]
    assert json.loads((tmp_path / "eval" / "rcm4" / "frechet_vs_teacher.json").read_text()) == {
        k: digest["rcm4"][k] for k in ("frechet_ratio_paired", "frechet_ratio_paired_stderr")}
    figs = toy_figures.ratios({**digest, "rcm4": {**digest["rcm4"], "frechet": 120.0}})
    assert figs["rcm"]["toy_rcm4_frechet_ratio_stderr_paired"] == digest["rcm4"]["frechet_ratio_paired_stderr"]


def test_bundle_sla_makes_the_bundles_from_that_variants_merge(tmp_path, monkeypatch):
    k2 = toy_gpu_suite.sla_variant("k2:method.sla.topk=0.2")
    s, calls = suite(tmp_path, monkeypatch, sla_variant=[k2], skip_ablations=True, bundle_sla="k2")
    assert s.main() == 0
    by = dict(calls)
    merged_k2 = str(tmp_path / "merged_k2.safetensors")
    assert sets_of(by["train-calibrate"])["model.checkpoint"] == merged_k2
    export = by["export"]
    assert export[export.index("--checkpoint") + 1] == merged_k2
    # the main fine-tune is still merged and evaluated on its own
    ev = by[f"eval-merged_rcm4_{toy_gpu_suite.sla_label()}"]
    assert ev[ev.index("--checkpoint") + 1] == str(tmp_path / "merged.safetensors")
    assert "--bundle-sla k2" in toy_figures.suite_command({"out": "o", "minutes": 4, "prompts": 256, "bundle_sla": "k2"})
    for argv in (["--bundle-sla", "k3", "--sla-variant", "k2:method.sla.topk=0.2"],
                 ["--bundle-sla", "k2", "--sla-variant", "k2:method.sla.topk=0.2", "--rcm-only"]):
        with pytest.raises(SystemExit):  # refused before anything runs
            toy_gpu_suite.main(["--out", str(tmp_path / "x"), *argv])
    assert not (tmp_path / "x").exists()


def test_lean_leaves_out_the_reference_evaluations(tmp_path, monkeypatch):
    s, calls = suite(tmp_path, monkeypatch, skip_ablations=True, lean=True)
    assert s.main() == 0
    names = {name for name, _ in calls}
    assert not names & {"eval-teacher_sla0.1_untrained", "eval-teacher_sla0.2_untrained", "eval-rcm2", "eval-rcm1"}
    assert {"eval-teacher", "eval-rcm4", f"eval-merged_rcm4_{toy_gpu_suite.sla_label()}", "eval-bundle_h100",
            "eval-bundle_cpu"} <= names
    assert toy_figures.suite_command({"out": "o", "minutes": 4, "prompts": 256, "lean": True}).endswith(" --lean")


def test_a_stage_whose_inputs_are_missing_is_skipped_not_run(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(toy_gpu_suite.subprocess, "call", lambda *a, **k: ran.append(a) or 0)
    there = tmp_path / "w.safetensors"
    there.write_bytes(b"w")
    r = toy_gpu_suite.run("merge-sla", ["echo"], tmp_path, [there, tmp_path / "sla" / "ema.safetensors"])
    assert r["rc"] is None and "sla/ema.safetensors" in r["skipped"] and not ran
    assert "skip merge-sla: missing" in capsys.readouterr().out
    assert toy_gpu_suite.run("merge-sla", ["echo"], tmp_path, [there])["rc"] == 0 and ran
    # the suite's own stages name their inputs: an evaluation its checkpoint, calibration the merged model
    s, _ = suite(tmp_path, monkeypatch)
    calls = []
    monkeypatch.setattr(toy_gpu_suite, "run", lambda name, cmd, out, needs=(): calls.append((name, list(needs))) or
                        {"stage": name, "rc": 0, "seconds": 0.0})
    s.evaluate("rcm4", ["--checkpoint", str(tmp_path / "rcm/ema.safetensors")])
    s.train("calibrate", "recipes/toy/calibrate.yaml", ["--set", f"model.checkpoint={tmp_path / 'merged.safetensors'}"])
    needs = dict(calls)
    assert needs["eval-rcm4"] == [tmp_path / "rcm/ema.safetensors"]
    assert tmp_path / "merged.safetensors" in needs["train-calibrate"]
