"""`turbo-infer` CLI: every error path exits through argparse naming the option/path; one real run."""
import pytest
import torch

from turbo_infer.cli import main


@pytest.fixture
def toy_ckpt(tmp_path):
    from safetensors.torch import save_file

    from turbo_infer.models.wan import WAN_CONFIGS, WanModel

    model = WanModel(WAN_CONFIGS["toy"])
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    path = tmp_path / "toy.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _fails(capsys, argv, *needles):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--checkpoint", "--config", "--prompt", "--prompts-file", "--sampler", "--out", "--device"):
        assert opt in out


def test_missing_checkpoint(capsys, tmp_path):
    _fails(capsys, ["--checkpoint", str(tmp_path / "nope.safetensors"), "--prompt", "a"],
           "--checkpoint", "nope.safetensors", "does not exist")


def test_missing_shipped_toy_teacher(capsys, tmp_path, monkeypatch):
    import turbo_infer.pipeline as pipeline_mod

    monkeypatch.setattr(pipeline_mod, "TOY_TEACHER_PATH", tmp_path / "assets" / "toy_teacher.safetensors")
    _fails(capsys, ["--prompt", "a"], "--checkpoint", "toy teacher is missing", "toy_teacher.safetensors")


def test_unknown_config(capsys, toy_ckpt):
    _fails(capsys, ["--config", "wan9", "--checkpoint", str(toy_ckpt), "--prompt", "a"], "--config", "wan9")


def test_unknown_sampler(capsys, toy_ckpt):
    _fails(capsys, ["--sampler", "ddim", "--checkpoint", str(toy_ckpt), "--prompt", "a"], "--sampler", "ddim")


def test_empty_prompts(capsys, toy_ckpt, tmp_path):
    _fails(capsys, ["--checkpoint", str(toy_ckpt), "--prompt", "a", "--prompt", "   "], "--prompt", "prompt 2 is empty")
    blank = tmp_path / "prompts.txt"
    blank.write_text("\n  \n")
    _fails(capsys, ["--checkpoint", str(toy_ckpt), "--prompts-file", str(blank)], "--prompts-file", "no prompts")
    _fails(capsys, ["--checkpoint", str(toy_ckpt), "--prompts-file", str(tmp_path / "none.txt")],
           "--prompts-file", "none.txt")
    _fails(capsys, ["--checkpoint", str(toy_ckpt)], "--prompt")  # neither given


@pytest.mark.parametrize("args,needle", [
    (["--height", "60"], "--height: height=60 must be divisible by 8"),
    (["--width", "0"], "--width: width must be a positive int"),
    (["--frames", "0"], "--frames"),
    (["--steps", "0"], "--steps"),
    (["--shift", "-2"], "--shift"),
    (["--guidance", "-1"], "--guidance"),
    (["--out", "video.avi"], "--out"),
    (["--vae", "."], "--vae: only for Wan configs"),
    (["--vae-dtype", "bfloat16"], "--vae-dtype: only for Wan configs"),
    (["--vae-dtype", "float16"], "--vae-dtype"),
    (["--sampler", "rcm", "--rcm-mid-times", "1.0,1.2"], "--rcm-mid-times"),
    (["--sampler", "rcm", "--rcm-mid-times", "shift=-1"], "--rcm-mid-times"),
    (["--rcm-mid-times", "shift=3"], "--rcm-mid-times: only with --sampler rcm"),
])
def test_bad_values(capsys, toy_ckpt, args, needle):
    _fails(capsys, ["--checkpoint", str(toy_ckpt), "--prompt", "a", *args], needle)


def test_wan_config_requirements(capsys, tmp_path, toy_ckpt):
    base = ["--config", "wan2.1-1.3b", "--prompt", "a"]
    _fails(capsys, base, "--checkpoint: required for --config wan2.1-1.3b")
    _fails(capsys, [*base, "--checkpoint", str(toy_ckpt)], "--text-encoder: required")
    _fails(capsys, [*base, "--checkpoint", str(toy_ckpt), "--text-encoder", str(tmp_path)], "--vae: required")
    _fails(capsys, [*base, "--checkpoint", str(toy_ckpt), "--text-encoder", str(tmp_path / "umt5")],
           "--text-encoder", "umt5")
    full = [*base, "--checkpoint", str(toy_ckpt), "--text-encoder", str(tmp_path), "--vae", str(tmp_path)]
    # Wan sizes: (F - 1) % 4 == 0 and H, W multiples of 16; checked before anything is loaded
    _fails(capsys, [*full, "--frames", "8"], "--frames: num_frames=8 is invalid")
    _fails(capsys, [*full, "--width", "840"], "--width: width=840 must be divisible by 16")


