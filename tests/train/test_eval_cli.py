"""turbo-eval end to end on a few prompts: a tiny toy checkpoint and the bundle exported from it,
scored by the shipped judge; and the CLI's refusals. (The figures themselves are in
benchmarks/toy.json and are reproduced by the same command at full size.)"""
import json

import numpy as np
import pytest
import torch

from turbo_infer.models.wan import WanConfig, WanModel
from turbo_infer.models.wan_keys import save_wan_checkpoint
from turbo_train.eval import main

TINY = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=384, in_channels=48, out_channels=48)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = WanModel(TINY).eval()
    for p in model.parameters():  # Wan zero-inits the head: give every weight some signal
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_wan_checkpoint(model, path)
    return path


def run(args, out):
    assert main([*args, "--num-prompts", "2", "--diversity-prompts", "2", "--diversity-seeds", "2",
                 "--out-dir", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "contact_sheet.png").stat().st_size > 0
    assert 0.0 <= report["adherence"] <= 1.0 and report["frechet"] >= 0 and report["s_per_video"] > 0
    assert set(report["per_attribute_accuracy"]) >= {"background", "obj1.shape", "obj1.color", "obj1.motion"}
    per = report["adherence_per_video"]  # in prompt order, for paired comparisons of two runs
    assert len(per) == report["settings"]["num_prompts"] and sum(per) / len(per) == pytest.approx(report["adherence"])
    assert report["adherence_stderr"] >= 0 and report["frechet_stderr"] >= 0
    div = report["diversity_per_prompt"]  # per diversity prompt, same seeds for every model: paired ratios
    assert len(div) == 2 and sum(div) / 2 == pytest.approx(report["diversity"])
    assert report["diversity_stderr"] == pytest.approx(abs(div[0] - div[1]) / 2)  # sd(ddof 1) / sqrt(2) of two
    feats = np.load(out / "features.npz")  # the Fréchet distance's two sets, for paired comparisons
    assert feats["generated"].shape == feats["real"].shape == (2, feats["real"].shape[1])
    return report


def test_checkpoint_end_to_end(tiny_checkpoint, tmp_path, capsys):
    report = run(["--checkpoint", str(tiny_checkpoint), "--steps", "2", "--guidance", "2"], tmp_path / "a")
    assert report["settings"]["steps"] == 2 and report["settings"]["sampler"] == "euler"
    assert report["checkpoint"] == str(tiny_checkpoint)
    assert "adherence" in capsys.readouterr().out
    # deterministic: the same command gives the same report
    again = run(["--checkpoint", str(tiny_checkpoint), "--steps", "2", "--guidance", "2"], tmp_path / "b")
    assert again["adherence"] == report["adherence"] and again["frechet"] == pytest.approx(report["frechet"])


def test_bundle_end_to_end_uses_the_bundles_sampler(tiny_checkpoint, tmp_path):
    from turbo_train.export import export_bundle

    bundle = export_bundle(tiny_checkpoint, "cpu", tmp_path / "bundles", steps=2, progress=False)
    report = run(["--bundle", str(bundle)], tmp_path / "eval")
    assert report["settings"]["sampler"] == "rcm" and report["settings"]["steps"] == 2
    assert report["checkpoint"].startswith("bundle ")


def test_gpu_bundle_on_the_cpu_only_with_allow_reference(tiny_checkpoint, tmp_path, capsys):
    """An h100 bundle (fp8 W8A8 linears) is refused on the CPU with the bundle to use instead; --allow-reference
    evaluates it through the torch references (which emulate the fp8 arithmetic)."""
    import torch

    from turbo_train.export import export_bundle

    if torch.cuda.is_available():
        pytest.skip("a GPU here may run the h100 target natively")
    bundle = export_bundle(tiny_checkpoint, "h100", tmp_path / "bundles", steps=2, progress=False)
    with pytest.raises(SystemExit):
        run(["--bundle", str(bundle)], tmp_path / "refused")
    err = capsys.readouterr().err
    assert "cannot run an h100 bundle" in err and "turbo-eval --allow-reference" in err
    report = run(["--bundle", str(bundle), "--allow-reference"], tmp_path / "eval")
    assert report["settings"]["steps"] == 2 and report["checkpoint"].startswith("bundle ")
    with pytest.raises(SystemExit):
        main(["--allow-reference"])
    assert "only with --bundle" in capsys.readouterr().err


def test_cli_refusals(tiny_checkpoint, tmp_path, capsys):
    def error(args, match):
        with pytest.raises(SystemExit):
            main(args)
        assert match in capsys.readouterr().err

    error(["--checkpoint", str(tmp_path / "missing.safetensors")], "missing.safetensors")
    error(["--bundle", str(tmp_path)], "no manifest.json")
    error(["--bundle", str(tmp_path), "--checkpoint", str(tiny_checkpoint)], "drop --checkpoint")
    error(["--checkpoint", str(tiny_checkpoint), "--sampler", "rcm", "--steps", "8"], "--steps 1..4")
    error(["--num-prompts", "1"], "--num-prompts")
    error(["--diversity-prompts", "-1"], "--diversity-prompts")
    error(["--diversity-seeds", "1"], "--diversity-seeds")
    # the diversity prompts are the first evaluation prompts: more of them than prompts is refused, not capped
    error(["--num-prompts", "4", "--diversity-prompts", "8"], "must be <= --num-prompts (4)")
    error(["--frechet-bootstrap", "1"], "--frechet-bootstrap")


def test_diversity_can_be_skipped(tiny_checkpoint, tmp_path, capsys):
    # --diversity-prompts 0 (a quicker evaluation) used to fail after all the sampling, in diversity()
    assert main(["--checkpoint", str(tiny_checkpoint), "--steps", "2", "--num-prompts", "2", "--diversity-prompts", "0",
                 "--out-dir", str(tmp_path), "--no-progress"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["diversity"] is None and report["diversity_real"] is None and report["frechet"] >= 0
    assert report["diversity_per_prompt"] is None and report["diversity_stderr"] is None
    assert "diversity not measured" in capsys.readouterr().out


def test_reference_fidelity(tiny_checkpoint, tmp_path, capsys):
    """--save-videos then --reference: a model against its own videos is a perfect match (PSNR at the
    100 dB cap, feature distance 0); an SLA variant of the same weights scores lower, finitely."""
    common = ["--checkpoint", str(tiny_checkpoint), "--steps", "2", "--num-prompts", "2", "--diversity-prompts", "0",
              "--no-progress"]
    assert main([*common, "--out-dir", str(tmp_path / "ref"), "--save-videos"]) == 0
    assert (tmp_path / "ref" / "videos.npz").is_file()
    assert main([*common, "--out-dir", str(tmp_path / "same"), "--reference", str(tmp_path / "ref")]) == 0
    same = json.loads((tmp_path / "same" / "report.json").read_text())
    assert same["fidelity_psnr_db"] == 100.0 and same["fidelity_feature_dist"] == 0.0
    assert "fidelity to" in capsys.readouterr().out
    assert main([*common, "--out-dir", str(tmp_path / "sla"), "--reference", str(tmp_path / "ref" / "videos.npz"),
                 "--attention", "sla", "--topk", "0.25", "--block-q", "16", "--block-k", "16"]) == 0
    sla = json.loads((tmp_path / "sla" / "report.json").read_text())
    assert 0 < sla["fidelity_psnr_db"] < 100.0 and sla["fidelity_feature_dist"] > 0


def test_reference_refusals(tiny_checkpoint, tmp_path, capsys):
    import numpy as np

    def error(args, match):
        with pytest.raises(SystemExit):
            main(["--checkpoint", str(tiny_checkpoint), "--num-prompts", "2", *args])
        assert match in capsys.readouterr().err

    error(["--reference", str(tmp_path)], "videos.npz not found")
    (tmp_path / "videos.npz").write_bytes(b"not a zip")
    error(["--reference", str(tmp_path)], "is not a turbo-eval videos file")
    from turbo_train.eval import eval_prompts, save_videos

    captions = [c for c, _, _ in eval_prompts(2, 0)]
    save_videos(tmp_path / "videos.npz", np.zeros((2, 2, 4, 4, 3), np.uint8), captions, seed=0)
    error(["--reference", str(tmp_path), "--seed", "1"], "same --num-prompts and --seed")
    error(["--reference", str(tmp_path), "--num-prompts", "3"], "same --num-prompts and --seed")
    assert not list(tmp_path.glob("*.tmp*"))  # the atomic write left no temporary file


def test_rcm_mid_times_reach_the_sampler_and_the_report(tiny_checkpoint, tmp_path):
    """--rcm-mid-times: another 4-step grid changes the videos and is recorded; bad grids are refused."""
    from turbo_infer.samplers import shifted_mid_times

    base = ["--checkpoint", str(tiny_checkpoint), "--sampler", "rcm", "--steps", "4", "--save-videos"]
    spec = run(base, tmp_path / "spec")
    toy = run(base + ["--rcm-mid-times", "shift=3"], tmp_path / "toy")
    assert toy["settings"]["sampler_options"]["mid_times"] == pytest.approx(list(shifted_mid_times(3.0)))
    assert "sampler_options" not in spec["settings"]
    a, b = (np.load(tmp_path / d / "videos.npz")["videos"] for d in ("spec", "toy"))
    assert not np.array_equal(a, b)  # same seeds, other intermediate times
    for bad, msg in ((["--rcm-mid-times", "1.0,1.4,1.5"], "strictly decreasing"),
                     (["--rcm-mid-times", "shift=x"], "needs a number"),
                     (["--rcm-mid-times", "1.4,1.0"], "needs 3 --rcm-mid-times")):
        with pytest.raises(SystemExit):
            main(base + bad + ["--out-dir", str(tmp_path / "bad")])
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tiny_checkpoint), "--rcm-mid-times", "shift=3", "--out-dir", str(tmp_path / "e")])
