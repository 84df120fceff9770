"""tools/bench_rcm_step.py on the CPU: its --tiny path runs the Wan-1.3B rCM recipe through turbo-train
(tiny model, random latent shards and teacher) and writes its JSON into the work directory only;
the step table's reading (kinds from the update counters, the schedule-cycle mean) and the merge
into cluster.json (existing figures kept)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import bench_rcm_step as tool  # noqa: E402


def _steps(kinds, times, mfus=None):
    mfus = mfus or [None] * len(kinds)
    return [{"step": i, "step_s": t, "mfu": m, "peak_mem_gib": 1.0 + i, "mem_kind": "gpu", "kind": k}
            for i, (k, t, m) in enumerate(zip(kinds, times, mfus))]


def test_summarize_takes_one_schedule_cycle():
    # warm-up (3 steps) left out; measured: fake 2.0, 2.2, student 10.0, fake 1.8, 2.0
    steps = _steps(["student", "student", "fake", "fake", "fake", "student", "fake", "fake"],
                   [50.0, 40.0, 9.0, 2.0, 2.2, 10.0, 1.8, 2.0], [0.1] * 5 + [0.4, 0.2, 0.2])
    s = tool.summarize(steps, skip=3, student_update_freq=5)
    assert s["by_kind"]["fake"]["n"] == 4 and s["by_kind"]["student"]["n"] == 1
    assert s["step_s"] == pytest.approx((10.0 + 4 * 2.0) / 5)  # median fake time 2.0
    mf = 0.15  # median of 0.1, 0.1, 0.2, 0.2
    assert s["mfu"] == pytest.approx((0.4 * 10.0 + 4 * mf * 2.0) / (10.0 + 4 * 2.0))
    assert s["peak_mem_gib"] == 8.0  # the whole run's peak, warm-up included
    only = tool.summarize(_steps(["student"] * 6, [9.0, 5, 1.0, 3.0, 2.0, 4.0]), skip=2, student_update_freq=5)
    assert only["step_s"] == 2.5 and only["how"] == "median of the measured steps"
    with pytest.raises(ValueError, match="raise --steps"):
        tool.summarize(_steps(["student"] * 2, [1.0, 1.0]), skip=3, student_update_freq=5)


def test_merge_into_cluster_keeps_the_cpu_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(tool, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"device": "cpu", "date": "2026-01-01T00:00:00Z",
                                "command": "python tools/cpu_ddp_parity.py",
                                "figures": {"cpu_2proc_ddp_loss_max_rel_diff": 0.0}}))
    figures = {"rcm_1.3b_fsdp2_1gpu_step_s": 5.0, "rcm_1.3b_fsdp2_1gpu_peak_mem_gib": 60.0, "rcm_1.3b_step_mfu": 0.3}
    tool.merge_into_cluster(figures, path)
    tool.merge_into_cluster(figures, path)  # a rerun lists each source once
    doc = json.loads(path.read_text())
    assert doc["figures"] == {"cpu_2proc_ddp_loss_max_rel_diff": 0.0, "rcm_1.3b_fsdp2_1gpu_step_s": 5.0,
                              "rcm_1.3b_fsdp2_1gpu_peak_mem_gib": 60.0}  # rcm.json's own figures stay out
    assert doc["device"] == "cpu; NVIDIA H100 80GB HBM3 (rcm_1.3b_*)"
    assert doc["command"].startswith("python tools/cpu_ddp_parity.py; python ") and doc["command"].count(";") == 1
    with pytest.raises(ValueError, match="no cluster figure"):
        tool.merge_into_cluster({"rcm_1.3b_step_s": 1.0}, path)


def test_tiny_fsdp2_run_in_process(tmp_path, monkeypatch):
    """The child's part of the tool in this process: random inputs, turbo-train on the 1.3B recipe
    (tiny overrides, fsdp2 on one CPU process) with the non-writing checkpoint callback, the CSV read back."""
    from turbo_train import runner

    torch.set_num_threads(1)
    monkeypatch.setattr(runner, "StepCheckpoint", runner.StepCheckpoint)  # child_main swaps it: restore after
    inputs = tool.write_inputs(tmp_path, tool.TINY, num_samples=2)
    run_dir = tmp_path / "run-fsdp2"
    argv = [str(tool.RECIPE)]
    # the first of the two blocks recomputed (partial activation checkpointing under FSDP2)
    for s in tool.common_overrides(inputs, run_dir, 6, tiny=True) + tool.run_overrides("fsdp2", tiny=True) \
            + ["model.activation_checkpointing=1"]:
        argv += ["--set", s]
    env = dict(os.environ)
    try:
        assert tool.child_main(argv) == 0
    finally:
        if torch.distributed.is_initialized():  # the fsdp2 strategy's one-process group
            torch.distributed.destroy_process_group()
        os.environ.clear()  # Lightning exported MASTER_PORT, RANK, ... for it
        os.environ.update(env)
    steps = tool.read_steps(run_dir)
    # tangent_warmup 2: two sCM student steps, then fake-score steps and a student step at iteration 5
    assert [s["kind"] for s in steps] == ["student", "student", "fake", "fake", "fake", "student"]
    f = tool.figures_of("fsdp2", tool.summarize(steps, skip=3, student_update_freq=5))
    assert f["rcm_1.3b_step_s"] == f["rcm_1.3b_fsdp2_1gpu_step_s"] > 0
    assert f["rcm_1.3b_student_step_s"] > 0 and f["rcm_1.3b_fake_step_s"] > 0
    assert "rcm_1.3b_peak_mem_gib" not in f  # CPU: resident memory, not a GPU figure
    resolved = (run_dir / "resolved_recipe.yaml").read_text()
    assert "strategy: fsdp2" in resolved and "loss_mode: rcm" in resolved and "wan2.1-1.3b" in resolved
    assert "activation_checkpointing: 1" in resolved
    ckpts = run_dir / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir())  # nothing written
    assert not (run_dir / "ema.safetensors").exists()


def test_bad_extra_set_fails_before_any_run(tmp_path):
    with pytest.raises(SystemExit, match="model.activation_checkpointing"):
        tool.main(["--tiny", "--work", str(tmp_path), "--set", "model.activation_checkpointing=-1"])
    assert not any(tmp_path.iterdir())  # no inputs written, nothing launched


@pytest.mark.slow
def test_tiny_both_runs(tmp_path, monkeypatch):
    """The tool's CLI with both runs of the device command (zero2 under strategy auto on the CPU), each in
    its own process (~35 s on 2 shared cores)."""
    import subprocess

    monkeypatch.delenv("OUT", raising=False)
    cmd = [sys.executable, str(ROOT / "tools" / "bench_rcm_step.py"), "--tiny", "--work", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    f = json.loads((tmp_path / "benchmarks" / "rcm_step.json").read_text())["figures"]
    assert f["rcm_1.3b_zero2_1gpu_step_s"] > 0 and f["rcm_1.3b_fsdp2_1gpu_step_s"] > 0
    zero2 = (tmp_path / "run-zero2" / "resolved_recipe.yaml").read_text()
    assert "loss_mode: rcm" in zero2 and "kind: none" in zero2  # full rCM, no EMA
    assert "compare it with fsdp2_noema" in proc.stdout
    assert not (ROOT / "benchmarks" / "rcm_step.json").exists() or \
        json.loads((ROOT / "benchmarks" / "rcm_step.json").read_text())["device"] != "cpu"  # tiny: temp dir only


def test_every_run_s_settings_are_valid_recipe_overrides():
    from turbo_train.recipe import load_recipe

    root = Path(tool.__file__).resolve().parents[1]
    for name, (_, sets) in tool.RUNS.items():
        r = load_recipe(root / "recipes/wan2.1-1.3b/rcm.yaml", overrides=sets)
        if name == "fsdp2_fullac":
            assert r.model.activation_checkpointing_policy == "full"
        if name == "fsdp2":  # the recipe's own policy: attention outputs kept
            assert r.model.activation_checkpointing_policy == "keep_attention"
