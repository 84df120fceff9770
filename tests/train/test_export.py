"""turbo-export -> bundle -> TurboPipeline.from_bundle round trips on a tiny toy-world DiT (CPU).

Tolerances, relative L2 error of the DiT velocity vs the float source model (3 random inputs, 22
quantized linears; measured over 3 seeds -> bound):
    cpu bundle, fp32                      0 (same tensors, same code)       -> exact equality
    int8 W8A8, fp32 tensors               2.6e-4 .. 3.4e-4                  -> 1e-3
    fp8 W8A8 + sage attention, fp32       1.3e-3 .. 1.4e-3                  -> 5e-3
    any GPU target at its bf16 dtype      5.2e-3 .. 5.8e-3 (bf16 rounding)  -> 2e-2
Against the same quantization done in-process (quantize_model on the source, the dequantized
reference) the loaded bundle must agree to fp32 rounding: 1e-6.
"""
import copy
import json
import warnings

import pytest
import torch
from safetensors import safe_open

from turbo_infer.bundle import MANIFEST, WEIGHTS, checkpoint_sha256, sha256_file
from turbo_infer.layers.attention import SDPAttention
from turbo_infer.models.wan import WanConfig, WanModel
from turbo_infer.models.wan_keys import save_wan_checkpoint
from turbo_infer.pipeline import TurboPipeline
from turbo_infer.quant import W8A8Linear, quantizable_linears, quantize_model
from turbo_infer.samplers import RCMSampler
from turbo_infer.vae import ToyCodec
from turbo_train import export as E
from turbo_train.methods.calibrate import KEEP_FLOAT, PLAN_FORMAT, PLAN_VERSION
from fakes import FakeTextEncoder

TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=384, in_channels=48, out_channels=48)
SLA = dict(attention="sla", attention_options={"topk": 0.5, "block_q": 16, "block_k": 16})
BOUND = {"int8_fp32": 1e-3, "fp8_fp32": 5e-3, "bf16": 2e-2, "same_math": 1e-6}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = WanModel(WanConfig(**{**TINY, **overrides})).eval()
    for p in model.parameters():  # Wan's init zeroes the head (and SLA proj_l): give every weight signal
        torch.nn.init.normal_(p, std=0.05)
    return model


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{"dense": (path, model), "sla": (path, model)}: tiny checkpoints with their source models."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, kw in (("dense", {}), ("sla", SLA)):
        model = tiny_model(**kw)
        save_wan_checkpoint(model, root / f"{name}.safetensors")
        out[name] = (root / f"{name}.safetensors", model)
    return out


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(3, 48, 2, 8, 8, generator=g), torch.randn(3, 8, 384, generator=g)
    return x, torch.tensor([980.0, 600.0, 200.0]), c