def test_bad_device(capsys, toy_ckpt):
    _fails(capsys, ["--checkpoint", str(toy_ckpt), "--prompt", "a", "--device", "warp9"], "--device")


def test_generates_one_file_per_prompt(capsys, toy_ckpt, tmp_path):
    from turbo_infer.video_io import read_video

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n\na blue square moving up\n")
    out = tmp_path / "videos" / "clip.mp4"
    rc = main(["--checkpoint", str(toy_ckpt), "--prompts-file", str(prompts), "--steps", "2", "--frames", "3",
               "--height", "32", "--width", "40", "--sampler", "unipc", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    for i in range(2):
        path = tmp_path / "videos" / f"clip_{i:03d}.mp4"
        assert str(path) in printed
        assert read_video(path).shape == (3, 32, 40, 3)
    # gif by suffix, a single prompt keeps the exact name
    gif = tmp_path / "one.gif"
    assert main(["--checkpoint", str(toy_ckpt), "--prompt", "a star", "--steps", "1", "--frames", "2",
                 "--height", "16", "--width", "16", "--out", str(gif), "--no-progress"]) == 0
    assert read_video(gif).shape == (2, 16, 16, 3)


def test_compile_flag_compiles_before_generating(toy_ckpt, tmp_path, monkeypatch):
    from turbo_infer.pipeline import TurboPipeline

    calls = []
    monkeypatch.setattr(TurboPipeline, "compile", lambda self, *a, **k: calls.append(self) or self)
    out = tmp_path / "v.gif"
    assert main(["--checkpoint", str(toy_ckpt), "--prompt", "a", "--frames", "2", "--height", "32", "--width", "32",
                 "--steps", "1", "--out", str(out), "--no-progress", "--compile"]) == 0
    assert len(calls) == 1 and out.is_file()


def test_cuda_graphs_flag_hands_the_sampler_the_graphed_dit(toy_ckpt, tmp_path, monkeypatch):
    """--cuda-graphs: the sampler gets GraphedDiT (on the CPU it runs the model itself: same video as without);
    with --num-gpus it is refused."""
    from turbo_infer import samplers
    from turbo_infer.cuda_graph import GraphedDiT
    from turbo_infer.video_io import read_video

    seen = []
    real = samplers.FlowEulerSampler.sample

    def spy(self, model, *a, **k):
        seen.append(model)
        return real(self, model, *a, **k)

    monkeypatch.setattr(samplers.FlowEulerSampler, "sample", spy)
    args = ["--checkpoint", str(toy_ckpt), "--prompt", "a", "--frames", "2", "--height", "32", "--width", "32",
            "--steps", "1", "--no-progress", "--sampler", "euler"]
    assert main(args + ["--out", str(tmp_path / "g.gif"), "--cuda-graphs"]) == 0
    assert main(args + ["--out", str(tmp_path / "p.gif")]) == 0
    assert isinstance(seen[0], GraphedDiT) and not isinstance(seen[1], GraphedDiT)
    assert (read_video(tmp_path / "g.gif") == read_video(tmp_path / "p.gif")).all()
    with pytest.raises(SystemExit):
        main(args + ["--out", str(tmp_path / "x.gif"), "--cuda-graphs", "--num-gpus", "2", "--device", "cpu"])


def test_rcm_mid_times_reach_the_sampler(toy_ckpt, tmp_path, monkeypatch):
    from turbo_infer import samplers

    seen = []
    real = samplers.RCMSampler.sample

    def spy(self, *a, **k):
        seen.append(self.mid_times)
        return real(self, *a, **k)

    monkeypatch.setattr(samplers.RCMSampler, "sample", spy)
    assert main(["--checkpoint", str(toy_ckpt), "--prompt", "a star", "--sampler", "rcm", "--steps", "4",
                 "--rcm-mid-times", "shift=3", "--frames", "2", "--height", "16", "--width", "16",
                 "--out", str(tmp_path / "a.mp4"), "--no-progress"]) == 0
    assert seen == [pytest.approx(samplers.shifted_mid_times(3.0))]
