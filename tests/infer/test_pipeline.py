"""TurboPipeline on the toy DiT (random weights) and the video writers."""
import dataclasses

import numpy as np
import pytest
import torch

from turbo_infer.models.wan import WAN_CONFIGS, WanModel
from turbo_infer.pipeline import TurboPipeline, check_video_size, video_to_uint8
from turbo_infer.vae import ToyCodec
from turbo_infer.video_io import read_video, write_gif, write_mp4, write_video


class HashTextEncoder:
    """Deterministic stand-in for MiniLM: (B, 8, 384) from a per-prompt seeded generator."""

    dim = 384

    def encode(self, prompts):
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(map(ord, p)) + 7 * len(p))
            out.append(torch.randn(8, self.dim, generator=g))
        return torch.stack(out)

    def empty_embedding(self):
        return torch.zeros(1, 8, self.dim)


def random_toy_model(seed=0):
    torch.manual_seed(seed)
    model = WanModel(WAN_CONFIGS["toy"]).eval()
    for p in model.parameters():  # Wan's init zeroes the head; give every weight some signal
        torch.nn.init.normal_(p, std=0.02)
    return model


@pytest.fixture(scope="module")
def pipe():
    return TurboPipeline(random_toy_model(), HashTextEncoder(), ToyCodec(), default_shift=3.0)


SMALL = dict(num_frames=4, height=32, width=32, steps=3, progress=False)


def test_generate_shape_dtype_and_determinism(pipe):
    v = pipe.generate(["a red circle", "a blue square"], guidance=4.0, seed=1, **SMALL)
    assert v.shape == (2, 4, 32, 32, 3) and v.dtype == torch.uint8 and v.device.type == "cpu"
    assert torch.equal(v, pipe.generate(["a red circle", "a blue square"], guidance=4.0, seed=1, **SMALL))
    assert not torch.equal(v, pipe.generate(["a red circle", "a blue square"], guidance=4.0, seed=2, **SMALL))
    assert not torch.equal(v[0], v[1])
    assert v.float().std() > 1  # not a constant image


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_batched_equals_single(pipe, sampler):
    prompts = ["a red circle", "a blue square", "two stars"]
    kw = dict(SMALL, guidance=5.0, sampler=sampler)
    both = pipe.generate_latents(prompts, seed=10, **kw)
    for i, p in enumerate(prompts):  # prompt i of a batch uses seed + i
        one = pipe.generate_latents([p], seed=10 + i, **kw)
        torch.testing.assert_close(one[0], both[i], atol=1e-5, rtol=1e-5)


def test_compile_keeps_results_and_parameter_names():
    """TurboPipeline.compile (WanModel.compile_blocks, in place): same video, same state-dict keys; dynamo's
    "eager" backend here (tracing and graph breaks without Inductor's C++ build), inductor on a GPU."""
    p = TurboPipeline(random_toy_model(), HashTextEncoder(), ToyCodec(), default_shift=3.0)
    keys = list(p.transformer.state_dict())
    ref = p.generate(["a red circle"], guidance=4.0, seed=3, **SMALL)
    assert p.compile(backend="eager") is p
    assert all(b._compiled_call_impl is not None for b in p.transformer.blocks)
    assert list(p.transformer.state_dict()) == keys
    assert torch.equal(p.generate(["a red circle"], guidance=4.0, seed=3, **SMALL), ref)
    p.transformer.uncompile_blocks()
    assert all(b._compiled_call_impl is None for b in p.transformer.blocks)


def test_guidance_one_skips_the_unconditional_branch(pipe):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        pipe.generate_latents(["a"], guidance=1.0, **SMALL)
        assert calls == [1, 1, 1]
        calls.clear()
        pipe.generate_latents(["a"], guidance=3.0, **SMALL)
        assert calls == [2, 2, 2]
    finally:
        handle.remove()


def test_shift_default_and_override_change_the_result(pipe):
    a = pipe.generate_latents(["a"], guidance=1.0, **SMALL)
    b = pipe.generate_latents(["a"], guidance=1.0, shift=3.0, **SMALL)
    c = pipe.generate_latents(["a"], guidance=1.0, shift=1.0, **SMALL)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_size_and_argument_errors(pipe):
    with pytest.raises(ValueError, match="height=36 must be divisible by 8"):
        pipe.generate(["a"], height=36, **{k: v for k, v in SMALL.items() if k != "height"})
    with pytest.raises(ValueError, match="width=12"):
        pipe.generate(["a"], width=12, **{k: v for k, v in SMALL.items() if k != "width"})
    with pytest.raises(ValueError, match="num_frames"):
        pipe.generate(["a"], num_frames=0, **{k: v for k, v in SMALL.items() if k != "num_frames"})
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.generate(["a"], sampler="ddim", **SMALL)
    with pytest.raises(ValueError, match="prompts is empty"):
        pipe.generate([], **SMALL)
    with pytest.raises(ValueError, match="seed"):
        pipe.generate(["a"], seed=-1, **SMALL)
    # Wan: x8 VAE x 2 patch = 16 pixels, (F - 1) divisible by 4
    with pytest.raises(ValueError, match="num_frames=8 is invalid"):
        check_video_size(8, 480, 832, spatial_factor=8, temporal_factor=4)
    with pytest.raises(ValueError, match="height=472 must be divisible by 16"):
        check_video_size(81, 472, 832, spatial_factor=8, temporal_factor=4)
    check_video_size(81, 480, 832, spatial_factor=8, temporal_factor=4)


