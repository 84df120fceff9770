"""W8A8 calibration (turbo_train.methods.calibrate) on a tiny DiT: statistics, scales, sensitivity, plan."""
import json
import warnings
from pathlib import Path

import pytest
import torch

from turbo_infer.models.wan import WanConfig, WanModel
from turbo_infer.quant import quantizable_linears
from turbo_train.methods import calibrate as C
from turbo_train.recipe import recipe_from_dict
from fakes import FakeTextEncoder

TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=384, in_channels=48, out_channels=48)
LATENT = (48, 2, 8, 8)  # (C, F, H, W): 2 x 4 x 4 = 32 tokens
OUTLIER = "blocks.1.self_attn.o"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py


def tiny_model(seed=0, **config):
    torch.manual_seed(seed)
    model = WanModel(WanConfig(**TINY, **config)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def inject_outlier(model, factor=1e3, channels=(0, 5, 17)):
    """Outlier input channels for blocks.1.self_attn.o without changing the model's function: v's
    output rows j (weight and bias) x factor, so attention's output channels j are x factor (it is
    linear in V), and o's input columns j / factor."""
    a = model.blocks[1].self_attn
    with torch.no_grad():
        for j in channels:
            a.v.weight[j] *= factor
            a.v.bias[j] *= factor
            a.o.weight[:, j] /= factor
    return model


def config(**kw):
    base = dict(num_prompts=2, batch_size=2, sensitivity_samples=2, histogram_bins=256)
    return C.CalibrateConfig(**{**base, **kw})


def run(model, **kw):
    cfg = config(**kw)
    prompts = ["a red circle moving left", "two blue squares", "a green star", "a yellow cross"][:cfg.num_prompts]
    return C.calibrate(model, FakeTextEncoder(), prompts, LATENT, cfg, shift=3.0)


# ----------------------------------------------------------------------------- statistics


def test_abs_histogram_percentiles_and_range_doubling():
    h = C.AbsHistogram(bins=512)
    h.update(torch.zeros(100))  # zeros before any range is known
    chunks = [torch.randn(1000) * s for s in (0.01, 1.0, 30.0, 0.5)]  # the range doubles 12 times
    for c in chunks:
        h.update(c)
    a = torch.cat([torch.zeros(100)] + chunks).abs()
    assert h.total == a.numel() and h.amax == a.max().item()
    step = h.hi / h.bins  # resolution: the answer is the upper edge of the percentile's bin
    for p in (10.0, 50.0, 90.0, 99.0, 99.9):
        exact = torch.quantile(a.double(), p / 100).item()
        assert exact - 1e-9 <= h.percentile(p) <= exact + step + 1e-9, p
    assert h.percentile(100) == h.amax and h.percentile(5) <= step  # the 100 zeros + small values
    with pytest.raises(ValueError, match="non-finite"):
        h.update(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="bins must be an even int"):
        C.AbsHistogram(bins=3)


def test_static_scales_come_from_the_recorded_inputs():
    model = tiny_model()
    seen = []
    h = model.get_submodule("blocks.0.ffn.2").register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max()))
    plan = run(model, percentile=100.0)
    h.remove()
    entry = plan["layers"]["blocks.0.ffn.2"]
    amax = max(seen[:4]).item()  # the sampler's 4 rcm steps (2 prompts, one batch); then sensitivity runs
    assert entry["act_amax"] == pytest.approx(amax, rel=1e-6)
    assert entry["act_scale"]["fp8"] == pytest.approx(amax / 448, rel=1e-6)
    assert entry["act_scale"]["int8"] == pytest.approx(amax / 127, rel=1e-6)  # percentile 100 = amax
    assert plan["calibration"]["inputs"] == 8 and plan["calibration"]["sensitivity_inputs"] == 2


# ----------------------------------------------------------------------------- sensitivity


