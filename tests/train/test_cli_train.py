"""`turbo-train` end to end on the CPU: --help, clear errors, --dry-run builds nothing, a real fit of a
tiny DiT on on-the-fly toy videos (fake text encoder) that writes the resolved recipe, CSV metrics,
checkpoints and ema.safetensors, and a resume from last.ckpt."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from turbo_train import cli, runner
from turbo_train.recipe import recipe_from_dict
from fakes import FakeTextEncoder, run_cli

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "recipes" / "toy" / "teacher-cpu-smoke.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops on 2 shared cores: tests/conftest.py


def run_main(args, capsys):
    """cli.main(args) -> (exit code, stdout, stderr)."""
    return run_cli(cli.main, args, capsys)


def test_help(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0 and "--set" in out and "--dry-run" in out and "recipe" in out


def test_missing_recipe_file(tmp_path, capsys):
    code, _, err = run_main([str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "recipe file not found" in err and "nope.yaml" in err


def test_bad_key_names_key_and_file(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("trainer: {max_stepz: 3}\n")
    code, _, err = run_main([str(p)], capsys)
    assert code == 2 and "trainer.max_stepz" in err and str(p) in err
    code, _, err = run_main([str(SMOKE), "--set", "optim.lr=fast"], capsys)
    assert code == 2 and "optim.lr: expected float" in err and "--set optim.lr" in err


def test_unsupported_strategy_is_refused_before_anything_runs(capsys, monkeypatch):
    monkeypatch.setattr(runner, "fit", lambda *a, **k: pytest.fail("fit must not run"))
    # DeepSpeed cannot run on the CPU (the smoke recipe's accelerator); the error says so and names the key
    code, _, err = run_main([str(SMOKE), "--set", "trainer.strategy=deepspeed_zero2", "--set", "ema.kind=none",
                             "--dry-run"], capsys)
    assert code == 2 and "trainer.strategy" in err and "CUDA GPUs only" in err


def test_dry_run_prints_resolved_recipe_and_builds_nothing(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        pytest.fail("--dry-run must not build anything")

    monkeypatch.setattr(runner, "fit", boom)
    monkeypatch.setattr(runner, "build_module", boom)
    monkeypatch.setattr(runner, "build_trainer", boom)
    run_dir = tmp_path / "run"
    code, out, _ = run_main([str(SMOKE), "--dry-run", "--set", "trainer.max_steps=9",
                             "--set", f"logging.run_dir={run_dir}"], capsys)
    assert code == 0
    assert out.startswith("# resolved recipe: turbo-train ")
    printed = recipe_from_dict(yaml.safe_load(out))
    assert printed.trainer.max_steps == 9 and printed.logging.run_dir == str(run_dir)
    assert printed.model.overrides["num_layers"] == 2  # from the file
    assert not run_dir.exists()


def test_run_dir_defaults_to_recipe_stem(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main([str(SMOKE), "--dry-run", "--set", "logging.run_dir=null"], capsys)
    assert code == 0 and recipe_from_dict(yaml.safe_load(out)).logging.run_dir == str(Path("runs") / SMOKE.stem)


def read_metrics(run_dir: Path) -> list[dict]:
    rows = []
    for f in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(f) as fh:
            rows += list(csv.DictReader(fh))
    return rows


def test_fit_writes_everything_and_resumes(tmp_path, capsys, monkeypatch):
    import turbo_train.methods.batching as batching
    from turbo_infer.models.wan import WanModel

    monkeypatch.setattr(batching, "build_text_encoder", lambda cfg, device: FakeTextEncoder())
    run_dir = tmp_path / "run"
    common = [str(SMOKE), "--set", f"logging.run_dir={run_dir}", "--set", "logging.progress_bar=false",
              "--set", "model.overrides={dim: 32, ffn_dim: 64, num_heads: 2, num_layers: 2}",
              "--set", "checkpoint.every_n_steps=2", "--set", "checkpoint.resume=auto"]
    code, out, err = run_main(common + ["--set", "trainer.max_steps=3"], capsys)
    assert code == 0, err
    # no progress bar: a plain line per logged step (log_every_n_steps 1), the last one at step 3
    lines = [ln for ln in out.splitlines() if ln.startswith("turbo-train step ")]
    assert [ln.split()[2] for ln in lines] == ["1/3", "2/3", "3/3"], out
    assert "| loss " in lines[-1] and " grad_norm " in lines[-1] and " lr " in lines[-1] and "s/step" in lines[-1]

    # the resolved recipe is the one printed, with the run dir filled in
    resolved = recipe_from_dict(yaml.safe_load((run_dir / "resolved_recipe.yaml").read_text()))
    assert resolved.trainer.max_steps == 3 and resolved.logging.run_dir == str(run_dir)
    # checkpoints: the newest step checkpoint (keep 1) and last.ckpt
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(n.startswith("step") for n in ckpts), ckpts
    # metrics: loss, lr, grad norm and throughput every step (log_every_n_steps 1), a validation loss
    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("train/loss")]
    assert len(train) == 3
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s"):
        assert all(float(r[key]) > 0 for r in train), key
    assert any(r.get("val/loss") for r in rows) and any(r.get("val/loss_ema") for r in rows)
    # the exported EMA loads without a config and holds 3 updates
    ema = WanModel.from_pretrained(run_dir / "ema.safetensors")
    assert ema.config.dim == 32
    from safetensors import safe_open

    with safe_open(str(run_dir / "ema.safetensors"), "pt") as f:
        assert f.metadata()["turbo_ema_updates"] == "3"

    # resume: same run dir, more steps -> continues from last.ckpt (step 3) to step 5
    code, out, err = run_main(common + ["--set", "trainer.max_steps=5"], capsys)
    assert code == 0, err
    assert "resuming from" in out and "last.ckpt" in out
    assert "turbo-train step 5/5 | " in out and "turbo-train step 3/" not in out
    with safe_open(str(run_dir / "ema.safetensors"), "pt") as f:
        assert f.metadata()["turbo_ema_updates"] == "5"
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 5 and int(state["state_dict"]["ema_updates"]) == 5
    train2 = [r for r in read_metrics(run_dir) if r.get("train/loss")]
    assert len(train2) == 5


def test_resume_from_missing_path_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import turbo_train.methods.batching as batching

    monkeypatch.setattr(batching, "build_text_encoder", lambda cfg, device: FakeTextEncoder())
    code, _, err = run_main([str(SMOKE), "--set", f"logging.run_dir={tmp_path / 'r'}",
                             "--set", f"checkpoint.resume={tmp_path / 'gone.ckpt'}"], capsys)
    assert code == 2 and "checkpoint.resume" in err and "gone.ckpt" in err


@pytest.mark.parametrize("key", ["model.checkpoint", "model.text_encoder_path"])
def test_missing_input_paths_name_their_key(tmp_path, capsys, key):
    code, _, err = run_main([str(SMOKE), "--set", f"logging.run_dir={tmp_path / 'r'}",
                             "--set", f"{key}={tmp_path / 'missing'}"], capsys)
    assert code == 2 and key in err and "missing" in err


def test_close_process_group_waits_then_destroys(tmp_path, monkeypatch):
    """turbo-train leaves a multi-process job through a barrier and destroy_process_group (a 1-rank gloo
    group here); after a failure there is no barrier (the peers may be gone), but the group still goes."""
    import torch.distributed as dist

    from turbo_train.cli import close_process_group

    close_process_group(wait_for_peers=True)  # no group: nothing to do
    for wait in (True, False):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'store{wait}'}", rank=0, world_size=1)
        calls = []
        barrier = dist.barrier
        monkeypatch.setattr(dist, "barrier", lambda *a, **k: (calls.append("barrier"), barrier(*a, **k)))
        close_process_group(wait_for_peers=wait)
        assert calls == (["barrier"] if wait else [])
        assert not dist.is_initialized()
