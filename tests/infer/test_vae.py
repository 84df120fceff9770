"""Codecs: ToyCodec (exact, layout, errors) and WanVAE on a tiny random AutoencoderKLWan."""
import pytest
import torch

from turbo_infer.vae import ToyCodec, WanVAE


# ---------------------------------------------------------------------------------------------
# ToyCodec
# ---------------------------------------------------------------------------------------------
def test_toy_codec_exact_round_trip_and_shape():
    codec = ToyCodec()
    video = torch.rand(2, 3, 5, 12, 20) * 2 - 1  # odd frame count, H != W
    z = codec.encode(video)
    assert z.shape == (2, 48, 5, 3, 5) == (2, *codec.latent_shape(5, 12, 20))
    assert torch.equal(codec.decode(z), video)  # a permutation times 2: bit-exact
    assert z.min() >= -2 and z.max() <= 2  # pixels in [-1, 1] times the codec's scale 2
    assert torch.equal(z, codec.encode(video / 2) * 2)  # linear, power-of-two scale
    assert torch.equal(z.flatten().sort().values, (2 * video).flatten().sort().values)  # same values, permuted


def test_toy_codec_channel_layout():
    codec = ToyCodec()
    video = torch.randn(1, 3, 2, 8, 8)
    z = codec.encode(video)
    for c, i, j in ((0, 0, 0), (1, 2, 3), (2, 3, 1)):
        # latent channel c*16 + 4i + j holds 2 x pixel (4h + i, 4w + j) of color c
        assert torch.equal(z[:, c * 16 + 4 * i + j], 2 * video[:, c, :, i::4, j::4])


def test_toy_codec_decode_clamps_generated_latents():
    out = ToyCodec().decode(torch.full((1, 48, 1, 2, 2), 3.0))
    assert out.shape == (1, 3, 1, 8, 8) and out.max() == 1.0


def test_toy_codec_errors():
    codec = ToyCodec()
    with pytest.raises(ValueError, match="height=10"):
        codec.encode(torch.zeros(1, 3, 2, 10, 8))
    with pytest.raises(ValueError, match="width=6"):
        codec.latent_shape(2, 8, 6)
    with pytest.raises(ValueError, match="num_frames"):
        codec.latent_shape(0, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        codec.encode(torch.zeros(1, 4, 2, 8, 8))
    with pytest.raises(ValueError, match="latents"):
        codec.decode(torch.zeros(1, 16, 2, 2, 2))


# ---------------------------------------------------------------------------------------------
# WanVAE
# ---------------------------------------------------------------------------------------------
MEAN = [0.1, -0.2, 0.3, 0.0]
STD = [1.5, 0.5, 2.0, 1.0]


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    # 4 stages -> x8 spatial, two temporal downsamples -> x4 temporal, as Wan2.1; ~0.2M params
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True], latents_mean=MEAN, latents_std=STD)
    root = tmp_path_factory.mktemp("wan_repo")
    vae.save_pretrained(root / "vae")  # diffusers repo layout: <root>/vae/config.json
    return root


def test_wan_vae_shapes_and_factors(tiny_vae_dir):
    vae = WanVAE(tiny_vae_dir / "vae")
    assert (vae.latent_channels, vae.spatial_factor, vae.temporal_factor) == (4, 8, 4)
    assert vae.latent_shape(5, 16, 24) == (4, 2, 2, 3)
    assert vae.latent_shape(81, 480, 832) == (4, 21, 60, 104)


