"""Recipes: YAML <-> typed dataclasses, errors that name the key and the file, --set overrides,
and every shipped recipe under recipes/ (parses, launch-command first line, a comment above every key)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from turbo_train.recipe import (
    FieldError,
    OptimConfig,
    Recipe,
    apply_overrides,
    load_recipe,
    parse_override,
    recipe_from_dict,
    save_recipe,
)

ROOT = Path(__file__).resolve().parents[2]
# turbo-train recipes are the YAML files under recipes/ whose first line is their launch command
# "# turbo-train <path>" (others, e.g. launch templates or a judge recipe, have their own loaders)
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.read_text().startswith("# turbo-train "))


def write(tmp_path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- round trip


def test_defaults_round_trip_through_dict_and_yaml(tmp_path):
    r = Recipe()
    assert recipe_from_dict(r.to_dict()) == r
    save_recipe(r, tmp_path / "out.yaml", header="hello")
    text = (tmp_path / "out.yaml").read_text()
    assert text.startswith("# hello\n")
    assert load_recipe(tmp_path / "out.yaml") == r


def test_round_trip_keeps_every_changed_value(tmp_path):
    p = write(tmp_path, """
method: {flow_matching: {time_distribution: shifted_uniform, shift: 3, caption_dropout: 0.2}}
model: {preset: toy, overrides: {dim: 32, num_heads: 2, num_layers: 1, ffn_dim: 64}, text_encoder_path: /x/minilm}
data: {batch_size: 5, num_workers: 0, seed: 7}
trainer: {devices: auto, precision: bf16-mixed, max_steps: 12, max_time_minutes: 1.5, gradient_clip_val: 0.5}
optim: {lr: 3e-4, betas: [0.8, 0.95], schedule: cosine, min_lr_ratio: 0.1, warmup_steps: 3}
ema: {kind: fixed, decay: 0.99}
logging: {run_dir: runs/x, wandb: false}
checkpoint: {every_n_steps: 0, keep: null, resume: null, export_dtype: bfloat16}
""")
    r = load_recipe(p)
    assert r.method.flow_matching.shift == 3.0 and isinstance(r.method.flow_matching.shift, float)
    assert r.optim.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string; float fields accept it
    assert r.optim.betas == (0.8, 0.95)
    assert r.trainer.devices == "auto" and r.trainer.max_time_minutes == 1.5
    assert r.checkpoint.keep is None and r.checkpoint.resume is None
    assert r.model.wan_config().dim == 32
    save_recipe(r, tmp_path / "again.yaml")
    assert load_recipe(tmp_path / "again.yaml") == r


def test_empty_file_gives_defaults(tmp_path):
    assert load_recipe(write(tmp_path, "")) == Recipe()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text, key, fragment", [
    ("optim: {lrr: 1.0}", "optim.lrr", "unknown key"),
    ("optimizer: {lr: 1.0}", "optimizer", "unknown key"),
    ("method: {flow_matching: {time_dist: x}}", "method.flow_matching.time_dist", "unknown key"),
    ("model: {overrides: {width: 3}}", "model.overrides.width", "not a WanConfig field"),
])
def test_unknown_key_names_dotted_key_and_file(tmp_path, text, key, fragment):
    p = write(tmp_path, text)
    with pytest.raises(ValueError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and key in msg and fragment in msg, msg


@pytest.mark.parametrize("text, key", [
    ("optim: {lr: fast}", "optim.lr"),
    ("trainer: {max_steps: 10.5}", "trainer.max_steps"),
    ("trainer: {max_steps: true}", "trainer.max_steps"),  # bool is not an int
    ("logging: {wandb: 'yes please'}", "logging.wandb"),
    ("trainer: {strategy: fsdp}", "trainer.strategy"),
    ("trainer: {devices: many}", "trainer.devices"),
    ("optim: {betas: [0.9]}", "optim.betas"),
    ("ema: 0.999", "ema"),
    ("data: {source: imagenet}", "data.source"),
    ("method: {name: dreambooth}", "method.name"),
])
def test_ill_typed_value_names_dotted_key_and_file(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ValueError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and f"{key}: expected" in msg, msg


@pytest.mark.parametrize("text, key", [
    ("optim: {lr: -1.0}", "optim.lr"),
    ("optim: {betas: [0.9, 1.5]}", "optim.betas[1]"),
    ("trainer: {devices: 0}", "trainer.devices"),
    ("ema: {sigma_rel: 0.5}", "ema.sigma_rel"),
    ("ema: {extra_sigma_rels: [0.2, 0.3]}", "ema.extra_sigma_rels[1]"),
    ("ema: {sigma_rel: 0.1, extra_sigma_rels: [0.2, 0.1]}", "ema.extra_sigma_rels"),
    ("ema: {kind: fixed, extra_sigma_rels: [0.2]}", "ema.extra_sigma_rels"),
    ("method: {flow_matching: {caption_dropout: 1.0}}", "method.flow_matching.caption_dropout"),
    ("model: {preset: giant}", "model.preset"),
    ("model: {overrides: {dim: 33}}", "model.overrides"),  # 33 not divisible by the toy's 3 heads
    ("model: {attention: flash9}", "model.attention"),
    ("model: {activation_checkpointing: -2}", "model.activation_checkpointing"),
    ("model: {activation_checkpointing_policy: attention}", "model.activation_checkpointing_policy"),
    ("model: {overrides: {prediction: eps}}", "model.overrides"),
    ("data: {source: toy_shards}", "data.train_shards"),
    ("model: {preset: wan2.1-1.3b}", "data.source"),  # cross-section check
])
def test_bad_value_names_dotted_key_and_file(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ValueError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and f"{key}:" in msg, msg


def test_activation_checkpointing_takes_a_number_of_blocks(tmp_path):
    r = load_recipe(write(tmp_path, "model: {activation_checkpointing: 20}"))
    assert r.model.activation_checkpointing == 20
    assert load_recipe(write(tmp_path, "model: {activation_checkpointing: true}")).model.activation_checkpointing is True


def test_direct_construction_names_the_field():
    with pytest.raises(FieldError, match="lr: must be > 0"):
        OptimConfig(lr=0.0)
    with pytest.raises(TypeError):  # kw_only: no positional fields
        OptimConfig(1e-3)


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    p = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_recipe(p)
    p = write(tmp_path, "optim: {lr: [\n", "broken.yaml")
    with pytest.raises(ValueError, match="broken.yaml: not valid YAML"):
        load_recipe(p)


# ----------------------------------------------------------------------------- --set


def test_parse_override_values_are_yaml():
    assert parse_override("trainer.max_steps=10") == ("trainer.max_steps", 10)
    assert parse_override("optim.betas=[0.9, 0.95]") == ("optim.betas", [0.9, 0.95])
    assert parse_override("checkpoint.resume=null") == ("checkpoint.resume", None)
    assert parse_override("checkpoint.resume=") == ("checkpoint.resume", None)
    assert parse_override("logging.run_dir=a=b") == ("logging.run_dir", "a=b")  # split on the first '='
    for bad in ("trainer.max_steps", "=3", "a..b=1"):
        with pytest.raises(ValueError, match="--set"):
            parse_override(bad)


def test_overrides_apply_on_top_of_the_file(tmp_path):
    p = write(tmp_path, "optim: {lr: 1.0e-3}\ntrainer: {max_steps: 100}\n")
    r = load_recipe(p, ["optim.lr=2e-4", "trainer.max_steps=7", "model.overrides={dim: 48, num_heads: 2}",
                        "ema.kind=fixed", "data.batch_size=3"])
    assert r.optim.lr == pytest.approx(2e-4) and r.trainer.max_steps == 7
    assert r.model.overrides == {"dim": 48, "num_heads": 2} and r.ema.kind == "fixed" and r.data.batch_size == 3
    # the file itself is untouched by overrides
    assert load_recipe(p).optim.lr == pytest.approx(1e-3)


def test_override_errors_name_the_set_and_the_file(tmp_path):
    p = write(tmp_path, "trainer: {max_steps: 100}\n")
    with pytest.raises(ValueError) as e:
        load_recipe(p, ["trainer.max_stepz=3"])
    assert "--set trainer.max_stepz" in str(e.value) and str(p) in str(e.value)
    with pytest.raises(ValueError) as e:
        load_recipe(p, ["trainer.max_steps=many"])
    assert "--set trainer.max_steps" in str(e.value) and "trainer.max_steps: expected int" in str(e.value)
    with pytest.raises(ValueError, match="is not a section"):
        apply_overrides({"trainer": {"max_steps": 3}}, ["trainer.max_steps.x=1"], "f.yaml")


def test_unsupported_strategy_is_valid_recipe_but_refused_by_the_runner(tmp_path):
    from turbo_train.runner import check_supported

    # DeepSpeed is a valid recipe value that the runner refuses on the CPU (the cluster tests cover the rest)
    r = load_recipe(write(tmp_path, "trainer: {strategy: deepspeed_zero2, accelerator: cpu}\nema: {kind: none}\n"))
    with pytest.raises(ValueError, match="trainer.strategy: 'deepspeed_zero2' runs on CUDA GPUs only"):
        check_supported(r)
    for strategy in ("ddp", "fsdp2"):
        check_supported(dataclasses.replace(r, trainer=dataclasses.replace(r.trainer, strategy=strategy)))


# ----------------------------------------------------------------------------- shipped recipes


def test_there_are_shipped_recipes():
    names = {p.name for p in RECIPES}
    assert {"teacher.yaml", "teacher-cpu-smoke.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_parses_and_is_documented(path):
    text = path.read_text()
    lines = text.splitlines()
    # first line: the launch command for this very file
    assert lines[0] == f"# turbo-train {path.relative_to(ROOT).as_posix()}", lines[0]
    # a comment line directly above every key
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z_][\w.-]*\s*:", line):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#"), f"{path}:{i + 1}: no comment above {line.strip()!r}"
    if "chain" in yaml.safe_load(text):  # the whole-pipeline recipe (turbo_train.chain) has its own schema
        from turbo_train.chain import load_chain

        load_chain(path)
        return
    recipe = load_recipe(path)
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
