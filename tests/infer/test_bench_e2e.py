"""tools/bench_e2e.py: the profiler breakdown's classification, the synthetic umT5 tokenizer, the
video writer fallback (fast), and the whole tool on its --tiny CPU path (slow: ~45 s on 2 cores,
most of it the fresh-process stage's interpreter start and imports)."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from e2e_breakdown import CLASSES, classify, name_class, profile_breakdown, split_wall  # noqa: E402
from e2e_setup import SHAPES, FirstKernelCalls, random_dit, synthetic_umt5_tokenizer, synthetic_vocab, video_sink  # noqa: E402

FIXED_FIGURES = ("e2e_1.3b_480p_speedup", "e2e_1.3b_480p_turbo_s", "e2e_1.3b_480p_full_s",
                 "time_to_first_video_1.3b_s", "e2e_1.3b_480p_turbo_attention_s", "e2e_1.3b_480p_turbo_linear_s",
                 "e2e_1.3b_480p_turbo_other_s", "text_encode_s", "vae_decode_s", "baseline_forward_ms",
                 "vae_decode_bf16_s", "vae_decode_bf16_psnr_db")


@pytest.mark.parametrize("name, cls", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("_sla_fwd_kernel", "attention"), ("_lowbit_sparse_fwd_kernel", "attention"), ("_pool_kernel", "attention"),
    ("_quant_v_kernel", "attention"),
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTN", "linear"), ("_w8a8_gemm_kernel", "linear"),
    ("_quantize_rows_kernel", "linear"), ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "linear"),
    ("aten::addmm", "linear"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>", "other"),
    ("triton_poi_fused_add_mul_0", "other"),
])
def test_name_class(name, cls):
    assert name_class(name) == cls


def test_classify_charges_each_kernel_once_and_leaves_out_the_scopes_spans():
    """On CUDA the profiler mirrors each record_function scope on the GPU timeline as a user annotation
    spanning its kernels; counted as a kernel it charged every span twice (attention 84 s of a 59 s
    baseline on 2026-12-04). Fake events in the profiler's shape: a GEMM launched inside a linear
    scope, an attention kernel inside an attention scope (the op also lists a legacy copy of its own
    range among its `kernels`, which must not count), one kernel no op claims, a runtime call whose id
    collides with an op's, and the two scopes' GPU spans."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    def cpu(id, name, parent, kernels=(), linked=0):
        return NS(id=id, name=name, device_type=DeviceType.CPU, cpu_parent=parent, kernels=list(kernels),
                  linked_correlation_id=linked)

    def gpu(name, start, end, linked, annotation=False):
        return NS(name=name, device_type=DeviceType.CUDA, is_user_annotation=annotation, linked_correlation_id=linked,
                  time_range=NS(start=start, end=end), kernels=[])

    lin_scope, att_scope = cpu(1, "turbo::linear", None), cpu(3, "turbo::attention", None)
    events = [
        lin_scope, cpu(2, "aten::mm", lin_scope), att_scope,
        cpu(4, "triton_op", att_scope, kernels=[NS(name="triton_op", duration=50.0)]),
        cpu(2, "cudaLaunchKernel", None, linked=99),  # a runtime call: its id is not an op's
        gpu("nvjet_gemm", 0, 30, linked=2), gpu("_sla_fwd_kernel", 30, 80, linked=4),
        gpu("elementwise_kernel", 80, 100, linked=0),  # no op claimed it: by name -> other
        gpu("turbo::linear", 0, 31, linked=1, annotation=True), gpu("turbo::attention", 30, 81, linked=3, annotation=True),
    ]
    br = classify(NS(events=lambda: events), "cuda")
    assert br["seconds"] == pytest.approx({"attention": 50e-6, "linear": 30e-6, "other": 20e-6})
    assert br["total_s"] == pytest.approx(100e-6) and br["linked_fraction"] == pytest.approx(0.8)