def test_wan_vae_normalization_matches_wan_pipeline(tiny_vae_dir):
    vae = WanVAE(tiny_vae_dir)  # repo root: resolves vae/
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 4, 2, 2, 2)
    mean = torch.tensor(MEAN).view(1, 4, 1, 1, 1)
    std = torch.tensor(STD).view(1, 4, 1, 1, 1)
    raw = vae.full_model.encode(video).latent_dist.mode()
    torch.testing.assert_close(z, (raw - mean) / std)  # Wan: (mu - mean) * (1 / std)
    # decode inverts the normalization as WanPipeline does: latents / (1/std) + mean
    out = vae.decode(z)
    ref = vae.full_model.decode(z / (1.0 / std) + mean, return_dict=False)[0].clamp(-1, 1)  # diffusers decodes
    assert vae.native and out.shape == (1, 3, 5, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # the runtime's decoder vs diffusers'
    assert out.min() >= -1 and out.max() <= 1


def test_wan_vae_falls_back_to_diffusers_where_its_decoder_refuses(tiny_vae_dir, monkeypatch, caplog):
    """A VAE the runtime's decoder does not reproduce (its from_dir raises ValueError naming the field) is
    decoded by diffusers, logged; same video."""
    from turbo_infer.models.wan_vae import WanVAEDecoder

    z = torch.randn(1, 4, 2, 2, 2)
    ref = WanVAE(tiny_vae_dir / "vae").decode(z)

    def refuse(*a, **k):
        raise ValueError("config.json: field 'is_residual' is True")

    monkeypatch.setattr(WanVAEDecoder, "from_dir", refuse)
    with caplog.at_level("WARNING", logger="turbo_infer.vae"):
        vae = WanVAE(tiny_vae_dir / "vae")
    assert not vae.native and vae.full_model is vae.model and "is_residual" in caplog.text
    torch.testing.assert_close(vae.decode(z), ref, atol=1e-5, rtol=1e-5)


def test_wan_vae_channels_last_conv3d_weights_decode_the_same(tiny_vae_dir):
    """Channels-last Conv3d weights (the default on CUDA, measured faster there) change the kernels,
    not the result; on the CPU the default stays contiguous. Tolerance: fp32 convolutions summed in
    another order (~1e-6 relative)."""
    conv3d = lambda vae: [m.weight for m in vae.model.modules() if isinstance(m, torch.nn.Conv3d)]  # noqa: E731
    plain, last = WanVAE(tiny_vae_dir / "vae"), WanVAE(tiny_vae_dir / "vae", channels_last=True)
    assert not plain.channels_last and all(w.is_contiguous() for w in conv3d(plain))
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in conv3d(last))
    z = torch.randn(1, 4, 2, 2, 2)
    torch.testing.assert_close(last.decode(z), plain.decode(z), atol=1e-5, rtol=1e-5)
    last.to(dtype=torch.float32)  # a move keeps the layout
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in conv3d(last))


def test_wan_vae_errors(tiny_vae_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        WanVAE(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        WanVAE(tmp_path)
    vae = WanVAE(tiny_vae_dir / "vae")
    with pytest.raises(ValueError, match="num_frames=8"):
        vae.latent_shape(8, 16, 16)
    with pytest.raises(ValueError, match="height=12"):
        vae.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2))


def test_wan_vae_staged_load_equals_from_pretrained(tiny_vae_dir, tmp_path):
    """WanVAE's GPU loader (meta-device model filled by turbo_infer.fastload), run on the CPU with its
    staged reads: the same weights and decode as from_pretrained; None (use from_pretrained) where it
    cannot load exactly."""
    import shutil

    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file, save_file

    from turbo_infer.vae import load_vae_staged

    ref = AutoencoderKLWan.from_pretrained(str(tiny_vae_dir / "vae")).eval()
    got = load_vae_staged(AutoencoderKLWan, tiny_vae_dir / "vae", torch.device("cpu"), torch.float32)
    assert got is not None and not got.training
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert set(ref_sd) == set(got_sd) and all(torch.equal(got_sd[k], v) for k, v in ref_sd.items())
    z = torch.randn(1, 4, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(got.decode(z).sample, ref.decode(z).sample)
    odd = tmp_path / "vae"
    shutil.copytree(tiny_vae_dir / "vae", odd)
    sd = load_file(str(odd / "diffusion_pytorch_model.safetensors"))
    sd.pop(next(iter(sd)))  # a weight missing: not loadable exactly
    save_file(sd, str(odd / "diffusion_pytorch_model.safetensors"))
    assert load_vae_staged(AutoencoderKLWan, odd, torch.device("cpu"), torch.float32) is None
