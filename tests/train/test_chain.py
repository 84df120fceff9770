"""The whole-pipeline recipe: parsing, validation errors naming the key, and the CLI dispatch."""
import pytest

from turbo_train.chain import ChainConfig, is_chain_recipe, load_chain
from turbo_train.cli import main


def write(tmp_path, text):
    p = tmp_path / f"chain{len(list(tmp_path.iterdir()))}.yaml"
    p.write_text(text)
    return p


def test_shipped_chain_recipe_loads():
    cfg = load_chain("recipes/toy/turbo.yaml")
    assert cfg.steps == 4 and "cpu" in cfg.targets
    assert is_chain_recipe("recipes/toy/turbo.yaml") and not is_chain_recipe("recipes/toy/teacher.yaml")


def test_overrides_and_errors_name_the_key(tmp_path):
    p = write(tmp_path, "chain:\n  steps: 2\n")
    assert load_chain(p, ["chain.eval_prompts=0"]).eval_prompts == 0
    with pytest.raises(ValueError, match="bogus"):
        load_chain(write(tmp_path, "chain:\n  bogus: 1\n"))
    with pytest.raises(ValueError, match="chain.steps"):
        load_chain(p, ["chain.steps=9"])
    with pytest.raises(ValueError, match="method"):
        load_chain(write(tmp_path, "chain: {}\nmethod: {name: rcm}\n"))
    with pytest.raises(ValueError, match="eval_prompts"):
        ChainConfig(eval_prompts=1)


def test_cli_dry_run_and_error(tmp_path, capsys):
    assert main(["recipes/toy/turbo.yaml", "--dry-run"]) == 0
    assert "rcm_recipe" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(write(tmp_path, "chain:\n  targets: []\n")), "--dry-run"])
    assert "targets" in capsys.readouterr().err


def test_summary_table_shows_adherence_with_its_standard_error(capsys):
    from turbo_train.chain import print_summary

    print_summary([{"stage": "teacher eval", "seconds": 99.1, "adherence": 0.766, "adherence_stderr": 0.051},
                   {"stage": "export", "seconds": 0.6, "artefact": "runs/x/bundles"}])
    out = capsys.readouterr().out
    assert "0.766 ± 0.051" in out and "runs/x/bundles" in out and "99.7" in out  # total


def _shrunk(tmp_path, name, edits):
    """A copy of a shipped toy recipe with some keys changed (section.key -> value), for a fast chain."""
    import yaml

    doc = yaml.safe_load(open(f"recipes/toy/{name}"))
    for key, value in edits.items():
        section, _, leaf = key.rpartition(".")
        node = doc
        for part in section.split("."):
            node = node[part]
        node[leaf] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.mark.parametrize("sla_base", ["teacher", "student"])
def test_chain_runs_every_stage_and_bundles_the_sparse_student(tmp_path, sla_base):
    """The README job's chain end to end at a few steps of each stage (no evaluations): the bundle made from
    the SLA model of either route loads, verifies and renders the mp4."""
    import json

    from safetensors import safe_open

    from turbo_train.chain import run_chain

    rcm = _shrunk(tmp_path, "rcm-cpu.yaml", {"trainer.max_steps": 1})
    sla = _shrunk(tmp_path, "sla-cpu.yaml", {"trainer.max_steps": 2, "data.batch_size": 1})
    cal = _shrunk(tmp_path, "calibrate.yaml", {"method.calibrate.num_prompts": 2, "method.calibrate.batch_size": 2,
                                               "method.calibrate.sensitivity_samples": 1})
    run = tmp_path / "run"
    cfg = ChainConfig(run_dir=str(run), rcm_recipe=rcm, sla_recipe=sla, calibrate_recipe=cal, targets=["cpu"],
                      eval_prompts=0, sla_base=sla_base)
    rows = run_chain(cfg)
    stages = [r["stage"] for r in rows]
    assert any(s.startswith("merge") for s in stages) == (sla_base == "teacher")
    assert (run / "turbo.mp4").stat().st_size > 0
    manifest = json.loads((run / "bundles" / "cpu" / "manifest.json").read_text())
    assert manifest["attention"]["backend"] == "sla"  # the cpu target's sparse backend: the torch reference
    bundled = "sla/ema.safetensors" if sla_base == "student" else "merged.safetensors"
    assert manifest["sources"]["checkpoint"]["path"].endswith(bundled)
    # the student route fine-tunes the rCM export itself, without caption dropout (it samples without CFG)
    with safe_open(str(run / "sla" / "ema.safetensors"), "pt") as f:
        source = f.metadata()["turbo_source_checkpoint"]
    assert source.endswith("rcm/ema.safetensors" if sla_base == "student" else "toy_teacher.safetensors")
    assert json.loads((run / "summary.json").read_text())["config"]["sla_base"] == sla_base
    # the plan quantizes the block layers of the x0-prediction toy models (until session 31 the block-suffix
    # sensitivity runs compared x̂0 with the velocity: every block layer failed the budget, 2 of 62 were quantized;
    # the README job's plan now has all 62)
    plan = json.loads((run / "calibrate" / "calibration_plan.json").read_text())
    assert plan["summary"]["int8"]["quantized_layers"] > len(plan["layers"]) // 2, plan["summary"]


def test_chain_evaluates_the_quantized_bundle_too(tmp_path):
    """With a GPU target among the bundles and evaluations on, the chain scores that W8A8 bundle as well (on a CPU
    through the reference kernels, which emulate its 8-bit arithmetic), beside the cpu bundle that makes the mp4."""
    import re

    import torch

    from turbo_train.chain import run_chain

    if torch.cuda.is_available():
        pytest.skip("a GPU here may run the h100 bundle natively (the stage's name differs)")
    rcm = _shrunk(tmp_path, "rcm-cpu.yaml", {"trainer.max_steps": 1})
    sla = _shrunk(tmp_path, "sla-cpu.yaml", {"trainer.max_steps": 1, "data.batch_size": 1})
    cal = _shrunk(tmp_path, "calibrate.yaml", {"method.calibrate.num_prompts": 2, "method.calibrate.batch_size": 2,
                                               "method.calibrate.sensitivity_samples": 1})
    cfg = ChainConfig(run_dir=str(tmp_path / "run"), rcm_recipe=rcm, sla_recipe=sla, calibrate_recipe=cal,
                      targets=["cpu", "h100"], eval_prompts=2, teacher_steps=2, sla_base="student")
    rows = {r["stage"]: r for r in run_chain(cfg)}
    row = rows["bundle eval (h100, reference kernels)"]
    assert 0.0 <= row["adherence"] <= 1.0
    eight_bit, total = map(int, re.fullmatch(r"(\d+) of (\d+) linears 8-bit", row["artefact"]).groups())
    assert 0 < eight_bit <= total
    assert "adherence" in rows["bundle eval + mp4 (cpu)"]


def test_chain_rejects_an_unknown_sla_base():
    with pytest.raises(ValueError, match="chain.sla_base"):
        ChainConfig(sla_base="both")