@pytest.mark.parametrize("variant", ["plain", "x0", "tiled_x0"])
def test_block_suffix_equals_the_whole_forward(variant):
    """run_from_block from the captured state gives exactly the model's output, also for the shipped toy models'
    x0 prediction (the head predicts x̂0, the model returns the velocity it implies) and a tile token order
    (SLA students): session 31 found the suffix returning raw x̂0 there, so every block layer of the toy
    teacher v9 and its students measured a relative MSE ~2 and calibration kept all of them in bf16."""
    extra = {"plain": {}, "x0": dict(prediction="x0"),
             "tiled_x0": dict(prediction="x0", attention_options={"token_tile": [1, 2, 2]})}[variant]
    torch.manual_seed(0)
    model = WanModel(WanConfig(**TINY, **extra)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    assert (model.token_order((2, 4, 4), "cpu") is not None) == (variant == "tiled_x0")
    x, t, c = torch.randn(2, *LATENT), torch.tensor([900.0, 100.0]), torch.randn(2, 8, 384)
    with torch.no_grad():
        want = model(x, t, c)
        state, tail = C.block_inputs(model, x, t, c)
        assert torch.equal(C.run_from_block(model, 0, state, tail), want)
        tokens, e, ctx, rope = state
        state1 = (model.blocks[0](tokens, e, ctx, rope), e, ctx, rope)
        assert torch.equal(C.run_from_block(model, 1, state1, tail), want)
        # a scalar timestep, as the sampler may pass it
        state, tail = C.block_inputs(model, x, torch.tensor(500.0), c)
        assert torch.equal(C.run_from_block(model, 0, state, tail), model(x, torch.tensor(500.0), c))


@pytest.mark.parametrize("prediction", ["velocity", "x0"])
def test_sensitivity_matches_brute_force_whole_model_runs(prediction):
    model = tiny_model(prediction=prediction)
    samples = (torch.randn(3, *LATENT), torch.tensor([980.0, 500.0, 30.0]), torch.randn(3, 8, 384))
    names = ["text_embedding.0", "blocks.0.ffn.0", "blocks.1.cross_attn.v"]
    got = C.layer_sensitivity(model, names, samples, ["int8", "fp8"], batch_size=3)  # one batch, as below
    chunked = C.layer_sensitivity(model, names, samples, ["int8", "fp8"], batch_size=2)  # 2 + 1 samples
    with torch.no_grad():
        v = model(*samples)
        for n in names:
            for f in ("int8", "fp8"):
                local = [0.0, 0.0]
                with C.swapped(model, n, f, None, local):
                    e = ((model(*samples) - v).double().pow(2).sum() / v.double().pow(2).sum()).item()
                assert got[n][f][0] == pytest.approx(e, rel=1e-6, abs=1e-12), (n, f)
                assert got[n][f][1] == pytest.approx(local[0] / local[1], rel=1e-6), (n, f)
                # other batch shapes round fp32 products differently (a value near a quantization
                # step can land on the other side): measured up to 6e-6 relative
                assert chunked[n][f][0] == pytest.approx(e, rel=1e-3), (n, f)
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in names)  # swapped back


# ----------------------------------------------------------------------------- the plan


def test_plan_keeps_an_injected_outlier_layer_in_bf16():
    model = inject_outlier(tiny_model())
    plan = run(model, formats="int8")
    layers = plan["layers"]
    assert layers[OUTLIER]["precision"] == "bf16"
    # int8 per token: the 1e3x channels set every row's scale, the other channels round to ~0
    # (measured 0.17-0.7 relative MSE of the layer's output, vs ~1e-4 for the clean layer)
    assert layers[OUTLIER]["layer_error"]["int8"] > 5 * plan["layer_error_budget"]
    others = [n for n in layers if n != OUTLIER]
    assert all(layers[n]["precision"] == "int8" for n in others)
    assert OUTLIER not in plan["float_layers"] and "head.head" in plan["float_layers"]
    assert set(layers) == set(quantizable_linears(model, C.KEEP_FLOAT))
    # the same model without the outlier: that layer is int8 too
    clean = run(tiny_model(), formats="int8")
    assert clean["layers"][OUTLIER]["precision"] == "int8"


