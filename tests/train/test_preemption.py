"""Preemption and non-finite steps.

SIGTERM (or SIGUSR1) sent from outside to a running `turbo-train` subprocess -> it finishes the step,
writes last.ckpt at that step and exits 143; resuming loses nothing: the loss sequence of interrupted +
resumed equals an uninterrupted run, bitwise. On 2 processes a signal to ONE rank stops both at the
same step (slow). NaN/Inf losses: the step is skipped (weights and optimizer moments unchanged) and
counted; N in a row stop training with a checkpoint (NonFiniteStop)."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_cluster import assert_ok, read_metric, run_train, train_command, worker_env, write_recipe

from turbo_train.callbacks import EXIT_PREEMPTED, NonFiniteStop


def wait_for_step(progress: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> list[tuple[int, int, int]]:
    """Poll the worker's progress file until some rank started optimizer step `step`; its (rank, pid, step) rows."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"turbo-train ended early ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
        rows = [tuple(map(int, line.split())) for line in progress.read_text().splitlines()] if progress.exists() else []
        if any(r[2] >= step for r in rows):
            return rows
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout} s")


def last_step(run_dir: Path) -> int:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def test_sigterm_checkpoints_exits_143_and_resume_loses_nothing(tmp_path):
    # no periodic checkpoint: the only one is the preemption's
    recipe = write_recipe(tmp_path, checkpoint={"every_n_steps": 0, "resume": "auto"}, trainer={"max_steps": 200})
    progress = tmp_path / "progress.txt"
    env = worker_env(TURBO_TEST_PROGRESS=progress, TURBO_TEST_STEP_SLEEP=0.3)
    proc = subprocess.Popen(train_command(tmp_path, recipe, tmp_path / "run"), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(progress, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-4000:]
    assert "received SIGTERM" in out + err
    k = last_step(tmp_path / "run")
    assert 3 <= k < 200  # stopped after the step that was running (>= step index 2 finished)

    # resume to k + 2 steps, and compare with a run that was never interrupted
    assert_ok(run_train(tmp_path, recipe, tmp_path / "run", overrides=[f"trainer.max_steps={k + 2}"]))
    assert_ok(run_train(tmp_path, recipe, tmp_path / "straight", overrides=[f"trainer.max_steps={k + 2}"]))
    resumed = read_metric(tmp_path / "run", "train/loss_global")
    straight = read_metric(tmp_path / "straight", "train/loss_global")
    assert len(straight) == k + 2 and resumed == straight


@pytest.mark.slow  # two processes, ~40 s on 2 shared cores
def test_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    recipe = write_recipe(tmp_path, checkpoint={"every_n_steps": 0, "resume": "auto"}, trainer={"max_steps": 200})
    progress = tmp_path / "progress.txt"
    env = worker_env(TURBO_TEST_PROGRESS=progress, TURBO_TEST_STEP_SLEEP=0.3)
    proc = subprocess.Popen(train_command(tmp_path, recipe, tmp_path / "run", nproc=2, overrides=["trainer.strategy=ddp"]),
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows = wait_for_step(progress, 2, proc)
    rank1_pid = next(pid for rank, pid, _ in rows if rank == 1)
    import os

    os.kill(rank1_pid, signal.SIGUSR1)  # SLURM's warning signal, to rank 1 only
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports its workers' exit code 143 as a failure
    assert f"exitcode  : {EXIT_PREEMPTED}" in err or "exit code 143" in out + err, err[-4000:]
    k = last_step(tmp_path / "run")
    steps = [s for _, _, s in (tuple(map(int, line.split())) for line in progress.read_text().splitlines())]
    assert max(steps) == k - 1  # both ranks stopped after the same step, none started another
    assert_ok(run_train(tmp_path, recipe, tmp_path / "run", nproc=2,
                        overrides=["trainer.strategy=ddp", f"trainer.max_steps={k + 1}"]))
    assert last_step(tmp_path / "run") == k + 1


# ----------------------------------------------------------------------------- NaN / Inf


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at({1, 2}): the flow-matching loss is NaN at those optimizer steps (fake text encoder too)."""

    import turbo_train.methods.batching as batching
    import turbo_train.methods.flow_matching as fm
    from fakes import FakeTextEncoder

    monkeypatch.setattr(batching, "build_text_encoder", lambda cfg, device: FakeTextEncoder())
    steps = set()
    step = fm.FlowMatchingModule.training_step

    def training_step(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step in steps else loss

    monkeypatch.setattr(fm.FlowMatchingModule, "training_step", training_step)
    return steps.update


def fit(tmp_path, recipe_path, *overrides):
    from turbo_train import cli

    args = [str(recipe_path), "--set", f"logging.run_dir={tmp_path / 'run'}"]
    for o in overrides:
        args += ["--set", o]
    return cli.main(args)


def test_nan_steps_are_skipped_and_counted(tmp_path, nan_at):
    nan_at({1, 2})
    recipe = write_recipe(tmp_path, trainer={"max_steps": 4, "max_nonfinite_steps": 3},
                          checkpoint={"every_n_steps": 1, "keep": None, "resume": None})
    assert fit(tmp_path, recipe) == 0
    ck = tmp_path / "run" / "checkpoints"
    s1, s3 = (torch.load(ck / f"step{k:08d}.ckpt", map_location="cpu", weights_only=True) for k in (1, 3))
    # steps 1 and 2 were skipped: the trained weights and AdamW's moments did not move
    for k, v in s1["state_dict"].items():
        if k.startswith("model."):
            assert torch.equal(v, s3["state_dict"][k]), k
    for a, b in zip(s1["optimizer_states"][0]["state"].values(), s3["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    skipped = read_metric(tmp_path / "run", "train/nonfinite_skipped")
    assert [skipped[k] for k in sorted(skipped)] == [0, 1, 2, 2]
    loss = read_metric(tmp_path / "run", "train/loss_global")
    assert [loss[k] != loss[k] for k in sorted(loss)] == [False, True, True, False]  # NaN where injected
    final = torch.load(ck / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 4 and all(torch.isfinite(v).all() for v in final["state_dict"].values())


def test_nan_steps_in_a_row_stop_with_a_checkpoint(tmp_path, nan_at):
    nan_at(set(range(2, 100)))
    recipe = write_recipe(tmp_path, trainer={"max_steps": 50, "max_nonfinite_steps": 2},
                          checkpoint={"every_n_steps": 0, "resume": None})
    with pytest.raises(NonFiniteStop, match=r"trainer\.max_nonfinite_steps: 2 optimizer steps in a row"):
        fit(tmp_path, recipe)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 4  # steps 2 and 3 skipped, then the stop
    assert state["callbacks"]["NonFiniteGuard"] == {"skipped": 2, "consecutive": 2}
