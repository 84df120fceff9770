"""Exact resume: 6 steps in one run give bitwise the same losses, weights, EMA and optimizer state as 3
steps + a resumed run of 3 (CPU, fp32), also with DataLoader workers and gradient accumulation, and
with FSDP2's sharded checkpoints on 2 processes (slow). Plus the pieces: ToyBatchStream positions,
atomic checkpoint writes, resume_path fallbacks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_cluster import assert_ok, read_metric, run_train, write_recipe

from turbo_train import cli, runner
from turbo_train.recipe import recipe_from_dict
from fakes import FakeTextEncoder


@pytest.fixture(autouse=True)
def _fake_text(monkeypatch):
    import turbo_train.methods.batching as batching

    monkeypatch.setattr(batching, "build_text_encoder", lambda cfg, device: FakeTextEncoder())
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train(recipe: Path, run_dir: Path, max_steps: int, *overrides: str) -> None:
    args = [str(recipe), "--set", f"logging.run_dir={run_dir}", "--set", f"trainer.max_steps={max_steps}"]
    for o in overrides:
        args += ["--set", o]
    assert cli.main(args) == 0


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    """Bitwise equal weights (model and EMA), optimizer moments and step counters."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert a["lr_schedulers"] == b["lr_schedulers"]


def assert_same_export(a: Path, b: Path) -> None:
    """The exported EMA tensors are bitwise equal (the metadata names the run directory, so differs)."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("extra", [[], ["data.num_workers=2", "trainer.accumulate_grad_batches=2"]],
                         ids=["plain", "workers+accumulation"])
def test_resume_is_bitwise(tmp_path, extra):
    recipe = write_recipe(tmp_path, checkpoint={"every_n_steps": 3, "keep": 1, "resume": "auto"})
    train(recipe, tmp_path / "straight", 6, *extra)
    train(recipe, tmp_path / "split", 3, *extra)
    assert load(tmp_path / "split" / "checkpoints" / "last.ckpt")["turbo_data"]["samples_seen"] == 3 * 2 * (
        2 if extra else 1)
    train(recipe, tmp_path / "split", 6, *extra)  # resumes from last.ckpt at step 3
    straight = read_metric(tmp_path / "straight", "train/loss_global")
    split = read_metric(tmp_path / "split", "train/loss_global")
    assert len(straight) == 6 and straight == split  # bitwise: the same float32 values
    assert_same_state(load(tmp_path / "straight" / "checkpoints" / "last.ckpt"),
                      load(tmp_path / "split" / "checkpoints" / "last.ckpt"))
    assert_same_export(tmp_path / "split" / "ema.safetensors", tmp_path / "straight" / "ema.safetensors")


def test_rng_states_are_saved_per_rank_and_restored(tmp_path):
    import numpy as np

    recipe = write_recipe(tmp_path, checkpoint={"every_n_steps": 2, "keep": 1, "resume": "auto"})
    train(recipe, tmp_path / "run", 2)
    state = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    (rng,) = state["turbo_rng"]  # one rank
    assert set(rng) >= {"torch", "numpy", "python"}
    from turbo_train.callbacks import _get_rng_state, _set_rng_state

    _set_rng_state(rng)
    a = (torch.rand(3), np.random.rand(3))
    _set_rng_state(rng)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # round trip through the plain-tensor encoding
    _set_rng_state(_get_rng_state())


# ----------------------------------------------------------------------------- the pieces


def test_toy_batch_stream_positions():
    # slot j = rank·A + a of step g holds videos g·G + j·B + [0, B): 1 process x 2 micro-batches and
    # 2 processes x 1 micro-batch see the same videos per slot; a resumed stream continues exactly
    one = runner.ToyBatchStream(0, "train", batch_size=2, accumulate=2)
    one.set_data_parallel(0, 1)
    two = [runner.ToyBatchStream(0, "train", batch_size=2, accumulate=1) for _ in range(2)]
    for r, s in enumerate(two):
        s.set_data_parallel(r, 2)
    assert [list(one.batch_indices(n)) for n in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [list(two[0].batch_indices(n)) for n in range(2)] == [[0, 1], [4, 5]]
    assert [list(two[1].batch_indices(n)) for n in range(2)] == [[2, 3], [6, 7]]
    resumed = runner.ToyBatchStream(0, "train", batch_size=2, accumulate=2, start=4)
    resumed.set_data_parallel(0, 1)
    assert [list(resumed.batch_indices(n)) for n in range(2)] == [[4, 5], [6, 7]]
    first = next(iter(resumed))
    assert first["key"] == ["train-00000004", "train-00000005"] and first["video"].dtype == torch.uint8
    # with DataLoader workers the batches come back in stream order
    from torch.utils.data import DataLoader

    loader = DataLoader(runner.ToyBatchStream(0, "eval", batch_size=1, num_batches=5), batch_size=None,
                        num_workers=2, collate_fn=runner._whole_batches)
    assert [b["key"][0] for b in loader] == [f"eval-{i:08d}" for i in range(5)]
    with pytest.raises(ValueError, match="batch_size"):
        runner.ToyBatchStream(0, "train", batch_size=0)
    with pytest.raises(ValueError, match="split"):
        runner.ToyBatchStream(0, "test", batch_size=1)


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_save_fails(tmp_path, monkeypatch):
    from turbo_train.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    assert load(path) == {"step": 1}

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load(path) == {"step": 1}  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left behind


def test_swap_in_replaces_directories_and_resume_path_falls_back(tmp_path):
    from turbo_train.parallel import _swap_in

    ck = tmp_path / "checkpoints"
    (ck / "last.ckpt").mkdir(parents=True)
    (ck / "last.ckpt" / "old").write_text("1")
    (ck / "last.ckpt.tmp").mkdir()
    (ck / "last.ckpt.tmp" / "new").write_text("2")
    _swap_in(ck / "last.ckpt.tmp", ck / "last.ckpt")
    assert sorted(p.name for p in (ck / "last.ckpt").iterdir()) == ["new"]
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt"]
    recipe = recipe_from_dict(yaml.safe_load(write_recipe(tmp_path).read_text()))
    assert runner.resume_path(recipe, tmp_path) == str(ck / "last.ckpt")
    (ck / "last.ckpt").rename(ck / "last.ckpt.old")  # a crash between the two renames
    assert runner.resume_path(recipe, tmp_path) == str(ck / "last.ckpt.old")


# ----------------------------------------------------------------------------- FSDP2 sharded checkpoints


@pytest.mark.slow  # three 2-process runs: ~80 s on 2 shared cores
def test_fsdp2_resume_from_sharded_checkpoint_is_bitwise(tmp_path):
    recipe = write_recipe(tmp_path, checkpoint={"every_n_steps": 2, "keep": 1, "resume": "auto"})
    fsdp = ["trainer.strategy=fsdp2"]
    assert_ok(run_train(tmp_path, recipe, tmp_path / "straight", 2, fsdp + ["trainer.max_steps=4"]))
    assert_ok(run_train(tmp_path, recipe, tmp_path / "split", 2, fsdp + ["trainer.max_steps=2"]))
    last = tmp_path / "split" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and {p.name for p in last.iterdir()} >= {"__0_0.distcp", "__1_0.distcp", "meta.pt"}
    proc = run_train(tmp_path, recipe, tmp_path / "split", 2, fsdp + ["trainer.max_steps=4"])
    assert_ok(proc)
    assert "resuming from" in proc.stdout
    straight = read_metric(tmp_path / "straight", "train/loss_global")
    assert len(straight) == 4 and straight == read_metric(tmp_path / "split", "train/loss_global")
    assert_same_export(tmp_path / "split" / "ema.safetensors", tmp_path / "straight" / "ema.safetensors")


@pytest.mark.slow  # three 2-process rCM runs on the toy teacher: ~2.5 min on 2 shared cores
def test_rcm_fsdp2_resume_without_the_teacher_in_the_checkpoint(tmp_path):
    # rCM leaves its frozen teacher out of training checkpoints; the sharded loader must accept that
    from test_cluster import ROOT

    recipe = ROOT / "recipes" / "toy" / "rcm-cpu.yaml"
    common = ["trainer.strategy=fsdp2", "trainer.max_time_minutes=null", "checkpoint.every_n_steps=2",
              "checkpoint.resume=auto", f"model.checkpoint={ROOT / 'turbo_infer/assets/toy_teacher.safetensors'}"]
    assert_ok(run_train(tmp_path, recipe, tmp_path / "straight", 2, common + ["trainer.max_steps=4"], timeout=400))
    assert_ok(run_train(tmp_path, recipe, tmp_path / "split", 2, common + ["trainer.max_steps=2"], timeout=400))
    assert_ok(run_train(tmp_path, recipe, tmp_path / "split", 2, common + ["trainer.max_steps=4"], timeout=400))
    straight = read_metric(tmp_path / "straight", "train/loss_global")
    assert len(straight) == 4 and straight == read_metric(tmp_path / "split", "train/loss_global")