def test_outlier_layer_stays_float_in_int8_bundles(tmp_path):
    """Both formats: fp8's exponent absorbs a 1e3 outlier (the plan may pick fp8 for the layer), int8
    cannot: the int8 targets' bundles keep it in floating point."""
    from turbo_infer.models.wan_keys import save_wan_checkpoint
    from turbo_train.export import export_bundle

    model = inject_outlier(tiny_model())
    plan = run(model)  # formats both
    assert plan["layers"][OUTLIER]["precision"] != "int8"
    assert not C.format_ok(plan["layers"][OUTLIER], "int8", plan)
    C.write_plan(plan, tmp_path / "plan.json")
    save_wan_checkpoint(model, tmp_path / "ckpt.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_bundle(tmp_path / "ckpt.safetensors", "a100", tmp_path / "b", plan_path=tmp_path / "plan.json",
                             steps=2, progress=False)
    linears = json.loads((path / "manifest.json").read_text())["linears"]
    assert linears[OUTLIER]["precision"] == "bf16"
    assert sum(e["precision"] == "int8" for e in linears.values()) == len(plan["layers"]) - 1


def test_static_activations_plan_and_summary():
    plan = run(tiny_model(), activations="static")
    assert plan["activations"] == "static" and plan["formats"] == ["int8", "fp8"]
    for f in ("int8", "fp8"):
        s = plan["summary"][f]
        assert s["quantized_layers"] == len(plan["layers"]) and 0 < s["rel_mse_all"] < 1e-2
    C.validate_plan(json.loads(json.dumps(plan)))  # JSON-safe and valid
    assert "calibration plan: 22 layers" in C.summary_table(plan)


@pytest.mark.parametrize("edit, field", [
    (lambda p: p.pop("error_budget"), "error_budget"),
    (lambda p: p.update(activations="sometimes"), "activations"),
    (lambda p: p.update(formats=["int4"]), "formats"),
    (lambda p: p["layers"]["blocks.0.ffn.0"].update(precision="int4"), "layers.blocks.0.ffn.0.precision"),
    (lambda p: p["layers"]["blocks.0.ffn.0"]["act_scale"].update(fp8=-1.0), "layers.blocks.0.ffn.0.act_scale.fp8"),
    (lambda p: p["layers"]["blocks.0.ffn.0"]["sensitivity"].pop("int8"), "layers.blocks.0.ffn.0.sensitivity.int8"),
    (lambda p: p["layers"]["blocks.0.ffn.0"]["layer_error"].update(int8="x"), "layers.blocks.0.ffn.0.layer_error.int8"),
    (lambda p: p["model"]["config"].update(dim=-1), "model.config"),
    (lambda p: p.update(version=7), "version"),
])
def test_plan_schema_errors_name_the_field(tmp_path, edit, field):
    plan = run(tiny_model(), sensitivity_samples=1, num_prompts=1, steps=1)
    path = C.write_plan(plan, tmp_path / "plan.json")
    assert C.load_plan(path) == json.loads(path.read_text())
    edit(plan)
    path.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=rf"{path}: field '{field}'"):
        C.load_plan(path)


def test_pinned_precision_must_be_a_calibrated_format():
    plan = run(tiny_model(), formats="fp8", sensitivity_samples=1, num_prompts=1, steps=1)
    plan["layers"]["blocks.0.ffn.0"]["precision"] = "int8"
    with pytest.raises(ValueError, match=r"field 'layers.blocks.0.ffn.0.precision': 'int8' was not calibrated"):
        C.validate_plan(plan)


# ----------------------------------------------------------------------------- recipe


def test_recipe_method_writes_the_plan(tmp_path, capsys):
    recipe = recipe_from_dict({
        "method": {"name": "calibrate", "calibrate": {"num_prompts": 2, "batch_size": 2, "steps": 2,
                                                      "num_frames": 2, "height": 32, "width": 32,
                                                      "sensitivity_samples": 2}},
        "model": {"preset": "toy", "overrides": {k: v for k, v in TINY.items()}},
        "trainer": {"accelerator": "cpu", "precision": "32-true"},
        "logging": {"run_dir": str(tmp_path), "wandb": False, "progress_bar": False},
    })
    path = C.run_calibration(recipe, tmp_path, model=tiny_model(), text_encoder=FakeTextEncoder())
    assert path == tmp_path / "calibration_plan.json"
    plan = C.load_plan(path)
    assert plan["calibration"]["latent_shape"] == [48, 2, 8, 8] and plan["calibration"]["steps"] == 2
    assert plan["calibration"]["prompts"] == 2 and "calibration plan" in capsys.readouterr().out