def velocity(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def export(ckpt, target, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no calibration plan" etc.
        return E.export_bundle(ckpt, target, out, steps=kw.pop("steps", 2), progress=False, **kw)


def test_cpu_bundle_round_trip(ckpts, inputs, tmp_path):
    ckpt, src = ckpts["dense"]
    path = export(ckpt, "cpu", tmp_path)
    assert path == tmp_path / "cpu" and sorted(p.name for p in tmp_path.iterdir()) == ["cpu"]  # no temp dirs left
    pipe = TurboPipeline.from_bundle(path, "cpu", text_encoder=FakeTextEncoder())
    assert torch.equal(velocity(pipe.transformer, inputs), velocity(src, inputs))
    # generation with the bundle's sampler and steps == the source model with them
    ref = TurboPipeline(src, FakeTextEncoder(), ToyCodec(), default_shift=3.0)
    kw = dict(num_frames=2, height=32, width=32, progress=False, seed=3)
    video = pipe.generate(["a red circle moving left"], **kw)
    assert torch.equal(video, ref.generate(["a red circle moving left"], sampler="rcm", steps=2, **kw))
    assert pipe.sample_defaults == {"sampler": "rcm", "steps": 2, "guidance": 1.0} and pipe.fps == 8
    # the manifest
    m = json.loads((path / MANIFEST).read_text())
    assert m["target"] == "cpu" and m["dtype"] == "float32" and m["min_compute_capability"] is None
    assert m["attention"] == {"backend": "sdpa"} and m["world"] == "toy"
    assert m["sampler"]["timesteps"] == pytest.approx(RCMSampler.timesteps(2).tolist())
    assert m["sources"]["checkpoint"]["sha256"] == checkpoint_sha256(ckpt)
    assert m["files"][WEIGHTS] == {"sha256": sha256_file(path / WEIGHTS), "bytes": (path / WEIGHTS).stat().st_size}
    assert {e["precision"] for e in m["linears"].values()} == {"bf16"}
    assert m["text_encoder"] == {"name": "minilm", "path": None} and m["vae"] == {"name": "toy_codec", "path": None}


def test_int8_bundle_on_cpu_with_override_matches_the_dequantized_reference(ckpts, inputs, tmp_path):
    ckpt, src = ckpts["dense"]
    path = export(ckpt, "a100", tmp_path, dtype="float32")
    pipe = TurboPipeline.from_bundle(path, "cpu", text_encoder=FakeTextEncoder(), allow_reference=True)
    model = pipe.transformer
    candidates = quantizable_linears(src, KEEP_FLOAT)
    q = {n for n, m in model.named_modules() if isinstance(m, W8A8Linear)}
    assert q == set(candidates) and all(model.get_submodule(n).weight_q.dtype == torch.int8 for n in q)
    assert isinstance(model.blocks[0].self_attn.attn, SDPAttention)  # a100, dense checkpoint: sdpa
    ref = copy.deepcopy(src)
    quantize_model(ref, dict.fromkeys(candidates, "int8"))
    v = velocity(model, inputs)
    assert rel(v, velocity(ref, inputs)) <= BOUND["same_math"]
    assert rel(v, velocity(src, inputs)) <= BOUND["int8_fp32"]


def test_gpu_target_tensors_and_dtypes(ckpts, inputs, tmp_path):
    ckpt, src = ckpts["sla"]
    path = export(ckpt, "h100", tmp_path)  # bf16 + fp8 + sla (SLA-tuned checkpoint; sagesla measured slower there)
    m = json.loads((path / MANIFEST).read_text())
    assert m["attention"] == {"backend": "sla", "topk": 0.5, "block_q": 16, "block_k": 16, "feature_map": "softmax"}
    assert m["min_compute_capability"] == [9, 0] and m["dtype"] == "bfloat16"
    quantized = {n for n, e in m["linears"].items() if e["precision"] == "fp8"}
    assert quantized == set(quantizable_linears(src, KEEP_FLOAT))
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        for k in f.keys():
            t, mod = f.get_tensor(k), k.rpartition(".")[0]
            if k.endswith(".weight_q"):
                assert t.dtype == torch.float8_e4m3fn and mod in quantized
            elif mod in quantized or ".proj_l." in k:
                assert t.dtype == torch.float32, k  # scales, biases of W8A8 layers; SLA proj_l
            else:
                assert t.dtype == torch.bfloat16, k
    pipe = TurboPipeline.from_bundle(path, "cpu", text_encoder=FakeTextEncoder(), allow_reference=True)
    assert type(pipe.transformer.blocks[0].self_attn.attn).__name__ == "SparseLinearAttention"  # h100: sla
    assert rel(velocity(pipe.transformer, inputs), velocity(src, inputs)) <= BOUND["bf16"]


def test_sla_checkpoint_round_trips_on_the_cpu_and_can_go_dense(ckpts, inputs, tmp_path):
    ckpt, src = ckpts["sla"]
    pipe = TurboPipeline.from_bundle(export(ckpt, "cpu", tmp_path), "cpu", text_encoder=FakeTextEncoder())
    assert type(pipe.transformer.blocks[0].self_attn.attn).__name__ == "SparseLinearAttention"
    assert torch.equal(velocity(pipe.transformer, inputs), velocity(src, inputs))
    with pytest.warns(UserWarning, match="proj_l tensors of the checkpoint are dropped"):
        path = E.export_bundle(ckpt, "a100", tmp_path, attention="sdpa", dtype="float32", progress=False)
    assert json.loads((path / MANIFEST).read_text())["attention"] == {"backend": "sdpa"}


def make_plan(model, activations="dynamic", formats=("int8", "fp8")):
    """A hand-made plan: every candidate 8-bit with tiny errors and static scales from a forward."""
    layers = {}
    for n in quantizable_linears(model, KEEP_FLOAT):
        layers[n] = {"precision": formats[0], "act_scale": {f: 0.05 for f in formats},
                     "sensitivity": {f: 1e-6 for f in formats}, "layer_error": {f: 1e-4 for f in formats}}
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("attention", "attention_options")}
    return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "model": {"config": cfg}, "activations": activations,
            "error_budget": 1e-3, "layer_error_budget": 2e-2, "formats": list(formats), "summary": {},
            "float_layers": [], "layers": layers}