def test_mismatched_parts_are_refused():
    class Codec16(ToyCodec):
        latent_channels = 16

    with pytest.raises(ValueError, match="in_channels=48"):
        TurboPipeline(random_toy_model(), HashTextEncoder(), Codec16())
    enc = HashTextEncoder()
    enc.dim = 4096
    with pytest.raises(ValueError, match="text_dim=384"):
        TurboPipeline(random_toy_model(), enc, ToyCodec())


def test_toy_builder_errors(tmp_path, monkeypatch):
    import turbo_infer.pipeline as pipeline_mod

    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        TurboPipeline.toy(tmp_path / "nope.safetensors")
    monkeypatch.setattr(pipeline_mod, "TOY_TEACHER_PATH", tmp_path / "assets" / "toy_teacher.safetensors")
    with pytest.raises(FileNotFoundError, match=r"toy teacher is missing: .*assets/toy_teacher.safetensors"):
        TurboPipeline.toy()


def test_toy_world_end_to_end_from_checkpoint(tmp_path):
    """The real toy runtime: checkpoint file -> WanModel 'toy', MiniLM text encoder, ToyCodec."""
    from safetensors.torch import save_file

    model = random_toy_model(seed=3)
    ckpt = tmp_path / "toy.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    pipe = TurboPipeline.toy(ckpt)
    assert pipe.default_shift == 3.0 and pipe.fps == 8
    v = pipe.generate(["a red circle moving left"], guidance=3.0, **SMALL)
    assert v.shape == (1, 4, 32, 32, 3)
    # same weights, same seed, same text states -> same latents as the in-memory model
    ref = TurboPipeline(model, pipe.text_encoder, ToyCodec(), default_shift=3.0)
    torch.testing.assert_close(pipe.generate_latents(["a red circle moving left"], guidance=3.0, **SMALL),
                               ref.generate_latents(["a red circle moving left"], guidance=3.0, **SMALL))


def test_toy_dense_checkpoint_with_an_sla_backend_starts_untrained(tmp_path):
    """--attention sla on a dense checkpoint: the SLA model with proj_l = 0 (what 'untrained SLA' means);
    a dense run still refuses a checkpoint that lacks one of its tensors."""
    from safetensors.torch import save_file

    model = random_toy_model(seed=4)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    ckpt = tmp_path / "toy.safetensors"
    save_file(state, str(ckpt))
    pipe = TurboPipeline.toy(ckpt, attention="sla", attention_options={"topk": 0.5})
    proj = [p for n, p in pipe.transformer.named_parameters() if "proj_l" in n]
    assert proj and all(torch.count_nonzero(p) == 0 for p in proj)
    assert pipe.generate(["a red circle"], **SMALL).shape == (1, 4, 32, 32, 3)
    state.pop("blocks.1.self_attn.q.weight")
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(RuntimeError, match="blocks.1.self_attn.q.weight"):
        TurboPipeline.toy(tmp_path / "bad.safetensors")