@pytest.mark.parametrize("section, key", [
    ({"steps": 5}, "method.calibrate.steps"),  # rcm takes 1-4
    ({"sampler": "ddim"}, "method.calibrate.sampler"),
    ({"percentile": 0}, "method.calibrate.percentile"),
    ({"error_budget": 0}, "method.calibrate.error_budget"),
    ({"histogram_bins": 7}, "method.calibrate.histogram_bins"),
    ({"formats": "int4"}, "method.calibrate.formats"),
])
def test_recipe_errors_name_the_key(section, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        recipe_from_dict({"method": {"name": "calibrate", "calibrate": section}})


def test_wan_presets_need_prompts_and_a_text_encoder():
    r = recipe_from_dict({"method": {"name": "calibrate"}, "model": {"preset": "wan2.1-1.3b"}})
    with pytest.raises(ValueError, match="method.calibrate.prompts_file: required for Wan presets"):
        C.check_calibrate_recipe(r)


def test_toy_prompts_are_deterministic_captions():
    a = C.toy_prompts(3, seed=1)
    assert a == C.toy_prompts(3, seed=1) and a != C.toy_prompts(3, seed=2) and len(set(a)) == 3


def test_standalone_entry_refuses_other_methods(tmp_path, capsys):
    f = tmp_path / "r.yaml"
    f.write_text("method:\n  name: sla\n")
    with pytest.raises(SystemExit) as e:
        C.main([str(f)])
    assert e.value.code == 2 and "method.name: this entry point runs 'calibrate'" in capsys.readouterr().err


def test_turbo_train_runs_method_calibrate(tmp_path):
    """The shipped recipe through turbo-train (runner.fit dispatches to run_calibration), with a tiny
    checkpoint, the real MiniLM text encoder and a small video."""
    from turbo_infer.models.wan_keys import save_wan_checkpoint
    from turbo_train import cli

    save_wan_checkpoint(tiny_model(), tmp_path / "tiny.safetensors")
    sets = [f"model.checkpoint={tmp_path / 'tiny.safetensors'}", f"logging.run_dir={tmp_path / 'run'}",
            "logging.progress_bar=false", "method.calibrate.num_prompts=2", "method.calibrate.batch_size=2",
            "method.calibrate.sensitivity_samples=2", "method.calibrate.num_frames=2",
            "method.calibrate.height=32", "method.calibrate.width=32",
            "model.overrides={dim: 32, ffn_dim: 64, num_heads: 2, num_layers: 2}"]
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "toy" / "calibrate.yaml"
    assert cli.main([str(recipe)] + [a for s in sets for a in ("--set", s)]) == 0
    plan = C.load_plan(tmp_path / "run" / "calibration_plan.json")
    assert plan["model"]["checkpoint_sha256"] and len(plan["layers"]) == 22


def test_sla_tuned_checkpoint_is_calibrated_with_its_sla_attention(tmp_path):
    """The chain calibrates the merged rCM + SLA student with recipes/toy/calibrate.yaml (attention:
    sdpa): the checkpoint's own SLA backend and options are kept, proj_l included."""
    from turbo_infer.models.wan_keys import save_wan_checkpoint

    torch.manual_seed(0)
    sla = WanModel(WanConfig(**TINY, attention="sla", attention_options={"topk": 0.5, "block_q": 16, "block_k": 16}))
    for p in sla.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_wan_checkpoint(sla, tmp_path / "sla.safetensors")
    recipe = recipe_from_dict({
        "method": {"name": "calibrate"},
        "model": {"preset": "toy", "checkpoint": str(tmp_path / "sla.safetensors"), "attention": "sdpa",
                  "overrides": {k: TINY[k] for k in ("dim", "ffn_dim", "num_heads", "num_layers")}},
    })
    model = C.build_calibration_model(recipe.model)
    assert model.config.attention == "sla" and model.config.attention_options["block_k"] == 16
    x, t, c = torch.randn(2, *LATENT), torch.tensor([900.0, 100.0]), torch.randn(2, 8, 384)
    with torch.no_grad():
        assert torch.equal(model(x, t, c), sla.eval()(x, t, c))