def test_classify_links_through_raw_kineto_events_when_function_events_lack_the_id():
    """torch 2.11 (the GPU machine's): FunctionEvent has no linked_correlation_id (the 2026-12-04 H200 run
    linked 0 % of its kernels), so the device side comes from the raw Kineto events; runtime calls have
    no kernels of their own and must not claim one through a colliding id."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    def cpu(id, name, parent, kernels=()):
        return NS(id=id, name=name, device_type=DeviceType.CPU, cpu_parent=parent, kernels=list(kernels), is_async=False)

    def raw(name, ns, linked, annotation=False):
        return NS(name=lambda: name, device_type=lambda: DeviceType.CUDA, duration_ns=lambda: ns,
                  linked_correlation_id=lambda: linked, is_user_annotation=lambda: annotation)

    k = [NS(name="k", duration=1.0)]
    lin_scope, att_scope = cpu(1, "turbo::linear", None), cpu(3, "turbo::attention", None)
    events = [lin_scope, cpu(2, "aten::mm", lin_scope, k), att_scope, cpu(4, "triton_op", att_scope, k),
              cpu(5, "cudaLaunchKernel", None),  # runtime call, id 5 collides with no op here...
              cpu(4, "cudaLaunchKernel", None),  # ...and this one collides with the attention op's id
              NS(name="nvjet_gemm", device_type=DeviceType.CUDA, time_range=NS(start=0, end=30), kernels=[])]
    raws = [raw("nvjet_gemm", 30_000, 2), raw("_sla_fwd_kernel", 50_000, 4), raw("elementwise_kernel", 20_000, 5),
            raw("turbo::attention", 51_000, 3, annotation=True), raw("cpu_side", 1, 0)]
    raws[-1].device_type = lambda: DeviceType.CPU
    prof = NS(events=lambda: events, profiler=NS(kineto_results=NS(events=lambda: raws)))
    br = classify(prof, "cuda")
    assert br["seconds"] == pytest.approx({"attention": 50e-6, "linear": 30e-6, "other": 20e-6})
    assert br["linked_fraction"] == pytest.approx(0.8)


def test_split_wall_adds_up_to_the_wall_time():
    s = {"attention": 0.4, "linear": 0.3, "other": 0.5}
    # a compiled headline: attention and linear at their kernel seconds, the rest is other
    assert split_wall(s, 0.9, eager=False) == pytest.approx({"attention": 0.4, "linear": 0.3, "other": 0.2})
    # eager, kernels under the wall: launch gaps land in other
    assert split_wall(s, 1.5, eager=True) == pytest.approx({"attention": 0.4, "linear": 0.3, "other": 0.8})
    # eager, the profiled kernels add up to more than the timed wall: scaled down, never negative
    got = split_wall(s, 0.6, eager=True)
    assert got == pytest.approx({"attention": 0.2, "linear": 0.15, "other": 0.25})
    assert sum(got.values()) == pytest.approx(0.6)
    assert split_wall(s, 0.5, eager=False)["other"] == 0.0


def test_profile_breakdown_scopes_on_cpu():
    """A tiny DiT with SLA attention: the attention backend's ops (block map, torch GEMMs of the
    reference) count as attention, the linears as linear, norms/modulation as other."""
    torch.set_num_threads(1)
    from dataclasses import replace

    cfg = replace(SHAPES["tiny"].dit_config(), attention="sla", attention_options={"topk": 0.5})
    model = random_dit(cfg, "cpu", torch.float32)
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 7, cfg.text_dim)
    with torch.no_grad():
        br = profile_breakdown(model, lambda: model(x, t, ctx), "cpu")
    s = br["seconds"]
    assert set(s) == set(CLASSES) and all(v > 0 for v in s.values())
    top = {c: {n for n, _ in br["top"][c]} for c in CLASSES}
    assert "turbo::attention" in top["attention"] and "turbo::linear" in top["linear"]
    assert not {"aten::addmm", "aten::mm", "aten::bmm"} & top["other"]  # GEMMs are attention or linear
    assert not model.blocks[0].self_attn.attn._forward_pre_hooks  # hooks removed on exit


def test_synthetic_tokenizer_has_the_vocab_size_and_appends_eos():
    vocab = synthetic_vocab(1000)
    assert len(vocab) == 1000 and len({p for p, _ in vocab}) == 1000
    tok = synthetic_umt5_tokenizer(1000)
    ids = tok(["a red fox"], padding="max_length", max_length=12, truncation=True)["input_ids"][0]
    assert len(ids) == 12 and 1 in ids and max(ids) < 1000  # </s> = 1, then <pad> = 0
    with pytest.raises(ValueError, match="vocab size"):
        synthetic_vocab(10)


def test_video_writer_falls_back_to_opencv(tmp_path, monkeypatch):
    pytest.importorskip("cv2")
    import builtins

    real_import = builtins.__import__

    def no_imageio_ffmpeg(name, *a, **k):
        if name == "imageio_ffmpeg":
            raise ImportError("hidden for the test")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_imageio_ffmpeg)
    from turbo_infer.video_io import write_mp4_stream

    frames = np.random.default_rng(0).integers(0, 255, (5, 32, 48, 3), dtype=np.uint8)
    sink, writer = video_sink()
    write_mp4_stream(tmp_path / "v.mp4", [frames[:1], frames[1:]], 8, sink=sink)
    assert writer.startswith("opencv") and (tmp_path / "v.mp4").stat().st_size > 0
    pytest.importorskip("cv2")
    import cv2

    cap = cv2.VideoCapture(str(tmp_path / "v.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 5


@pytest.mark.slow
def test_tiny_run_writes_every_figure_outside_benchmarks(tmp_path):
    kept = [REPO / "benchmarks" / "e2e.json", REPO / "benchmarks" / "e2e_breakdown.png"]
    before = [p.stat().st_mtime_ns if p.exists() else None for p in kept]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TRITON_INTERPRET="1")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_e2e.py"), "--tiny", "--workdir",
                           str(tmp_path), "--with-14b", "--reps", "1", "--ab-rounds", "1",
                           "--ab", "w2=turbo_kernels.attention.qk_norm_rope:NUM_WARPS=2", "--ab", "dyn=@dynamic"],
                          env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "results" / "e2e.json").read_text())
    fig = doc["figures"]
    missing = [k for k in (*FIXED_FIGURES, "e2e_14b_720p_turbo_s") if k not in fig]
    assert not missing, missing
    assert fig["e2e_1.3b_480p_speedup"] == pytest.approx(fig["e2e_1.3b_480p_baseline_s"]
                                                         / fig["e2e_1.3b_480p_turbo_s"])
    assert "EXTRAPOLATED" in doc["notes"]["baseline"] and "--tiny" in doc["command"]
    assert fig["e2e_1.3b_480p_ab_w2_min_s"] > 0 and fig["e2e_1.3b_480p_ab_default_min_s"] > 0
    # a tuning knob leaves the output as it was; per-token instead of the headline's static scales change the rounding
    assert fig["e2e_1.3b_480p_ab_w2_rel_diff"] == 0.0
    assert 0.0 < fig["e2e_1.3b_480p_ab_dyn_rel_diff"] < 0.05
    assert "@dynamic = every W8A8 layer" in doc["notes"]["ab"]
    # the headline bundle went through turbo-export with the stand-in plan: every W8A8 layer static
    manifest = json.loads((tmp_path / "bundles" / "h100" / "manifest.json").read_text())
    eight = [e for e in manifest["linears"].values() if e["precision"] != "bf16"]
    assert eight and all(isinstance(e["act_scale"], float) and e["act_scale"] > 0 for e in eight)
    assert manifest["sources"]["plan"]["path"].endswith("standin_plan.json")
    assert fig["e2e_1.3b_480p_turbo_dynamic_scales_s"] > 0 and "static" in doc["notes"]["activations"]
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "results" / "e2e_breakdown.png").stat().st_size > 0
    except ImportError:  # no plotting package: the run still succeeds, with the figures and no chart
        assert "no breakdown chart" in proc.stdout + proc.stderr
    assert (tmp_path / "first_video.mp4").stat().st_size > 0
    # two fresh launches by default: the figure is the second, the first is kept beside it
    assert fig["ttfv_first_launch_s"] > 0 and "last of 2 subprocesses" in doc["notes"]["time_to_first_video"]
    # the first generate() split into text + DiT and VAE decode, the parts adding up to it
    parts = fig["ttfv_generate_text_dit_s"] + fig["ttfv_generate_vae_s"]
    assert 0 < parts <= fig["ttfv_generate_s"] + 1e-6
    assert fig["ttfv_load_dit_s"] > 0 and fig["ttfv_warmup_dit_s"] > 0 and fig["ttfv_wait_text_vae_s"] >= 0
    assert fig["ttfv_prepare_s"] > 0 and "turbo-infer --prepare" in doc["notes"]["time_to_first_video"]
    assert "one after the other" in doc["notes"]["time_to_first_video"]
    assert [p.stat().st_mtime_ns if p.exists() else None for p in kept] == before  # benchmarks/ untouched


def test_static_scales_stand_in_for_calibration_and_restore():
    """set_static_scales: every W8A8 layer gets amax/QMAX of its input over one forward (FFN blocks
    re-fused, fused norm inputs back on); the DiT then computes nearly what it did with per-token scales;
    restore_scales brings the dynamic scales back."""
    from dataclasses import replace

    import bench_e2e
    from e2e_setup import restore_scales, set_static_scales

    from turbo_infer.quant import W8A8GeluFFN, W8A8Linear, fuse_gelu_ffns, quantizable_linears, quantize_model

    torch.set_num_threads(1)
    cfg = replace(SHAPES["tiny"].dit_config(), num_layers=2)
    model = random_dit(cfg, "cpu", torch.float32)
    quantize_model(model, {n: "fp8" for n in quantizable_linears(model)})
    fuse_gelu_ffns(model)
    model.fuse_norm_quant()
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 7, cfg.text_dim)
    with torch.no_grad():
        dynamic = model(x, t, ctx)
        old = set_static_scales(model, lambda: model(x, t, ctx))
        layers = [m for m in model.modules() if isinstance(m, W8A8Linear)]
        assert old and all(v is None for v in old.values())
        assert all(isinstance(m.act_scale, float) and m.act_scale > 0 for m in layers)
        assert all(isinstance(b.ffn, W8A8GeluFFN) and b.fused_norm_quant for b in model.blocks)
        static = model(x, t, ctx)
        # per-tensor instead of per-token fp8 scales (amax of this very input): measured 2e-3 of the output
        assert ((static - dynamic).norm() / dynamic.norm()).item() < 2e-2
        restore_scales(model, old)
        assert all(m.act_scale is None for m in layers)
        torch.testing.assert_close(model(x, t, ctx), dynamic)
        # bench_e2e's "@static" A/B variant: recorded once (the model keeps its scales), applied and undone per run
        scales = bench_e2e.record_static_scales(None, model, lambda: model(x, t, ctx), use_compiled=False)
        assert all(m.act_scale is None for m in layers) and set(scales) == set(old)
        undo = bench_e2e._apply_ab("@static", model, scales)
        torch.testing.assert_close(model(x, t, ctx), static)
        undo()
        torch.testing.assert_close(model(x, t, ctx), dynamic)


def test_standin_plan_exports_a_static_bundle(tmp_path):
    """e2e_setup.standin_plan: the recorded static scales as a valid calibration plan, which turbo-export turns into
    a bundle whose every planned layer carries its scale (bench_e2e's headline bundle with --activations static)."""
    from dataclasses import replace

    from e2e_setup import standin_plan, static_scales

    from turbo_infer.models.wan_keys import save_wan_checkpoint
    from turbo_infer.quant import quantizable_linears, quantize_model
    from turbo_train.export import export_bundle
    from turbo_train.methods.calibrate import KEEP_FLOAT, load_plan, write_plan

    torch.set_num_threads(1)
    cfg = replace(SHAPES["tiny"].dit_config(), num_layers=1)
    model = random_dit(cfg, "cpu", torch.float32)
    save_wan_checkpoint(model, tmp_path / "dit.safetensors")
    quantize_model(model, {n: "fp8" for n in quantizable_linears(model, KEEP_FLOAT)})  # as the exported bundle
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 7, cfg.text_dim)
    with torch.no_grad():
        scales = static_scales(model, lambda: model(x, t, ctx))
    plan = write_plan(standin_plan(model, scales), tmp_path / "plan.json")
    loaded = load_plan(plan)
    assert loaded["activations"] == "static" and "stand_in" in loaded["calibration"]
    assert {n: e["act_scale"]["fp8"] for n, e in loaded["layers"].items()} == pytest.approx(scales)
    bundle = export_bundle(tmp_path / "dit.safetensors", "h100", tmp_path / "bundles", plan_path=plan,
                           progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {n: e["precision"] for n, e in manifest["linears"].items() if n in scales} == dict.fromkeys(scales, "fp8")
    assert {n: e["act_scale"] for n, e in manifest["linears"].items() if n in scales} == pytest.approx(scales)


def test_first_kernel_calls_times_each_kernels_first_launch_only(monkeypatch):
    import time
    import types

    from triton.runtime.jit import JITFunction

    calls = []

    def fake_run(self, *args, **kwargs):  # stands in for a launch (the CPU has no Triton launches to time)
        calls.append(self.__name__)
        time.sleep(0.02 if len(calls) == 1 else 0.0)
        return "launched"

    monkeypatch.setattr(JITFunction, "run", fake_run)
    k1, k2 = types.SimpleNamespace(__name__="k1"), types.SimpleNamespace(__name__="k2")
    with FirstKernelCalls() as first:
        assert JITFunction.run(k1, grid=(1,), warmup=False) == "launched"
        JITFunction.run(k1, grid=(1,), warmup=False)
        JITFunction.run(k2, grid=(1,), warmup=False)
    assert calls == ["k1", "k1", "k2"] and set(first.first) == {"k1", "k2"}
    assert first.first["k1"] >= 0.015 and first.seconds == pytest.approx(sum(first.first.values()))
    assert JITFunction.run is fake_run  # restored


def test_set_option_assigns_constants_and_config_fields(monkeypatch):
    """bench_e2e --set: a module constant, a field of a module-level config dataclass (replaced, not mutated),
    and errors that name what is wrong; the values are literals."""
    import bench_e2e

    from turbo_kernels.attention import qk_norm_rope as qr
    from turbo_kernels.attention import sla

    monkeypatch.setattr(qr, "NUM_WARPS", qr.NUM_WARPS)  # restored after the test
    monkeypatch.setattr(sla, "DEFAULT_CONFIG", sla.DEFAULT_CONFIG)
    before = sla.DEFAULT_CONFIG
    bench_e2e.apply_setting("turbo_kernels.attention.qk_norm_rope:NUM_WARPS=2")
    assert qr.NUM_WARPS == 2
    bench_e2e.apply_setting("turbo_kernels.attention.sla:DEFAULT_CONFIG.state_blocks=3")
    assert sla.DEFAULT_CONFIG.state_blocks == 3 and before.state_blocks != 3  # a new instance
    for bad, match in (("turbo_kernels.attention.sla:NOPE=1", "has no NOPE"),
                       ("turbo_kernels.attention.sla:DEFAULT_CONFIG.nope=1", "not a dataclass with a field 'nope'"),
                       ("turbo_kernels.attention.sla:DEFAULT_CONFIG.state_blocks=four", "Python literal"),
                       ("no_colon=1", "MODULE:NAME=VALUE")):
        with pytest.raises(SystemExit, match=match):
            bench_e2e.apply_setting(bad)


def test_ab_variants_interleave_and_restore(monkeypatch):
    """bench_e2e --ab: each round runs the default, then each variant with its settings applied, and restores the
    module constants after every run (also when the run fails); malformed specs fail before anything runs."""
    import bench_e2e

    from turbo_kernels.attention import qk_norm_rope as qr
    from turbo_kernels.attention import sla

    monkeypatch.setattr(qr, "NUM_WARPS", 4)
    monkeypatch.setattr(sla, "DEFAULT_CONFIG", sla.DEFAULT_CONFIG)
    seen = []

    def dit():
        seen.append((qr.NUM_WARPS, sla.DEFAULT_CONFIG.state_blocks))

    args = SimpleNamespace(ab=["w2=turbo_kernels.attention.qk_norm_rope:NUM_WARPS=2",
                               "both=turbo_kernels.attention.qk_norm_rope:NUM_WARPS=1;"
                               "turbo_kernels.attention.sla:DEFAULT_CONFIG.state_blocks=3"], ab_rounds=2)
    fig, notes = {}, {}
    blocks = sla.DEFAULT_CONFIG.state_blocks
    bench_e2e.bench_ab(args, dit, torch.device("cpu"), fig, notes, "eager")
    assert seen == [(4, blocks), (2, blocks), (1, 3)] * 3  # an untimed round, then two timed
    assert qr.NUM_WARPS == 4 and sla.DEFAULT_CONFIG.state_blocks == blocks
    assert {"e2e_1.3b_480p_ab_w2_vs_default", "e2e_1.3b_480p_ab_both_median_s"} <= set(fig)
    assert "state_blocks=3" in notes["ab"]

    def failing():  # the variant's run fails: dropped (settings restored), the others timed
        if qr.NUM_WARPS == 2:
            raise RuntimeError("boom")
    fig, notes = {}, {}
    bench_e2e.bench_ab(SimpleNamespace(ab=args.ab, ab_rounds=1), failing, torch.device("cpu"), fig, notes, "eager")
    assert qr.NUM_WARPS == 4 and "e2e_1.3b_480p_ab_both_min_s" in fig and "e2e_1.3b_480p_ab_w2_min_s" not in fig
    assert "w2 failed: RuntimeError: boom" in notes["ab"]
    monkeypatch.setattr(qr, "NUM_WARPS", 2)  # the default itself failing ends the run
    with pytest.raises(RuntimeError):
        bench_e2e.bench_ab(SimpleNamespace(ab=args.ab[1:], ab_rounds=1), failing, torch.device("cpu"), {}, {}, "eager")
    for bad in ("nameonly", "x=", "x=no_colon_or_value"):
        with pytest.raises(SystemExit, match="--ab"):
            bench_e2e.parse_ab(bad)
