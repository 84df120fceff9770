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
