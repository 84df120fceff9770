"""callbacks.ProgressLines: one line per logging window on rank 0, once per optimizer step even with
gradient accumulation (several batch ends per step), the last step always, time left capped by max_time."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from turbo_train.callbacks import ProgressLines


def drive(cb, steps_per_batch_end, metrics, capsys, is_global_zero=True):
    """The lines the callback printed over these batch ends."""
    capsys.readouterr()
    trainer = SimpleNamespace(global_step=0, is_global_zero=is_global_zero, callback_metrics=metrics)
    cb.on_train_start(trainer, None)
    for step in steps_per_batch_end:
        trainer.global_step = step
        cb.on_train_batch_end(trainer, None, None, None, 0)
    return capsys.readouterr().out.splitlines()


def test_one_line_per_window_and_the_last_step(capsys):
    metrics = {"train/loss": torch.tensor(0.25), "train/lr": torch.tensor(1e-4), "train/step_s": torch.tensor(2.0),
               "val/loss": torch.tensor(9.0)}
    # accumulation 2: global_step stays for two batch ends; max_steps 5 is not a multiple of every = 2
    lines = drive(ProgressLines(every=2, max_steps=5), [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5], metrics, capsys)
    assert [ln.split()[2] for ln in lines] == ["2/5", "4/5", "5/5"]
    assert "loss 0.25" in lines[0] and "lr 0.0001" in lines[0]
    assert "step_s" not in lines[0] and "val" not in lines[0]  # only losses, grad norms, LRs, samples/s
    assert all(ln.startswith("turbo-train step ") for ln in lines)


def test_other_ranks_print_nothing_and_max_time_caps_the_estimate(capsys):
    assert drive(ProgressLines(every=1, max_steps=3), [1, 2, 3], {}, capsys, is_global_zero=False) == []
    lines = drive(ProgressLines(every=1, max_steps=10**9, max_time_s=60.0), [1], {}, capsys)
    assert "no metrics yet" in lines[0] and lines[0].endswith(("0:00:59 left", "0:01:00 left"))