def test_plan_decides_each_targets_precision_and_static_scales(ckpts, tmp_path):
    ckpt, src = ckpts["dense"]
    plan = make_plan(src, activations="static")
    plan["layers"]["blocks.0.ffn.0"]["sensitivity"]["int8"] = 0.5  # over budget in int8 only
    plan["layers"]["blocks.1.ffn.2"]["layer_error"]["fp8"] = 0.5  # its own output too damaged in fp8
    plan["layers"]["blocks.0.self_attn.o"]["precision"] = "bf16"  # pinned floating point
    plan["layers"]["blocks.1.cross_attn.q"]["act_scale"]["fp8"] = 0.125
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    prec = {}
    for target in ("a100", "h100"):
        path = export(ckpt, target, tmp_path / "b", plan_path=tmp_path / "plan.json")
        m = json.loads((path / MANIFEST).read_text())
        prec[target] = {n: e["precision"] for n, e in m["linears"].items()}
        assert m["sources"]["plan"]["sha256"] == sha256_file(tmp_path / "plan.json")
    assert prec["a100"]["blocks.0.ffn.0"] == "bf16" and prec["h100"]["blocks.0.ffn.0"] == "fp8"
    assert prec["a100"]["blocks.1.ffn.2"] == "int8" and prec["h100"]["blocks.1.ffn.2"] == "bf16"
    assert prec["a100"]["blocks.0.self_attn.o"] == prec["h100"]["blocks.0.self_attn.o"] == "bf16"
    for n in KEEP_FLOAT[1:]:  # patch embedding is a Conv3d; head, time embedding/projection are Linears
        assert all(p == "bf16" for k, p in prec["h100"].items() if n in k.split("."))
    m = json.loads((tmp_path / "b" / "h100" / MANIFEST).read_text())
    assert m["linears"]["blocks.1.cross_attn.q"]["act_scale"] == 0.125
    pipe = TurboPipeline.from_bundle(tmp_path / "b" / "h100", "cpu", text_encoder=FakeTextEncoder(),
                                     allow_reference=True)
    assert pipe.transformer.get_submodule("blocks.1.cross_attn.q").act_scale == 0.125