def test_wan_world_end_to_end_on_tiny_parts(tmp_path):
    """TurboPipeline.wan with a tiny DiT, a tiny random umT5 + tokenizer and a tiny AutoencoderKLWan."""
    import json

    from diffusers import AutoencoderKLWan
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    from turbo_infer.models.wan import WanConfig

    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.train_from_iterator(["a red circle moving left", "a blue square"] * 10, trainers.UnigramTrainer(
        vocab_size=40, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    vocab = [(piece, score) for piece, score in json.loads(tk.to_str())["model"]["vocab"]]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(tmp_path / "umt5")
    UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                relative_attention_num_buckets=8)).save_pretrained(tmp_path / "umt5")
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                     latents_std=[1.0] * 4).save_pretrained(tmp_path / "vae")
    cfg = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=1, text_dim=32, in_channels=4, out_channels=4)
    model = WanModel(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "dit.safetensors"))

    pipe = TurboPipeline.wan(tmp_path / "dit.safetensors", tmp_path / "umt5", tmp_path / "vae", config=cfg)
    assert pipe.default_shift == 5.0 and pipe.text_encoder.max_length == 512
    v = pipe.generate(["a red circle"], steps=2, guidance=5.0, num_frames=5, height=16, width=32,
                      sampler="unipc", progress=False)
    assert v.shape == (1, 5, 16, 32, 3) and v.dtype == torch.uint8
    with pytest.raises(ValueError, match="num_frames=8 is invalid"):
        pipe.generate(["a"], steps=1, num_frames=8, height=16, width=16, progress=False)
    with pytest.raises(ValueError, match="height=8 must be divisible by 16"):
        pipe.generate(["a"], steps=1, num_frames=5, height=8, width=16, progress=False)
    with pytest.raises(FileNotFoundError, match="vae_path"):
        TurboPipeline.wan(tmp_path / "dit.safetensors", tmp_path / "umt5", tmp_path / "no_vae", config=cfg)
    # the VAE in bf16 (turbo-infer --vae-dtype bfloat16): same latents decoded to nearly the same video
    pipe16 = TurboPipeline.wan(tmp_path / "dit.safetensors", tmp_path / "umt5", tmp_path / "vae", config=cfg,
                               vae_dtype=torch.bfloat16)
    assert pipe16.vae.dtype == torch.bfloat16 and next(pipe16.vae.model.parameters()).dtype == torch.bfloat16
    v16 = pipe16.generate(["a red circle"], steps=2, guidance=5.0, num_frames=5, height=16, width=32,
                          sampler="unipc", progress=False)
    assert v16.shape == v.shape and v16.dtype == torch.uint8
    # bf16 keeps 8 bits of mantissa: a few uint8 levels at most on a [-1, 1] video (the DiT runs in fp32 in both)
    assert (v16.int() - v.int()).abs().float().mean() < 3.0


def test_video_to_uint8():
    v = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    u = video_to_uint8(v)
    assert u.shape == (1, 5, 1, 1, 3) and u[0, :, 0, 0, 0].tolist() == [0, 64, 128, 255, 255]


# ---------------------------------------------------------------------------------------------
# Video writers
# ---------------------------------------------------------------------------------------------
def _gradient_video(f=6, h=32, w=48):
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 5 + 20 * t) % 256, (y * 7) % 256, np.full_like(x, 40 * t % 256)], -1)
              for t in range(f)]
    return np.stack(frames).astype(np.uint8)  # (F, H, W, 3)


def test_mp4_written_and_readable(tmp_path):
    video = _gradient_video()
    path = write_mp4(tmp_path / "v.mp4", torch.from_numpy(video), fps=8)
    back = read_video(path)
    assert back.shape == video.shape and back.dtype == np.uint8
    # H.264 yuv420p is lossy: smooth gradients come back within a few levels on average
    assert np.abs(back.astype(int) - video).mean() < 6
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]  # no temporary file left


def test_mp4_odd_size_is_padded_not_rescaled(tmp_path):
    video = _gradient_video(3, 33, 47)
    back = read_video(write_mp4(tmp_path / "odd.mp4", video))
    assert back.shape == (3, 34, 48, 3)
    assert np.abs(back[:, :33, :47].astype(int) - video).mean() < 6


def test_gif_keeps_every_frame(tmp_path):
    video = np.zeros((5, 16, 16, 3), np.uint8)
    video[2:, :, :, 0] = 200  # identical consecutive frames must not be merged
    back = read_video(write_video(tmp_path / "v.gif", video, fps=4))
    assert back.shape == (5, 16, 16, 3) and np.array_equal(back, video)


def test_writer_errors(tmp_path):
    with pytest.raises(ValueError, match="suffix"):
        write_video(tmp_path / "v.avi", _gradient_video())
    with pytest.raises(TypeError, match="uint8"):
        write_mp4(tmp_path / "v.mp4", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        write_gif(tmp_path / "v.gif", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="fps"):
        write_mp4(tmp_path / "v.mp4", _gradient_video(), fps=0)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")


def test_toy_pipeline_keeps_the_checkpoints_own_config(tmp_path):
    """An SLA-merged student carries attention="sla" (and proj_l) in its file: toy() must load it as such."""
    from turbo_infer.models.wan import WanModel
    from turbo_infer.models.wan_keys import save_wan_checkpoint

    model = WanModel("toy")
    sla = WanModel(dataclasses.replace(model.config, attention="sla", attention_options={"topk": 0.5, "block_q": 64, "block_k": 16}))
    sla.load_state_dict(model.state_dict(), strict=False)
    save_wan_checkpoint(sla, tmp_path / "merged.safetensors")
    pipe = TurboPipeline.toy(tmp_path / "merged.safetensors")
    assert pipe.transformer.config.attention == "sla"
    assert pipe.transformer.config.attention_options["topk"] == 0.5