def test_plan_mismatches_are_refused(ckpts, tmp_path):
    ckpt, src = ckpts["dense"]
    plan = make_plan(src, formats=("int8",))
    (tmp_path / "int8.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"calibrated formats \['int8'\], target h100 needs fp8"):
        export(ckpt, "h100", tmp_path, plan_path=tmp_path / "int8.json")
    plan["model"]["config"]["dim"] = 64
    (tmp_path / "other.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"plan: model.config.dim=64 but the checkpoint has dim=32"):
        export(ckpt, "a100", tmp_path, plan_path=tmp_path / "other.json")


def test_existing_bundles_and_failed_writes(ckpts, tmp_path, monkeypatch):
    ckpt, _ = ckpts["dense"]
    path = export(ckpt, "cpu", tmp_path)
    before = sha256_file(path / WEIGHTS)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export(ckpt, "cpu", tmp_path)
    import safetensors.torch

    def disk_full(*a, **k):
        raise OSError("No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export(ckpt, "cpu", tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu"]  # temp dir removed, old bundle kept
    assert sha256_file(path / WEIGHTS) == before
    monkeypatch.undo()
    export(ckpt, "cpu", tmp_path, overwrite=True, dtype="bfloat16")  # replaced
    assert sha256_file(path / WEIGHTS) != before and sorted(p.name for p in tmp_path.iterdir()) == ["cpu"]


def test_cli_writes_bundles_and_names_bad_options(ckpts, tmp_path, capsys):
    ckpt, src = ckpts["dense"]
    base = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--steps", "2", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert E.main(base + ["--target", "cpu", "--target", "rtx4090"]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"cpu", "rtx4090"}
    assert "rtx4090\tsage attention, linears bf16 4, int8 22" in capsys.readouterr().out

    def error(args, match):
        with pytest.raises(SystemExit) as e:
            E.main(args)
        assert e.value.code == 2
        assert match in capsys.readouterr().err

    error(base + ["--target", "cpu"], "exists; pass --overwrite")
    error(base + ["--target", "a100", "--plan", str(tmp_path / "none.json")], "--plan: path does not exist")
    bad = make_plan(src)
    bad["layers"]["blocks.0.ffn.0"]["precision"] = "int4"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    error(base + ["--target", "a100", "--plan", str(tmp_path / "bad.json")], "field 'layers.blocks.0.ffn.0.precision'")
    error(base + ["--target", "a100", "--steps", "9"], "steps must be an int in 1..4 for the rcm sampler")
    error(base + ["--target", "a100", "--topk", "2"], "--topk: must be in (0, 1]")
    error(base + ["--target", "tpu"], "invalid choice: 'tpu'")


def test_x0_checkpoint_keeps_its_prediction_through_export_and_calibration(tmp_path):
    """A preset passed as the config (turbo-export --config, a calibration recipe's model.preset) must not
    turn an x0-prediction checkpoint into a velocity model: the plan and the bundle would describe
    another function than the weights compute."""
    from turbo_infer.models.wan import WanConfig, WanModel
    from turbo_infer.models.wan_keys import save_wan_checkpoint
    from turbo_train.methods.calibrate import build_calibration_model
    from turbo_train.recipe import ModelConfig

    tiny = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=1, text_dim=384, in_channels=48, out_channels=48, freq_dim=32)
    path = tmp_path / "x0.safetensors"
    save_wan_checkpoint(WanModel(WanConfig(**tiny, prediction="x0")), path)
    _, cfg = E.load_checkpoint(path, WanConfig(**tiny))
    assert cfg.prediction == "x0"
    m = ModelConfig(preset="toy", overrides=dict(tiny), checkpoint=str(path))
    assert build_calibration_model(m).config.prediction == "x0"
    forced = ModelConfig(preset="toy", overrides={**tiny, "prediction": "velocity"}, checkpoint=str(path))
    assert build_calibration_model(forced).config.prediction == "velocity"


def test_rcm_grid_is_recorded_and_sampled_by_the_runtime(tmp_path, monkeypatch):
    """turbo-export --rcm-mid-times: the manifest's timesteps carry the grid and from_bundle samples it; the
    spec's grid adds no option; a manifest grid that is not one names sampler.timesteps."""
    import json

    from turbo_infer import samplers
    from turbo_infer.bundle import BundleError, read_manifest
    from turbo_infer.pipeline import TurboPipeline

    ckpt = tmp_path / "tiny.safetensors"
    save_wan_checkpoint(tiny_model(), ckpt)
    toy = samplers.shifted_mid_times(3.0)
    b = E.export_bundle(ckpt, "cpu", tmp_path / "grid", steps=4, mid_times=toy, progress=False)
    m = read_manifest(b)
    assert m["sampler"]["timesteps"] == pytest.approx(samplers.RCMSampler.timesteps(4, mid_times=toy).tolist())
    seen = []
    real = samplers.RCMSampler.sample
    monkeypatch.setattr(samplers.RCMSampler, "sample", lambda self, *a, **k: seen.append(self.mid_times) or real(self, *a, **k))
    pipe = TurboPipeline.from_bundle(b, "cpu", text_encoder=None)
    pipe.generate_latents(["a red circle"], num_frames=2, height=16, width=16, progress=False)
    assert seen[-1] == pytest.approx(toy)
    spec = TurboPipeline.from_bundle(E.export_bundle(ckpt, "cpu", tmp_path / "spec", steps=4, progress=False), "cpu")
    assert "sampler_options" not in spec.sample_defaults
    with pytest.raises(ValueError, match="rcm sampler"):
        E.export_bundle(ckpt, "cpu", tmp_path / "x", sampler="euler", steps=4, mid_times=toy, progress=False)
    m["sampler"]["timesteps"] = [0.98, 0.99, 0.5, 0.2, 0.0]
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="sampler.timesteps"):
        read_manifest(b)
